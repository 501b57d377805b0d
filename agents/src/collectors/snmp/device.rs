//! One SNMP device: session setup (v2c or v3 USM), the system group and
//! the interface tables, read with GETBULK walks.

use std::collections::BTreeMap;
use std::time::Duration;

use snmp2::{Oid, SyncSession, Value};

use crate::config::{SnmpCredentials, SnmpTargetConfig};

const SYSTEM: [u64; 7] = [1, 3, 6, 1, 2, 1, 1];
const IF_ENTRY: [u64; 9] = [1, 3, 6, 1, 2, 1, 2, 2, 1];
const IFX_ENTRY: [u64; 10] = [1, 3, 6, 1, 2, 1, 31, 1, 1, 1];
/// Walks stop here whatever the device says, so a broken agent cannot keep
/// the collector busy forever.
const MAX_WALK: usize = 20_000;

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Int(i64),
    Uint(u64),
    Bytes(Vec<u8>),
    Oid(String),
    Other,
}

impl Val {
    pub(crate) fn from(v: &Value<'_>) -> Self {
        match v {
            Value::Integer(i) => Val::Int(*i),
            Value::Counter32(c) | Value::Unsigned32(c) | Value::Timeticks(c) => {
                Val::Uint(u64::from(*c))
            }
            Value::Counter64(c) => Val::Uint(*c),
            Value::OctetString(b) | Value::Opaque(b) => Val::Bytes(b.to_vec()),
            Value::ObjectIdentifier(o) => Val::Oid(o.to_id_string()),
            Value::IpAddress(a) => Val::Bytes(a.to_vec()),
            _ => Val::Other,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Val::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            Val::Oid(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Uint(u) => u.to_string(),
            Val::Other => String::new(),
        }
    }

    pub fn uint(&self) -> Option<u64> {
        match self {
            Val::Uint(u) => Some(*u),
            Val::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }

    pub fn mac(&self) -> String {
        match self {
            Val::Bytes(b) if b.len() == 6 => b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            _ => String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(
        "no response from {address} within {timeout:?} (device down or unreachable, or a wrong community/credentials)"
    )]
    Timeout { address: String, timeout: Duration },
    #[error("authentication failed at {address}: {detail} (wrong user, password or protocols)")]
    Auth { address: String, detail: String },
    #[error("{address}: {detail}")]
    Protocol { address: String, detail: String },
    #[error("{address}: {detail}")]
    Io { address: String, detail: String },
}

impl PollError {
    pub fn label(&self) -> &'static str {
        match self {
            PollError::Timeout { .. } => "timeout",
            PollError::Auth { .. } => "auth",
            PollError::Protocol { .. } => "protocol",
            PollError::Io { .. } => "io",
        }
    }
}

pub struct Device {
    pub target: SnmpTargetConfig,
    timeout: Duration,
    retries: u32,
    // Boxed: a session holds 64 KiB buffers inline, too big to move
    // around on async worker stacks.
    session: Option<Box<SyncSession>>,
}

/// What one poll read.
#[derive(Debug, Default, Clone)]
pub struct Reading {
    pub system: BTreeMap<u64, Val>,
    /// ifIndex -> column -> value, from ifTable (columns as numbered there).
    pub if_table: BTreeMap<u64, BTreeMap<u64, Val>>,
    /// ifIndex -> column -> value, from ifXTable.
    pub ifx_table: BTreeMap<u64, BTreeMap<u64, Val>>,
}

impl Device {
    pub fn new(target: SnmpTargetConfig, timeout: Duration, retries: u32) -> Self {
        Self {
            target,
            timeout,
            retries,
            session: None,
        }
    }

    fn err(&self, e: snmp2::Error) -> PollError {
        let address = self.target.address.clone();
        match e {
            snmp2::Error::Receive => PollError::Timeout {
                address,
                timeout: self.timeout,
            },
            snmp2::Error::AuthFailure(k) => PollError::Auth {
                address,
                detail: format!("{k:?}"),
            },
            snmp2::Error::Send => PollError::Io {
                address,
                detail: "send failed".into(),
            },
            other => PollError::Protocol {
                address,
                detail: format!("{other:?}"),
            },
        }
    }

    fn open(&self) -> Result<Box<SyncSession>, PollError> {
        let io = |e: std::io::Error| PollError::Io {
            address: self.target.address.clone(),
            detail: e.to_string(),
        };
        match &self.target.credentials {
            SnmpCredentials::V2c { community } => SyncSession::new_v2c(
                self.target.address.as_str(),
                community,
                Some(self.timeout),
                0,
            )
            .map(Box::new)
            .map_err(io),
            SnmpCredentials::V3 {
                user,
                auth_protocol,
                auth_password,
                privacy,
            } => {
                let auth = match privacy {
                    Some((cipher, pw)) => snmp2::v3::Auth::AuthPriv {
                        cipher: *cipher,
                        privacy_password: pw.clone(),
                    },
                    None => snmp2::v3::Auth::AuthNoPriv,
                };
                let sec = snmp2::v3::Security::new(user.as_bytes(), auth_password)
                    .with_auth_protocol(*auth_protocol)
                    .with_auth(auth);
                let mut s = Box::new(
                    SyncSession::new_v3(self.target.address.as_str(), Some(self.timeout), 0, sec)
                        .map_err(io)?,
                );
                s.init().map_err(|e| self.err(e))?;
                Ok(s)
            }
        }
    }

    /// Runs `f` on a session, opening (or re-opening, after an error) it as
    /// needed and retrying timeouts `retries` times.
    fn with_session<T>(
        &mut self,
        mut f: impl FnMut(&mut SyncSession) -> Result<T, snmp2::Error>,
    ) -> Result<T, PollError> {
        let mut attempt = 0;
        // Set once a v3 engine discovery succeeded during this call.
        let mut discovered = false;
        let result = loop {
            if self.session.is_none() {
                match self.open() {
                    Ok(s) => {
                        discovered |= matches!(self.target.credentials, SnmpCredentials::V3 { .. });
                        self.session = Some(s);
                    }
                    Err(PollError::Timeout { .. }) if attempt < self.retries => {
                        attempt += 1;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            let Some(s) = self.session.as_mut() else {
                continue;
            };
            match f(s) {
                Ok(v) => break Ok(v),
                Err(e) => {
                    // A fresh session re-discovers the engine (boots and
                    // time change when the device restarts).
                    self.session = None;
                    let retry = matches!(e, snmp2::Error::Receive | snmp2::Error::AuthUpdated)
                        && attempt < self.retries;
                    if !retry {
                        break Err(self.err(e));
                    }
                    attempt += 1;
                }
            }
        };
        match result {
            // A v3 device that answers engine discovery but never the
            // authenticated request is rejecting the credentials (its
            // report is unauthenticated, so it reads as silence).
            Err(PollError::Timeout { .. }) if discovered => Err(PollError::Auth {
                address: self.target.address.clone(),
                detail: "the device answered engine discovery but not the authenticated request"
                    .into(),
            }),
            other => other,
        }
    }

    fn walk(&mut self, root: &[u64]) -> Result<Vec<(Vec<u64>, Val)>, PollError> {
        let mut out = Vec::new();
        let mut cur = root.to_vec();
        while out.len() < MAX_WALK {
            let start = cur.clone();
            let page = self.with_session(|s| {
                let oid = Oid::from(&start).map_err(|_| snmp2::Error::AsnParse)?;
                let pdu = s.getbulk(&[&oid], 0, 32)?;
                if pdu.error_status != 0 {
                    return Err(snmp2::Error::ValueOutOfRange);
                }
                Ok(pdu
                    .varbinds
                    .map(|(name, v)| {
                        (
                            name.iter()
                                .map(|i| i.collect::<Vec<u64>>())
                                .unwrap_or_default(),
                            Val::from(&v),
                            matches!(v, Value::EndOfMibView),
                        )
                    })
                    .collect::<Vec<_>>())
            })?;
            let mut progressed = false;
            for (name, v, end) in page {
                // Past the subtree, at its end, or not increasing: done.
                if end || !name.starts_with(root) || name <= cur {
                    return Ok(out);
                }
                cur = name.clone();
                out.push((name, v));
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        Ok(out)
    }

    fn table(
        &mut self,
        entry: &[u64],
        columns: &[u64],
    ) -> Result<BTreeMap<u64, BTreeMap<u64, Val>>, PollError> {
        let mut t: BTreeMap<u64, BTreeMap<u64, Val>> = BTreeMap::new();
        for &col in columns {
            let mut root = entry.to_vec();
            root.push(col);
            for (oid, v) in self.walk(&root)? {
                if let Some(&index) = oid.get(root.len()) {
                    t.entry(index).or_default().insert(col, v);
                }
            }
        }
        Ok(t)
    }

    pub fn poll(&mut self) -> Result<Reading, PollError> {
        let mut r = Reading::default();
        for (oid, v) in self.walk(&SYSTEM)? {
            // sysDescr.0 .. sysLocation.0
            if oid.len() == SYSTEM.len() + 2 {
                r.system.insert(oid[SYSTEM.len()], v);
            }
        }
        if r.system.is_empty() {
            return Err(PollError::Protocol {
                address: self.target.address.clone(),
                detail: "the system group is empty (is the view restricted?)".into(),
            });
        }
        // ifDescr, ifSpeed, ifPhysAddress, ifAdminStatus, ifOperStatus,
        // ifInOctets, ifInErrors, ifOutOctets, ifOutErrors
        r.if_table = self.table(&IF_ENTRY, &[2, 5, 6, 7, 8, 10, 14, 16, 20])?;
        // ifName, ifHCInOctets, ifHCOutOctets, ifHighSpeed (absent on old devices)
        r.ifx_table = self.table(&IFX_ENTRY, &[1, 6, 10, 15]).unwrap_or_default();
        Ok(r)
    }
}
