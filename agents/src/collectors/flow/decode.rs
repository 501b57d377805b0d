//! Packet decoding for flow keys: link layer (Ethernet with VLAN tags, Linux
//! cooked v1/v2, raw IP), IPv4/IPv6 (extension headers skipped), TCP, UDP and
//! ICMP. Every read is bounds-checked: a truncated or malformed packet is an
//! error naming what is wrong, never a panic. Byte counts come from the IP
//! header's length, so a short snaplen still counts whole packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What makes packets one flow: both ends, the protocol and the VLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The sender's address.
    pub src: IpAddr,
    /// The receiver's address.
    pub dst: IpAddr,
    /// The sender's port (0 without ports, e.g. ICMP).
    pub src_port: u16,
    /// The receiver's port (for ICMP: type and code).
    pub dst_port: u16,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub protocol: u8,
    /// The innermost VLAN id; 0 untagged.
    pub vlan: u16,
}

/// One packet, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Its flow.
    pub key: FlowKey,
    /// IP bytes (header included), from the IP header.
    pub ip_bytes: u64,
    /// Transport payload bytes (what the application sent).
    pub payload_bytes: u64,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

/// Why a packet gave no flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The packet ends inside the named header or field.
    Truncated(&'static str),
    /// The named header holds an impossible value.
    Bad(&'static str),
    /// Not IP (ARP, LLDP, ...): skipped, not an error.
    NotIp,
    /// A link type this decoder does not read.
    UnsupportedLink(i32),
}

impl Malformed {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Malformed::Truncated(_) => "truncated",
            Malformed::Bad(_) => "bad_header",
            Malformed::NotIp => "not_ip",
            Malformed::UnsupportedLink(_) => "unsupported_link",
        }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Truncated(what) => write!(f, "truncated {what}"),
            Malformed::Bad(what) => write!(f, "bad {what}"),
            Malformed::NotIp => write!(f, "not an IP packet"),
            Malformed::UnsupportedLink(l) => write!(f, "unsupported link type {l}"),
        }
    }
}

// libpcap's link types (LINKTYPE_* / DLT_*) this decoder reads.
/// BSD loopback: a 4-byte address family, then IP.
pub const LINK_NULL: i32 = 0;
/// Ethernet, with any number of 802.1Q/802.1ad tags.
pub const LINK_ETHERNET: i32 = 1;
/// Raw IP, as DLT 12 on some systems.
pub const LINK_RAW_DLT: i32 = 12;
/// Raw IP (LINKTYPE_RAW).
pub const LINK_RAW: i32 = 101;
/// Linux cooked capture v1 (`any` interface).
pub const LINK_LINUX_SLL: i32 = 113;
/// Raw IPv4.
pub const LINK_IPV4: i32 = 228;
/// Raw IPv6.
pub const LINK_IPV6: i32 = 229;
/// Linux cooked capture v2.
pub const LINK_LINUX_SLL2: i32 = 276;

fn u16_at(b: &[u8], i: usize, what: &'static str) -> Result<u16, Malformed> {
    b.get(i..i + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(Malformed::Truncated(what))
}

fn byte(b: &[u8], i: usize, what: &'static str) -> Result<u8, Malformed> {
    b.get(i).copied().ok_or(Malformed::Truncated(what))
}

/// Decodes one captured frame of the given link type.
pub fn decode(link: i32, frame: &[u8]) -> Result<Decoded, Malformed> {
    let (mut ethertype, mut off) = match link {
        LINK_ETHERNET => (u16_at(frame, 12, "ethernet header")?, 14),
        LINK_LINUX_SLL => (u16_at(frame, 14, "cooked header")?, 16),
        LINK_LINUX_SLL2 => (u16_at(frame, 0, "cooked v2 header")?, 20),
        LINK_RAW | LINK_RAW_DLT | LINK_IPV4 | LINK_IPV6 => {
            match byte(frame, 0, "IP header")? >> 4 {
                4 => (0x0800, 0),
                6 => (0x86dd, 0),
                _ => return Err(Malformed::Bad("IP version")),
            }
        }
        LINK_NULL => {
            // BSD loopback: a host-order address family.
            let fam = frame
                .get(0..4)
                .ok_or(Malformed::Truncated("loopback header"))?;
            let fam = u32::from_ne_bytes([fam[0], fam[1], fam[2], fam[3]]);
            match fam {
                2 => (0x0800, 4),
                10 | 24 | 28 | 30 => (0x86dd, 4),
                _ => return Err(Malformed::NotIp),
            }
        }
        other => return Err(Malformed::UnsupportedLink(other)),
    };
    let mut vlan = 0u16;
    // Up to two VLAN tags (802.1Q, 802.1ad/QinQ); the inner one names the flow.
    for _ in 0..2 {
        if ethertype == 0x8100 || ethertype == 0x88a8 {
            vlan = u16_at(frame, off, "VLAN tag")? & 0x0fff;
            ethertype = u16_at(frame, off + 2, "VLAN tag")?;
            off += 4;
        }
    }
    let ip = frame
        .get(off..)
        .ok_or(Malformed::Truncated("link header"))?;
    match ethertype {
        0x0800 => ipv4(ip, vlan),
        0x86dd => ipv6(ip, vlan),
        _ => Err(Malformed::NotIp),
    }
}

fn ipv4(b: &[u8], vlan: u16) -> Result<Decoded, Malformed> {
    let vihl = byte(b, 0, "IPv4 header")?;
    if vihl >> 4 != 4 {
        return Err(Malformed::Bad("IPv4 version"));
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(Malformed::Bad("IPv4 header length"));
    }
    let hdr = b.get(..ihl).ok_or(Malformed::Truncated("IPv4 header"))?;
    let total = usize::from(u16_at(hdr, 2, "IPv4 header")?);
    if total < ihl {
        return Err(Malformed::Bad("IPv4 total length"));
    }
    let frag_offset = u16_at(hdr, 6, "IPv4 header")? & 0x1fff;
    let protocol = hdr[9];
    let src = IpAddr::V4(Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]));
    let l4 = b.get(ihl..).unwrap_or(&[]);
    // Later fragments carry no transport header: they count toward the
    // addresses' flow with ports 0.
    let l4 = if frag_offset == 0 { Some(l4) } else { None };
    transport(
        src,
        dst,
        protocol,
        l4,
        total as u64,
        (total - ihl) as u64,
        vlan,
    )
}

fn ipv6(b: &[u8], vlan: u16) -> Result<Decoded, Malformed> {
    let hdr = b.get(..40).ok_or(Malformed::Truncated("IPv6 header"))?;
    if hdr[0] >> 4 != 6 {
        return Err(Malformed::Bad("IPv6 version"));
    }
    let payload_len = u64::from(u16_at(hdr, 4, "IPv6 header")?);
    let mut next = hdr[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    let mut off = 40usize;
    let mut ext_len = 0u64;
    let mut fragmented_later = false;
    // Hop-by-hop, routing, fragment, destination options.
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let nh = byte(b, off, "IPv6 extension header")?;
                let len = (usize::from(byte(b, off + 1, "IPv6 extension header")?) + 1) * 8;
                next = nh;
                off += len;
                ext_len += len as u64;
            }
            44 => {
                let nh = byte(b, off, "IPv6 fragment header")?;
                let fo = u16_at(b, off + 2, "IPv6 fragment header")? >> 3;
                fragmented_later = fo != 0;
                next = nh;
                off += 8;
                ext_len += 8;
            }
            _ => break,
        }
    }
    let l4 = if fragmented_later {
        None
    } else {
        Some(b.get(off..).unwrap_or(&[]))
    };
    let total = payload_len + 40;
    transport(
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        next,
        l4,
        total,
        payload_len.saturating_sub(ext_len),
        vlan,
    )
}

fn transport(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    l4: Option<&[u8]>,
    ip_bytes: u64,
    l4_len: u64,
    vlan: u16,
) -> Result<Decoded, Malformed> {
    let mut d = Decoded {
        key: FlowKey {
            src,
            dst,
            src_port: 0,
            dst_port: 0,
            protocol,
            vlan,
        },
        ip_bytes,
        payload_bytes: l4_len,
        tcp_flags: 0,
    };
    let Some(b) = l4 else { return Ok(d) };
    match protocol {
        6 => {
            d.key.src_port = u16_at(b, 0, "TCP header")?;
            d.key.dst_port = u16_at(b, 2, "TCP header")?;
            let data_off = u64::from(byte(b, 12, "TCP header")? >> 4) * 4;
            if data_off < 20 {
                return Err(Malformed::Bad("TCP data offset"));
            }
            d.tcp_flags = byte(b, 13, "TCP header")?;
            d.payload_bytes = l4_len.saturating_sub(data_off);
        }
        17 => {
            d.key.src_port = u16_at(b, 0, "UDP header")?;
            d.key.dst_port = u16_at(b, 2, "UDP header")?;
            d.payload_bytes = l4_len.saturating_sub(8);
        }
        1 | 58 => {
            // NetFlow convention: ICMP type and code in the destination port.
            let t = byte(b, 0, "ICMP header")?;
            let c = byte(b, 1, "ICMP header")?;
            d.key.dst_port = u16::from(t) << 8 | u16::from(c);
            d.payload_bytes = l4_len.saturating_sub(8);
        }
        _ => {}
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .single_vlan(42.try_into().unwrap())
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 443, 1, 65535)
            .syn()
            .ack(7);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn decodes_tcp_over_vlan() {
        let f = tcp_frame(b"hello world");
        let d = decode(LINK_ETHERNET, &f).unwrap();
        assert_eq!(d.key.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (d.key.src_port, d.key.dst_port, d.key.protocol, d.key.vlan),
            (40000, 443, 6, 42)
        );
        assert_eq!(d.payload_bytes, 11);
        assert_eq!(d.ip_bytes, 20 + 20 + 11);
        assert_eq!(d.tcp_flags & 0x12, 0x12, "SYN and ACK");
    }

    #[test]
    fn snaplen_truncation_still_counts_whole_packets() {
        let f = tcp_frame(&[0u8; 1000]);
        let d = decode(LINK_ETHERNET, &f[..80]).unwrap();
        assert_eq!(d.payload_bytes, 1000);
    }

    #[test]
    fn decodes_udp_v6_and_cooked() {
        let b = PacketBuilder::linux_sll(etherparse::LinuxSllPacketType::OUTGOING, 6, [0; 8])
            .ipv6([0xfd; 16], [0xfe; 16], 5)
            .udp(5353, 53);
        let mut f = Vec::new();
        b.write(&mut f, &[9u8; 33]).unwrap();
        let d = decode(LINK_LINUX_SLL, &f).unwrap();
        assert_eq!(
            (d.key.src_port, d.key.dst_port, d.key.protocol),
            (5353, 53, 17)
        );
        assert_eq!(d.payload_bytes, 33);
        assert_eq!(d.ip_bytes, 40 + 8 + 33);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            decode(LINK_ETHERNET, &[0; 5]),
            Err(Malformed::Truncated("ethernet header"))
        );
        let mut f = tcp_frame(b"x");
        f[18] = 0x41; // IPv4, IHL 1
        assert_eq!(
            decode(LINK_ETHERNET, &f),
            Err(Malformed::Bad("IPv4 header length"))
        );
        let mut arp = vec![0u8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(decode(LINK_ETHERNET, &arp), Err(Malformed::NotIp));
        assert_eq!(decode(9999, &arp), Err(Malformed::UnsupportedLink(9999)));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(link in prop::sample::select(vec![0, 1, 12, 101, 113, 228, 229, 276]), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(link, &bytes);
        }

        #[test]
        fn never_panics_on_mutated_real_packets(payload in prop::collection::vec(any::<u8>(), 0..64), cut in 0usize..200, flips in prop::collection::vec((0usize..120, any::<u8>()), 0..6)) {
            let mut f = tcp_frame(&payload);
            for (i, v) in flips {
                if i < f.len() { f[i] = v; }
            }
            let cut = cut.min(f.len());
            let _ = decode(LINK_ETHERNET, &f[..cut]);
        }

        #[test]
        fn agrees_with_an_independent_encoder(sp in 1u16.., dp in 1u16.., len in 0usize..300, udp in any::<bool>()) {
            let b = PacketBuilder::ethernet2([1; 6], [2; 6]).ipv4([192, 168, 0, 1], [192, 168, 0, 2], 9);
            let mut f = Vec::new();
            let payload = vec![1u8; len];
            if udp { b.udp(sp, dp).write(&mut f, &payload).unwrap(); } else { b.tcp(sp, dp, 0, 100).write(&mut f, &payload).unwrap(); }
            let d = decode(LINK_ETHERNET, &f).unwrap();
            prop_assert_eq!((d.key.src_port, d.key.dst_port), (sp, dp));
            prop_assert_eq!(d.payload_bytes, len as u64);
            prop_assert_eq!(d.ip_bytes, (20 + if udp { 8 } else { 20 } + len) as u64);
        }
    }
}
