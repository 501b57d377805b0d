//! What a rule sees of an event: CEL variables named after the payload
//! (`process`, `flow`, `snmp`, `inventory`, `gap`, `incarnation`) beside
//! `event` (envelope) and `k8s` (the pod), with camelCase fields as
//! Kubernetes users write them in CRD validation rules.
//!
//! The schema below is the one list of fields: conditions, exceptions,
//! dedup keys and summaries are checked against it when a rule compiles,
//! inline test events are read through it, and a test keeps the conversion
//! of real events in step with it.

use std::collections::HashMap;
use std::sync::Arc;

use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Severity};
use cel::Value;
use cel::objects::{Key, Map};

/// A field's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    /// A string.
    Str,
    /// A whole number (every number is a CEL `int`).
    Int,
    /// A list of strings.
    StrList,
    /// A list of numbers.
    IntList,
    /// A map of strings to strings (labels).
    StrMap,
    /// An object with these fields.
    Obj(&'static [Field]),
    /// A list of objects with these fields.
    ObjList(&'static [Field]),
}

/// One field of a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Its name in CEL.
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
}

const fn f(name: &'static str, ty: Ty) -> Field {
    Field { name, ty }
}

use Ty::{Int, IntList, Obj, ObjList, Str, StrList, StrMap};

/// `event`: the envelope every event has.
pub const EVENT: &[Field] = &[
    f("agentId", Str),
    f("node", Str),
    f("collector", Str),
    f("type", Str),
    f("kind", Str),
    f("severity", Str),
    f("labels", StrMap),
    f("seq", Int),
    f("observedAt", Int),
    f("storedAt", Int),
];

/// `k8s`: the pod the event is about (empty strings for node events).
pub const K8S: &[Field] = &[
    f("namespace", Str),
    f("pod", Str),
    f("podUid", Str),
    f("labels", StrMap),
    f("serviceAccount", Str),
    f("container", Str),
    f("image", Str),
];

const PARENT: &[Field] = &[f("name", Str), f("exe", Str)];

/// `process`.
pub const PROCESS: &[Field] = &[
    f("pid", Int),
    f("ppid", Int),
    f("uid", Int),
    f("user", Str),
    f("name", Str),
    f("exe", Str),
    f("cmdline", StrList),
    f("args", Str),
    f("startTime", Int),
    f("exitCode", Int),
    f("containerId", Str),
    f("podUid", Str),
    f("cgroup", Str),
    f("source", Str),
    f("parent", Obj(PARENT)),
];

/// `flow`.
pub const FLOW: &[Field] = &[
    f("srcIp", Str),
    f("srcPort", Int),
    f("dstIp", Str),
    f("dstPort", Int),
    f("protocol", Int),
    f("proto", Str),
    f("vlan", Int),
    f("packets", Int),
    f("bytes", Int),
    f("payloadBytes", Int),
    f("tcpFlags", Int),
    f("interface", Str),
    f("endReason", Str),
    f("firstSeen", Int),
    f("lastSeen", Int),
    f("pid", Int),
    f("process", Str),
    f("exe", Str),
    f("owner", Str),
    f("containerId", Str),
    f("podUid", Str),
];

const SNMP_INTERFACE: &[Field] = &[
    f("index", Int),
    f("name", Str),
    f("descr", Str),
    f("operStatus", Int),
    f("adminStatus", Int),
    f("speedBps", Int),
    f("inErrors", Int),
    f("outErrors", Int),
];

/// `snmp`.
pub const SNMP: &[Field] = &[
    f("target", Str),
    f("sysName", Str),
    f("sysDescr", Str),
    f("sysObjectId", Str),
    f("sysUptimeTicks", Int),
    f("sysContact", Str),
    f("sysLocation", Str),
    f("error", Str),
    f("interfaces", ObjList(SNMP_INTERFACE)),
];

const LISTENER: &[Field] = &[
    f("protocol", Str),
    f("address", Str),
    f("port", Int),
    f("pid", Int),
    f("process", Str),
];

const NEIGHBOR: &[Field] = &[
    f("ip", Str),
    f("mac", Str),
    f("interface", Str),
    f("state", Str),
];

const HOST: &[Field] = &[
    f("hostname", Str),
    f("os", Str),
    f("osVersion", Str),
    f("kernel", Str),
    f("arch", Str),
];

/// `inventory`.
pub const INVENTORY: &[Field] = &[
    f("host", Obj(HOST)),
    f("listeners", ObjList(LISTENER)),
    f("neighbors", ObjList(NEIGHBOR)),
    f("discoveredIp", Str),
    f("openPorts", IntList),
];

/// `gap`: events an agent's spool dropped, or a range the bus lost.
pub const GAP: &[Field] = &[
    f("dropped", Int),
    f("firstSeq", Int),
    f("lastSeq", Int),
    f("reason", Str),
];

/// `incarnation`: an agent that started over with a new spool.
pub const INCARNATION: &[Field] = &[
    f("incarnation", Str),
    f("previousIncarnation", Str),
    f("previousLastSeq", Int),
    f("previousUnacked", Int),
];

/// The payload kinds a rule may match, each with its variable's fields and
/// the kinds it has (empty: no kinds).
pub const PAYLOADS: &[(&str, &[Field], &[&str])] = &[
    ("process", PROCESS, &["start", "exit", "snapshot"]),
    ("flow", FLOW, &[]),
    ("snmp", SNMP, &["poll", "device_down", "device_up"]),
    (
        "inventory",
        INVENTORY,
        &[
            "snapshot",
            "listener_added",
            "listener_removed",
            "neighbor_added",
            "neighbor_removed",
            "discovered",
        ],
    ),
    ("gap", GAP, &[]),
    ("incarnation", INCARNATION, &[]),
];

/// The fields of variable `name` for rules on `payload`.
pub fn variable(payload: &str, name: &str) -> Option<&'static [Field]> {
    match name {
        "event" => Some(EVENT),
        "k8s" => Some(K8S),
        _ if name == payload => PAYLOADS.iter().find(|p| p.0 == name).map(|p| p.1),
        _ => None,
    }
}

/// The type at `path` (`process.parent.name`) for rules on `payload`.
pub fn field_type(payload: &str, path: &str) -> Option<Ty> {
    let mut parts = path.split('.');
    let mut fields = variable(payload, parts.next()?)?;
    let mut ty = None;
    for part in parts {
        if let Some(Ty::Obj(sub)) = ty {
            fields = sub;
        } else if ty.is_some() {
            return None;
        }
        ty = Some(fields.iter().find(|f| f.name == part)?.ty);
    }
    ty
}

/// The payload type and kind of a stored event: `("process", "start")`;
/// None for what rules never see (heartbeats, alerts, synthetic load).
pub fn payload_kind(e: &Event) -> Option<(&'static str, &'static str)> {
    use amoskys_proto::{
        inventory_event::Kind as I, process_event::Kind as P, snmp_event::Kind as S,
    };
    Some(match e.payload.as_ref()? {
        Payload::Process(p) => (
            "process",
            match P::try_from(p.kind).unwrap_or_default() {
                P::Start => "start",
                P::Exit => "exit",
                P::Snapshot => "snapshot",
                P::Unspecified => "",
            },
        ),
        Payload::Flow(_) => ("flow", ""),
        Payload::Snmp(s) => (
            "snmp",
            match S::try_from(s.kind).unwrap_or_default() {
                S::Poll => "poll",
                S::DeviceDown => "device_down",
                S::DeviceUp => "device_up",
                S::Unspecified => "",
            },
        ),
        Payload::Inventory(i) => (
            "inventory",
            match I::try_from(i.kind).unwrap_or_default() {
                I::Snapshot => "snapshot",
                I::ListenerAdded => "listener_added",
                I::ListenerRemoved => "listener_removed",
                I::NeighborAdded => "neighbor_added",
                I::NeighborRemoved => "neighbor_removed",
                I::Discovered => "discovered",
                I::Unspecified => "",
            },
        ),
        Payload::Gap(_) => ("gap", ""),
        Payload::IncarnationStarted(_) => ("incarnation", ""),
        Payload::Heartbeat(_) | Payload::Alert(_) | Payload::Synthetic(_) => return None,
    })
}

/// The variables one event binds: `event`, `k8s` and its payload's.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    /// The payload type (`process`, …).
    pub payload: &'static str,
    /// `event`.
    pub event: Value,
    /// `k8s`.
    pub k8s: Value,
    /// The payload's variable.
    pub body: Value,
}

fn s(v: &str) -> Value {
    Value::String(Arc::new(v.to_string()))
}

fn i<T: TryInto<i64>>(v: T) -> Value {
    Value::Int(v.try_into().unwrap_or(i64::MAX))
}

fn obj<const N: usize>(fields: [(&'static str, Value); N]) -> Value {
    let map: HashMap<Key, Value> = fields.into_iter().map(|(k, v)| (Key::from(k), v)).collect();
    Value::Map(Map { map: Arc::new(map) })
}

fn str_map<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    let map: HashMap<Key, Value> = m
        .into_iter()
        .map(|(k, v)| (Key::from(k.as_str()), s(v)))
        .collect();
    Value::Map(Map { map: Arc::new(map) })
}

fn list(items: Vec<Value>) -> Value {
    Value::List(Arc::new(items))
}

fn severity_name(n: i32) -> &'static str {
    match Severity::try_from(n).unwrap_or_default() {
        Severity::Unspecified => "unspecified",
        Severity::Debug => "debug",
        Severity::Info => "info",
        Severity::Notice => "notice",
        Severity::Warning => "warning",
        Severity::Error => "error",
        Severity::Critical => "critical",
    }
}

fn proto_name(p: u32) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

fn hex(i: u64) -> String {
    format!("{i:016x}")
}

impl View {
    /// The view of a stored event; None for events rules never see.
    pub fn of(e: &Event) -> Option<Self> {
        let (payload, kind) = payload_kind(e)?;
        let event = obj([
            ("agentId", s(&e.agent_id)),
            ("node", s(&e.node)),
            ("collector", s(&e.collector)),
            ("type", s(payload)),
            ("kind", s(kind)),
            ("severity", s(severity_name(e.severity))),
            ("labels", str_map(&e.labels)),
            ("seq", i(e.seq)),
            ("observedAt", i(e.observed_at)),
            ("storedAt", i(e.stored_at)),
        ]);
        let k = e.k8s.clone().unwrap_or_default();
        let k8s = obj([
            ("namespace", s(&k.namespace)),
            ("pod", s(&k.pod)),
            ("podUid", s(&k.pod_uid)),
            ("labels", str_map(&k.labels)),
            ("serviceAccount", s(&k.service_account)),
            ("container", s(&k.container)),
            ("image", s(&k.image)),
        ]);
        let body = match e.payload.as_ref()? {
            Payload::Process(p) => obj([
                ("pid", i(p.pid)),
                ("ppid", i(p.ppid)),
                ("uid", i(p.uid)),
                ("user", s(&p.user)),
                ("name", s(&p.name)),
                ("exe", s(&p.exe)),
                ("cmdline", list(p.cmdline.iter().map(|a| s(a)).collect())),
                ("args", s(&p.cmdline.join(" "))),
                ("startTime", i(p.start_time)),
                ("exitCode", i(p.exit_code)),
                ("containerId", s(&p.container_id)),
                ("podUid", s(&p.pod_uid)),
                ("cgroup", s(&p.cgroup)),
                ("source", s(&p.source)),
                (
                    "parent",
                    obj([("name", s(&p.parent_name)), ("exe", s(&p.parent_exe))]),
                ),
            ]),
            Payload::Flow(fl) => obj([
                ("srcIp", s(&fl.src_ip)),
                ("srcPort", i(fl.src_port)),
                ("dstIp", s(&fl.dst_ip)),
                ("dstPort", i(fl.dst_port)),
                ("protocol", i(fl.protocol)),
                ("proto", s(&proto_name(fl.protocol))),
                ("vlan", i(fl.vlan)),
                ("packets", i(fl.packets)),
                ("bytes", i(fl.bytes)),
                ("payloadBytes", i(fl.payload_bytes)),
                ("tcpFlags", i(fl.tcp_flags)),
                ("interface", s(&fl.interface)),
                ("endReason", s(&fl.end_reason)),
                ("firstSeen", i(fl.first_seen)),
                ("lastSeen", i(fl.last_seen)),
                ("pid", i(fl.pid)),
                ("process", s(&fl.process)),
                ("exe", s(&fl.exe)),
                ("owner", s(&fl.owner)),
                ("containerId", s(&fl.container_id)),
                ("podUid", s(&fl.pod_uid)),
            ]),
            Payload::Snmp(sn) => obj([
                ("target", s(&sn.target)),
                ("sysName", s(&sn.sys_name)),
                ("sysDescr", s(&sn.sys_descr)),
                ("sysObjectId", s(&sn.sys_object_id)),
                ("sysUptimeTicks", i(sn.sys_uptime_ticks)),
                ("sysContact", s(&sn.sys_contact)),
                ("sysLocation", s(&sn.sys_location)),
                ("error", s(&sn.error)),
                (
                    "interfaces",
                    list(
                        sn.interfaces
                            .iter()
                            .map(|x| {
                                obj([
                                    ("index", i(x.index)),
                                    ("name", s(&x.name)),
                                    ("descr", s(&x.descr)),
                                    ("operStatus", i(x.oper_status)),
                                    ("adminStatus", i(x.admin_status)),
                                    ("speedBps", i(x.speed_bps)),
                                    ("inErrors", i(x.in_errors)),
                                    ("outErrors", i(x.out_errors)),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
            Payload::Inventory(inv) => {
                let h = inv.host.clone().unwrap_or_default();
                obj([
                    (
                        "host",
                        obj([
                            ("hostname", s(&h.hostname)),
                            ("os", s(&h.os)),
                            ("osVersion", s(&h.os_version)),
                            ("kernel", s(&h.kernel)),
                            ("arch", s(&h.arch)),
                        ]),
                    ),
                    (
                        "listeners",
                        list(
                            inv.listeners
                                .iter()
                                .map(|l| {
                                    obj([
                                        ("protocol", s(&l.protocol)),
                                        ("address", s(&l.address)),
                                        ("port", i(l.port)),
                                        ("pid", i(l.pid)),
                                        ("process", s(&l.process)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                    (
                        "neighbors",
                        list(
                            inv.neighbors
                                .iter()
                                .map(|n| {
                                    obj([
                                        ("ip", s(&n.ip)),
                                        ("mac", s(&n.mac)),
                                        ("interface", s(&n.interface)),
                                        ("state", s(&n.state)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                    ("discoveredIp", s(&inv.discovered_ip)),
                    (
                        "openPorts",
                        list(inv.open_ports.iter().map(|p| i(*p)).collect()),
                    ),
                ])
            }
            Payload::Gap(g) => obj([
                ("dropped", i(g.dropped)),
                ("firstSeq", i(g.first_seq)),
                ("lastSeq", i(g.last_seq)),
                ("reason", s(&g.reason)),
            ]),
            Payload::IncarnationStarted(n) => obj([
                ("incarnation", s(&hex(n.incarnation))),
                ("previousIncarnation", s(&hex(n.previous_incarnation))),
                ("previousLastSeq", i(n.previous_last_seq)),
                ("previousUnacked", i(n.previous_unacked)),
            ]),
            Payload::Heartbeat(_) | Payload::Alert(_) | Payload::Synthetic(_) => return None,
        };
        Some(Self {
            payload,
            event,
            k8s,
            body,
        })
    }

    /// A test event: JSON (from YAML) with any of `event`, `k8s` and the
    /// payload's variable, every field it leaves out at its zero value. A
    /// field the schema does not have is an error naming it.
    pub fn from_json(payload: &str, v: &serde_json::Value) -> Result<Self, String> {
        let (payload, body_fields, _) = PAYLOADS
            .iter()
            .find(|p| p.0 == payload)
            .copied()
            .ok_or_else(|| format!("{payload:?} is not an event type rules can match"))?;
        let top = v
            .as_object()
            .ok_or("an event is an object of event, k8s and the payload's fields")?;
        for k in top.keys() {
            if k != "event" && k != "k8s" && k != payload {
                return Err(format!(
                    "{k}: not a variable of {payload} events (event, k8s, {payload})"
                ));
            }
        }
        let mut event = from_json_obj("event", EVENT, top.get("event"))?;
        if let Value::Map(m) = &mut event {
            // The type is the rule's; the kind is whatever the test says.
            Arc::make_mut(&mut m.map).insert(Key::from("type"), s(payload));
        }
        Ok(Self {
            payload,
            event,
            k8s: from_json_obj("k8s", K8S, top.get("k8s"))?,
            body: from_json_obj(payload, body_fields, top.get(payload))?,
        })
    }

    /// The value at a field path, e.g. `process.parent.name`.
    pub fn get(&self, path: &str) -> Option<&Value> {
        let mut parts = path.split('.');
        let mut v = match parts.next()? {
            "event" => &self.event,
            "k8s" => &self.k8s,
            p if p == self.payload => &self.body,
            _ => return None,
        };
        for part in parts {
            match v {
                Value::Map(m) => v = m.map.get(&Key::from(part))?,
                _ => return None,
            }
        }
        Some(v)
    }

    /// Sets `event.storedAt` (test events stored one after another).
    pub fn set_stored_at(&mut self, t: i64) {
        self.set_event_field("storedAt", Value::Int(t));
    }

    /// Sets `event.kind` (a test event that leaves it out).
    pub fn set_kind(&mut self, kind: &str) {
        self.set_event_field("kind", s(kind));
    }

    fn set_event_field(&mut self, name: &str, v: Value) {
        if let Value::Map(m) = &mut self.event {
            Arc::make_mut(&mut m.map).insert(Key::from(name), v);
        }
    }

    /// The CEL context binding this view's variables.
    pub fn context(&self, env: &Arc<cel::Env>) -> cel::Context<'static, 'static> {
        let mut ctx = cel::Context::with_env(env.clone());
        ctx.add_variable_from_value("event", self.event.clone());
        ctx.add_variable_from_value("k8s", self.k8s.clone());
        ctx.add_variable_from_value(self.payload, self.body.clone());
        ctx
    }

    /// The event's stored time (Unix ns).
    pub fn stored_at(&self) -> i64 {
        match self.get("event.storedAt") {
            Some(Value::Int(t)) => *t,
            _ => 0,
        }
    }

    /// The event's pod namespace ("" for a node event).
    pub fn namespace(&self) -> &str {
        match self.get("k8s.namespace") {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        }
    }

    /// The pod's label `key`.
    pub fn pod_label(&self, key: &str) -> Option<&str> {
        match self.get("k8s.labels") {
            Some(Value::Map(m)) => match m.map.get(&Key::from(key)) {
                Some(Value::String(s)) => Some(s.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// One field's value as prechecks read it.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar<'a> {
    /// A string field.
    Str(std::borrow::Cow<'a, str>),
    /// A number field.
    Int(i64),
    /// A list, map or object, as its text.
    Other(String),
}

impl Scalar<'_> {
    /// As text (exception tuples, keys).
    pub fn text(&self) -> String {
        match self {
            Self::Str(s) => s.to_string(),
            Self::Int(n) => n.to_string(),
            Self::Other(t) => t.clone(),
        }
    }

    fn of(v: &Value) -> Scalar<'_> {
        match v {
            Value::String(s) => Scalar::Str(std::borrow::Cow::Borrowed(s.as_str())),
            Value::Int(n) => Scalar::Int(*n),
            other => Scalar::Other(text(other)),
        }
    }
}

/// What the checks before CEL read of an event.
pub trait Fields {
    /// The value at a field path.
    fn field(&self, path: &str) -> Option<Scalar<'_>>;
    /// The pod's namespace ("" for a node event).
    fn namespace(&self) -> &str;
    /// The pod's label `key`.
    fn pod_label(&self, key: &str) -> Option<&str>;
}

impl Fields for View {
    fn field(&self, path: &str) -> Option<Scalar<'_>> {
        self.get(path).map(Scalar::of)
    }
    fn namespace(&self) -> &str {
        View::namespace(self)
    }
    fn pod_label(&self, key: &str) -> Option<&str> {
        View::pod_label(self, key)
    }
}

/// A stored event read in place: string and number fields straight from
/// the message, without building CEL maps; anything else (lists, objects,
/// the rare field) from its [`View`], built once on first need. Most events
/// are decided by prefilters alone, so most never build one.
pub struct EventRef<'a> {
    e: &'a Event,
    /// The payload type.
    pub payload: &'static str,
    /// The payload's kind.
    pub kind: &'static str,
    view: std::cell::OnceCell<Option<View>>,
}

impl<'a> EventRef<'a> {
    /// None for events rules never see.
    pub fn new(e: &'a Event) -> Option<Self> {
        let (payload, kind) = payload_kind(e)?;
        Some(Self {
            e,
            payload,
            kind,
            view: std::cell::OnceCell::new(),
        })
    }

    /// The full view, built on first call.
    pub fn view(&self) -> Option<&View> {
        self.view.get_or_init(|| View::of(self.e)).as_ref()
    }

    /// The event.
    pub fn event(&self) -> &Event {
        self.e
    }

    fn direct(&self, path: &str) -> Option<Scalar<'a>> {
        use Scalar::{Int, Str};
        use std::borrow::Cow::Borrowed;
        let e = self.e;
        let n = |v: i64| Some(Int(v));
        let (root, rest) = path.split_once('.')?;
        match (root, rest) {
            ("event", "agentId") => Some(Str(Borrowed(&e.agent_id))),
            ("event", "node") => Some(Str(Borrowed(&e.node))),
            ("event", "collector") => Some(Str(Borrowed(&e.collector))),
            ("event", "type") => Some(Str(Borrowed(self.payload))),
            ("event", "kind") => Some(Str(Borrowed(self.kind))),
            ("event", "severity") => Some(Str(Borrowed(severity_name(e.severity)))),
            ("event", "seq") => n(e.seq.try_into().unwrap_or(i64::MAX)),
            ("event", "observedAt") => n(e.observed_at),
            ("event", "storedAt") => n(e.stored_at),
            ("k8s", f) => {
                let k = e.k8s.as_ref();
                let get = |s: Option<&'a String>| Some(Str(Borrowed(s.map_or("", |s| s.as_str()))));
                match f {
                    "namespace" => get(k.map(|k| &k.namespace)),
                    "pod" => get(k.map(|k| &k.pod)),
                    "podUid" => get(k.map(|k| &k.pod_uid)),
                    "serviceAccount" => get(k.map(|k| &k.service_account)),
                    "container" => get(k.map(|k| &k.container)),
                    "image" => get(k.map(|k| &k.image)),
                    _ => None,
                }
            }
            (root, f) if root == self.payload => match e.payload.as_ref()? {
                Payload::Process(p) => match f {
                    "pid" => n(p.pid.into()),
                    "ppid" => n(p.ppid.into()),
                    "uid" => n(p.uid.into()),
                    "user" => Some(Str(Borrowed(&p.user))),
                    "name" => Some(Str(Borrowed(&p.name))),
                    "exe" => Some(Str(Borrowed(&p.exe))),
                    "startTime" => n(p.start_time),
                    "exitCode" => n(p.exit_code.into()),
                    "containerId" => Some(Str(Borrowed(&p.container_id))),
                    "podUid" => Some(Str(Borrowed(&p.pod_uid))),
                    "cgroup" => Some(Str(Borrowed(&p.cgroup))),
                    "source" => Some(Str(Borrowed(&p.source))),
                    "parent.name" => Some(Str(Borrowed(&p.parent_name))),
                    "parent.exe" => Some(Str(Borrowed(&p.parent_exe))),
                    _ => None,
                },
                Payload::Flow(fl) => match f {
                    "srcIp" => Some(Str(Borrowed(&fl.src_ip))),
                    "dstIp" => Some(Str(Borrowed(&fl.dst_ip))),
                    "srcPort" => n(fl.src_port.into()),
                    "dstPort" => n(fl.dst_port.into()),
                    "protocol" => n(fl.protocol.into()),
                    "proto" => Some(Str(match fl.protocol {
                        1 => Borrowed("icmp"),
                        6 => Borrowed("tcp"),
                        17 => Borrowed("udp"),
                        58 => Borrowed("icmpv6"),
                        other => std::borrow::Cow::Owned(other.to_string()),
                    })),
                    "vlan" => n(fl.vlan.into()),
                    "interface" => Some(Str(Borrowed(&fl.interface))),
                    "endReason" => Some(Str(Borrowed(&fl.end_reason))),
                    "pid" => n(fl.pid.into()),
                    "process" => Some(Str(Borrowed(&fl.process))),
                    "exe" => Some(Str(Borrowed(&fl.exe))),
                    "owner" => Some(Str(Borrowed(&fl.owner))),
                    "containerId" => Some(Str(Borrowed(&fl.container_id))),
                    "podUid" => Some(Str(Borrowed(&fl.pod_uid))),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }
}

impl Fields for EventRef<'_> {
    fn field(&self, path: &str) -> Option<Scalar<'_>> {
        if let Some(v) = self.direct(path) {
            return Some(v);
        }
        self.view()?.get(path).map(Scalar::of)
    }
    fn namespace(&self) -> &str {
        self.e.k8s.as_ref().map_or("", |k| k.namespace.as_str())
    }
    fn pod_label(&self, key: &str) -> Option<&str> {
        self.e.k8s.as_ref()?.labels.get(key).map(String::as_str)
    }
}

/// A value as text, for summaries and keys.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        Value::Int(n) => n.to_string(),
        Value::UInt(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::List(items) => items.iter().map(text).collect::<Vec<_>>().join(" "),
        Value::Null => String::new(),
        Value::Map(m) => {
            let mut kv: Vec<(String, String)> = m
                .map
                .iter()
                .map(|(k, v)| (k.to_string(), text(v)))
                .collect();
            kv.sort();
            kv.into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
        other => format!("{other:?}"),
    }
}

fn zero(ty: Ty) -> Value {
    match ty {
        Ty::Str => s(""),
        Ty::Int => Value::Int(0),
        Ty::StrList | Ty::IntList | Ty::ObjList(_) => list(Vec::new()),
        Ty::StrMap => str_map(std::iter::empty()),
        Ty::Obj(fields) => from_fields(fields, |_| Ok(None)).unwrap_or(Value::Null),
    }
}

fn from_fields(
    fields: &'static [Field],
    mut given: impl FnMut(&Field) -> Result<Option<Value>, String>,
) -> Result<Value, String> {
    let mut map = HashMap::with_capacity(fields.len());
    for fd in fields {
        let v = match given(fd)? {
            Some(v) => v,
            None => zero(fd.ty),
        };
        map.insert(Key::from(fd.name), v);
    }
    Ok(Value::Map(Map { map: Arc::new(map) }))
}

fn from_json_obj(
    at: &str,
    fields: &'static [Field],
    v: Option<&serde_json::Value>,
) -> Result<Value, String> {
    let empty = serde_json::Map::new();
    let o = match v {
        None | Some(serde_json::Value::Null) => &empty,
        Some(serde_json::Value::Object(o)) => o,
        Some(_) => return Err(format!("{at}: must be an object")),
    };
    for k in o.keys() {
        if !fields.iter().any(|f| f.name == k) {
            let names: Vec<_> = fields.iter().map(|f| f.name).collect();
            return Err(format!(
                "{at}.{k}: no such field (fields: {})",
                names.join(", ")
            ));
        }
    }
    from_fields(fields, |fd| {
        o.get(fd.name)
            .map(|v| from_json(&format!("{at}.{}", fd.name), fd.ty, v))
            .transpose()
    })
}

fn from_json(at: &str, ty: Ty, v: &serde_json::Value) -> Result<Value, String> {
    use serde_json::Value as J;
    let want = |what: &str| format!("{at}: must be {what}");
    Ok(match (ty, v) {
        (Ty::Str, J::String(x)) => s(x),
        // YAML reads `port: 22` as a number and `agentId: 7` too: a number
        // where a string goes is its text.
        (Ty::Str, J::Number(n)) => s(&n.to_string()),
        (Ty::Int, J::Number(n)) => Value::Int(n.as_i64().ok_or_else(|| want("a whole number"))?),
        (Ty::StrList, J::Array(a)) => list(
            a.iter()
                .enumerate()
                .map(|(n, x)| from_json(&format!("{at}[{n}]"), Ty::Str, x))
                .collect::<Result<_, _>>()?,
        ),
        (Ty::IntList, J::Array(a)) => list(
            a.iter()
                .enumerate()
                .map(|(n, x)| from_json(&format!("{at}[{n}]"), Ty::Int, x))
                .collect::<Result<_, _>>()?,
        ),
        (Ty::StrMap, J::Object(o)) => {
            let mut map = HashMap::new();
            for (k, x) in o {
                map.insert(
                    Key::from(k.as_str()),
                    from_json(&format!("{at}.{k}"), Ty::Str, x)?,
                );
            }
            Value::Map(Map { map: Arc::new(map) })
        }
        (Ty::Obj(fields), J::Object(_)) => from_json_obj(at, fields, Some(v))?,
        (Ty::ObjList(fields), J::Array(a)) => list(
            a.iter()
                .enumerate()
                .map(|(n, x)| from_json_obj(&format!("{at}[{n}]"), fields, Some(x)))
                .collect::<Result<_, _>>()?,
        ),
        (Ty::Str, _) => return Err(want("a string")),
        (Ty::Int, _) => return Err(want("a number")),
        (Ty::StrList | Ty::IntList | Ty::ObjList(_), _) => return Err(want("a list")),
        (Ty::StrMap | Ty::Obj(_), _) => return Err(want("an object")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::*;

    /// The keys a value has, recursively, as `a.b` paths, lists looked into
    /// at their first item.
    fn paths(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Map(m) if !prefix.ends_with("labels") => {
                for (k, x) in m.map.iter() {
                    let Key::String(k) = k else { continue };
                    paths(&format!("{prefix}.{k}"), x, out);
                }
            }
            Value::List(items) if items.first().is_some_and(|x| matches!(x, Value::Map(_))) => {
                paths(&format!("{prefix}[]"), &items[0], out);
            }
            _ => out.push(prefix.to_string()),
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn full_events() -> Vec<Event> {
        let payloads = vec![
            event::Payload::Process(ProcessEvent::default()),
            event::Payload::Flow(FlowEvent::default()),
            event::Payload::Snmp(SnmpEvent {
                interfaces: vec![SnmpInterface::default()],
                ..Default::default()
            }),
            event::Payload::Inventory(InventoryEvent {
                listeners: vec![Listener::default()],
                neighbors: vec![Neighbor::default()],
                ..Default::default()
            }),
            event::Payload::Gap(GapEvent::default()),
            event::Payload::IncarnationStarted(IncarnationEvent::default()),
        ];
        payloads
            .into_iter()
            .map(|p| Event {
                payload: Some(p),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn real_events_and_test_events_have_exactly_the_schema_fields() {
        for e in full_events() {
            let real = View::of(&e).unwrap();
            // A test event naming every list with one object in it.
            let mut body = serde_json::Map::new();
            let (_, fields, _) = PAYLOADS.iter().find(|p| p.0 == real.payload).unwrap();
            for fd in *fields {
                if let Ty::ObjList(_) = fd.ty {
                    body.insert(fd.name.into(), serde_json::json!([{}]));
                }
            }
            let test =
                View::from_json(real.payload, &serde_json::json!({ real.payload: body })).unwrap();
            for (name, a, b) in [
                ("event", &real.event, &test.event),
                ("k8s", &real.k8s, &test.k8s),
                (real.payload, &real.body, &test.body),
            ] {
                let (mut pa, mut pb) = (Vec::new(), Vec::new());
                paths(name, a, &mut pa);
                paths(name, b, &mut pb);
                assert_eq!(sorted(pa.clone()), sorted(pb), "{name}");
                // Inside a list of objects the shape check above holds.
                for p in pa.iter().filter(|p| !p.contains("[]")) {
                    assert!(field_type(real.payload, p).is_some(), "{p}");
                }
            }
        }
    }

    /// Every field path of the schema (not into lists of objects).
    fn schema_paths(prefix: &str, fields: &[Field], out: &mut Vec<String>) {
        for f in fields {
            let p = format!("{prefix}.{}", f.name);
            if let Ty::Obj(sub) = f.ty {
                schema_paths(&p, sub, out);
            } else {
                out.push(p);
            }
        }
    }

    #[test]
    fn events_read_in_place_say_what_their_views_say() {
        let mut events = full_events();
        for (i, e) in events.iter_mut().enumerate() {
            e.agent_id = format!("a{i}");
            e.node = "n".into();
            e.seq = 7 + i as u64;
            e.stored_at = 99;
            e.severity = Severity::Warning as i32;
            e.k8s = Some(K8sIdentity {
                namespace: "ns".into(),
                pod: "p".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            });
            match e.payload.as_mut().unwrap() {
                event::Payload::Process(p) => {
                    p.kind = process_event::Kind::Start as i32;
                    p.name = "sh".into();
                    p.exe = "/bin/sh".into();
                    p.cmdline = vec!["sh".into(), "-c".into()];
                    p.parent_name = "nginx".into();
                    p.pid = 42;
                }
                event::Payload::Flow(f) => {
                    f.src_ip = "10.0.0.1".into();
                    f.dst_port = 443;
                    f.protocol = 99;
                }
                _ => {}
            }
        }
        for e in &events {
            let r = EventRef::new(e).unwrap();
            let v = View::of(e).unwrap();
            let mut paths = Vec::new();
            schema_paths("event", EVENT, &mut paths);
            schema_paths("k8s", K8S, &mut paths);
            let (_, body, _) = PAYLOADS.iter().find(|p| p.0 == r.payload).unwrap();
            schema_paths(r.payload, body, &mut paths);
            for p in paths {
                assert_eq!(
                    Fields::field(&r, &p).map(|s| s.text()),
                    Fields::field(&v, &p).map(|s| s.text()),
                    "{p}"
                );
                assert_eq!(
                    matches!(Fields::field(&r, &p), Some(Scalar::Int(_))),
                    matches!(Fields::field(&v, &p), Some(Scalar::Int(_))),
                    "{p}"
                );
            }
            assert_eq!(Fields::namespace(&r), "ns");
            assert_eq!(Fields::pod_label(&r, "app"), Some("web"));
        }
    }

    #[test]
    fn test_events_name_what_is_wrong() {
        let e = View::from_json(
            "process",
            &serde_json::json!({"process": {"exe": "/bin/sh", "nmae": "sh"}}),
        )
        .unwrap_err();
        assert!(e.contains("process.nmae: no such field"), "{e}");
        let e = View::from_json("process", &serde_json::json!({"flow": {}})).unwrap_err();
        assert!(e.starts_with("flow: not a variable"), "{e}");
        let e =
            View::from_json("process", &serde_json::json!({"process": {"pid": "x"}})).unwrap_err();
        assert_eq!(e, "process.pid: must be a number");
        let v = View::from_json(
            "process",
            &serde_json::json!({"process": {"exe": "/bin/sh", "parent": {"name": "nginx"}}, "k8s": {"namespace": "shop"}}),
        )
        .unwrap();
        assert_eq!(text(v.get("process.parent.name").unwrap()), "nginx");
        assert_eq!(text(v.get("process.exe").unwrap()), "/bin/sh");
        assert_eq!(v.namespace(), "shop");
        assert_eq!(text(v.get("event.type").unwrap()), "process");
    }

    #[test]
    fn field_types_follow_paths() {
        assert_eq!(field_type("process", "process.parent.name"), Some(Ty::Str));
        assert_eq!(field_type("process", "process.cmdline"), Some(Ty::StrList));
        assert_eq!(field_type("process", "flow.dstPort"), None);
        assert_eq!(field_type("flow", "flow.dstPort"), Some(Ty::Int));
        assert_eq!(field_type("flow", "k8s.labels"), Some(Ty::StrMap));
        assert_eq!(field_type("process", "process.exe.x"), None);
    }
}
