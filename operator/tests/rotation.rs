#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Certificate issuance and rotation with a fake clock: leaves renew on
//! time, a CA rotation goes through its phases in order and never leaves a
//! certificate its peers cannot verify, an operator stopped between any two
//! Secret writes resumes correctly, and expired certificates recover.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use amoskys_client::identity::{PeerIdentity, Role};
use amoskys_operator::rotation::{
    self, Change, LeafKind, LeafSpec, Phase, PkiState, Policy, SecretContent, ca_secret_data,
    leaf_secret_data, state_from_secrets, step,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

const DAY: i64 = 86_400;

fn policy() -> Policy {
    Policy {
        bus: "amoskys".into(),
        leaf_validity: Duration::from_secs(90 * DAY as u64),
        leaf_renew_before: Duration::from_secs(30 * DAY as u64),
        ca_validity: Duration::from_secs(365 * DAY as u64),
        ca_renew_before: Duration::from_secs(120 * DAY as u64),
        propagation: Duration::from_secs(120),
    }
}

fn specs() -> Vec<LeafSpec> {
    vec![
        LeafSpec {
            secret: "amoskys-server-tls".into(),
            common_name: "amoskys-bus".into(),
            kind: LeafKind::Server(vec![
                "amoskys.security.svc".into(),
                "amoskys-0.amoskys-headless.security.svc".into(),
            ]),
        },
        LeafSpec {
            secret: "amoskys-admin-tls".into(),
            common_name: "amoskys-operator".into(),
            kind: LeafKind::Client(Role::Admin),
        },
        LeafSpec {
            secret: "nodes-agent-tls".into(),
            common_name: "agentset-nodes".into(),
            kind: LeafKind::Client(Role::Agent),
        },
    ]
}

fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000 + t).unwrap()
}

fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    amoskys_client::tls::pem_certs(pem.as_bytes()).unwrap()
}

/// Verifies `leaf` against `trust` (a bundle) as a peer would, at time `t`.
fn verifies(leaf: &rotation::Leaf, trust: &str, spec: &LeafSpec, t: i64) -> bool {
    let provider = amoskys_client::tls::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in der(trust) {
        roots.add(c).unwrap();
    }
    let roots = Arc::new(roots);
    let now = UnixTime::since_unix_epoch(Duration::from_secs(at(t).unix_timestamp() as u64));
    let chain = der(&leaf.cert_pem);
    match &spec.kind {
        LeafKind::Server(dns) => {
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .unwrap();
            dns.iter().all(|name| {
                v.verify_server_cert(
                    &chain[0],
                    &[],
                    &ServerName::try_from(name.as_str()).unwrap(),
                    &[],
                    now,
                )
                .is_ok()
            })
        }
        LeafKind::Client(role) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .unwrap();
            v.verify_client_cert(&chain[0], &[], now).is_ok()
                && PeerIdentity::from_der(&chain[0]).unwrap().role == Some(*role)
        }
    }
}

/// Every pair of peers can verify each other: each leaf chains to the
/// bundle of every other Secret (what a peer has loaded).
fn all_trusted(s: &PkiState, t: i64) {
    for a in specs() {
        for b in specs() {
            let leaf = &s.leaves[&a.secret];
            let peer_bundle = &s.leaves[&b.secret].ca_pem;
            assert!(
                verifies(leaf, peer_bundle, &a, t),
                "{} not trusted by {} in phase {:?}",
                a.secret,
                b.secret,
                s.phase
            );
        }
    }
}

fn run(s: &mut PkiState, t: i64, loaded: Option<&[String]>, rotate: bool) -> Vec<Change> {
    step(s, &specs(), at(t), &policy(), loaded, rotate).unwrap()
}

#[test]
fn first_issue_chains_carries_sans_and_roles() {
    let mut s = PkiState::default();
    let changes = run(&mut s, 0, None, false);
    assert!(matches!(changes[0], Change::CaCreated { .. }));
    assert_eq!(s.leaves.len(), 3);
    all_trusted(&s, 0);
    // Nothing more to do until the renewal time.
    assert!(run(&mut s, 3600, None, false).is_empty());
    assert_eq!(
        s.next_deadline(&policy()),
        Some(at(60 * DAY).unix_timestamp())
    );
}

#[test]
fn leaves_renew_before_they_expire() {
    let mut s = PkiState::default();
    run(&mut s, 0, None, false);
    let before: BTreeMap<_, _> = s
        .leaves
        .iter()
        .map(|(k, l)| (k.clone(), l.serial.clone()))
        .collect();
    assert!(run(&mut s, 60 * DAY - 1, None, false).is_empty(), "not yet");
    let changes = run(&mut s, 60 * DAY, None, false);
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(
                c,
                Change::LeafIssued {
                    reason: "renewal due",
                    ..
                }
            ))
            .count(),
        3
    );
    for (k, l) in &s.leaves {
        assert_ne!(&before[k], &l.serial);
        assert_eq!(l.not_after, at(150 * DAY).unix_timestamp());
    }
    all_trusted(&s, 60 * DAY);
}

#[test]
fn ca_rotation_goes_through_its_phases_in_order() {
    let mut s = PkiState::default();
    run(&mut s, 0, None, false);
    let old_ca = s.current.clone().unwrap();
    let mut t = 245 * DAY; // past the CA's renewal time (365 - 120 days)
    let mut phases = Vec::new();
    let mut loaded: Vec<String> = s.leaves.values().map(|l| l.serial.clone()).collect();
    for _ in 0..20 {
        let changes = run(&mut s, t, Some(&loaded), false);
        all_trusted(&s, t);
        for c in &changes {
            if let Change::PhaseChanged(p) = c {
                phases.push(*p);
            }
        }
        // Pods load what the Secrets hold after the propagation time.
        if changes.is_empty() {
            loaded = s.leaves.values().map(|l| l.serial.clone()).collect();
        }
        if s.phase == Phase::Stable && phases.len() == 3 {
            break;
        }
        t += 60;
    }
    assert_eq!(
        phases,
        [Phase::BundlePublished, Phase::LeavesReissued, Phase::Stable]
    );
    let new_ca = s.current.clone().unwrap();
    assert_ne!(new_ca.serial, old_ca.serial);
    assert!(s.other.is_none());
    assert!(s.leaves.values().all(|l| l.issuer_serial == new_ca.serial));
    assert_eq!(der(&s.bundle()).len(), 1, "the old CA left the bundle");
}

#[test]
fn the_old_ca_stays_while_a_peer_still_holds_an_old_leaf() {
    let mut s = PkiState::default();
    run(&mut s, 0, None, false);
    let old_serials: Vec<String> = s.leaves.values().map(|l| l.serial.clone()).collect();
    let mut t = 10;
    run(&mut s, t, Some(&old_serials), true);
    assert_eq!(s.phase, Phase::BundlePublished);
    t += 200;
    run(&mut s, t, Some(&old_serials), false);
    assert_eq!(s.phase, Phase::LeavesReissued);
    // One agent has not reloaded: its old leaf is still in use.
    for _ in 0..10 {
        t += 200;
        run(&mut s, t, Some(&old_serials[..1]), false);
        assert_eq!(s.phase, Phase::LeavesReissued, "old CA kept while in use");
        assert_eq!(der(&s.bundle()).len(), 2);
    }
    let now_loaded: Vec<String> = s.leaves.values().map(|l| l.serial.clone()).collect();
    run(&mut s, t + 1, Some(&now_loaded), false);
    assert_eq!(s.phase, Phase::Stable);
}

/// The Secrets as stored: the CA Secret and the leaf Secrets by name.
type Stored = (Option<SecretContent>, BTreeMap<String, SecretContent>);

/// Writes the state as Secrets the way the reconciler does (CA Secret
/// first), stopping after `writes` Secrets.
fn persist_partially(prev: &Stored, s: &PkiState, writes: usize) -> Stored {
    let mut ca = prev.0.clone();
    let mut leaves = prev.1.clone();
    let mut budget = writes;
    if budget > 0 {
        ca = Some(ca_secret_data(s));
        budget -= 1;
    }
    for (name, leaf) in &s.leaves {
        if budget == 0 {
            break;
        }
        leaves.insert(name.clone(), leaf_secret_data(leaf));
        budget -= 1;
    }
    (ca, leaves)
}

fn read_back(stored: &Stored) -> PkiState {
    state_from_secrets(stored.0.as_ref(), &stored.1, &specs())
}

#[test]
fn a_crash_between_any_two_writes_resumes() {
    for crash_after in 0..=4 {
        let mut stored: Stored = (None, BTreeMap::new());
        let mut s = PkiState::default();
        run(&mut s, 0, None, false);
        let first_ca = s.current.clone().unwrap().serial;
        stored = persist_partially(&stored, &s, usize::MAX);
        let mut t = 100;
        let mut phases = Vec::new();
        let mut crashed = false;
        for i in 0..40 {
            let mut s = read_back(&stored);
            let changes = run(&mut s, t, None, i == 0);
            phases.extend(changes.iter().filter_map(|c| match c {
                Change::PhaseChanged(p) => Some(*p),
                _ => None,
            }));
            let writes = if !crashed && !changes.is_empty() && i > 0 {
                crashed = true;
                crash_after
            } else {
                usize::MAX
            };
            stored = persist_partially(&stored, &s, writes);
            if writes == usize::MAX
                && s.phase == Phase::Stable
                && phases.contains(&Phase::LeavesReissued)
            {
                break;
            }
            t += 130;
        }
        let s = read_back(&stored);
        assert!(crashed, "the crash was exercised");
        assert_eq!(
            phases
                .iter()
                .filter(|p| **p != Phase::Stable)
                .take(1)
                .collect::<Vec<_>>(),
            [&Phase::BundlePublished]
        );
        assert!(phases.contains(&Phase::LeavesReissued));
        assert_ne!(
            s.current.as_ref().unwrap().serial,
            first_ca,
            "the CA was rotated"
        );
        assert_eq!(s.phase, Phase::Stable, "crash after {crash_after} writes");
        all_trusted(&s, t);
        let ca = s.current.as_ref().unwrap();
        assert!(s.leaves.values().all(|l| l.issuer_serial == ca.serial));
        assert_eq!(der(&s.bundle()).len(), 1);
    }
}

#[test]
fn expired_certificates_recover() {
    let mut s = PkiState::default();
    run(&mut s, 0, None, false);
    // The operator was away for a year: CA and leaves are all expired.
    let t = 400 * DAY;
    let changes = run(&mut s, t, None, false);
    assert!(matches!(changes[0], Change::CaCreated { .. }));
    assert_eq!(s.phase, Phase::Stable);
    all_trusted(&s, t);
    assert!(
        s.leaves
            .values()
            .all(|l| l.not_after > at(t).unix_timestamp())
    );

    // Only the leaves expired (the CA is fine): they are re-issued.
    let mut s = PkiState::default();
    run(&mut s, 0, None, false);
    let t = 91 * DAY;
    let changes = run(&mut s, t, None, false);
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(
                c,
                Change::LeafIssued {
                    reason: "expired",
                    ..
                }
            ))
            .count(),
        3
    );
    all_trusted(&s, t);
}
