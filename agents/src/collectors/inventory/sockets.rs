//! Listening sockets from /proc/net/{tcp,tcp6,udp,udp6} and their owning
//! processes from /proc/<pid>/fd.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Socket {
    pub protocol: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub inode: u64,
}

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

/// Listening entries of one /proc/net table: TCP in LISTEN, UDP bound with
/// no peer.
pub fn parse_table(contents: &str, protocol: &'static str) -> Vec<Socket> {
    let udp = protocol.starts_with("udp");
    contents
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (address, port) = parse_addr(f.get(1)?)?;
            let (_, rport) = parse_addr(f.get(2)?)?;
            let st = *f.get(3)?;
            let listening = if udp {
                st == "07" && rport == 0
            } else {
                st == "0A"
            };
            let inode = f.get(9)?.parse().ok()?;
            listening.then_some(Socket {
                protocol,
                address,
                port,
                inode,
            })
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
    let mut want: BTreeSet<u64> = inodes.iter().copied().filter(|&i| i != 0).collect();
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(proc) else {
        return out;
    };
    for e in rd.flatten() {
        if want.is_empty() {
            break;
        }
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
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
            if want.remove(&inode) {
                let name = std::fs::read_to_string(e.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                out.insert(inode, (pid, name));
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
