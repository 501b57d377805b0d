//! Entry points for the cargo-fuzz targets in `fuzz/`, one per parser of
//! bytes the agent does not control: captured packets, netlink messages,
//! `/proc` files, cgroup paths, SNMP responses and its config file.
//!
//! They live in the crate, not in `fuzz/`, so that `fuzz/corpus_replay.rs`
//! replays every corpus and every crash found through exactly this code on
//! each `cargo test`, without a fuzzing toolchain. Each must return normally
//! for any input: a panic, an overflow or an endless loop is the bug.

use std::time::Duration;

use crate::collectors::flow::decode::{self, decode};
use crate::collectors::flow::table::FlowTable;
use crate::collectors::inventory::neighbors;
use crate::collectors::process::{cgroup, netlink, procfs};
use crate::collectors::snmp::device::Val;
use crate::collectors::sockets;

/// The link types the capture hands the decoder.
const LINKS: [i32; 8] = [
    decode::LINK_NULL,
    decode::LINK_ETHERNET,
    decode::LINK_RAW_DLT,
    decode::LINK_RAW,
    decode::LINK_LINUX_SLL,
    decode::LINK_IPV4,
    decode::LINK_IPV6,
    decode::LINK_LINUX_SLL2,
];

/// Frames separated by a 2-byte length, each decoded with the link type its
/// first byte picks, then fed to a small flow table that expires and drains,
/// as the capture loop does.
pub fn flow(data: &[u8]) {
    let mut table = FlowTable::new(8, Duration::from_millis(5), Duration::from_millis(20));
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 0i64;
    while rest.len() >= 3 {
        let link = LINKS[usize::from(rest[0]) % LINKS.len()];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let body = &rest[3..];
        let frame = &body[..len.min(body.len())];
        rest = &body[frame.len()..];
        ts += 1_000_000 * i64::from(link.rem_euclid(7));
        if let Ok(p) = decode(link, frame) {
            table.add(&p, ts, &mut out);
        }
        table.expire(ts, &mut out);
    }
    table.drain(&mut out);
}

/// A netlink receive buffer (proc connector messages).
pub fn netlink(data: &[u8]) {
    for ev in netlink::parse(data) {
        let _ = format!("{ev:?}");
    }
}

/// `/proc` files: the first byte picks which parser reads the rest.
pub fn procfs(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 5 {
        0 => {
            let _ = procfs::parse_stat(&text);
        }
        1 => {
            let _ = procfs::parse_cmdline(rest);
        }
        2 => {
            let _ = sockets::parse_table(&text, "tcp");
        }
        3 => {
            let _ = sockets::parse_addr(&text);
        }
        _ => {
            let _ = neighbors::parse_arp(&text);
        }
    }
}

/// `/proc/<pid>/cgroup`.
pub fn cgroup(data: &[u8]) {
    let _ = cgroup::parse(&String::from_utf8_lossy(data));
}

/// An SNMP response datagram, decoded as the collector's session does, and
/// every value read the ways the collector reads them.
pub fn snmp_response(data: &[u8]) {
    let Ok(pdu) = snmp2::Pdu::from_bytes(data) else {
        return;
    };
    for (oid, value) in pdu.varbinds {
        let _ = oid.to_id_string();
        let v = Val::from(&value);
        let _ = (v.text(), v.uint(), v.mac());
    }
}

/// The agent's config file, parsed and resolved as `amoskys agent` does.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = crate::config::parse_config(text) else {
        return;
    };
    let flags = crate::AgentOverrides {
        agent_id: Some("fuzz".into()),
        tls_dir: Some("/nonexistent/tls".into()),
        spool_dir: Some("/nonexistent/spool".into()),
        ..Default::default()
    };
    let _ = crate::config::resolve(file, flags);
}
