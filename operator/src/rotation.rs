//! Certificates an EventBus needs and the schedule that keeps them valid:
//! leaf renewal before `renewBefore`, and CA rotation in three phases that
//! never leave a loaded certificate untrusted.
//!
//! Pure: the state is what the Secrets hold (the CA Secret is the source of
//! truth and records the phase), the clock is a parameter, and [`step`]
//! changes the state in memory; the reconciler writes the CA Secret first
//! and the leaf Secrets after. Every step is level-triggered (it ensures the
//! whole desired state for the current phase), so an operator that stops
//! between any two writes continues correctly from what it finds.
//!
//! CA rotation, from CA `A` to CA `B`:
//! 1. `BundlePublished`: `B` is created; every Secret's `ca.crt` holds
//!    `A` and `B`; leaves are still signed by `A`.
//! 2. `LeavesReissued` (once the bundle has had time to reach every pod):
//!    `B` signs every leaf; `ca.crt` still holds both.
//! 3. `Stable` (once no loaded certificate is signed by `A`): `A` leaves
//!    the bundle.

use std::collections::BTreeMap;
use std::time::Duration;

use amoskys_client::identity::Role;
use amoskys_client::pki::{CertAuthority, PkiError, Validity};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// On the CA Secret: the rotation phase.
pub const PHASE_ANNOTATION: &str = "amoskys.io/ca-rotation-phase";
/// On the CA Secret: when the phase began (Unix seconds).
pub const PHASE_SINCE_ANNOTATION: &str = "amoskys.io/ca-rotation-since";
/// Set (to any new value) on an EventBus to rotate its CA now.
pub const ROTATE_REQUEST_ANNOTATION: &str = "amoskys.io/rotate-ca";
/// On each leaf Secret: the serial of the CA that signed it.
pub const ISSUER_ANNOTATION: &str = "amoskys.io/issuer-serial";

/// Where a CA rotation stands (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One CA; no rotation in progress.
    Stable,
    /// The new CA is in every bundle; leaves are still signed by the old.
    BundlePublished,
    /// The new CA signs every leaf; the old is still in the bundles.
    LeavesReissued,
}

impl Phase {
    /// The phase's name, as the annotation and status write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stable => "Stable",
            Phase::BundlePublished => "BundlePublished",
            Phase::LeavesReissued => "LeavesReissued",
        }
    }

    /// The phase named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        [Phase::Stable, Phase::BundlePublished, Phase::LeavesReissued]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A CA as kept in the CA Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry, Unix seconds.
    pub not_after: i64,
}

/// What a leaf is for: the Secret it lives in and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    /// The Secret it lives in.
    pub secret: String,
    /// Its subject's common name.
    pub common_name: String,
    /// Server or client.
    pub kind: LeafKind,
}

/// The two kinds of leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafKind {
    /// The bus: these DNS names.
    Server(Vec<String>),
    /// A client with a role (agent per AgentSet, admin for the operator).
    Client(Role),
}

/// A leaf as kept in its Secret (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The CA bundle it is handed with, PEM.
    pub ca_pem: String,
    /// The serial of the CA that signed it.
    pub issuer_serial: String,
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry, Unix seconds.
    pub not_after: i64,
    /// DNS names (server) or role (client), to notice a changed spec.
    pub identity: String,
}

/// An EventBus's certificates, as its Secrets hold them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiState {
    /// Signs new leaves.
    pub current: Option<Ca>,
    /// During rotation: the other CA still in the bundle (the new one while
    /// BundlePublished, the old one while LeavesReissued).
    pub other: Option<Ca>,
    /// Where a rotation stands.
    pub phase: Phase,
    /// Unix seconds the phase began.
    pub since: i64,
    /// By Secret name.
    pub leaves: BTreeMap<String, Leaf>,
}

impl Default for PkiState {
    fn default() -> Self {
        Self {
            current: None,
            other: None,
            phase: Phase::Stable,
            since: 0,
            leaves: BTreeMap::new(),
        }
    }
}

/// The schedule, from the EventBus's `spec.tls`.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The EventBus's name (the CA's common name).
    pub bus: String,
    /// Lifetime of a new leaf.
    pub leaf_validity: Duration,
    /// Renew a leaf this long before it expires.
    pub leaf_renew_before: Duration,
    /// Lifetime of a new CA.
    pub ca_validity: Duration,
    /// Renew the CA this long before it expires (a third of its life).
    pub ca_renew_before: Duration,
    /// How long a changed Secret takes to reach every pod's files and be
    /// reloaded (kubelet sync plus the reload interval).
    pub propagation: Duration,
}

/// What one step changed, for logs and Kubernetes events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The first CA was made.
    CaCreated {
        /// Its serial.
        serial: String,
    },
    /// A rotation began with a new CA.
    RotationStarted {
        /// The new CA's serial.
        new_serial: String,
    },
    /// The rotation moved to this phase.
    PhaseChanged(Phase),
    /// A leaf was (re)issued.
    LeafIssued {
        /// Its Secret.
        secret: String,
        /// Its new serial.
        serial: String,
        /// Why: `missing`, `expired`, `renewal due`, `signed by the previous
        /// CA` or `names changed`.
        reason: &'static str,
    },
    /// A leaf Secret's CA bundle changed.
    BundleUpdated {
        /// The Secret.
        secret: String,
    },
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// Serial (hex, colon-separated) and expiry (unix seconds) of a PEM certificate.
pub fn cert_facts(pem: &str) -> Option<(String, i64)> {
    let der = amoskys_client::tls::pem_certs(pem.as_bytes())
        .ok()?
        .into_iter()
        .next()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some((
        cert.raw_serial_as_string(),
        cert.validity().not_after.timestamp(),
    ))
}

fn new_ca(policy: &Policy, now: OffsetDateTime) -> Result<Ca, PkiError> {
    let ca = CertAuthority::generate(
        &format!("amoskys {} CA {}", policy.bus, now.unix_timestamp()),
        Validity::starting(now, policy.ca_validity),
    )?;
    let (serial, not_after) = cert_facts(&ca.cert_pem).unwrap_or_default();
    Ok(Ca {
        cert_pem: ca.cert_pem,
        key_pem: ca.key_pem,
        serial,
        not_after,
    })
}

fn identity(kind: &LeafKind) -> String {
    match kind {
        LeafKind::Server(dns) => format!("server:{}", dns.join(",")),
        LeafKind::Client(role) => format!("client:{}", role.as_str()),
    }
}

fn issue(
    ca: &Ca,
    spec: &LeafSpec,
    bundle: &str,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<Leaf, PkiError> {
    let signer = CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem)?;
    let validity = Validity::starting(now, policy.leaf_validity);
    let issued = match &spec.kind {
        LeafKind::Server(dns) => signer.issue_server(&spec.common_name, dns, &[], validity)?,
        LeafKind::Client(role) => signer.issue_client(&spec.common_name, *role, validity)?,
    };
    let (serial, not_after) = cert_facts(&issued.cert_pem).unwrap_or_default();
    Ok(Leaf {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: bundle.to_string(),
        issuer_serial: ca.serial.clone(),
        serial,
        not_after,
        identity: identity(&spec.kind),
    })
}

impl PkiState {
    /// The trust bundle every Secret's `ca.crt` should hold now.
    pub fn bundle(&self) -> String {
        let mut b = String::new();
        for ca in [&self.current, &self.other].into_iter().flatten() {
            b.push_str(&ca.cert_pem);
            if !ca.cert_pem.ends_with('\n') {
                b.push('\n');
            }
        }
        b
    }

    /// When something next needs doing (unix seconds): the reconciler
    /// requeues for then.
    pub fn next_deadline(&self, policy: &Policy) -> Option<i64> {
        let renew = |not_after: i64, before: Duration| not_after - before.as_secs() as i64;
        let mut t: Vec<i64> = self
            .leaves
            .values()
            .map(|l| renew(l.not_after, policy.leaf_renew_before))
            .collect();
        if let Some(ca) = &self.current {
            t.push(renew(ca.not_after, policy.ca_renew_before));
        }
        if self.phase != Phase::Stable {
            t.push(self.since + policy.propagation.as_secs() as i64);
        }
        t.into_iter().min()
    }
}

/// Brings `state` one step closer to valid certificates for `specs` at
/// `now`. `loaded` is the serials of the certificates the bus and agents
/// report having loaded, when known; `rotate` asks for a CA rotation.
pub fn step(
    state: &mut PkiState,
    specs: &[LeafSpec],
    now: OffsetDateTime,
    policy: &Policy,
    loaded: Option<&[String]>,
    rotate: bool,
) -> Result<Vec<Change>, PkiError> {
    let mut changes = Vec::new();
    let t = unix(now);
    let settled = t >= state.since + policy.propagation.as_secs() as i64;

    match (&state.current, state.phase) {
        (None, _) => {
            let ca = new_ca(policy, now)?;
            changes.push(Change::CaCreated {
                serial: ca.serial.clone(),
            });
            *state = PkiState {
                current: Some(ca),
                since: t,
                leaves: std::mem::take(&mut state.leaves),
                ..Default::default()
            };
        }
        // An expired CA protects nothing and no overlap can help: replace it
        // and every leaf at once.
        (Some(ca), _) if ca.not_after <= t => {
            let fresh = new_ca(policy, now)?;
            changes.push(Change::CaCreated {
                serial: fresh.serial.clone(),
            });
            state.current = Some(fresh);
            state.other = None;
            state.phase = Phase::Stable;
            state.since = t;
        }
        (Some(ca), Phase::Stable)
            if rotate || t >= ca.not_after - policy.ca_renew_before.as_secs() as i64 =>
        {
            let next = new_ca(policy, now)?;
            changes.push(Change::RotationStarted {
                new_serial: next.serial.clone(),
            });
            state.other = Some(next);
            state.phase = Phase::BundlePublished;
            state.since = t;
            changes.push(Change::PhaseChanged(Phase::BundlePublished));
        }
        (Some(_), Phase::BundlePublished) if settled && bundles_current(state, specs) => {
            // The new CA takes over signing; the old one stays trusted.
            std::mem::swap(&mut state.current, &mut state.other);
            state.phase = Phase::LeavesReissued;
            state.since = t;
            changes.push(Change::PhaseChanged(Phase::LeavesReissued));
        }
        (Some(ca), Phase::LeavesReissued) if settled => {
            let serial = ca.serial.clone();
            let all_new = specs.iter().all(|s| {
                state
                    .leaves
                    .get(&s.secret)
                    .is_some_and(|l| l.issuer_serial == serial)
            });
            let nothing_old_loaded = match loaded {
                Some(serials) => serials.iter().all(|s| {
                    state
                        .leaves
                        .values()
                        .any(|l| &l.serial == s && l.issuer_serial == serial)
                }),
                // Without reports, twice the propagation time.
                None => t >= state.since + 2 * policy.propagation.as_secs() as i64,
            };
            if all_new && nothing_old_loaded {
                state.other = None;
                state.phase = Phase::Stable;
                state.since = t;
                changes.push(Change::PhaseChanged(Phase::Stable));
            }
        }
        _ => {}
    }

    // Every leaf: signed by the current CA, valid past its renewal time,
    // for the identity in its spec, with the current bundle.
    let Some(ca) = state.current.clone() else {
        return Ok(changes);
    };
    let bundle = state.bundle();
    for spec in specs {
        let reason = match state.leaves.get(&spec.secret) {
            None => Some("missing"),
            Some(l) if l.not_after <= t => Some("expired"),
            Some(l) if t >= l.not_after - policy.leaf_renew_before.as_secs() as i64 => {
                Some("renewal due")
            }
            Some(l) if l.issuer_serial != ca.serial && state.phase != Phase::BundlePublished => {
                Some("signed by the previous CA")
            }
            Some(l) if l.identity != identity(&spec.kind) => Some("names changed"),
            _ => None,
        };
        if let Some(reason) = reason {
            let leaf = issue(&ca, spec, &bundle, policy, now)?;
            changes.push(Change::LeafIssued {
                secret: spec.secret.clone(),
                serial: leaf.serial.clone(),
                reason,
            });
            state.leaves.insert(spec.secret.clone(), leaf);
        } else if let Some(l) = state.leaves.get_mut(&spec.secret)
            && l.ca_pem != bundle
        {
            l.ca_pem = bundle.clone();
            changes.push(Change::BundleUpdated {
                secret: spec.secret.clone(),
            });
        }
    }
    // Mid-rotation, the wait for pods to load what changed starts at the
    // last Secret written, not at the start of the phase.
    if state.phase != Phase::Stable
        && changes
            .iter()
            .any(|c| matches!(c, Change::LeafIssued { .. } | Change::BundleUpdated { .. }))
    {
        state.since = t;
    }
    Ok(changes)
}

fn bundles_current(state: &PkiState, specs: &[LeafSpec]) -> bool {
    let bundle = state.bundle();
    specs.iter().all(|s| {
        state
            .leaves
            .get(&s.secret)
            .is_some_and(|l| l.ca_pem == bundle)
    })
}

// ---- Secrets ---------------------------------------------------------------

/// What the operator keeps in one Secret: data and annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretContent {
    /// Its data, by key (`tls.crt`, `tls.key`, `ca.crt`).
    pub data: BTreeMap<String, String>,
    /// Its annotations (phase, issuer serial).
    pub annotations: BTreeMap<String, String>,
}

/// The CA Secret's data and annotations.
pub fn ca_secret_data(state: &PkiState) -> SecretContent {
    let mut data = BTreeMap::new();
    if let Some(ca) = &state.current {
        data.insert("tls.crt".into(), ca.cert_pem.clone());
        data.insert("tls.key".into(), ca.key_pem.clone());
    }
    if let Some(o) = &state.other {
        data.insert("other.crt".into(), o.cert_pem.clone());
        data.insert("other.key".into(), o.key_pem.clone());
    }
    data.insert("ca.crt".into(), state.bundle());
    let annotations = BTreeMap::from([
        (
            PHASE_ANNOTATION.to_string(),
            state.phase.as_str().to_string(),
        ),
        (PHASE_SINCE_ANNOTATION.to_string(), state.since.to_string()),
    ]);
    SecretContent { data, annotations }
}

fn ca_from(cert: Option<&String>, key: Option<&String>) -> Option<Ca> {
    let (cert_pem, key_pem) = (cert?.clone(), key?.clone());
    let (serial, not_after) = cert_facts(&cert_pem)?;
    Some(Ca {
        cert_pem,
        key_pem,
        serial,
        not_after,
    })
}

/// Rebuilds the state from the CA Secret and the leaf Secrets (data and
/// annotations, by Secret name). Unreadable parts count as missing and are
/// re-issued.
pub fn state_from_secrets(
    ca: Option<&SecretContent>,
    leaves: &BTreeMap<String, SecretContent>,
    specs: &[LeafSpec],
) -> PkiState {
    let mut s = PkiState::default();
    if let Some(SecretContent {
        data,
        annotations: ann,
    }) = ca
    {
        s.current = ca_from(data.get("tls.crt"), data.get("tls.key"));
        s.other = ca_from(data.get("other.crt"), data.get("other.key"));
        s.phase = ann
            .get(PHASE_ANNOTATION)
            .and_then(|p| Phase::parse(p))
            .unwrap_or(Phase::Stable);
        s.since = ann
            .get(PHASE_SINCE_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if s.other.is_none() {
            s.phase = Phase::Stable;
        }
    }
    for spec in specs {
        let Some(SecretContent {
            data,
            annotations: ann,
        }) = leaves.get(&spec.secret)
        else {
            continue;
        };
        let (Some(cert), Some(key), Some(ca_pem)) =
            (data.get("tls.crt"), data.get("tls.key"), data.get("ca.crt"))
        else {
            continue;
        };
        let Some((serial, not_after)) = cert_facts(cert) else {
            continue;
        };
        s.leaves.insert(
            spec.secret.clone(),
            Leaf {
                cert_pem: cert.clone(),
                key_pem: key.clone(),
                ca_pem: ca_pem.clone(),
                issuer_serial: ann.get(ISSUER_ANNOTATION).cloned().unwrap_or_default(),
                serial,
                not_after,
                identity: ann.get("amoskys.io/identity").cloned().unwrap_or_default(),
            },
        );
    }
    s
}

/// A leaf Secret's data and annotations (type `kubernetes.io/tls`).
pub fn leaf_secret_data(l: &Leaf) -> SecretContent {
    SecretContent {
        data: BTreeMap::from([
            ("tls.crt".to_string(), l.cert_pem.clone()),
            ("tls.key".to_string(), l.key_pem.clone()),
            ("ca.crt".to_string(), l.ca_pem.clone()),
        ]),
        annotations: BTreeMap::from([
            (ISSUER_ANNOTATION.to_string(), l.issuer_serial.clone()),
            ("amoskys.io/identity".to_string(), l.identity.clone()),
        ]),
    }
}
