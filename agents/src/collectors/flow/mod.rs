//! Flow collector: libpcap capture on an interface (optionally filtered by
//! BPF) or a capture file, aggregated into flow records.
//!
//! Live capture needs CAP_NET_RAW (and the host network namespace to see the
//! node's traffic). Without it the collector reports itself unavailable with
//! the reason, and the agent runs on without it.

pub(crate) mod config;
pub mod decode;
pub(crate) mod owner;
pub(crate) mod table;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amoskys_proto::event::Payload;
use amoskys_proto::{FlowEvent, Severity};
use tracing::{info, warn};

use super::{StartError, Started};
use crate::collectors::context::Ctx;
use crate::config::FlowConfig;
use crate::metrics::{AgentMetrics, reason, result};
use crate::spool::Draft;
use owner::{Owner, Resolver};
use table::{Export, FlowTable};

/// The collector's name in events, metrics and control.
pub const NAME: &str = "flow";

fn ts_ns(h: &pcap::PacketHeader) -> i64 {
    // time_t and suseconds_t are i64 on the 64-bit Linux targets we build.
    h.ts.tv_sec * 1_000_000_000 + h.ts.tv_usec * 1_000
}

fn to_draft(e: &Export, interface: &str, owner: Option<Owner>) -> Draft {
    let (k, f, r) = e;
    let (process, via) = match &owner {
        Some((p, via)) => (p.as_ref().clone(), via.as_str()),
        None => (owner::Process::default(), ""),
    };
    let mut d = Draft::new(
        NAME,
        Severity::Info,
        Payload::Flow(FlowEvent {
            src_ip: k.src.to_string(),
            src_port: k.src_port.into(),
            dst_ip: k.dst.to_string(),
            dst_port: k.dst_port.into(),
            protocol: k.protocol.into(),
            vlan: k.vlan.into(),
            packets: f.packets,
            bytes: f.bytes,
            tcp_flags: f.tcp_flags.into(),
            first_seen: f.first_seen,
            last_seen: f.last_seen,
            interface: interface.into(),
            end_reason: r.as_str().into(),
            payload_bytes: f.payload_bytes,
            pid: process.pid,
            process: process.name,
            exe: process.exe,
            owner: via.into(),
            container_id: process.container_id,
            pod_uid: process.pod_uid,
        }),
    );
    d.observed_at = f.last_seen;
    d
}

/// The packet loop shared by live and file capture.
struct Pipeline {
    table: FlowTable,
    link: i32,
    interface: String,
    metrics: Arc<AgentMetrics>,
    out: Vec<Export>,
    /// Live capture only: a capture file's sockets are not this host's now.
    owners: Option<Resolver>,
}

impl Pipeline {
    fn packet(&mut self, h: &pcap::PacketHeader, data: &[u8]) {
        self.metrics.flow_packets.inc();
        match decode::decode(self.link, data) {
            Ok(p) => {
                self.metrics.flow_bytes.inc_by(p.ip_bytes);
                let before = self.out.len();
                let new = self.table.add(&p, ts_ns(h), &mut self.out);
                if new
                    && let Some(o) = self.owners.as_mut()
                    && let Some(skipped) = o.note(p.key)
                {
                    self.metrics
                        .flow_owner_lookups
                        .get_or_create(&result(skipped.as_str()))
                        .inc();
                }
                self.metrics
                    .flow_evicted
                    .inc_by((self.out.len() - before) as u64);
            }
            Err(e) => {
                self.metrics
                    .flow_malformed
                    .get_or_create(&reason(e.reason()))
                    .inc();
            }
        }
    }

    /// Attributes the flows that began since the last pass, when due.
    fn attribute(&mut self) {
        let Some(o) = self.owners.as_mut() else {
            return;
        };
        let table = &self.table;
        for outcome in o.resolve_due(Instant::now(), |k| table.contains(k)) {
            self.metrics
                .flow_owner_lookups
                .get_or_create(&result(outcome.as_str()))
                .inc();
        }
    }

    /// Hands finished flows to the sink; false when the agent is stopping.
    fn flush(&mut self, ctx: &Ctx) -> bool {
        self.metrics.flow_active.set(self.table.len() as i64);
        // Taken out and put back, so its capacity is kept across flushes.
        let mut out = std::mem::take(&mut self.out);
        let mut open = true;
        for e in out.drain(..) {
            self.metrics.flow_exported.inc();
            let owner = self.owners.as_mut().and_then(|o| o.take(&e.0));
            if !ctx.sink.emit_blocking(to_draft(&e, &self.interface, owner)) {
                open = false;
                break;
            }
        }
        self.out = out;
        open
    }
}

/// Starts the collector. A capture file that cannot be read is a startup
/// error; an interface that cannot be captured on leaves the collector
/// unavailable (with the reason in its status) and the agent running.
pub fn spawn(cfg: FlowConfig, ctx: Ctx) -> Started {
    if let Some(file) = cfg.pcap_file.clone() {
        let cap = pcap::Capture::from_file(&file).map_err(|e| StartError {
            collector: NAME,
            message: format!("collectors.flow.pcapFile {}: {e}", file.display()),
        })?;
        ctx.status.set_mode("file");
        return Ok(Some(tokio::task::spawn_blocking(move || {
            run_file(cfg, ctx, cap, &file)
        })));
    }
    match open_live(&cfg) {
        Ok(cap) => {
            ctx.status.set_mode("live");
            info!(collector = NAME, interface = %cfg.interface, "capturing");
            Ok(Some(tokio::task::spawn_blocking(move || {
                run_live(cfg, ctx, cap)
            })))
        }
        Err(e) => {
            ctx.status.set_mode("unavailable");
            let why = format!(
                "cannot capture on {:?}: {e} (live capture needs CAP_NET_RAW)",
                cfg.interface
            );
            warn!(collector = NAME, "{why}; flow collection is skipped");
            ctx.status.error(why);
            Ok(None)
        }
    }
}

/// Opens a live capture on the configured interface with its snaplen and
/// filter; fails without capture privilege.
pub fn open_live(cfg: &FlowConfig) -> Result<pcap::Capture<pcap::Active>, pcap::Error> {
    let mut cap = pcap::Capture::from_device(cfg.interface.as_str())?
        .promisc(false)
        .snaplen(cfg.snaplen)
        .immediate_mode(true)
        .timeout(100)
        .buffer_size(8 * 1024 * 1024)
        .open()?;
    if !cfg.bpf_filter.is_empty() {
        cap.filter(&cfg.bpf_filter, true)?;
    }
    // libpcap's read timeout does not fire on Linux while no packet
    // arrives, so the loop could never see a stop or expire idle flows:
    // read without blocking and wait in poll(2) with our own timeout.
    cap.setnonblock()
}

/// Waits up to `ms` for the capture to become readable.
fn wait_readable(cap: &pcap::Capture<pcap::Active>, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd {
        fd: cap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fds, 1, ms) };
}

fn run_live(cfg: FlowConfig, ctx: Ctx, mut cap: pcap::Capture<pcap::Active>) {
    let mut p = Pipeline {
        table: FlowTable::new(cfg.max_flows, cfg.idle_timeout, cfg.active_timeout),
        link: cap.get_datalink().0,
        interface: cfg.interface.clone(),
        metrics: ctx.metrics.clone(),
        out: Vec::new(),
        owners: cfg
            .owner_interval
            .map(|every| Resolver::new("/proc", every, cfg.max_flows)),
    };
    let mut last_expire = Instant::now();
    while !ctx.stop.is_cancelled() {
        match cap.next_packet() {
            Ok(pkt) => {
                if !ctx.paused() {
                    p.packet(pkt.header, pkt.data);
                }
            }
            Err(pcap::Error::TimeoutExpired) => wait_readable(&cap, 100),
            Err(e) => {
                ctx.status
                    .error(format!("capture on {}: {e}", cfg.interface));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        p.attribute();
        if last_expire.elapsed() >= Duration::from_millis(500) || !p.out.is_empty() {
            if last_expire.elapsed() >= Duration::from_millis(500) {
                last_expire = Instant::now();
                p.table.expire(crate::spool::now_ns(), &mut p.out);
                if let Ok(s) = cap.stats() {
                    ctx.metrics
                        .flow_kernel_dropped
                        .set(i64::from(s.dropped) + i64::from(s.if_dropped));
                }
            }
            if !p.flush(&ctx) {
                return;
            }
        }
    }
    p.table.drain(&mut p.out);
    p.flush(&ctx);
}

fn run_file(cfg: FlowConfig, ctx: Ctx, mut cap: pcap::Capture<pcap::Offline>, file: &Path) {
    let mut p = Pipeline {
        table: FlowTable::new(cfg.max_flows, cfg.idle_timeout, cfg.active_timeout),
        link: cap.get_datalink().0,
        interface: format!("file:{}", file.display()),
        metrics: ctx.metrics.clone(),
        out: Vec::new(),
        owners: None,
    };
    // Time in a capture file is the packets' own: expire against it.
    let mut last_expire: Option<i64> = None;
    let mut packets = 0u64;
    loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        match cap.next_packet() {
            Ok(pkt) => {
                packets += 1;
                let ts = ts_ns(pkt.header);
                p.packet(pkt.header, pkt.data);
                if last_expire.is_none_or(|l| ts - l >= 1_000_000_000) {
                    last_expire = Some(ts);
                    p.table.expire(ts, &mut p.out);
                }
                if !p.out.is_empty() && !p.flush(&ctx) {
                    return;
                }
            }
            Err(pcap::Error::NoMorePackets) => break,
            Err(e) => {
                ctx.status.error(format!("reading {}: {e}", file.display()));
                break;
            }
        }
    }
    p.table.drain(&mut p.out);
    p.flush(&ctx);
    ctx.status.set_mode("file-done");
    info!(collector = NAME, file = %file.display(), packets, "capture file read");
}
