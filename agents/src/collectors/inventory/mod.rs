//! Inventory collector (the older system's device scanner): host facts,
//! listening sockets with their owners and the neighbor table, as a snapshot
//! at start and then change events. Optional active discovery probes
//! configured ranges.

pub(crate) mod config;
pub(crate) mod discovery;
pub(crate) mod neighbors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use amoskys_proto::event::Payload;
use amoskys_proto::inventory_event::Kind;
use amoskys_proto::{Disk, HostFacts, InventoryEvent, Listener, Neighbor, NetInterface, Severity};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};
use tokio::task::JoinHandle;

use crate::collectors::context::Ctx;
use crate::collectors::sockets;
use crate::config::InventoryConfig;
use crate::spool::Draft;

/// The collector's name in events, metrics and control.
pub const NAME: &str = "inventory";

/// This host's facts: name, OS, CPUs, memory, disks and interfaces.
pub fn host_facts() -> HostFacts {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let disks = Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| Disk {
            mount_point: d.mount_point().display().to_string(),
            device: d.name().to_string_lossy().into_owned(),
            fs_type: d.file_system().to_string_lossy().into_owned(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
        .collect();
    let mut interfaces: Vec<NetInterface> = Networks::new_with_refreshed_list()
        .iter()
        .map(|(name, n)| NetInterface {
            name: name.clone(),
            mac: n.mac_address().to_string(),
            addresses: n
                .ip_networks()
                .iter()
                .map(|a| format!("{}/{}", a.addr, a.prefix))
                .collect(),
            mtu: n.mtu(),
        })
        .collect();
    interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    HostFacts {
        hostname: System::host_name().unwrap_or_default(),
        os: System::name().unwrap_or_default(),
        os_version: System::os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: System::cpu_arch(),
        cpus: sys.cpus().len() as u32,
        memory_bytes: sys.total_memory(),
        disks,
        interfaces,
        boot_time: System::boot_time(),
    }
}

type ListenerKey = (String, String, u32);

fn listeners(proc: &Path) -> BTreeMap<ListenerKey, Listener> {
    let socks = sockets::listeners(proc);
    let owners = sockets::owners(proc, &socks.iter().map(|s| s.inode).collect::<Vec<_>>());
    socks
        .into_iter()
        .map(|s| {
            let (pid, process) = owners.get(&s.inode).cloned().unwrap_or_default();
            let l = Listener {
                protocol: s.protocol.into(),
                address: s.address.to_string(),
                port: s.port.into(),
                pid,
                process,
            };
            ((l.protocol.clone(), l.address.clone(), l.port), l)
        })
        .collect()
}

fn neighbor_set(proc: &Path) -> BTreeSet<(String, String, String)> {
    neighbors::read(proc)
        .into_iter()
        .map(|n| (n.ip, n.mac, n.interface))
        .collect()
}

fn to_neighbor(k: &(String, String, String)) -> Neighbor {
    Neighbor {
        ip: k.0.clone(),
        mac: k.1.clone(),
        interface: k.2.clone(),
        state: "reachable".into(),
    }
}

fn event(kind: Kind, f: impl FnOnce(&mut InventoryEvent)) -> Draft {
    let mut e = InventoryEvent {
        kind: kind as i32,
        ..Default::default()
    };
    f(&mut e);
    let sev = match kind {
        Kind::ListenerAdded | Kind::NeighborAdded | Kind::Discovered => Severity::Notice,
        _ => Severity::Info,
    };
    Draft::new(NAME, sev, Payload::Inventory(e))
}

/// Addresses and MACs only: what a change to would be worth a new snapshot.
fn host_shape(h: &HostFacts) -> Vec<(String, String, Vec<String>)> {
    h.interfaces
        .iter()
        .map(|i| (i.name.clone(), i.mac.clone(), i.addresses.clone()))
        .collect()
}

/// Starts the collector on this host's `/proc`.
pub fn spawn(cfg: InventoryConfig, ctx: Ctx) -> super::Started {
    Ok(Some(spawn_at(cfg, ctx, PathBuf::from("/proc"))))
}

/// Starts the collector reading `proc` as `/proc` (tests give a copy).
pub fn spawn_at(cfg: InventoryConfig, mut ctx: Ctx, proc: PathBuf) -> JoinHandle<()> {
    ctx.status.set_mode(if cfg.discovery.is_some() {
        "scan+discovery"
    } else {
        "scan"
    });
    tokio::spawn(async move {
        let mut prev_l: Option<BTreeMap<ListenerKey, Listener>> = None;
        let mut prev_n: BTreeSet<(String, String, String)> = BTreeSet::new();
        let mut prev_shape = Vec::new();
        let mut last_discovery: Option<Instant> = None;
        loop {
            if !ctx.wait_unpaused().await {
                return;
            }
            let p = proc.clone();
            let Ok((host, ls, ns)) = tokio::task::spawn_blocking(move || {
                (host_facts(), listeners(&p), neighbor_set(&p))
            })
            .await
            else {
                ctx.status.error("inventory scan panicked");
                return;
            };
            let shape = host_shape(&host);
            let mut out = Vec::new();
            match &prev_l {
                None => out.push(event(Kind::Snapshot, |e| {
                    e.host = Some(host);
                    e.listeners = ls.values().cloned().collect();
                    e.neighbors = ns.iter().map(to_neighbor).collect();
                })),
                Some(prev) => {
                    if shape != prev_shape {
                        out.push(event(Kind::Snapshot, |e| {
                            e.host = Some(host);
                            e.listeners = ls.values().cloned().collect();
                            e.neighbors = ns.iter().map(to_neighbor).collect();
                        }));
                    }
                    for (k, l) in &ls {
                        if !prev.contains_key(k) {
                            out.push(event(Kind::ListenerAdded, |e| {
                                e.listeners = vec![l.clone()]
                            }));
                        }
                    }
                    for (k, l) in prev {
                        if !ls.contains_key(k) {
                            out.push(event(Kind::ListenerRemoved, |e| {
                                e.listeners = vec![l.clone()]
                            }));
                        }
                    }
                    for n in ns.difference(&prev_n) {
                        out.push(event(Kind::NeighborAdded, |e| {
                            e.neighbors = vec![to_neighbor(n)]
                        }));
                    }
                    for n in prev_n.difference(&ns) {
                        out.push(event(Kind::NeighborRemoved, |e| {
                            e.neighbors = vec![to_neighbor(n)]
                        }));
                    }
                }
            }
            for d in out {
                if !ctx.sink.emit(d).await {
                    return;
                }
            }
            prev_l = Some(ls);
            prev_n = ns;
            prev_shape = shape;

            if let Some(d) = &cfg.discovery
                && last_discovery.is_none_or(|t| t.elapsed() >= d.interval)
            {
                last_discovery = Some(Instant::now());
                let metrics = ctx.metrics.clone();
                let found = discovery::probe(
                    &d.networks,
                    &d.ports,
                    d.probes_per_second,
                    d.connect_timeout,
                    &ctx.stop,
                    || {
                        metrics.discovery_probes.inc();
                    },
                )
                .await;
                for (ip, ports) in found {
                    let d = event(Kind::Discovered, |e| {
                        e.discovered_ip = ip.to_string();
                        e.open_ports = ports.iter().map(|&p| p.into()).collect();
                    });
                    if !ctx.sink.emit(d).await {
                        return;
                    }
                }
            }
            let every = ctx.interval(cfg.interval);
            if !ctx.sleep(every).await {
                return;
            }
        }
    })
}
