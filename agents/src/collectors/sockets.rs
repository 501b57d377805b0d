//! The kernel's socket tables (/proc/net/{tcp,tcp6,udp,udp6}, or
//! /proc/<pid>/net/... for another network namespace) and the processes that
//! hold each socket (/proc/<pid>/fd). The inventory lists listeners from
//! them; the flow collector finds the process behind a flow.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Socket {
    pub protocol: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// One row of a socket table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (0A listen for TCP, 07 unconnected for UDP).
    pub state: u8,
    /// 0 for sockets no file refers to any more (TIME_WAIT, SYN_RECV).
    pub inode: u64,
}

/// The four tables: file name, and the protocol number flows carry.
pub const TABLES: [(&str, u8); 4] = [("tcp", 6), ("tcp6", 6), ("udp", 17), ("udp6", 17)];

/// The kernel prints each 32-bit word of the address in host byte order.
pub fn parse_addr(hex: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = hex.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(a)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(a.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Every row of one table. Rows that do not parse are skipped: the kernel
/// writes these files, but a fuzzer and a newer kernel may not agree.
pub fn parse_entries(contents: &str) -> Vec<Entry> {
    contents
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = parse_addr(f.get(1)?)?;
            let remote = parse_addr(f.get(2)?)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some(Entry {
                local: local.into(),
                remote: remote.into(),
                state,
                inode,
            })
        })
        .collect()
}

/// Whether a row is a listener: TCP in LISTEN, UDP bound with no peer.
pub fn is_listening(e: &Entry, udp: bool) -> bool {
    if udp {
        e.state == 0x07 && e.remote.port() == 0
    } else {
        e.state == 0x0A
    }
}

/// Listening entries of one /proc/net table.
pub fn parse_table(contents: &str, protocol: &'static str) -> Vec<Socket> {
    let udp = protocol.starts_with("udp");
    parse_entries(contents)
        .into_iter()
        .filter(|e| is_listening(e, udp))
        .map(|e| Socket {
            protocol,
            address: e.local.ip(),
            port: e.local.port(),
            inode: e.inode,
        })
        .collect()
}

pub fn listeners(proc: &Path) -> Vec<Socket> {
    let mut out = BTreeSet::new();
    for (file, proto) in [
        ("tcp", "tcp"),
        ("tcp6", "tcp6"),
        ("udp", "udp"),
        ("udp6", "udp6"),
    ] {
        if let Ok(s) = std::fs::read_to_string(proc.join("net").join(file)) {
            out.extend(parse_table(&s, proto));
        }
    }
    out.into_iter().collect()
}

/// inode -> (pid, process name), only for the inodes asked for.
pub fn owners(proc: &Path, inodes: &[u64]) -> HashMap<u64, (u32, String)> {
    let want: HashSet<u64> = inodes.iter().copied().collect();
    holders(proc, pids(proc), &want)
        .into_iter()
        .map(|(inode, pid)| {
            let name = std::fs::read_to_string(proc.join(pid.to_string()).join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            (inode, (pid, name))
        })
        .collect()
}

/// Every process's pid, lowest first.
pub fn pids(proc: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(proc)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// inode -> the pid of a process holding that socket, for the inodes asked
/// for, among `pids`. Reads the processes' open files until all are found,
/// so the cost is that of the processes given; callers batch their
/// questions and narrow the processes where they can.
pub fn holders(
    proc: &Path,
    pids: impl IntoIterator<Item = u32>,
    want: &HashSet<u64>,
) -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    let mut left = want.iter().filter(|&&i| i != 0).count();
    for pid in pids {
        if left == 0 {
            break;
        }
        let Ok(fds) = std::fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if want.contains(&inode) && !out.contains_key(&inode) {
                out.insert(inode, pid);
                left -= 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_listeners() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
        let s = parse_table(tcp, "tcp");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((s[0].port, s[0].inode), (8080, 4242));
        let tcp6 = "header\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1\n";
        let s = parse_table(tcp6, "tcp6");
        assert_eq!(s[0].address, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(s[0].port, 22);
        assert!(parse_table("h\ngarbage line\n", "udp").is_empty());
    }

    #[test]
    fn finds_a_real_listener_and_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let all = listeners(Path::new("/proc"));
        let mine = all
            .iter()
            .find(|s| s.port == port && s.protocol == "tcp")
            .expect("listener listed");
        let o = owners(Path::new("/proc"), &[mine.inode]);
        assert_eq!(o.get(&mine.inode).map(|x| x.0), Some(std::process::id()));
    }
}
