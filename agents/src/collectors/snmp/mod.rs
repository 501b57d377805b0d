//! SNMP collector: polls v2c and v3 (USM, authPriv) targets for the system
//! group and the interface tables, computes rates from counter deltas, and
//! reports a device going down (timeouts, auth failures) and coming back.
//! Credentials are read from files when the config loads.

pub(crate) mod config;
pub(crate) mod device;
pub(crate) mod rates;

use std::collections::HashMap;
use std::time::SystemTime;

use amoskys_proto::event::Payload;
use amoskys_proto::snmp_event::Kind;
use amoskys_proto::{Severity, SnmpEvent, SnmpInterface};
use tokio::task::{JoinHandle, JoinSet};
use tracing::info;

use crate::collectors::context::Ctx;
use crate::config::SnmpConfig;
use crate::metrics::{TargetResultLabel, target};
use crate::spool::Draft;
use device::{Device, PollError, Reading};
use rates::Sample;

/// The collector's name in events, metrics and control.
pub const NAME: &str = "snmp";

struct TargetState {
    device: Option<Device>,
    name: String,
    up: Option<bool>,
    samples: HashMap<u64, Sample>,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Turns a reading into a poll event, updating the rate samples.
fn poll_event(name: &str, r: &Reading, samples: &mut HashMap<u64, Sample>) -> SnmpEvent {
    let sys = |i: u64| r.system.get(&i).map(|v| v.text()).unwrap_or_default();
    let uptime = r.system.get(&3).and_then(|v| v.uint()).unwrap_or(0);
    let at = now_secs();
    let mut interfaces = Vec::new();
    for (&index, cols) in &r.if_table {
        let x = r.ifx_table.get(&index);
        let xget = |c: u64| x.and_then(|m| m.get(&c));
        let get = |c: u64| cols.get(&c).and_then(|v| v.uint()).unwrap_or(0);
        // 64-bit counters where the device offers them.
        let (in_octets, out_octets, bits) = match (
            xget(6).and_then(|v| v.uint()),
            xget(10).and_then(|v| v.uint()),
        ) {
            (Some(i), Some(o)) => (i, o, 64),
            _ => (get(10), get(16), 32),
        };
        let speed_bps = match xget(15).and_then(|v| v.uint()) {
            Some(mbps) if mbps > 0 => mbps * 1_000_000,
            _ => get(5),
        };
        let cur = Sample {
            in_octets,
            out_octets,
            bits,
            uptime_ticks: uptime,
            at,
        };
        let (in_bps, out_bps) = samples
            .get(&index)
            .and_then(|prev| rates::rates(prev, &cur))
            .unwrap_or((0.0, 0.0));
        samples.insert(index, cur);
        interfaces.push(SnmpInterface {
            index: index as u32,
            name: xget(1).map(|v| v.text()).unwrap_or_default(),
            descr: cols.get(&2).map(|v| v.text()).unwrap_or_default(),
            oper_status: get(8) as u32,
            admin_status: get(7) as u32,
            speed_bps,
            in_octets,
            out_octets,
            in_bps,
            out_bps,
            in_errors: get(14),
            out_errors: get(20),
            mac: cols.get(&6).map(|v| v.mac()).unwrap_or_default(),
        });
    }
    SnmpEvent {
        kind: Kind::Poll as i32,
        target: name.into(),
        sys_descr: sys(1),
        sys_object_id: sys(2),
        sys_uptime_ticks: uptime,
        sys_contact: sys(4),
        sys_name: sys(5),
        sys_location: sys(6),
        interfaces,
        error: String::new(),
    }
}

fn transition(kind: Kind, name: &str, error: String) -> Draft {
    let sev = if kind == Kind::DeviceDown {
        Severity::Warning
    } else {
        Severity::Notice
    };
    Draft::new(
        NAME,
        sev,
        Payload::Snmp(SnmpEvent {
            kind: kind as i32,
            target: name.into(),
            error,
            ..Default::default()
        }),
    )
}

/// Starts polling every target.
pub fn spawn(cfg: SnmpConfig, ctx: Ctx) -> super::Started {
    Ok(Some(run(cfg, ctx)))
}

fn run(cfg: SnmpConfig, mut ctx: Ctx) -> JoinHandle<()> {
    ctx.status.set_mode("poll");
    tokio::spawn(async move {
        let mut targets: Vec<TargetState> = cfg
            .targets
            .iter()
            .map(|t| TargetState {
                name: t.name.clone(),
                device: Some(Device::new(t.clone(), cfg.timeout, cfg.retries)),
                up: None,
                samples: HashMap::new(),
            })
            .collect();
        loop {
            if !ctx.wait_unpaused().await {
                return;
            }
            // All targets at once: a dead device must not delay the others.
            let mut set = JoinSet::new();
            for (i, t) in targets.iter_mut().enumerate() {
                if let Some(mut d) = t.device.take() {
                    set.spawn_blocking(move || {
                        let r = d.poll();
                        (i, d, r)
                    });
                }
            }
            let mut results: Vec<(usize, Result<Reading, PollError>)> = Vec::new();
            while let Some(j) = set.join_next().await {
                if let Ok((i, d, r)) = j {
                    targets[i].device = Some(d);
                    results.push((i, r));
                }
            }
            results.sort_by_key(|(i, _)| *i);
            for (i, r) in results {
                let t = &mut targets[i];
                let result = match &r {
                    Ok(_) => "ok",
                    Err(e) => e.label(),
                };
                ctx.metrics
                    .snmp_polls
                    .get_or_create(&TargetResultLabel {
                        target: t.name.clone(),
                        result: result.into(),
                    })
                    .inc();
                ctx.metrics
                    .snmp_up
                    .get_or_create(&target(&t.name))
                    .set(r.is_ok() as i64);
                let mut out = Vec::new();
                match r {
                    Ok(reading) => {
                        if t.up == Some(false) {
                            info!(collector = NAME, target = %t.name, "device is back");
                            out.push(transition(Kind::DeviceUp, &t.name, String::new()));
                        }
                        t.up = Some(true);
                        out.push(Draft::new(
                            NAME,
                            Severity::Info,
                            Payload::Snmp(poll_event(&t.name, &reading, &mut t.samples)),
                        ));
                    }
                    Err(e) => {
                        ctx.status.error(format!("{}: {e}", t.name));
                        if t.up != Some(false) {
                            out.push(transition(Kind::DeviceDown, &t.name, e.to_string()));
                        }
                        t.up = Some(false);
                    }
                }
                for d in out {
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
