//! `Agent` resources: one per (AgentSet, node its DaemonSet runs a pod on),
//! their status written from the bus's agent registry (`Admin.ListAgents`,
//! read with the operator's admin certificate), and deleted when the node
//! or the pod is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use amoskys_client::phase::{GROWING_SAMPLES, SpoolSample, phase};
use amoskys_client::{BusClient, ClientError, Pems, connect_channel_pem};
use amoskys_proto::{AgentRecord, ListAgentsRequest, SetRulesRequest, StatsRequest, StatsResponse};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use time::OffsetDateTime;

use super::{Context, Error, apply, rfc3339, write_status};
use crate::build::agentset::COMPONENT;
use crate::build::eventbus::Names;
use crate::crd::{Agent, AgentCollectorStatus, AgentSet, AgentSpec, AgentStatus, EventBus};
use crate::labels::{labels, owned_meta, selector, selector_query};

/// An agent is Disconnected after this long without a heartbeat (three
/// missed heartbeats at the agent's default 10 s interval).
pub const MISSED_AFTER: Duration = Duration::from_secs(30);
/// Writes in flight at once while bringing statuses current.
const CONCURRENCY: usize = 16;

/// What the bus (all its replicas) knows: agent records by id, and the
/// serials of every certificate loaded by the bus and its connected agents.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// Agent records by agent id, the newest of every replica's.
    pub agents: HashMap<String, AgentRecord>,
    /// Serials of the certificates loaded by the bus and its agents.
    pub loaded_serials: Vec<String>,
    /// Replicas that did not answer, with why; the records they hold are
    /// missing from `agents`.
    pub unreachable: Vec<(String, String)>,
    /// Each replica's own Stats, by pod index, of those that answered.
    pub shards: BTreeMap<u32, StatsResponse>,
}

impl Registry {
    /// Keeps, per agent, the record seen most recently (an agent that
    /// reconnected to another replica leaves a stale one behind).
    pub fn add(&mut self, records: Vec<AgentRecord>) {
        for r in records {
            if r.connected
                && let Some(hb) = &r.last_heartbeat
                && !hb.cert_serial.is_empty()
            {
                self.loaded_serials.push(hb.cert_serial.clone());
            }
            match self.agents.get(&r.agent_id) {
                Some(have) if have.last_seen >= r.last_seen => {}
                _ => {
                    self.agents.insert(r.agent_id.clone(), r);
                }
            }
        }
    }

    /// Whether every replica answered: only then does a missing record mean
    /// the bus has never heard from an agent.
    pub fn complete(&self) -> bool {
        self.unreachable.is_empty()
    }

    /// The loaded serials CA rotation may wait on. A replica that did not
    /// answer may still hold a certificate the rotation is about to stop
    /// trusting, so a partial read gives none.
    pub fn loaded_for_rotation(&self) -> Option<&[String]> {
        self.complete().then_some(self.loaded_serials.as_slice())
    }
}

/// A replica's address: URL and the name to verify its certificate against.
pub type ReplicaUrl = (String, Option<String>);

/// Longest one replica's registry read may take; a replica that hangs must
/// not stall the sync of every other bus.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads bus registries over admin connections kept from one pass to the
/// next (otherwise every pass costs a TLS handshake per replica). A
/// connection is dialled again when the admin credentials change or a read
/// through it fails.
#[derive(Default)]
pub struct RegistryReader {
    clients: Mutex<HashMap<ReplicaUrl, (Pems, BusClient)>>,
    connects: Counter,
}

impl RegistryReader {
    /// `connects` counts the connections dialled.
    pub fn new(connects: Counter) -> Self {
        Self {
            clients: Mutex::default(),
            connects,
        }
    }

    /// Connections dialled so far (they are kept between reads).
    pub fn connects(&self) -> u64 {
        self.connects.get()
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<ReplicaUrl, (Pems, BusClient)>> {
        // The map holds no invariant a panicking holder could break.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn client(&self, replica: &ReplicaUrl, pems: &Pems) -> Result<BusClient, ClientError> {
        if let Some((have, c)) = self.clients().get(replica)
            && have == pems
        {
            return Ok(c.clone());
        }
        let ch = connect_channel_pem(&replica.0, replica.1.as_deref(), pems).await?;
        self.connects.inc();
        let c = BusClient::from_channel(ch, 64 * 1024 * 1024);
        self.clients()
            .insert(replica.clone(), (pems.clone(), c.clone()));
        Ok(c)
    }

    /// One replica's loaded server certificate serial and agent records.
    async fn read_one(
        &self,
        replica: &ReplicaUrl,
        pems: &Pems,
    ) -> Result<(StatsResponse, Vec<AgentRecord>), ClientError> {
        let mut c = self.client(replica, pems).await?;
        // Each replica's own part: the operator reads every replica itself.
        let stats = c
            .admin
            .stats(StatsRequest {
                local: true,
                allow_partial: false,
            })
            .await?
            .into_inner();
        let list = c
            .admin
            .list_agents(ListAgentsRequest {
                local: true,
                allow_partial: false,
            })
            .await?
            .into_inner();
        Ok((stats, list.agents))
    }

    /// Reads every replica at `urls` at once, as the admin client `pems`.
    /// Replicas that fail are listed in `unreachable`, not fatal.
    pub async fn read(&self, urls: &[ReplicaUrl], pems: &Pems) -> Registry {
        let reads = urls.iter().map(|replica| async move {
            match tokio::time::timeout(READ_TIMEOUT, self.read_one(replica, pems)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {}s", READ_TIMEOUT.as_secs())),
            }
        });
        let results = futures::future::join_all(reads).await;
        let mut reg = Registry::default();
        for (index, (replica, result)) in urls.iter().zip(results).enumerate() {
            match result {
                Ok((stats, agents)) => {
                    if !stats.server_cert_serial.is_empty() {
                        reg.loaded_serials.push(stats.server_cert_serial.clone());
                    }
                    reg.shards.insert(index as u32, stats);
                    reg.add(agents);
                }
                Err(why) => {
                    self.clients().remove(replica);
                    reg.unreachable.push((replica.0.clone(), why));
                }
            }
        }
        reg.loaded_serials.sort();
        reg.loaded_serials.dedup();
        reg
    }

    /// Hands `replica` the rule set `rules_yaml` (Admin.SetRules); the
    /// digest the bus computed for it.
    pub async fn set_rules(
        &self,
        replica: &ReplicaUrl,
        pems: &Pems,
        rules_yaml: &str,
    ) -> Result<String, ClientError> {
        let mut c = self.client(replica, pems).await?;
        let r = c
            .admin
            .set_rules(SetRulesRequest {
                rules_yaml: rules_yaml.to_string(),
            })
            .await?;
        Ok(r.into_inner().digest)
    }

    /// Closes connections to replicas not in `keep` (buses deleted or
    /// scaled down).
    pub fn retain(&self, keep: &BTreeSet<ReplicaUrl>) {
        self.clients().retain(|k, _| keep.contains(k));
    }
}

/// Where the operator reaches each replica of `bus` in the cluster: the
/// active shards and the retiring ones it still keeps.
pub fn replica_urls(bus: &EventBus) -> Vec<ReplicaUrl> {
    let n = Names::of(&bus.name_any());
    let ns = bus.namespace().unwrap_or_else(|| "default".into());
    (0..crate::build::eventbus::pods_kept(bus))
        .map(|i| {
            let host = format!("{}-{i}.{}.{ns}.svc", n.statefulset, n.headless);
            (
                format!("https://{host}:{}", bus.spec.service.grpc_port),
                None,
            )
        })
        .collect()
}

/// The admin client's TLS material from the bus's admin Secret.
pub async fn admin_pems(ctx: &Context, bus: &EventBus) -> Result<Option<Pems>, Error> {
    let ns = super::namespace(bus)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(s) = api
        .get_opt(&Names::of(&bus.name_any()).admin_secret)
        .await?
    else {
        return Ok(None);
    };
    let data = s.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| v.0.clone());
    Ok(match (get("ca.crt"), get("tls.crt"), get("tls.key")) {
        (Some(ca), Some(cert), Some(key)) => Some(Pems { ca, cert, key }),
        _ => None,
    })
}

/// Recent spool observations per agent id, for the Degraded rule.
#[derive(Default)]
pub struct History {
    samples: Mutex<HashMap<String, VecDeque<SpoolSample>>>,
}

impl History {
    fn record(&self, id: &str, rec: &AgentRecord) -> Vec<SpoolSample> {
        let Ok(mut all) = self.samples.lock() else {
            return Vec::new();
        };
        let q = all.entry(id.to_string()).or_default();
        if let Some(hb) = &rec.last_heartbeat {
            let s = SpoolSample {
                at_ns: rec.last_heartbeat_at,
                spool_bytes: hb.spool_bytes,
                dropped: hb.dropped,
            };
            if q.back().is_none_or(|b| b.at_ns != s.at_ns) {
                q.push_back(s);
            }
            while q.len() > GROWING_SAMPLES + 1 {
                q.pop_front();
            }
        }
        q.iter().copied().collect()
    }

    fn forget(&self, keep: &BTreeSet<String>) {
        if let Ok(mut all) = self.samples.lock() {
            all.retain(|k, _| keep.contains(k));
        }
    }
}

/// An Agent's status from its registry record (`None`: the bus has never
/// heard from it).
pub fn agent_status(
    rec: Option<&AgentRecord>,
    now: OffsetDateTime,
    samples: &[SpoolSample],
) -> AgentStatus {
    let Some(rec) = rec else {
        return AgentStatus {
            phase: "Pending".into(),
            reason: "the bus has no record of this agent yet".into(),
            ..Default::default()
        };
    };
    let now_ns = now.unix_timestamp_nanos() as i64;
    let (p, reason) = phase(rec, now_ns, MISSED_AFTER.as_nanos() as i64, samples);
    let hb = rec.last_heartbeat.clone().unwrap_or_default();
    AgentStatus {
        phase: p.as_str().into(),
        reason,
        last_seen: (rec.last_seen > 0).then(|| rfc3339(rec.last_seen / 1_000_000_000)),
        // Two decimals: enough to read, and no status write for noise.
        events_per_second: (hb.events_per_second * 100.0).round() / 100.0,
        events_total: rec.events,
        spool_bytes: hb.spool_bytes,
        dropped: hb.dropped,
        incarnation: if rec.incarnation == 0 {
            String::new()
        } else {
            format!("{:016x}", rec.incarnation)
        },
        incarnation_started: (rec.incarnation_started > 0)
            .then(|| rfc3339(rec.incarnation_started / 1_000_000_000)),
        incarnations: rec.incarnations,
        previous_unacked: rec.previous_unacked,
        refused_streams: rec.refused_streams,
        last_refusal: rec.last_refusal.clone(),
        lost_by_bus: rec.bus_lost,
        collectors: hb
            .collectors
            .iter()
            .map(|c| AgentCollectorStatus {
                name: c.name.clone(),
                mode: if c.paused {
                    "paused".into()
                } else {
                    c.mode.clone()
                },
            })
            .collect(),
        version: if rec.version.is_empty() {
            hb.version
        } else {
            rec.version.clone()
        },
        cert_serial: hb.cert_serial,
    }
}

/// The name of the Agent for `set` on `node`.
pub fn agent_name(set: &str, node: &str) -> String {
    format!("{set}-{node}")
}

/// What one sync of an AgentSet's Agents did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Agent resources created.
    pub created: usize,
    /// Agent resources deleted (their node left the set).
    pub deleted: usize,
    /// Statuses written because they changed.
    pub status_written: usize,
    /// Agent resources the set has after the sync.
    pub agents: usize,
    /// Those agents by phase (their status as written, or as it stays
    /// when the bus could not be read).
    pub phases: BTreeMap<String, usize>,
}

/// The names of the cluster's Nodes. Only their metadata is read: at a
/// thousand nodes full objects would be megabytes per pass.
pub async fn node_names(ctx: &Context) -> Result<BTreeSet<String>, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    Ok(nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| n.name_any())
        .collect())
}

/// Brings `set`'s Agents in line with its pods and the cluster's `nodes`,
/// and (with a registry) their statuses with the bus. Without a registry
/// (the bus cannot be reached) statuses are left as they are, and so are
/// those of agents whose records a partial registry lacks.
pub async fn sync_set(
    ctx: &Context,
    set: &AgentSet,
    nodes: &BTreeSet<String>,
    registry: Option<&Registry>,
    history: &History,
) -> Result<SyncReport, Error> {
    let ns = super::namespace(set)?;
    let name = set.name_any();
    let now = ctx.now();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let sel = selector_query(&selector(COMPONENT, &name));
    let pod_nodes: BTreeSet<String> = pods
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec.and_then(|s| s.node_name))
        .collect();
    let wanted: BTreeSet<String> = pod_nodes.intersection(nodes).cloned().collect();

    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let agent_sel = selector_query(&labels(COMPONENT, &name));
    let have: BTreeMap<String, Agent> = agents
        .list(&ListParams::default().labels(&agent_sel))
        .await?
        .items
        .into_iter()
        .filter(|a| a.spec.agent_set == name)
        .map(|a| (a.spec.node.clone(), a))
        .collect();

    let mut report = SyncReport {
        agents: wanted.len(),
        ..Default::default()
    };
    for (node, a) in &have {
        if !wanted.contains(node) {
            agents
                .delete(&a.name_any(), &DeleteParams::default())
                .await?;
            report.deleted += 1;
        }
    }

    let ids: BTreeSet<String> = wanted.iter().map(|n| format!("{name}/{n}")).collect();
    let work = wanted.iter().map(|node| {
        let existing = have.get(node).cloned();
        let id = format!("{name}/{node}");
        let ns = ns.clone();
        let name = name.clone();
        async move {
            let mut created = false;
            let agent = match existing {
                Some(a) => a,
                None => {
                    let a = Agent {
                        metadata: owned_meta(set, COMPONENT, &agent_name(&name, node)),
                        spec: AgentSpec {
                            agent_set: name.clone(),
                            node: node.clone(),
                            agent_id: id.clone(),
                        },
                        status: None,
                    };
                    created = true;
                    apply(&ctx.client, &ns, &a).await?
                }
            };
            let mut wrote = false;
            let mut phase = agent.status.as_ref().map(|s| s.phase.clone());
            // A replica that did not answer may hold this agent's record.
            if let Some(reg) = registry.filter(|r| r.complete() || r.agents.contains_key(&id)) {
                let rec = reg.agents.get(&id);
                let samples = rec.map(|r| history.record(&id, r)).unwrap_or_default();
                let status = agent_status(rec, now, &samples);
                phase = Some(status.phase.clone());
                wrote = write_status(&ctx.client, &agent, agent.status.as_ref(), &status).await?;
            }
            Ok::<_, Error>((created, wrote, phase.unwrap_or_else(|| "Pending".into())))
        }
    });
    let results: Vec<(bool, bool, String)> = futures::stream::iter(work)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    report.created = results.iter().filter(|r| r.0).count();
    report.status_written = results.iter().filter(|r| r.1).count();
    for (_, _, phase) in results {
        *report.phases.entry(phase).or_default() += 1;
    }
    if registry.is_some() {
        history.forget(&ids);
    }
    Ok(report)
}

/// One pass over every EventBus: read its registry, remember which
/// certificates are loaded (CA rotation waits on them), and sync the
/// Agents of every AgentSet sending to it.
pub async fn sync_all(ctx: &Context, history: &History) -> Result<usize, Error> {
    let started = Instant::now();
    let buses: Api<EventBus> = Api::all(ctx.client.clone());
    let sets: Api<AgentSet> = Api::all(ctx.client.clone());
    let all_sets = sets.list(&ListParams::default()).await?.items;
    // Nodes matter only to AgentSets; without any, skip the LIST.
    let nodes = if all_sets.is_empty() {
        BTreeSet::new()
    } else {
        node_names(ctx).await?
    };
    let mut total = 0;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = None;
    let mut replicas = BTreeSet::new();
    let all_buses = buses.list(&ListParams::default()).await?.items;
    // The rule set every bus should run, as the EventBus reconciler writes it.
    let rules = if all_buses.is_empty() {
        None
    } else {
        let yaml = super::rules::rule_set(&ctx.client).await?;
        let digest = amoskys_detect::rule_set_digest([yaml.as_str()]);
        Some((yaml, digest))
    };
    for bus in all_buses {
        let ns = super::namespace(&bus)?;
        let urls = replica_urls(&bus);
        replicas.extend(urls.iter().cloned());
        let registry = match admin_pems(ctx, &bus).await? {
            None => None,
            Some(pems) => {
                let r = ctx.registry_reader.read(&urls, &pems).await;
                for (replica, error) in &r.unreachable {
                    ctx.metrics.registry_errors.inc();
                    tracing::warn!(bus = %bus.name_any(), %replica, %error, "reading the agent registry failed");
                }
                if let Some((yaml, digest)) = &rules {
                    push_rules(ctx, &bus, &urls, &pems, &r, yaml, digest).await;
                }
                // With no replica answering there is nothing to go on.
                (urls.is_empty() || r.unreachable.len() < urls.len()).then_some(r)
            }
        };
        let key = format!("{ns}/{}", bus.name_any());
        if let Some(serials) = registry.as_ref().and_then(Registry::loaded_for_rotation)
            && let Ok(mut loaded) = ctx.loaded.lock()
        {
            loaded.insert(key.clone(), serials.to_vec());
        }
        if let Some(r) = &registry
            && let Ok(mut seen) = ctx.shards_seen.lock()
        {
            // A shard that did not answer keeps what it said last.
            let held = seen.entry(key).or_default();
            held.retain(|i, _| (*i as usize) < urls.len());
            held.extend(r.shards.iter().map(|(i, s)| (*i, s.clone())));
        }
        for set in all_sets.iter().filter(|s| {
            s.namespace().as_deref() == Some(ns.as_str()) && s.spec.bus_ref.name == bus.name_any()
        }) {
            match sync_set(ctx, set, &nodes, registry.as_ref(), history).await {
                Ok(r) => {
                    total += r.agents;
                    for (p, n) in r.phases {
                        *phases.entry(p).or_default() += n;
                    }
                }
                Err(e) => {
                    failed = Some(e.kind());
                    tracing::warn!(agentset = %set.name_any(), error = %e, "agent sync failed");
                }
            }
        }
    }
    ctx.registry_reader.retain(&replicas);
    ctx.metrics.agents.set(total as i64);
    for p in amoskys_client::phase::Phase::ALL {
        let n = phases.get(p.as_str()).copied().unwrap_or(0);
        ctx.metrics
            .agents_by_phase
            .get_or_create(&super::metrics::PhaseLabel {
                phase: p.as_str().into(),
            })
            .set(n as i64);
    }
    ctx.metrics.observe("agents", started.elapsed(), failed);
    Ok(total)
}

/// Hands the cluster's rule set to each pod of `bus` that answered and runs
/// another one, so a rule change is live within a sync interval rather than
/// when kubelet refreshes the mounted ConfigMap. Pods without detection
/// (an empty digest) are left alone; a failure is logged and counted, and
/// the mounted ConfigMap still gets there.
pub async fn push_rules(
    ctx: &Context,
    bus: &EventBus,
    urls: &[ReplicaUrl],
    pems: &Pems,
    registry: &Registry,
    yaml: &str,
    digest: &str,
) {
    for (index, stats) in &registry.shards {
        if stats.rules_digest.is_empty() || stats.rules_digest == digest {
            continue;
        }
        let Some(replica) = urls.get(*index as usize) else {
            continue;
        };
        let result = match tokio::time::timeout(
            READ_TIMEOUT,
            ctx.registry_reader.set_rules(replica, pems, yaml),
        )
        .await
        {
            Ok(Ok(_)) => "ok",
            Ok(Err(e)) => {
                tracing::warn!(bus = %bus.name_any(), replica = %replica.0, error = %e, "handing the rule set over failed");
                "error"
            }
            Err(_) => {
                tracing::warn!(bus = %bus.name_any(), replica = %replica.0, "handing the rule set over timed out");
                "error"
            }
        };
        if result == "ok" {
            tracing::info!(bus = %bus.name_any(), replica = %replica.0, digest, "rule set handed over");
        }
        ctx.metrics
            .rule_set_pushes
            .get_or_create(&super::metrics::ResultLabel {
                result: result.into(),
            })
            .inc();
    }
}

/// Keeps `sync_all` running every `every` until `stop` resolves.
pub async fn run(ctx: &Context, every: Duration, stop: impl std::future::Future<Output = ()>) {
    let history = History::default();
    tokio::pin!(stop);
    loop {
        if let Err(e) = sync_all(ctx, &history).await {
            tracing::warn!(error = %e, "agent status sync failed");
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
