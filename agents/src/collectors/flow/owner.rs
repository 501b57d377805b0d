//! The process on this host behind a flow.
//!
//! A flow's endpoints are looked up in the socket tables of every network
//! namespace on the host (read through `/proc/<pid>/net/` of one process in
//! each, so pods' own sockets are found too), and the socket's inode among
//! the processes' open files. Both are walks over `/proc`, so new flows are
//! collected and resolved together at most once per `interval`: a flow is
//! attributed if its socket still exists then. A connection that opens and
//! closes within the interval may go unattributed; it is counted, not
//! guessed.
//!
//! The owner is the sender's socket when the flow's source is on this host
//! (flows are one direction), else the receiver's. Where only a listening
//! socket matches (the first packets of an accepted connection), the
//! listener's process is given, marked as such.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::decode::FlowKey;
use crate::collectors::process::cgroup;
use crate::collectors::sockets::{self, Entry, TABLES};

/// How a flow was tied to its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The flow's own socket (a connection, or a UDP socket bound to its port).
    Socket,
    /// The TCP listener on the flow's local port.
    Listener,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Socket => "socket",
            Via::Listener => "listener",
        }
    }
}

/// A process that holds a socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub name: String,
    pub exe: String,
    pub pod_uid: String,
    pub container_id: String,
}

impl Process {
    fn read(proc: &Path, pid: u32) -> Self {
        let dir = proc.join(pid.to_string());
        let id = std::fs::read_to_string(dir.join("cgroup"))
            .map(|c| cgroup::parse(&c))
            .unwrap_or_default();
        Self {
            pid,
            name: std::fs::read_to_string(dir.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            exe: std::fs::read_link(dir.join("exe"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pod_uid: id.pod_uid,
            container_id: id.container_id,
        }
    }
}

/// A flow's owner: the process and how it was found.
pub type Owner = (Arc<Process>, Via);

/// How one lookup ended, for `amoskys_agent_flow_owner_lookups_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Found(Via),
    /// No socket on this host matched (traffic passing through, or a
    /// connection already closed).
    NotFound,
    /// More new flows than `max_pending` arrived within one interval.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Found(v) => v.as_str(),
            Outcome::NotFound => "none",
            Outcome::Skipped => "skipped",
        }
    }
}

/// One network namespace's sockets, indexed for lookups.
#[derive(Default)]
struct Tables {
    /// (protocol, local, remote) of connected sockets.
    connected: HashMap<(u8, SocketAddr, SocketAddr), u64>,
    /// (protocol, port) -> (address, inode) of sockets with no peer: TCP
    /// listeners and unconnected UDP sockets.
    bound: HashMap<(u8, u16), Vec<(IpAddr, u64)>>,
}

impl Tables {
    fn add(&mut self, protocol: u8, e: Entry) {
        if e.inode == 0 {
            return;
        }
        let local = SocketAddr::new(e.local.ip().to_canonical(), e.local.port());
        if sockets::is_listening(&e, protocol == 17) {
            self.bound
                .entry((protocol, local.port()))
                .or_default()
                .push((local.ip(), e.inode));
        } else if !e.remote.ip().is_unspecified() {
            let remote = SocketAddr::new(e.remote.ip().to_canonical(), e.remote.port());
            self.connected.insert((protocol, local, remote), e.inode);
        }
    }

    /// The bound socket on `addr`'s port: its own address, or the wildcard
    /// where `wildcard` (only in the namespace the capture runs in: another
    /// namespace's wildcard listener says nothing about this address).
    fn bound_to(&self, protocol: u8, addr: SocketAddr, wildcard: bool) -> Option<u64> {
        let v = self.bound.get(&(protocol, addr.port()))?;
        v.iter()
            .find(|(ip, _)| *ip == addr.ip())
            .or_else(|| {
                wildcard
                    .then(|| v.iter().find(|(ip, _)| ip.is_unspecified()))
                    .flatten()
            })
            .map(|&(_, inode)| inode)
    }

    /// The socket of `key`'s flow here, and how it was found.
    fn find(&self, key: &FlowKey, wildcard: bool) -> Option<(u64, Via)> {
        let p = key.protocol;
        let src = SocketAddr::new(key.src.to_canonical(), key.src_port);
        let dst = SocketAddr::new(key.dst.to_canonical(), key.dst_port);
        let bound_via = if p == 6 { Via::Listener } else { Via::Socket };
        self.connected
            .get(&(p, src, dst))
            .or_else(|| self.connected.get(&(p, dst, src)))
            .map(|&i| (i, Via::Socket))
            .or_else(|| {
                self.bound_to(p, src, wildcard)
                    .or_else(|| self.bound_to(p, dst, wildcard))
                    .map(|i| (i, bound_via))
            })
    }
}

/// Attributes new flows to processes, in batches.
pub struct Resolver {
    proc: PathBuf,
    interval: Duration,
    max_pending: usize,
    pending: Vec<FlowKey>,
    /// Owners of flows still in the table; taken when the flow is exported.
    found: HashMap<FlowKey, Owner>,
    /// Processes by socket inode, kept while the socket exists.
    by_inode: HashMap<u64, Arc<Process>>,
    /// The processes of each network namespace, by the namespace's inode
    /// (the first one's `/proc/<pid>/net` shows the namespace's sockets);
    /// walked again every `NS_REFRESH`, when a namespace's first process is
    /// gone, or when a socket's holder is not among the processes known.
    namespaces: HashMap<u64, Vec<u32>>,
    host_ns: u64,
    namespaces_at: Option<Instant>,
    last: Option<Instant>,
}

/// How often the set of network namespaces is walked again (pods come and go).
const NS_REFRESH: Duration = Duration::from_secs(5);

fn netns(proc: &Path, pid: &str) -> Option<u64> {
    let link = std::fs::read_link(proc.join(pid).join("ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

impl Resolver {
    pub fn new(proc: impl Into<PathBuf>, interval: Duration, max_pending: usize) -> Self {
        let proc = proc.into();
        Self {
            host_ns: netns(&proc, "self").unwrap_or(0),
            proc,
            interval,
            max_pending,
            pending: Vec::new(),
            found: HashMap::new(),
            by_inode: HashMap::new(),
            namespaces: HashMap::new(),
            namespaces_at: None,
            last: None,
        }
    }

    /// Queues a flow seen for the first time. Only TCP and UDP have sockets.
    pub fn note(&mut self, key: FlowKey) -> Option<Outcome> {
        if key.protocol != 6 && key.protocol != 17 {
            return None;
        }
        if self.pending.len() >= self.max_pending {
            return Some(Outcome::Skipped);
        }
        self.pending.push(key);
        None
    }

    /// The owner of an exported flow, if it was found; forgets it.
    pub fn take(&mut self, key: &FlowKey) -> Option<Owner> {
        self.found.remove(key)
    }

    /// Resolves the queued flows if the interval has passed since the last
    /// pass; `live` says whether a flow is still in the table (one exported
    /// meanwhile is not remembered). Returns each lookup's outcome.
    pub fn resolve_due(&mut self, now: Instant, live: impl Fn(&FlowKey) -> bool) -> Vec<Outcome> {
        if self.pending.is_empty() || self.last.is_some_and(|l| now - l < self.interval) {
            return Vec::new();
        }
        self.last = Some(now);
        self.resolve(now, live)
    }

    fn resolve(&mut self, now: Instant, live: impl Fn(&FlowKey) -> bool) -> Vec<Outcome> {
        let pending = std::mem::take(&mut self.pending);
        if self
            .namespaces_at
            .is_none_or(|t| now.duration_since(t) >= NS_REFRESH)
        {
            self.walk_namespaces(now);
        }
        let tables = self.read_tables();
        let mut hits: Vec<(FlowKey, u64, Via)> = Vec::new();
        let mut unknown: HashMap<u64, HashSet<u64>> = HashMap::new();
        let mut out = Vec::with_capacity(pending.len());
        for key in pending {
            let hit = tables
                .iter()
                .find_map(|(ns, host, t)| t.find(&key, *host).map(|h| (*ns, h)))
                .filter(|_| live(&key));
            match hit {
                Some((ns, (inode, via))) => {
                    if !self.by_inode.contains_key(&inode) {
                        unknown.entry(ns).or_default().insert(inode);
                    }
                    hits.push((key, inode, via));
                }
                None => out.push(Outcome::NotFound),
            }
        }
        if !unknown.is_empty() {
            self.find_holders(now, unknown);
        }
        for (key, inode, via) in hits {
            match self.by_inode.get(&inode) {
                Some(p) => {
                    self.found.insert(key, (p.clone(), via));
                    out.push(Outcome::Found(via));
                }
                None => out.push(Outcome::NotFound),
            }
        }
        // Keep processes only for sockets that still exist, so the cache
        // neither grows without bound nor outlives a closed socket.
        let alive: HashSet<u64> = tables
            .iter()
            .flat_map(|(_, _, t)| {
                t.connected
                    .values()
                    .copied()
                    .chain(t.bound.values().flatten().map(|b| b.1))
            })
            .collect();
        self.by_inode.retain(|i, _| alive.contains(i));
        out
    }

    /// Finds which processes hold the sockets, reading the open files of
    /// the socket's own namespace's processes only: on a node most
    /// processes are in pods, and reading every file descriptor on the
    /// node for each batch would cost more than the capture. Processes
    /// started since the last walk are looked for after one more walk.
    fn find_holders(&mut self, now: Instant, mut unknown: HashMap<u64, HashSet<u64>>) {
        let mut scanned: HashMap<u64, HashSet<u32>> = HashMap::new();
        for walked in [false, true] {
            if walked {
                self.walk_namespaces(now);
            }
            for (ns, want) in &mut unknown {
                let done = scanned.entry(*ns).or_default();
                // A namespace not walked (this host's, when /proc hid our
                // own namespace link): every process.
                let all = match self.namespaces.get(ns) {
                    Some(p) => p.clone(),
                    None => sockets::pids(&self.proc),
                };
                let pids: Vec<u32> = all.into_iter().filter(|p| !done.contains(p)).collect();
                done.extend(&pids);
                for (inode, pid) in sockets::holders(&self.proc, pids, want) {
                    want.remove(&inode);
                    self.by_inode
                        .insert(inode, Arc::new(Process::read(&self.proc, pid)));
                }
            }
            unknown.retain(|_, want| !want.is_empty());
            if unknown.is_empty() {
                return;
            }
        }
    }

    fn walk_namespaces(&mut self, now: Instant) {
        self.namespaces_at = Some(now);
        self.namespaces.clear();
        for pid in sockets::pids(&self.proc) {
            if let Some(ns) = netns(&self.proc, &pid.to_string()) {
                self.namespaces.entry(ns).or_default().push(pid);
            }
        }
        for pids in self.namespaces.values_mut() {
            pids.sort_unstable();
        }
    }

    /// Every namespace's tables, the host's (the capture's) first. A
    /// namespace whose first process has gone is walked again next time.
    fn read_tables(&mut self) -> Vec<(u64, bool, Tables)> {
        let mut out = vec![(self.host_ns, true, read_ns(&self.proc.join("self")))];
        let mut gone = false;
        for (&ns, pids) in &self.namespaces {
            let Some(&pid) = pids.first() else {
                continue;
            };
            if ns == self.host_ns {
                continue;
            }
            if netns(&self.proc, &pid.to_string()) != Some(ns) {
                gone = true;
                continue;
            }
            out.push((ns, false, read_ns(&self.proc.join(pid.to_string()))));
        }
        if gone {
            self.namespaces_at = None;
        }
        out
    }

    #[cfg(test)]
    fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }
}

fn read_ns(dir: &Path) -> Tables {
    let mut t = Tables::default();
    for (file, protocol) in TABLES {
        if let Ok(s) = std::fs::read_to_string(dir.join("net").join(file)) {
            for e in sockets::parse_entries(&s) {
                t.add(protocol, e);
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};

    fn key(protocol: u8, src: SocketAddr, dst: SocketAddr) -> FlowKey {
        FlowKey {
            src: src.ip(),
            dst: dst.ip(),
            src_port: src.port(),
            dst_port: dst.port(),
            protocol,
            vlan: 0,
        }
    }

    fn entry(local: &str, remote: &str, state: u8, inode: u64) -> Entry {
        Entry {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            inode,
        }
    }

    #[test]
    fn sender_first_then_receiver_then_listener() {
        let mut t = Tables::default();
        t.add(6, entry("10.0.0.5:40000", "10.0.0.9:443", 0x01, 11));
        t.add(
            6,
            entry("[::ffff:10.0.0.5]:8080", "[::ffff:10.0.0.7]:5555", 0x01, 12),
        );
        t.add(6, entry("0.0.0.0:8080", "0.0.0.0:0", 0x0A, 13));
        t.add(6, entry("10.0.0.5:9090", "0.0.0.0:0", 0x0A, 14));
        t.add(17, entry("0.0.0.0:53", "0.0.0.0:0", 0x07, 15));
        // TIME_WAIT: no inode, never an owner.
        t.add(6, entry("10.0.0.5:40001", "10.0.0.9:443", 0x06, 0));
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let out = key(6, a("10.0.0.5:40000"), a("10.0.0.9:443"));
        let back = key(6, a("10.0.0.9:443"), a("10.0.0.5:40000"));
        assert_eq!(t.find(&out, true), Some((11, Via::Socket)));
        assert_eq!(t.find(&back, true), Some((11, Via::Socket)));
        // A v4 flow matches a socket the kernel lists in tcp6 as v4-mapped.
        let mapped = key(6, a("10.0.0.7:5555"), a("10.0.0.5:8080"));
        assert_eq!(t.find(&mapped, true), Some((12, Via::Socket)));
        // A SYN from a new client: only the wildcard listener matches, and
        // only in the capture's own namespace.
        let syn = key(6, a("10.0.0.8:6000"), a("10.0.0.5:8080"));
        assert_eq!(t.find(&syn, true), Some((13, Via::Listener)));
        assert_eq!(t.find(&syn, false), None);
        let exact = key(6, a("10.0.0.8:6000"), a("10.0.0.5:9090"));
        assert_eq!(t.find(&exact, false), Some((14, Via::Listener)));
        let dns = key(17, a("10.0.0.8:7000"), a("10.0.0.5:53"));
        assert_eq!(t.find(&dns, true), Some((15, Via::Socket)));
        let closed = key(6, a("10.0.0.5:40001"), a("10.0.0.9:443"));
        assert_eq!(t.find(&closed, true), None);
    }

    /// A /proc of its own: processes with a network namespace, open
    /// sockets, a name and the namespace's socket tables.
    struct FakeProc(tempfile::TempDir);

    impl FakeProc {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn process(&self, pid: u32, ns: u64, name: &str, sockets: &[u64]) {
            let dir = self.0.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("fd")).unwrap();
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::create_dir_all(dir.join("net")).unwrap();
            std::os::unix::fs::symlink(format!("net:[{ns}]"), dir.join("ns/net")).unwrap();
            std::fs::write(dir.join("comm"), format!("{name}\n")).unwrap();
            for (fd, inode) in sockets.iter().enumerate() {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    dir.join("fd").join(fd.to_string()),
                )
                .unwrap();
            }
        }

        /// The tcp table every process of `pid`'s namespace would show.
        fn tcp(&self, pid: u32, rows: &[&str]) {
            let mut text = String::from(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
            );
            for r in rows {
                text.push_str(r);
                text.push('\n');
            }
            std::fs::write(self.0.path().join(pid.to_string()).join("net/tcp"), text).unwrap();
        }
    }

    /// A /proc/net/tcp row: local and remote as the kernel prints them.
    fn row(local: &str, remote: &str, state: &str, inode: u64) -> String {
        format!(
            "   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0"
        )
    }

    #[test]
    fn pod_sockets_are_found_in_their_namespace_among_its_processes_only() {
        let p = FakeProc::new();
        // The agent (pid 1) in the host namespace, with nothing listening.
        p.process(1, 1000, "amoskys", &[]);
        std::os::unix::fs::symlink("1", p.0.path().join("self")).unwrap();
        p.tcp(1, &[]);
        // A pod's namespace: a wildcard listener on 8080 (inode 50) and an
        // accepted connection from 10.0.0.9:40000 to 10.1.0.5:8080 (51),
        // both held by pid 20. Pid 5, in another namespace, claims the
        // same inode: only the pod's own processes may be its holder.
        p.process(20, 2000, "web", &[50, 51]);
        p.process(21, 2000, "sidecar", &[]);
        p.tcp(
            20,
            &[
                &row("00000000:1F90", "00000000:0000", "0A", 50),
                &row("0500010A:1F90", "0900000A:9C40", "01", 51),
            ],
        );
        p.process(5, 3000, "decoy", &[51]);
        p.tcp(5, &[]);

        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let conn = key(6, a("10.0.0.9:40000"), a("10.1.0.5:8080"));
        // Another address on 8080: the pod's wildcard listener says nothing.
        let other = key(6, a("10.0.0.9:40001"), a("10.1.0.7:8080"));
        let mut r = Resolver::new(p.0.path(), Duration::from_millis(1), 10);
        r.note(conn);
        r.note(other);
        let outcomes = r.resolve_due(Instant::now(), |_| true);
        assert_eq!(outcomes, [Outcome::NotFound, Outcome::Found(Via::Socket)]);
        let (web, via) = r.take(&conn).unwrap();
        assert_eq!((web.pid, web.name.as_str(), via), (20, "web", Via::Socket));

        // A process started after the namespaces were walked: found after
        // one more walk, without waiting for the periodic one.
        p.process(30, 2000, "late", &[52]);
        p.tcp(20, &[&row("0500010A:1F91", "0900000A:9C41", "01", 52)]);
        let late = key(6, a("10.1.0.5:8081"), a("10.0.0.9:40001"));
        r.note(late);
        let outcomes = r.resolve_due(Instant::now() + Duration::from_millis(5), |_| true);
        assert_eq!(outcomes, [Outcome::Found(Via::Socket)]);
        assert_eq!(r.take(&late).unwrap().0.name, "late");
    }

    #[test]
    fn finds_this_process_behind_a_real_connection_and_forgets_exported_flows() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        s.read_exact(&mut [0u8; 1]).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up = key(6, c.local_addr().unwrap(), l.local_addr().unwrap());
        let dgram = key(
            17,
            "127.0.0.1:9".parse().unwrap(),
            udp.local_addr().unwrap(),
        );
        let icmp = FlowKey { protocol: 1, ..up };
        let gone = key(
            6,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let mut r = Resolver::new("/proc", Duration::from_millis(100), 10);
        assert_eq!(r.note(icmp), None, "not queued");
        for k in [up, dgram, gone] {
            assert_eq!(r.note(k), None);
        }
        let t0 = Instant::now();
        let outcomes = r.resolve_due(t0, |k| *k != gone);
        assert_eq!(
            outcomes,
            vec![
                Outcome::NotFound,
                Outcome::Found(Via::Socket),
                Outcome::Found(Via::Socket)
            ]
        );
        assert!(r.namespace_count() >= 1);
        let (p, via) = r.take(&up).unwrap();
        assert_eq!((p.pid, via), (std::process::id(), Via::Socket));
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(p.exe, me.to_string_lossy());
        assert!(!p.name.is_empty());
        assert!(r.take(&up).is_none(), "taken once");
        assert_eq!(r.take(&dgram).unwrap().0.pid, std::process::id());
        assert!(r.take(&gone).is_none());
        // Within the interval nothing is resolved; the queue is bounded.
        for _ in 0..10 {
            r.note(up);
        }
        assert_eq!(r.note(up), Some(Outcome::Skipped));
        assert!(
            r.resolve_due(t0 + Duration::from_millis(50), |_| true)
                .is_empty()
        );
        assert_eq!(
            r.resolve_due(t0 + Duration::from_millis(150), |_| true)
                .len(),
            10
        );
    }
}
