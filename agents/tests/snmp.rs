#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The SNMP collector against a real net-snmp `snmpd` on a loopback port,
//! with a v2c community and a v3 authPriv user.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use amoskys_agents::collectors::snmp;
use amoskys_agents::config::{self, Collectors, SnmpSpec, SnmpTarget, SnmpVersion};
use amoskys_agents::spool::Draft;
use amoskys_proto::SnmpEvent;
use amoskys_proto::event::Payload;
use amoskys_proto::snmp_event::Kind;
use common::{harness, metric};

struct Snmpd {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Snmpd {
    fn start(dir: &Path, port: u16) -> Self {
        let conf = dir.join("snmpd.conf");
        std::fs::write(
            &conf,
            format!(
                "agentAddress udp:127.0.0.1:{port}\nrocommunity public 127.0.0.1\ncreateUser amoskys SHA \"authpass123\" AES \"privpass123\"\nrouser amoskys priv\nsysName amoskys-test-device\nsysLocation lab-7\nsysContact ops@example.org\n"
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/snmpd", "/usr/local/sbin/snmpd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("snmpd is not installed (apt-get install snmpd; .ci/run installs it)");
        let child = Command::new(bin)
            .args(["-f", "-Lf"])
            .arg(dir.join("snmpd.log"))
            .arg("-C")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("snmpd.pid"))
            .env("SNMP_PERSISTENT_DIR", dir.join("persist"))
            .env("MIBS", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Snmpd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn secret(dir: &Path, name: &str, value: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    Some(p)
}

fn snmp_events(got: &[Draft]) -> Vec<SnmpEvent> {
    got.iter()
        .filter_map(|d| match &d.payload {
            Payload::Snmp(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn of(got: &[Draft], target: &str, kind: Kind) -> Vec<SnmpEvent> {
    snmp_events(got)
        .into_iter()
        .filter(|e| e.target == target && e.kind == kind as i32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_v2c_and_v3_reports_bad_credentials_and_device_down_and_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let mut snmpd = Snmpd::start(dir.path(), port);
    let d = dir.path();
    let address = format!("127.0.0.1:{port}");
    let spec = SnmpSpec {
        enabled: true,
        interval: "1s".into(),
        timeout: "500ms".into(),
        retries: 1,
        targets: vec![
            SnmpTarget {
                name: "v2c".into(),
                address: address.clone(),
                version: SnmpVersion::V2c,
                community_file: secret(d, "community", "public"),
                ..Default::default()
            },
            SnmpTarget {
                name: "v2c-wrong".into(),
                address: address.clone(),
                version: SnmpVersion::V2c,
                community_file: secret(d, "bad-community", "nope"),
                ..Default::default()
            },
            SnmpTarget {
                name: "v3".into(),
                address: address.clone(),
                version: SnmpVersion::V3,
                user: "amoskys".into(),
                auth_protocol: "sha1".into(),
                auth_password_file: secret(d, "auth", "authpass123"),
                priv_protocol: "aes128".into(),
                priv_password_file: secret(d, "priv", "privpass123"),
                ..Default::default()
            },
            SnmpTarget {
                name: "v3-wrong".into(),
                address: address.clone(),
                version: SnmpVersion::V3,
                user: "amoskys".into(),
                auth_protocol: "sha1".into(),
                auth_password_file: secret(d, "auth-bad", "wrongpass99"),
                priv_protocol: "aes128".into(),
                priv_password_file: secret(d, "priv2", "privpass123"),
                ..Default::default()
            },
        ],
    };
    let resolved = config::resolve_collectors(
        &Collectors {
            snmp: spec,
            ..Default::default()
        },
        None,
    )
    .unwrap()
    .snmp
    .unwrap();
    let (ctx, mut h) = harness(snmp::NAME, Some(resolved.interval));
    let task = snmp::spawn(resolved, ctx).unwrap().unwrap();

    let got = h
        .until(Duration::from_secs(20), |g| {
            !of(g, "v2c", Kind::Poll).is_empty()
                && !of(g, "v3", Kind::Poll).is_empty()
                && !of(g, "v2c-wrong", Kind::DeviceDown).is_empty()
                && !of(g, "v3-wrong", Kind::DeviceDown).is_empty()
        })
        .await;
    for (name, _) in [("v2c", 0), ("v3", 0)] {
        let p = of(&got, name, Kind::Poll).remove(0);
        assert_eq!(p.sys_name, "amoskys-test-device", "{name}");
        assert_eq!(p.sys_location, "lab-7");
        assert!(p.sys_uptime_ticks > 0);
        assert!(p.sys_descr.contains("Linux"), "{}", p.sys_descr);
        let lo = p
            .interfaces
            .iter()
            .find(|i| i.descr == "lo")
            .unwrap_or_else(|| panic!("{name}: lo in {:?}", p.interfaces));
        assert_eq!(lo.oper_status, 1, "lo is up");
        assert_eq!(lo.name, "lo", "ifXTable ifName");
        assert!(lo.in_octets > 0);
    }
    let wrong = of(&got, "v2c-wrong", Kind::DeviceDown).remove(0);
    assert!(wrong.error.contains("no response"), "{}", wrong.error);
    // net-snmp answers a wrong v3 password with an unauthenticated report
    // that the client cannot tell from silence: the error says both.
    let wrong3 = of(&got, "v3-wrong", Kind::DeviceDown).remove(0);
    assert!(wrong3.error.contains("credentials"), "{}", wrong3.error);
    let text = h.metrics.encode();
    assert!(
        metric(
            &text,
            "amoskys_agent_snmp_polls_total{target=\"v2c-wrong\",result=\"timeout\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "amoskys_agent_snmp_polls_total{target=\"v3-wrong\",result=\"auth\"}"
        ) + metric(
            &text,
            "amoskys_agent_snmp_polls_total{target=\"v3-wrong\",result=\"timeout\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&text, "amoskys_agent_snmp_up{target=\"v2c\"}"), 1.0);
    assert_eq!(
        metric(&text, "amoskys_agent_snmp_up{target=\"v2c-wrong\"}"),
        0.0
    );

    // Rates appear from the second poll on: lo carries this test's SNMP
    // traffic. snmpd caches its interface counters for a few seconds, so two
    // polls a second apart can read the same values (rate 0): wait for a
    // poll after the cache moved on.
    let lo_rate = |g: &[Draft]| {
        of(g, "v2c", Kind::Poll)
            .iter()
            .filter_map(|p| p.interfaces.iter().find(|i| i.descr == "lo").cloned())
            .find(|lo| lo.in_bps > 0.0)
    };
    let got = h
        .until(Duration::from_secs(20), |g| lo_rate(g).is_some())
        .await;
    let lo = lo_rate(&got);
    assert!(
        lo.is_some(),
        "lo rate from counter deltas: {:?}",
        of(&got, "v2c", Kind::Poll)
    );

    // snmpd goes away: device-down for the good targets; back: device-up.
    snmpd.stop();
    let got = h
        .until(Duration::from_secs(20), |g| {
            !of(g, "v2c", Kind::DeviceDown).is_empty() && !of(g, "v3", Kind::DeviceDown).is_empty()
        })
        .await;
    assert!(
        !of(&got, "v2c", Kind::DeviceDown).is_empty(),
        "device-down after snmpd stopped"
    );
    let _snmpd = Snmpd::start(&snmpd.dir, snmpd.port);
    let got = h
        .until(Duration::from_secs(20), |g| {
            !of(g, "v2c", Kind::DeviceUp).is_empty() && !of(g, "v3", Kind::DeviceUp).is_empty()
        })
        .await;
    assert!(
        !of(&got, "v2c", Kind::DeviceUp).is_empty(),
        "device-up after snmpd restarted"
    );
    assert!(
        !of(&got, "v3", Kind::DeviceUp).is_empty(),
        "v3 re-discovers the engine after a restart"
    );
    assert!(
        of(&got, "v3-wrong", Kind::DeviceUp).is_empty(),
        "wrong credentials stay down"
    );
    h.stop.cancel();
    task.await.unwrap();
}
