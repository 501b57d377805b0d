//! `amoskys operator`: leader election, the two controllers, the Agent
//! status sync, and the metrics/health endpoints, until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use crate::controller::{self, Context, Error};
use crate::crd::{AgentSet, ClusterDetectionRule, DetectionRule, EventBus};
use crate::labels::MANAGER;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Where the leader Lease lives (the operator's own namespace).
    pub lease_namespace: String,
    /// The leader Lease's name.
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name in a cluster).
    pub identity: String,
    /// The image bus and agent pods run when a resource names none.
    pub image: Option<String>,
    /// How often Agent resources are synced from the buses' registries.
    pub agents_interval: Duration,
}

struct Health {
    ready: AtomicBool,
    ctx: Arc<Context>,
}

async fn metrics(State(h): State<Arc<Health>>) -> String {
    h.ctx.metrics.encode()
}

async fn readyz(State(h): State<Arc<Health>>) -> StatusCode {
    if h.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Only objects this operator manages are watched, so a cluster full of
/// Secrets and ConfigMaps costs nothing.
fn owned() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"))
}

/// A client from the pod's service account, or from KUBECONFIG outside a cluster.
pub async fn client() -> Result<Client, Error> {
    Ok(Client::try_default().await?)
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(client: Client, opts: Options) -> Result<(), Error> {
    run_until(client, opts, wait_for_signal()).await
}

/// Runs until `stop` resolves (or the lease is lost).
pub async fn run_until(
    client: Client,
    opts: Options,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let ctx = Arc::new(Context::new(
        client.clone(),
        opts.image.clone(),
        controller::system_clock(),
    ));
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        ctx: ctx.clone(),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health.clone());
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr).await?;
    tracing::info!(addr = %opts.metrics_addr, "serving /metrics, /healthz, /readyz");
    let shutdown = CancellationToken::new();
    let lost_lease = Arc::new(AtomicBool::new(false));
    let http_stop = shutdown.clone();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await;
    });
    let sig = shutdown.clone();
    tokio::spawn(async move {
        stop.await;
        tracing::info!("shutting down");
        sig.cancel();
    });

    // Ready once the API answers and the CRDs are installed.
    let buses: Api<EventBus> = Api::all(client.clone());
    buses.list(&ListParams::default().limit(1)).await?;
    health.ready.store(true, Ordering::Relaxed);

    let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&opts.identity)
        .with_duration(15)
        .with_grace(5)
        .with_field_manager(MANAGER)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    tracing::info!(identity = %opts.identity, lease = %opts.lease_name, "waiting for the leader lease");
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                drop(leader);
                let _ = lease_task.await;
                let _ = http.await;
                return Ok(());
            }
            changed = leader.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    tracing::info!(identity = %opts.identity, "leading");
    ctx.metrics.leader.set(1);

    // Losing the lease stops the controllers like a signal does; the
    // process then exits and restarts as a follower.
    let lost = shutdown.clone();
    let lost_flag = lost_lease.clone();
    let mut watch_leader = leader.clone();
    // This task holds a receiver too; it must end on shutdown, or the
    // lease task would never see every receiver gone and release.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lost.cancelled() => return,
                changed = watch_leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !*watch_leader.borrow() {
                        tracing::warn!("lost the leader lease");
                        lost_flag.store(true, Ordering::Relaxed);
                        lost.cancel();
                        return;
                    }
                }
            }
        }
    });

    let buses_ctl = Controller::new(Api::<EventBus>::all(client.clone()), Default::default());
    // Every bus runs every rule: a rule added, changed or deleted rewrites
    // each bus's rule set.
    let all_buses = buses_ctl.store();
    let every_bus = move || {
        all_buses
            .state()
            .into_iter()
            .map(|b| ObjectRef::from_obj(b.as_ref()))
            .collect::<Vec<_>>()
    };
    let every_bus_too = every_bus.clone();
    let buses_ctl = buses_ctl
        .owns(Api::<StatefulSet>::all(client.clone()), owned())
        .owns(Api::<Service>::all(client.clone()), owned())
        .owns(Api::<ConfigMap>::all(client.clone()), owned())
        .owns(Api::<Secret>::all(client.clone()), owned())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned())
        // A new AgentSet needs its certificate from its bus.
        .watches(
            Api::<AgentSet>::all(client.clone()),
            Default::default(),
            |set: AgentSet| {
                set.namespace()
                    .map(|ns| ObjectRef::new(&set.spec.bus_ref.name).within(&ns))
            },
        )
        .watches(
            Api::<DetectionRule>::all(client.clone()),
            Default::default(),
            move |_| every_bus(),
        )
        .watches(
            Api::<ClusterDetectionRule>::all(client.clone()),
            Default::default(),
            move |_| every_bus_too(),
        )
        .graceful_shutdown_on({
            let s = shutdown.clone();
            async move { s.cancelled().await }
        })
        .run(
            controller::eventbus::reconcile,
            controller::requeue_on_error,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let sets_ctl = Controller::new(Api::<AgentSet>::all(client.clone()), Default::default())
        .owns(Api::<DaemonSet>::all(client.clone()), owned())
        .owns(Api::<ConfigMap>::all(client.clone()), owned())
        .owns(Api::<Secret>::all(client.clone()), owned())
        .graceful_shutdown_on({
            let s = shutdown.clone();
            async move { s.cancelled().await }
        })
        .run(
            controller::agentset::reconcile,
            controller::requeue_on_error,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let rules_ctl = Controller::new(
        Api::<DetectionRule>::all(client.clone()),
        Default::default(),
    )
    .graceful_shutdown_on({
        let s = shutdown.clone();
        async move { s.cancelled().await }
    })
    .run(
        controller::rules::reconcile_rule,
        controller::requeue_on_error,
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));
    let cluster_rules_ctl = Controller::new(
        Api::<ClusterDetectionRule>::all(client.clone()),
        Default::default(),
    )
    .graceful_shutdown_on({
        let s = shutdown.clone();
        async move { s.cancelled().await }
    })
    .run(
        controller::rules::reconcile_cluster_rule,
        controller::requeue_on_error,
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));
    let agents = controller::agents::run(&ctx, opts.agents_interval, {
        let s = shutdown.clone();
        async move { s.cancelled().await }
    });
    tokio::join!(buses_ctl, sets_ctl, rules_ctl, cluster_rules_ctl, agents);

    ctx.metrics.leader.set(0);
    drop(leader);
    // Dropping the receiver makes the lease task release the Lease, so a
    // follower takes over at once instead of after the lease expires.
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!("leader lease released"),
        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        Err(e) => tracing::warn!(error = %e, "lease task failed"),
    }
    let _ = http.await;
    if lost_lease.load(Ordering::Relaxed) {
        return Err(Error::LeaseLost);
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
