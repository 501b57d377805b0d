//! Event filters shared by Query, Tail and the CLI: pure, no I/O.

use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Filter, Severity};

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub collectors: Vec<String>,
    pub agent_ids: Vec<String>,
    pub min_severity: i32,
    /// Lower-cased needle; empty matches everything.
    pub text: String,
}

impl EventFilter {
    /// Checks a wire filter; an unknown severity is an error naming the field.
    pub fn from_wire(f: Option<&Filter>) -> Result<Self, String> {
        let Some(f) = f else {
            return Ok(Self::default());
        };
        if Severity::try_from(f.min_severity).is_err() {
            return Err(format!(
                "filter.min_severity: {} is not a known severity",
                f.min_severity
            ));
        }
        Ok(Self {
            collectors: f
                .collectors
                .iter()
                .filter(|c| !c.is_empty())
                .cloned()
                .collect(),
            agent_ids: f
                .agent_ids
                .iter()
                .filter(|c| !c.is_empty())
                .cloned()
                .collect(),
            min_severity: f.min_severity,
            text: f.text.to_lowercase(),
        })
    }

    /// The wire form, for asking another shard the same.
    pub fn to_wire(&self) -> Filter {
        Filter {
            collectors: self.collectors.clone(),
            agent_ids: self.agent_ids.clone(),
            min_severity: self.min_severity,
            text: self.text.clone(),
        }
    }

    /// Whether it matches every event the bus stores: the bus refuses
    /// events of an unknown severity, so every stored one is at least 0.
    pub fn matches_all(&self) -> bool {
        self.collectors.is_empty()
            && self.agent_ids.is_empty()
            && self.min_severity <= 0
            && self.text.is_empty()
    }

    pub fn matches(&self, e: &Event) -> bool {
        (self.collectors.is_empty() || self.collectors.contains(&e.collector))
            && (self.agent_ids.is_empty() || self.agent_ids.contains(&e.agent_id))
            && e.severity >= self.min_severity
            && (self.text.is_empty() || text_matches(e, &self.text))
    }
}

/// Case-insensitive substring search over an event's human-readable fields.
fn text_matches(e: &Event, needle: &str) -> bool {
    let hit = |s: &str| !s.is_empty() && s.to_lowercase().contains(needle);
    if hit(&e.agent_id) || hit(&e.node) || hit(&e.collector) {
        return true;
    }
    if e.labels.iter().any(|(k, v)| hit(k) || hit(v)) {
        return true;
    }
    match &e.payload {
        Some(Payload::Process(p)) => {
            hit(&p.name)
                || hit(&p.exe)
                || hit(&p.user)
                || p.cmdline.iter().any(|a| hit(a))
                || hit(&p.pod_uid)
                || hit(&p.container_id)
        }
        Some(Payload::Flow(f)) => hit(&f.src_ip) || hit(&f.dst_ip) || hit(&f.interface),
        Some(Payload::Snmp(s)) => {
            hit(&s.target)
                || hit(&s.sys_name)
                || hit(&s.sys_descr)
                || hit(&s.error)
                || s.interfaces.iter().any(|i| hit(&i.name) || hit(&i.descr))
        }
        Some(Payload::Inventory(i)) => {
            hit(&i.discovered_ip)
                || i.host
                    .as_ref()
                    .is_some_and(|h| hit(&h.hostname) || hit(&h.os) || hit(&h.kernel))
                || i.listeners
                    .iter()
                    .any(|l| hit(&l.address) || hit(&l.process))
                || i.neighbors.iter().any(|n| hit(&n.ip) || hit(&n.mac))
        }
        Some(Payload::Alert(a)) => {
            hit(&a.rule)
                || hit(&a.summary)
                || hit(&a.description)
                || a.attributes.values().any(|v| hit(v))
        }
        Some(Payload::Gap(g)) => hit(&g.reason),
        Some(Payload::Heartbeat(h)) => hit(&h.version),
        Some(Payload::IncarnationStarted(i)) => hit(&i.node),
        Some(Payload::Synthetic(_)) | None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::ProcessEvent;

    fn proc_event(name: &str, sev: Severity) -> Event {
        Event {
            agent_id: "node-a".into(),
            collector: "process".into(),
            severity: sev as i32,
            payload: Some(Payload::Process(ProcessEvent {
                name: name.into(),
                cmdline: vec![name.into(), "--Flag".into()],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn filters_combine() {
        let e = proc_event("sshd", Severity::Warning);
        let f = |collectors: &[&str], agents: &[&str], sev: Severity, text: &str| {
            EventFilter::from_wire(Some(&Filter {
                collectors: collectors.iter().map(|s| s.to_string()).collect(),
                agent_ids: agents.iter().map(|s| s.to_string()).collect(),
                min_severity: sev as i32,
                text: text.into(),
            }))
            .unwrap()
        };
        assert!(f(&[], &[], Severity::Unspecified, "").matches(&e));
        assert!(f(&["process"], &["node-a"], Severity::Warning, "--flag").matches(&e));
        assert!(!f(&["flow"], &[], Severity::Unspecified, "").matches(&e));
        assert!(!f(&[], &["node-b"], Severity::Unspecified, "").matches(&e));
        assert!(!f(&[], &[], Severity::Error, "").matches(&e));
        assert!(!f(&[], &[], Severity::Unspecified, "nginx").matches(&e));
    }

    #[test]
    fn unknown_severity_is_named() {
        let err = EventFilter::from_wire(Some(&Filter {
            min_severity: 42,
            ..Default::default()
        }))
        .unwrap_err();
        assert!(err.contains("min_severity"));
    }
}
