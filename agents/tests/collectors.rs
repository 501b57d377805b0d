#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Collectors against the real thing: processes this test starts, packets
//! on `lo` and in a capture file this test writes.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use amoskys_agents::collectors::{flow, process};
use amoskys_agents::config::{FlowConfig, ProcessConfig, ProcessMode};
use amoskys_agents::spool::Draft;
use amoskys_proto::event::Payload;
use amoskys_proto::process_event::Kind;
use amoskys_proto::{FlowEvent, ProcessEvent};
use common::{harness, metric};

fn proc_events(got: &[Draft], pid: u32) -> Vec<ProcessEvent> {
    got.iter()
        .filter_map(|d| match &d.payload {
            Payload::Process(p) if p.pid == pid => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn has(got: &[Draft], pid: u32, kind: Kind) -> bool {
    proc_events(got, pid).iter().any(|p| p.kind == kind as i32)
}

async fn wait_mode(reg: &amoskys_agents::collectors::context::Registry, want: &str) {
    for _ in 0..100 {
        if reg.statuses().first().is_some_and(|s| s.mode == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("collector never reached mode {want}: {:?}", reg.statuses());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netlink_reports_a_50ms_process_with_pid_ppid_and_cmdline() {
    let (ctx, mut h) = harness(process::NAME, Some(Duration::from_secs(1)));
    let task = process::spawn(
        ProcessConfig {
            mode: ProcessMode::Netlink,
            poll_interval: Duration::from_secs(1),
        },
        ctx,
    )
    .unwrap()
    .unwrap();
    // This test runs as root in CI; without CAP_NET_ADMIN the mode would be "poll".
    wait_mode(&h.registry, "netlink").await;
    // Let the start-up snapshot go by.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = std::process::Command::new("sleep")
        .arg("0.05")
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(status.success());
    let got = h
        .until(Duration::from_secs(10), |g| has(g, pid, Kind::Exit))
        .await;
    let evs = proc_events(&got, pid);
    let start = evs
        .iter()
        .find(|p| p.kind == Kind::Start as i32)
        .expect("start event");
    assert_eq!(start.ppid, std::process::id());
    assert_eq!(start.cmdline, vec!["sleep", "0.05"]);
    assert!(start.exe.ends_with("sleep"), "{}", start.exe);
    assert_eq!(start.source, "netlink");
    assert!(start.start_time > 0);
    let exit = evs.iter().find(|p| p.kind == Kind::Exit as i32).unwrap();
    assert_eq!(exit.exit_code, 0);
    assert_eq!(exit.cmdline, start.cmdline, "exit carries what start saw");

    // A non-zero exit code comes through as well.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "exit 7"])
        .spawn()
        .unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let got = h
        .until(Duration::from_secs(10), |g| has(g, pid, Kind::Exit))
        .await;
    let exit = proc_events(&got, pid)
        .into_iter()
        .find(|p| p.kind == Kind::Exit as i32)
        .unwrap();
    assert_eq!(exit.exit_code, 7);
    assert_eq!(h.metrics.process_polling_fallback.get(), 0);
    h.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_reports_a_process_when_forced_by_config() {
    let (ctx, mut h) = harness(process::NAME, Some(Duration::from_millis(100)));
    let task = process::spawn(
        ProcessConfig {
            mode: ProcessMode::Poll,
            poll_interval: Duration::from_millis(100),
        },
        ctx,
    )
    .unwrap()
    .unwrap();
    wait_mode(&h.registry, "poll").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = std::process::Command::new("sleep")
        .arg("1.5")
        .spawn()
        .unwrap();
    let pid = child.id();
    let got = h
        .until(Duration::from_secs(10), |g| has(g, pid, Kind::Start))
        .await;
    let start = proc_events(&got, pid)
        .into_iter()
        .find(|p| p.kind == Kind::Start as i32)
        .expect("start event");
    assert_eq!(start.ppid, std::process::id());
    assert_eq!(start.cmdline, vec!["sleep", "1.5"]);
    assert_eq!(start.source, "poll");
    child.wait().unwrap();
    let got = h
        .until(Duration::from_secs(10), |g| has(g, pid, Kind::Exit))
        .await;
    assert!(has(&got, pid, Kind::Exit));
    assert_eq!(h.registry.statuses()[0].mode, "poll");
    h.stop.cancel();
    task.await.unwrap();
}

fn flows(got: &[Draft]) -> Vec<FlowEvent> {
    got.iter()
        .filter_map(|d| match &d.payload {
            Payload::Flow(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// Sums the records of one direction (a long flow may span several).
fn total(fs: &[FlowEvent], proto: u32, src_port: u16, dst_port: u16) -> (u64, u64, u64, u32) {
    fs.iter()
        .filter(|f| {
            f.protocol == proto
                && f.src_port == u32::from(src_port)
                && f.dst_port == u32::from(dst_port)
        })
        .fold((0, 0, 0, 0), |a, f| {
            (
                a.0 + f.packets,
                a.1 + f.bytes,
                a.2 + f.payload_bytes,
                a.3 | f.tcp_flags,
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_capture_on_lo_counts_tcp_and_udp_exactly() {
    let udp_a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pa, pb) = (
        udp_a.local_addr().unwrap().port(),
        udp_b.local_addr().unwrap().port(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pl = listener.local_addr().unwrap().port();
    let cfg = FlowConfig {
        interface: "lo".into(),
        bpf_filter: format!("(udp and port {pb}) or (tcp and port {pl})"),
        pcap_file: None,
        idle_timeout: Duration::from_secs(1),
        active_timeout: Duration::from_secs(60),
        max_flows: 1000,
        snaplen: 128,
        owner_interval: None,
    };
    let (ctx, mut h) = harness(flow::NAME, None);
    let task = flow::spawn(cfg, ctx)
        .unwrap()
        .expect("capture on lo (needs CAP_NET_RAW; CI runs as root)");
    tokio::time::sleep(Duration::from_millis(500)).await;

    for _ in 0..10 {
        udp_a.send_to(&[7u8; 100], ("127.0.0.1", pb)).unwrap();
    }
    let mut buf = [0u8; 200];
    for _ in 0..10 {
        udp_b.recv_from(&mut buf).unwrap();
    }
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = vec![0u8; 5000];
        s.read_exact(&mut got).unwrap();
        s.write_all(&[1u8; 1234]).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", pl)).unwrap();
    let pc = c.local_addr().unwrap().port();
    c.write_all(&[2u8; 5000]).unwrap();
    let mut back = vec![0u8; 1234];
    c.read_exact(&mut back).unwrap();
    drop(c);
    server.join().unwrap();

    let got = h
        .until(Duration::from_secs(15), |g| {
            let f = flows(g);
            total(&f, 17, pa, pb).0 >= 10
                && total(&f, 6, pc, pl).2 >= 5000
                && total(&f, 6, pl, pc).2 >= 1234
        })
        .await;
    let f = flows(&got);
    let udp = total(&f, 17, pa, pb);
    assert_eq!(udp.0, 10, "UDP packets");
    assert_eq!(udp.2, 1000, "UDP payload bytes");
    assert_eq!(udp.1, 10 * (100 + 8 + 20), "UDP IP bytes");
    let up = total(&f, 6, pc, pl);
    let down = total(&f, 6, pl, pc);
    assert_eq!(up.2, 5000, "client -> server payload bytes");
    assert_eq!(down.2, 1234, "server -> client payload bytes");
    assert!(
        up.3 & 0x02 != 0 && up.3 & 0x01 != 0,
        "SYN and FIN seen: {:#x}",
        up.3
    );
    assert!(
        f.iter()
            .all(|r| r.interface == "lo" && r.end_reason == "idle")
    );
    let text = h.metrics.encode();
    assert!(metric(&text, "amoskys_agent_flow_exported_total") >= 3.0);
    h.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_flows_name_the_process_that_owns_each_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = FlowConfig {
        interface: "lo".into(),
        bpf_filter: format!("tcp and port {port}"),
        pcap_file: None,
        idle_timeout: Duration::from_secs(1),
        active_timeout: Duration::from_secs(60),
        max_flows: 1000,
        snaplen: 128,
        owner_interval: Some(Duration::from_millis(100)),
    };
    let (ctx, mut h) = harness(flow::NAME, None);
    let task = flow::spawn(cfg, ctx)
        .unwrap()
        .expect("capture on lo (needs CAP_NET_RAW; CI runs as root)");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The server is this process; the client is a bash holding its
    // connection open a while, as a real client would (builtins only, and
    // the sleep does not inherit the socket: bash is its only holder).
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"welcome").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        peer.port()
    });
    let mut client = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; printf hello >&3; read -r -N 7 reply <&3; sleep 1 3>&-; true"
        ))
        .spawn()
        .unwrap();
    let client_pid = client.id();
    assert!(client.wait().unwrap().success());
    let client_port = server.join().unwrap();

    let got = h
        .until(Duration::from_secs(15), |g| {
            let f = flows(g);
            total(&f, 6, client_port, port).2 >= 5 && total(&f, 6, port, client_port).2 >= 7
        })
        .await;
    let f = flows(&got);
    let up: Vec<_> = f.iter().filter(|r| r.dst_port == u32::from(port)).collect();
    let down: Vec<_> = f.iter().filter(|r| r.src_port == u32::from(port)).collect();
    for r in &up {
        assert_eq!(
            (r.pid, r.process.as_str(), r.owner.as_str()),
            (client_pid, "bash", "socket"),
            "client -> server is the client's: {r:?}"
        );
        assert!(r.exe.ends_with("bash"), "{r:?}");
    }
    for r in &down {
        // The accepted socket, or the listener if the reply's first packet
        // was looked up before accept(): either way this process.
        assert_eq!(r.pid, std::process::id(), "server -> client: {r:?}");
        assert!(["socket", "listener"].contains(&r.owner.as_str()), "{r:?}");
        assert_eq!(
            r.exe,
            std::fs::read_link("/proc/self/exe")
                .unwrap()
                .to_string_lossy()
        );
    }
    let text = h.metrics.encode();
    assert!(
        metric(
            &text,
            "amoskys_agent_flow_owner_lookups_total{result=\"socket\"}"
        ) >= 1.0,
        "{text}"
    );
    h.stop.cancel();
    task.await.unwrap();
}

fn write_pcap(path: &std::path::Path, packets: &[(i64, Vec<u8>)]) {
    let cap = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();
    let mut out = cap.savefile(path).unwrap();
    for (usec, data) in packets {
        let header = pcap::PacketHeader {
            ts: libc::timeval {
                tv_sec: (usec / 1_000_000) as libc::time_t,
                tv_usec: (usec % 1_000_000) as libc::suseconds_t,
            },
            caplen: data.len() as u32,
            len: data.len() as u32,
        };
        out.write(&pcap::Packet::new(&header, data));
    }
    out.flush().unwrap();
}

fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &vec![0u8; payload])
        .unwrap();
    v
}

fn tcp(sp: u16, dp: u16, payload: usize, syn: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(sp, dp, 1, 1000);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut v, &vec![0u8; payload]).unwrap();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_file_gives_exact_flows_and_skips_bad_packets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.pcap");
    let s = 1_000_000i64;
    let base = 1_700_000_000 * s;
    let mut truncated = udp([10, 0, 0, 1], [10, 0, 0, 3], 1, 2, 10);
    truncated.truncate(20);
    write_pcap(
        &path,
        &[
            (base, udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53, 50)),
            (base + s, udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53, 50)),
            (
                base + 2 * s,
                udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53, 70),
            ),
            (base + 2 * s, tcp(40000, 443, 0, true)),
            (base + 3 * s, tcp(40000, 443, 300, false)),
            (base + 3 * s, truncated),
            // 100 s later: the UDP flow has gone idle (15 s) by packet time.
            (base + 100 * s, udp([10, 0, 0, 9], [10, 0, 0, 2], 5, 6, 1)),
        ],
    );
    let cfg = FlowConfig {
        interface: String::new(),
        bpf_filter: String::new(),
        pcap_file: Some(path.clone()),
        idle_timeout: Duration::from_secs(15),
        active_timeout: Duration::from_secs(60),
        max_flows: 1000,
        snaplen: 128,
        // Ignored for a file: its sockets are not this host's.
        owner_interval: Some(Duration::from_millis(10)),
    };
    let (ctx, mut h) = harness(flow::NAME, None);
    let task = flow::spawn(cfg, ctx).unwrap().unwrap();
    task.await.unwrap();
    let got = h
        .until(Duration::from_secs(5), |g| flows(g).len() >= 3)
        .await;
    let f = flows(&got);
    assert_eq!(f.len(), 3, "{f:?}");
    let d = f.iter().find(|x| x.dst_port == 53).unwrap();
    assert_eq!(
        (d.packets, d.payload_bytes, d.bytes),
        (3, 170, 3 * 28 + 170)
    );
    assert_eq!(d.end_reason, "idle");
    assert_eq!(d.first_seen, base * 1000);
    assert_eq!(d.last_seen, (base + 2 * s) * 1000);
    assert!(f.iter().all(|x| x.pid == 0 && x.owner.is_empty()));
    let t = f.iter().find(|x| x.dst_port == 443).unwrap();
    assert_eq!((t.packets, t.payload_bytes), (2, 300));
    assert_eq!(t.tcp_flags & 0x12, 0x12);
    assert_eq!(t.end_reason, "idle");
    let last = f.iter().find(|x| x.dst_port == 6).unwrap();
    assert_eq!(
        last.end_reason, "shutdown",
        "what is left at the end of the file"
    );
    let text = h.metrics.encode();
    assert_eq!(
        metric(
            &text,
            "amoskys_agent_flow_malformed_packets_total{reason=\"truncated\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "amoskys_agent_flow_packets_total"), 7.0);

    // A file that is not a capture is a clear startup error.
    let bogus = dir.path().join("bogus.pcap");
    std::fs::write(&bogus, b"not a capture").unwrap();
    let (ctx, _h) = harness(flow::NAME, None);
    let e = flow::spawn(
        FlowConfig {
            pcap_file: Some(bogus),
            ..f_cfg()
        },
        ctx,
    )
    .expect_err("a file that is not a capture");
    assert!(e.to_string().contains("collectors.flow.pcapFile"), "{e}");
}

fn f_cfg() -> FlowConfig {
    FlowConfig {
        interface: String::new(),
        bpf_filter: String::new(),
        pcap_file: None,
        idle_timeout: Duration::from_secs(15),
        active_timeout: Duration::from_secs(60),
        max_flows: 10,
        snaplen: 128,
        owner_interval: None,
    }
}

fn inventory(got: &[Draft]) -> Vec<amoskys_proto::InventoryEvent> {
    got.iter()
        .filter_map(|d| match &d.payload {
            Payload::Inventory(i) => Some(i.clone()),
            _ => None,
        })
        .collect()
}

fn listener_event(
    got: &[Draft],
    kind: amoskys_proto::inventory_event::Kind,
    port: u16,
) -> Option<amoskys_proto::Listener> {
    inventory(got)
        .into_iter()
        .filter(|e| e.kind == kind as i32)
        .flat_map(|e| e.listeners)
        .find(|l| l.port == u32::from(port) && l.protocol == "tcp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_snapshots_the_host_then_reports_listeners_coming_and_going() {
    use amoskys_agents::collectors::inventory;
    use amoskys_proto::inventory_event::Kind as Inv;

    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_port = open.local_addr().unwrap().port();
    let (ctx, mut h) = harness(inventory::NAME, Some(Duration::from_millis(200)));
    let cfg = amoskys_agents::config::InventoryConfig {
        interval: Duration::from_millis(200),
        discovery: Some(amoskys_agents::config::DiscoveryConfig {
            networks: vec!["127.0.0.1/32".parse().unwrap()],
            ports: vec![probe_port],
            probes_per_second: 100,
            connect_timeout: Duration::from_millis(500),
            interval: Duration::from_secs(3600),
        }),
    };
    let task = inventory::spawn(cfg, ctx).unwrap().unwrap();
    let got = h
        .until(Duration::from_secs(10), |g| {
            inventory(g)
                .iter()
                .any(|e| e.kind == Inv::Discovered as i32)
        })
        .await;
    let evs = inventory(&got);
    let snap = evs
        .iter()
        .find(|e| e.kind == Inv::Snapshot as i32)
        .expect("a snapshot first");
    let host = snap.host.as_ref().unwrap();
    assert!(
        !host.hostname.is_empty()
            && !host.kernel.is_empty()
            && host.cpus > 0
            && host.memory_bytes > 0
    );
    assert!(
        host.interfaces
            .iter()
            .any(|i| i.name == "lo" && i.addresses.iter().any(|a| a.starts_with("127.0.0.1")))
    );
    let mine = snap
        .listeners
        .iter()
        .find(|l| l.port == u32::from(probe_port))
        .expect("the test's listener in the snapshot");
    assert_eq!(mine.pid, std::process::id());
    let found = evs
        .iter()
        .find(|e| e.kind == Inv::Discovered as i32)
        .unwrap();
    assert_eq!(found.discovered_ip, "127.0.0.1");
    assert_eq!(found.open_ports, vec![u32::from(probe_port)]);

    // A new listener appears, then goes away.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = h
        .until(Duration::from_secs(10), |g| {
            listener_event(g, Inv::ListenerAdded, port).is_some()
        })
        .await;
    let added = listener_event(&got, Inv::ListenerAdded, port).expect("listener added");
    assert_eq!(added.pid, std::process::id());
    assert_eq!(added.address, "127.0.0.1");
    drop(l);
    let got = h
        .until(Duration::from_secs(10), |g| {
            listener_event(g, Inv::ListenerRemoved, port).is_some()
        })
        .await;
    assert!(
        listener_event(&got, Inv::ListenerRemoved, port).is_some(),
        "listener removed"
    );
    h.stop.cancel();
    task.await.unwrap();
}
