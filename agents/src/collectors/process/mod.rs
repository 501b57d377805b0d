//! Process collector: a snapshot of running processes at start, then start
//! and exit events. It uses the kernel's process-events connector when the
//! agent may (exact, nothing missed); otherwise it polls with sysinfo and
//! says so in its mode, a metric and the heartbeat.

pub(crate) mod cgroup;
pub(crate) mod config;
pub mod netlink;
pub(crate) mod procfs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amoskys_proto::event::Payload;
use amoskys_proto::process_event::Kind;
use amoskys_proto::{ProcessEvent, Severity};
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::collectors::context::Ctx;
use crate::config::{ProcessConfig, ProcessMode};
use crate::spool::Draft;
use procfs::{Clock, ProcInfo};

/// The collector's name in events, metrics and control.
pub const NAME: &str = "process";
/// Bounds the per-process cache so a fork storm cannot grow memory.
const MAX_TRACKED: usize = 65_536;

/// uid -> user name from /etc/passwd, re-read at most every 30 s on a miss.
struct Users {
    path: PathBuf,
    names: HashMap<u32, String>,
    loaded: Option<Instant>,
}

impl Users {
    fn new() -> Self {
        Self {
            path: PathBuf::from("/etc/passwd"),
            names: HashMap::new(),
            loaded: None,
        }
    }

    fn name(&mut self, uid: u32) -> String {
        if !self.names.contains_key(&uid)
            && self
                .loaded
                .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        {
            self.loaded = Some(Instant::now());
            if let Ok(s) = std::fs::read_to_string(&self.path) {
                self.names = s
                    .lines()
                    .filter_map(|l| {
                        let mut f = l.split(':');
                        let name = f.next()?;
                        let uid = f.nth(1)?.parse().ok()?;
                        Some((uid, name.to_string()))
                    })
                    .collect();
            }
        }
        self.names.get(&uid).cloned().unwrap_or_default()
    }
}

fn draft(kind: Kind, p: &ProcInfo, exit_code: i32, source: &str, users: &mut Users) -> Draft {
    let mut d = Draft::new(
        NAME,
        Severity::Info,
        Payload::Process(ProcessEvent {
            kind: kind as i32,
            pid: p.pid,
            ppid: p.ppid,
            uid: p.uid,
            user: users.name(p.uid),
            name: p.name.clone(),
            exe: p.exe.clone(),
            cmdline: p.cmdline.clone(),
            start_time: p.start_time,
            exit_code,
            container_id: p.identity.container_id.clone(),
            pod_uid: p.identity.pod_uid.clone(),
            cgroup: p.identity.cgroup.clone(),
            source: source.into(),
            parent_name: p.parent_name.clone(),
            parent_exe: p.parent_exe.clone(),
        }),
    );
    if !p.identity.pod_uid.is_empty() {
        d.labels
            .insert("pod_uid".into(), p.identity.pod_uid.clone());
    }
    d
}

/// Starts the collector on this host's `/proc`.
pub fn spawn(cfg: ProcessConfig, ctx: Ctx) -> super::Started {
    Ok(Some(spawn_at(cfg, ctx, PathBuf::from("/proc"))))
}

/// Starts the collector reading `proc` as `/proc` (tests give a copy).
pub fn spawn_at(cfg: ProcessConfig, ctx: Ctx, proc: PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        let conn = match cfg.mode {
            ProcessMode::Poll => None,
            mode => match netlink::Connector::open(Duration::from_millis(200)) {
                Ok(c) => Some(c),
                Err(e) => {
                    let why = format!(
                        "process-events connector unavailable ({e}); polling /proc every {:?} instead",
                        cfg.poll_interval
                    );
                    if mode == ProcessMode::Netlink {
                        ctx.status.error(why);
                    } else {
                        warn!(collector = NAME, "{why}");
                    }
                    ctx.metrics.process_polling_fallback.set(1);
                    None
                }
            },
        };
        match conn {
            Some(conn) => {
                ctx.status.set_mode("netlink");
                info!(
                    collector = NAME,
                    "using the kernel process-events connector"
                );
                let _ = tokio::task::spawn_blocking(move || netlink_loop(conn, ctx, &proc)).await;
            }
            None => {
                ctx.status.set_mode("poll");
                poll_loop(cfg, ctx, &proc).await;
            }
        }
    })
}

fn snapshot(ctx: &Ctx, proc: &Path, clock: &Clock, users: &mut Users) -> HashMap<u32, ProcInfo> {
    let mut known = HashMap::new();
    for pid in procfs::pids(proc) {
        if let Some(p) = procfs::read(proc, pid, clock) {
            if !ctx.paused()
                && !ctx
                    .sink
                    .emit_blocking(draft(Kind::Snapshot, &p, 0, "netlink", users))
            {
                break;
            }
            known.insert(pid, p);
        }
    }
    known
}

fn netlink_loop(conn: netlink::Connector, ctx: Ctx, proc: &Path) {
    let clock = Clock::read(proc);
    let mut users = Users::new();
    // Subscribed before the snapshot, so nothing falls between the two.
    let mut known = snapshot(&ctx, proc, &clock, &mut users);
    let mut parents: HashMap<u32, u32> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !ctx.stop.is_cancelled() {
        let n = match conn.recv(&mut buf) {
            Ok(None) => continue,
            Ok(Some(n)) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                ctx.status
                    .error("netlink receive buffer overrun: some process events were lost");
                continue;
            }
            Err(e) => {
                ctx.status.error(format!("netlink receive: {e}"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let paused = ctx.paused();
        for ev in netlink::parse(&buf[..n]) {
            match ev {
                netlink::ProcEvent::Fork {
                    parent_tgid,
                    child_pid,
                    child_tgid,
                } if child_pid == child_tgid => {
                    if parents.len() >= MAX_TRACKED {
                        parents.clear();
                    }
                    parents.insert(child_tgid, parent_tgid);
                }
                netlink::ProcEvent::Fork { .. } => {}
                netlink::ProcEvent::Exec { tgid, .. } => {
                    // Read /proc at once: a short-lived process may be gone soon.
                    let p = procfs::read(proc, tgid, &clock).unwrap_or_else(|| ProcInfo {
                        pid: tgid,
                        ppid: parents.get(&tgid).copied().unwrap_or(0),
                        ..Default::default()
                    });
                    if !paused
                        && !ctx
                            .sink
                            .emit_blocking(draft(Kind::Start, &p, 0, "netlink", &mut users))
                    {
                        return;
                    }
                    if known.len() >= MAX_TRACKED {
                        known.clear();
                    }
                    known.insert(tgid, p);
                }
                netlink::ProcEvent::Exit {
                    pid,
                    tgid,
                    exit_code,
                } if pid == tgid => {
                    let ppid = parents.remove(&tgid);
                    let p = known.remove(&tgid).unwrap_or_else(|| ProcInfo {
                        pid: tgid,
                        ppid: ppid.unwrap_or(0),
                        ..Default::default()
                    });
                    let code = netlink::exit_status(exit_code);
                    if !paused
                        && !ctx.sink.emit_blocking(draft(
                            Kind::Exit,
                            &p,
                            code,
                            "netlink",
                            &mut users,
                        ))
                    {
                        return;
                    }
                }
                netlink::ProcEvent::Exit { .. } => {}
            }
        }
    }
}

fn info_from(p: &sysinfo::Process, proc: &Path) -> ProcInfo {
    let pid = p.pid().as_u32();
    let ppid = p.parent().map(|x| x.as_u32()).unwrap_or(0);
    let (parent_name, parent_exe) = procfs::parent(proc, ppid);
    ProcInfo {
        pid,
        ppid,
        parent_name,
        parent_exe,
        uid: p.user_id().map(|u| **u).unwrap_or(0),
        name: p.name().to_string_lossy().into_owned(),
        exe: p.exe().map(|e| e.display().to_string()).unwrap_or_default(),
        cmdline: p
            .cmd()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        start_time: (p.start_time() as i64) * 1_000_000_000,
        identity: std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup"))
            .map(|s| cgroup::parse(&s))
            .unwrap_or_default(),
    }
}

async fn poll_loop(cfg: ProcessConfig, mut ctx: Ctx, proc: &Path) {
    let mut users = Users::new();
    let mut sys = System::new();
    let kind = ProcessRefreshKind::nothing()
        .with_cmd(UpdateKind::OnlyIfNotSet)
        .with_exe(UpdateKind::OnlyIfNotSet)
        .with_user(UpdateKind::OnlyIfNotSet);
    // (pid, start time) so a reused pid counts as a new process.
    let mut prev: HashMap<(u32, u64), ProcInfo> = HashMap::new();
    let mut first = true;
    loop {
        if !ctx.wait_unpaused().await {
            return;
        }
        let proc_dir = proc.to_path_buf();
        let (s, found) = match tokio::task::spawn_blocking(move || {
            sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
            let found: Vec<(u32, u64)> = sys
                .processes()
                .values()
                .filter(|p| p.thread_kind().is_none())
                .map(|p| (p.pid().as_u32(), p.start_time()))
                .collect();
            (sys, found)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                ctx.status.error(format!("process scan: {e}"));
                return;
            }
        };
        sys = s;
        let mut now: HashMap<(u32, u64), ProcInfo> = HashMap::with_capacity(found.len());
        for key in &found {
            let info = match prev.remove(key) {
                Some(p) => p,
                None => {
                    let Some(p) = sys.process(sysinfo::Pid::from_u32(key.0)) else {
                        continue;
                    };
                    let info = info_from(p, &proc_dir);
                    let k = if first { Kind::Snapshot } else { Kind::Start };
                    if !ctx.sink.emit(draft(k, &info, 0, "poll", &mut users)).await {
                        return;
                    }
                    info
                }
            };
            now.insert(*key, info);
        }
        // What is left in prev has exited; polling cannot know the code.
        for (_, p) in prev.drain() {
            let mut d = draft(Kind::Exit, &p, 0, "poll", &mut users);
            d.labels.insert("exit_code".into(), "unknown".into());
            if !ctx.sink.emit(d).await {
                return;
            }
        }
        prev = now;
        first = false;
        let every = ctx.interval(cfg.poll_interval);
        if !ctx.sleep(every).await {
            return;
        }
    }
}
