//! Shared set-up for the reconciler tests: the in-memory API, a context with
//! a clock the test moves, and the checked-in samples.
#![allow(dead_code)]

pub use amoskys_testkit::fakeapi;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use amoskys_operator::controller::Context;
use amoskys_operator::crd::{AgentSet, EventBus};
use fakeapi::FakeApi;
use kube::Resource;
use time::OffsetDateTime;

pub const NS: &str = "security";

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn sample<T: serde::de::DeserializeOwned>(path: &str) -> T {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn in_ns<K: Resource>(mut k: K) -> K {
    k.meta_mut().namespace = Some(NS.into());
    k
}

pub fn sample_bus() -> EventBus {
    in_ns(sample("config/eventbus.yaml"))
}

pub fn sample_set() -> AgentSet {
    in_ns(sample("config/agentset.yaml"))
}

/// The storage a claim (or claim template) requests.
pub fn claim_storage(c: &k8s_openapi::api::core::v1::PersistentVolumeClaim) -> String {
    let spec = c.spec.as_ref().unwrap();
    spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"]
        .0
        .clone()
}

/// A clock the test sets.
#[derive(Clone)]
pub struct TestClock(Arc<Mutex<OffsetDateTime>>);

impl TestClock {
    pub fn new() -> Self {
        Self::at(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap())
    }

    pub fn at(t: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }

    pub fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }

    pub fn advance(&self, by: std::time::Duration) {
        *self.0.lock().unwrap() += by;
    }
}

pub struct World {
    pub api: FakeApi,
    pub ctx: Arc<Context>,
    pub clock: TestClock,
}

pub fn world() -> World {
    world_at(TestClock::new().now())
}

/// A world whose clock starts at `t` (the real time, next to a real bus).
pub fn world_at(t: OffsetDateTime) -> World {
    let (client, api) = FakeApi::client();
    let clock = TestClock::at(t);
    let c = clock.clone();
    let ctx = Context::new(
        client,
        Some("example.org/amoskys:test".into()),
        Arc::new(move || c.now()),
    );
    World {
        api,
        ctx: Arc::new(ctx),
        clock,
    }
}

impl World {
    /// The stored EventBus, as a controller would hand it to the reconciler.
    pub fn bus(&self, name: &str) -> Arc<EventBus> {
        Arc::new(self.api.get(Some(NS), name).expect("the EventBus"))
    }

    pub fn set(&self, name: &str) -> Arc<AgentSet> {
        Arc::new(self.api.get(Some(NS), name).expect("the AgentSet"))
    }

    pub async fn reconcile_bus(&self, name: &str) -> kube::runtime::controller::Action {
        amoskys_operator::controller::eventbus::reconcile(self.bus(name), self.ctx.clone())
            .await
            .unwrap()
    }

    pub async fn reconcile_set(&self, name: &str) -> kube::runtime::controller::Action {
        amoskys_operator::controller::agentset::reconcile(self.set(name), self.ctx.clone())
            .await
            .unwrap()
    }

    /// Writes since `before` that changed anything.
    pub fn changes_since(&self, before: usize) -> Vec<String> {
        self.api.changes()[before..].to_vec()
    }
}
