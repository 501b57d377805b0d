//! Optional active discovery: TCP connect probes of configured ranges and
//! ports, rate-limited. Off by default; ranges above maxHosts are refused
//! when the config is loaded.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::task::JoinSet;

/// Addresses a probe run would visit.
pub fn host_count(net: &IpNet) -> u64 {
    let bits = net.max_prefix_len() - net.prefix_len();
    if bits >= 64 { u64::MAX } else { 1u64 << bits }
}

pub fn hosts(net: &IpNet) -> impl Iterator<Item = IpAddr> + '_ {
    net.hosts()
}

/// Probes every (host, port) at no more than `per_second` connects per
/// second; returns each host that answered with its open ports.
pub async fn probe(
    networks: &[IpNet],
    ports: &[u16],
    per_second: u32,
    timeout: Duration,
    stop: &tokio_util::sync::CancellationToken,
    on_probe: impl Fn(),
) -> Vec<(IpAddr, Vec<u16>)> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut set = JoinSet::new();
    let mut open: std::collections::BTreeMap<IpAddr, Vec<u16>> = Default::default();
    let mut collect = |r: Result<Option<(IpAddr, u16)>, tokio::task::JoinError>| {
        if let Ok(Some((ip, port))) = r {
            open.entry(ip).or_default().push(port);
        }
    };
    for net in networks {
        for ip in hosts(net) {
            for &port in ports {
                tokio::select! {
                    _ = stop.cancelled() => return Vec::new(),
                    _ = tick.tick() => {}
                }
                on_probe();
                set.spawn(async move {
                    let addr = SocketAddr::new(ip, port);
                    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
                    {
                        Ok(Ok(_)) => Some((ip, port)),
                        _ => None,
                    }
                });
                while let Some(r) = set.try_join_next() {
                    collect(r);
                }
            }
        }
    }
    while let Some(r) = set.join_next().await {
        collect(r);
    }
    open.into_iter()
        .map(|(ip, mut p)| {
            p.sort_unstable();
            (ip, p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hosts() {
        assert_eq!(host_count(&"10.0.0.0/24".parse().unwrap()), 256);
        assert_eq!(host_count(&"10.0.0.1/32".parse().unwrap()), 1);
        assert_eq!(host_count(&"fd00::/48".parse().unwrap()), u64::MAX);
    }

    #[tokio::test]
    async fn finds_an_open_port_and_not_a_closed_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let closed = {
            let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            t.local_addr().unwrap().port()
        };
        let probes = std::sync::atomic::AtomicU64::new(0);
        let found = probe(
            &["127.0.0.1/32".parse().unwrap()],
            &[open, closed],
            100,
            Duration::from_millis(500),
            &tokio_util::sync::CancellationToken::new(),
            || {
                probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
        )
        .await;
        assert_eq!(found, vec![("127.0.0.1".parse().unwrap(), vec![open])]);
        assert_eq!(probes.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
