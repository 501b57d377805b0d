//! The IPv4 neighbor (ARP) table from /proc/net/arp.

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbor {
    pub ip: String,
    pub mac: String,
    pub interface: String,
    pub state: String,
}

pub fn parse_arp(contents: &str) -> Vec<Neighbor> {
    contents
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip = f.first()?.to_string();
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            let mac = f.get(3)?.to_ascii_lowercase();
            let interface = f.get(5)?.to_string();
            // ATF_COM (0x2): the entry is resolved.
            if flags & 0x2 == 0 || mac == "00:00:00:00:00:00" {
                return None;
            }
            let state = if flags & 0x4 != 0 {
                "permanent"
            } else {
                "reachable"
            };
            Some(Neighbor {
                ip,
                mac,
                interface,
                state: state.into(),
            })
        })
        .collect()
}

pub fn read(proc: &std::path::Path) -> Vec<Neighbor> {
    let mut v = std::fs::read_to_string(proc.join("net/arp"))
        .map(|s| parse_arp(&s))
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_resolved_entries_only() {
        let s = "IP address       HW type     Flags       HW address            Mask     Device\n10.0.0.1         0x1         0x2         AA:bb:cc:dd:ee:01     *        eth0\n10.0.0.9         0x1         0x0         00:00:00:00:00:00     *        eth0\nbad\n";
        let n = super::parse_arp(s);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(n[0].interface, "eth0");
    }
}
