//! Brings a validated stack up and down on a container engine.
//!
//! Start walks the dependency graph: every service pulls its image and creates its container at
//! once, then starts as soon as its own dependencies meet their condition, so independent
//! services come up in parallel. Stop walks the graph the other way. Containers carry labels
//! (project, service, config hash, session, owner PID) so a later start can reuse them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::graph;
use crate::config::spec::{Condition, GpuRequest, Probe, Protocol, RestartPolicy, ServiceSpec};
use crate::config::{Config, ConfigError};
use crate::engine::{
    labels, ContainerInfo, ContainerPlan, EngineError, Replica, RunState, SharedEngine,
};
use crate::health::{self, Backoff};
use crate::services::logs::{LineSplitter, LogLines, Redactor};
use crate::services::walk::{self, Direction, Reached, Turn};
use crate::util::Background;

/// How many log lines a start error carries.
const ERROR_LOG_LINES: usize = 20;

/// More restarts than this within `CRASH_WINDOW` is a crash loop: the service is stopped and
/// marked failed instead of restarting forever.
const CRASH_LIMIT: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("service {service:?} cannot publish {host_ip}:{port}: {message}. Stop what holds it, or give the service another port (0 picks any free port)")]
    PortInUse {
        service: String,
        host_ip: String,
        port: u16,
        message: String,
    },
    #[error("service {service:?} failed to start: {reason}{}", logs_suffix(logs))]
    ServiceStart {
        service: String,
        reason: String,
        logs: String,
    },
    #[error("unknown service {name:?}; this stack runs: {known}")]
    UnknownService { name: String, known: String },
    #[error("service {name:?} has no container (it is stopped); start it first")]
    NotRunning { name: String },
    #[error("start was cancelled; every container it started has been removed")]
    Cancelled,
    /// Containers of the project belong to another live process.
    #[error(transparent)]
    InUse(crate::owner::OwnerError),
}

fn logs_suffix(logs: &str) -> String {
    if logs.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last log lines ---\n{}", logs.trim_end())
    }
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Pulling,
    Creating,
    Waiting,
    Starting,
    Healthy,
    Completed,
    Failed,
    Stopping,
    Stopped,
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Pulling => "pulling",
            Phase::Creating => "creating",
            Phase::Waiting => "waiting",
            Phase::Starting => "starting",
            Phase::Healthy => "healthy",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// A progress report; the gRPC streams and the CLI show these.
#[derive(Debug, Clone)]
pub struct ServiceEvent {
    pub service: String,
    pub phase: Phase,
    pub message: String,
}

/// What is known about one service of the running stack.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub name: String,
    pub image: String,
    pub phase: Phase,
    pub container_id: Option<String>,
    /// Published TCP ports: container port → (host ip to dial, host port).
    pub ports: BTreeMap<u16, (String, u16)>,
    /// The container was already running with this config and was attached to, not recreated.
    pub reused: bool,
    pub message: String,
    pub scheme: String,
    /// The container's state as last seen on the Engine.
    pub engine_state: Option<RunState>,
    /// When the container last started, as the Engine reports it (ms since the epoch).
    pub started_at_ms: Option<i64>,
    /// Restarts by the Engine's restart policy plus those asked of the core.
    pub restart_count: u32,
    /// The container runs a local stand-in image, not the real service.
    pub stand_in: bool,
    /// On a cluster backend, each copy of the service with its node.
    pub replicas: Vec<Replica>,
}

impl ServiceState {
    /// Healthy (or a one-shot job done), and its container not exited since.
    pub fn healthy(&self) -> bool {
        matches!(self.phase, Phase::Healthy | Phase::Completed)
            && self.engine_state != Some(RunState::Exited)
    }

    /// `scheme://host:port` of the first published TCP port.
    pub fn url(&self) -> Option<String> {
        self.ports
            .values()
            .next()
            .map(|(host, port)| format!("{}://{}:{}", self.scheme, url_host(host), port))
    }

    pub fn host(&self) -> String {
        self.ports
            .values()
            .next()
            .map(|(host, _)| url_host(host))
            .unwrap_or_else(|| "127.0.0.1".into())
    }
}

fn url_host(ip: &str) -> String {
    let addr = health::probe_addr(ip, 0);
    match addr.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// The config hash label: changes whenever anything about the service's container would.
pub fn config_hash(spec: &ServiceSpec) -> String {
    let json = serde_json::to_vec(spec).expect("a service spec always serializes");
    Sha256::digest(&json)
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct Supervisor {
    engine: SharedEngine,
    config: Arc<Config>,
    session: String,
    owner_addr: String,
    network: String,
    state: Mutex<BTreeMap<String, ServiceState>>,
    events: broadcast::Sender<ServiceEvent>,
    gpu_runtime: tokio::sync::OnceCell<bool>,
    /// One start, stop or restart at a time: they plan from what the Engine holds.
    ops: tokio::sync::Mutex<()>,
    /// Services that died and that their restart policy brings back, with their recent
    /// restarts (for crash-loop detection).
    healing: Mutex<Healing>,
    /// Owns every task this supervisor spawns (event following, healing, restarts).
    background: Background,
    /// The project network's creation, begun before the first start asked for it.
    early_network: Mutex<Option<NetworkUnderway>>,
    /// Where probe times are recorded, when the stack keeps metrics.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    /// Masks the stack's secrets in every message, error and log line that leaves it.
    redactor: Redactor,
}

/// The project network being made in the background.
pub type NetworkUnderway = tokio::task::JoinHandle<Result<(), EngineError>>;

#[derive(Default)]
struct Healing {
    /// Died, and the Engine is expected to start them again.
    awaiting: BTreeSet<String>,
    /// Restarted by the Engine and not yet healthy again.
    recovering: BTreeSet<String>,
    restarts: BTreeMap<String, std::collections::VecDeque<Instant>>,
    /// Stopped as a crash loop: left down, even across an Engine restart, until started again
    /// by hand.
    halted: BTreeSet<String>,
}

enum Plan {
    Reuse(ContainerInfo),
    Create,
}

impl Supervisor {
    /// `owner_addr` is this process's orchestrator address, written on every container so that
    /// a second start of the project can find (and attach to) the stack's owner.
    /// Its background tasks run in `background`, and end when that stops; `redactor` masks
    /// the secrets in what it reports.
    pub fn new(
        engine: SharedEngine,
        config: Arc<Config>,
        session: String,
        owner_addr: String,
        background: Background,
        redactor: Redactor,
    ) -> Self {
        let network = crate::util::network_name(&config.project);
        let state = config
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    ServiceState {
                        name: s.name.clone(),
                        image: s.image.clone(),
                        phase: Phase::Pending,
                        container_id: None,
                        ports: BTreeMap::new(),
                        reused: false,
                        message: String::new(),
                        scheme: s.scheme.clone(),
                        engine_state: None,
                        started_at_ms: None,
                        restart_count: 0,
                        stand_in: false,
                        replicas: Vec::new(),
                    },
                )
            })
            .collect();
        let (events, _) = broadcast::channel(1024);
        Supervisor {
            engine,
            config,
            session,
            owner_addr,
            network,
            state: Mutex::new(state),
            events,
            gpu_runtime: tokio::sync::OnceCell::new(),
            ops: tokio::sync::Mutex::new(()),
            healing: Mutex::new(Healing::default()),
            background,
            early_network: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
            redactor,
        }
    }

    /// Records every health probe's time in `metrics` from now on.
    pub fn record_probes(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The next start uses this creation of the project network instead of making it itself.
    pub fn network_underway(&self, network: NetworkUnderway) {
        *crate::util::lock(&self.early_network) = Some(network);
    }

    /// The label that marks every container this supervisor creates.
    pub fn session(&self) -> &str {
        &self.session
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.subscribe()
    }

    /// Follows the Engine's events for this project until `stop`: a service container that dies
    /// is marked failed at once, one its restart policy brings back is probed until healthy
    /// again, and one that keeps crashing is stopped. When the Engine goes away, this retries
    /// with backoff and rebuilds its view once the Engine answers again.
    pub fn follow_engine(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let stop = self.background.token();
        self.background.spawn(async move {
            loop {
                let mut events = this.engine.container_events(&this.config.project);
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        e = events.next() => e,
                    };
                    match next {
                        Some(Ok(e)) => this.on_event(&e.id, &e.action, e.exit_code).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "lost the Docker Engine's events; retrying");
                            break;
                        }
                        None => break,
                    }
                }
                // Back once the Engine answers, with what changed meanwhile.
                let mut backoff = Backoff::new(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    if this.refresh().await.is_ok() {
                        tracing::info!(project = %this.config.project, "following the Docker Engine again");
                        this.revive().await;
                        break;
                    }
                }
            }
        });
    }

    /// After the Engine came back: services that went down meanwhile are treated as if their
    /// death had been seen, and those the Engine restarted itself (its restart policy, when the
    /// Engine itself restarts) as if their start had been seen.
    async fn revive(self: &Arc<Self>) {
        let failed: Vec<(String, String, Option<RunState>)> = self
            .lock()
            .values()
            .filter(|s| s.phase == Phase::Failed)
            .filter_map(|s| Some((s.name.clone(), s.container_id.clone()?, s.engine_state)))
            .collect();
        for (name, id, state) in failed {
            let Ok(spec) = self.spec(&name).cloned() else {
                continue;
            };
            if self.healing().halted.contains(&name) {
                continue;
            }
            match state {
                // Without a restart policy its death was already reported as final.
                Some(RunState::Exited) if !matches!(spec.restart, RestartPolicy::No) => {
                    self.healing().recovering.insert(name);
                    self.on_die(&spec, &id, Phase::Failed, -1);
                }
                Some(RunState::Running) => self.on_restart(spec, &id).await,
                _ => {}
            }
        }
    }

    fn healing(&self) -> MutexGuard<'_, Healing> {
        crate::util::lock(&self.healing)
    }

    async fn on_event(self: &Arc<Self>, id: &str, action: &str, exit_code: Option<i64>) {
        let Some((name, phase)) = self
            .lock()
            .values()
            .find(|s| s.container_id.as_deref() == Some(id))
            .map(|s| (s.name.clone(), s.phase))
        else {
            return;
        };
        let Ok(spec) = self.spec(&name).cloned() else {
            return;
        };
        match action {
            "die" => self.on_die(&spec, id, phase, exit_code.unwrap_or(-1)),
            "start" => self.on_restart(spec, id).await,
            "destroy" => self.on_destroy(&spec.name, phase),
            _ => {}
        }
    }

    /// A container of a running service was removed by someone else: it is created again, as
    /// its owner would after a crash. Its own stops and rollbacks remove containers in the
    /// `stopping` phase, and a finished job is not run again.
    fn on_destroy(self: &Arc<Self>, name: &str, phase: Phase) {
        if matches!(
            phase,
            Phase::Stopping | Phase::Stopped | Phase::Completed | Phase::Pending
        ) || self.healing().halted.contains(name)
        {
            return;
        }
        if let Some(s) = self.lock().get_mut(name) {
            s.container_id = None;
            s.engine_state = None;
            s.started_at_ms = None;
            s.restart_count += 1;
        }
        {
            let mut healing = self.healing();
            healing.awaiting.remove(name);
            healing.recovering.remove(name);
        }
        self.set_phase(
            name,
            Phase::Failed,
            "its container was removed; creating it again",
        );
        let this = Arc::clone(self);
        let name = name.to_string();
        let cancel = self.background.token();
        self.background.spawn(async move {
            if let Err(e) = this
                .start_services(std::slice::from_ref(&name), cancel)
                .await
            {
                this.set_phase(
                    &name,
                    Phase::Failed,
                    format!("its container was removed and could not be created again: {e}"),
                );
            }
        });
    }

    fn on_die(self: &Arc<Self>, spec: &ServiceSpec, id: &str, phase: Phase, code: i64) {
        let name = &spec.name;
        let recovering = self.healing().recovering.remove(name);
        // Its own stop, its start (the start reports that), or a job that finished.
        if phase != Phase::Healthy && !recovering {
            return;
        }
        let done = self.lock().get(name).map(|s| s.restart_count).unwrap_or(0);
        let restarts = match spec.restart {
            RestartPolicy::No => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure { max_retries } => {
                code != 0 && max_retries.is_none_or(|max| done < max)
            }
        };
        if let Some(s) = self.lock().get_mut(name) {
            s.engine_state = Some(RunState::Exited);
            s.started_at_ms = None;
        }
        let then = if restarts {
            let recent = {
                let mut healing = self.healing();
                healing.awaiting.insert(name.clone());
                healing.restarts.get(name).map(|t| t.len()).unwrap_or(0)
            };
            // The Engine restarts it itself after a crash, but not after `docker kill` or
            // `docker stop`: start it after a backoff (a no-op when it already runs).
            let delay = Duration::from_millis(100)
                .saturating_mul(1 << recent.min(7))
                .min(Duration::from_secs(10));
            let this = Arc::clone(self);
            let id = id.to_string();
            let service = name.clone();
            self.background.spawn_until_stopped(async move {
                tokio::time::sleep(delay).await;
                if this.healing().awaiting.contains(&service) {
                    match this.engine.start(&id).await {
                        Ok(()) => {}
                        // Still awaited: once the Engine is back it is started, or seen running.
                        Err(e @ EngineError::Unavailable { .. }) => this.set_phase(
                            &service,
                            Phase::Failed,
                            format!(
                                "could not restart: {e}; it is restarted when the Engine is back"
                            ),
                        ),
                        Err(e) => {
                            this.healing().awaiting.remove(&service);
                            this.set_phase(
                                &service,
                                Phase::Failed,
                                format!("could not restart: {e}"),
                            );
                        }
                    }
                }
            });
            "; its restart policy brings it back"
        } else {
            ""
        };
        self.set_phase(
            name,
            Phase::Failed,
            format!("container exited with code {code}{then}"),
        );
        for dependent in graph::dependents_of(&self.config.services, name) {
            let current = self.lock().get(&dependent).map(|s| s.phase);
            if let Some(p) = current {
                let _ = self.events.send(ServiceEvent {
                    service: dependent,
                    phase: p,
                    message: format!("its dependency {name} went down"),
                });
            }
        }
    }

    async fn on_restart(self: &Arc<Self>, spec: ServiceSpec, id: &str) {
        let name = spec.name.clone();
        if !self.healing().awaiting.remove(&name) {
            return;
        }
        let recent = {
            let mut healing = self.healing();
            let times = healing.restarts.entry(name.clone()).or_default();
            let now = Instant::now();
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
            {
                times.pop_front();
            }
            times.len()
        };
        if let Some(s) = self.lock().get_mut(&name) {
            s.restart_count += 1;
            s.engine_state = Some(RunState::Running);
        }
        if recent > CRASH_LIMIT {
            self.healing().halted.insert(name.clone());
            // Stopped by hand, the Engine does not restart it again.
            self.engine.stop(id, Duration::from_secs(1)).await;
            self.set_phase(
                &name,
                Phase::Failed,
                format!("crash loop: restarted {recent} times within {CRASH_WINDOW:?}; stopped. Fix it, then `dspy-agent restart {name}`"),
            );
            return;
        }
        // A port published as 0 gets a new host port on every start.
        if let Ok(info) = self.engine.inspect(id).await {
            let reused = self.lock().get(&name).is_some_and(|s| s.reused);
            self.record_container(&name, &info, reused);
        }
        self.healing().recovering.insert(name.clone());
        self.set_phase(&name, Phase::Starting, "restarted by its restart policy");
        let this = Arc::clone(self);
        let id = id.to_string();
        let cancel = self.background.token();
        self.background.spawn(async move {
            let result = this.wait_healthy(&spec, &id, &cancel).await;
            // A die while it came up is its own event.
            if this.healing().recovering.remove(&spec.name) {
                match result {
                    Ok(()) => {
                        this.set_phase(&spec.name, Phase::Healthy, "healthy again after a restart")
                    }
                    Err(e) => this.set_phase(&spec.name, Phase::Failed, e.to_string()),
                }
            }
        });
    }

    /// The configured service names, in start order.
    pub fn names(&self) -> Vec<String> {
        self.config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// `names` with everything they depend on, checked against the config; all when empty.
    pub fn closure(&self, names: &[String]) -> Result<BTreeSet<String>, StackError> {
        if names.is_empty() {
            return Ok(self.names().into_iter().collect());
        }
        let mut chosen = BTreeSet::new();
        let mut todo: Vec<String> = names.to_vec();
        while let Some(name) = todo.pop() {
            let spec = self.spec(&name)?;
            if chosen.insert(name) {
                todo.extend(spec.depends_on.keys().cloned());
            }
        }
        Ok(chosen)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ServiceState>> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        crate::util::lock(&self.state)
    }

    pub fn snapshot(&self) -> Vec<ServiceState> {
        let state = self.lock();
        self.config
            .services
            .iter()
            .filter_map(|s| state.get(&s.name).cloned())
            .collect()
    }

    fn set_phase(&self, service: &str, phase: Phase, message: impl Into<String>) {
        let message = self.redactor.redact(&message.into());
        if let Some(s) = self.lock().get_mut(service) {
            s.phase = phase;
            s.message = message.clone();
        }
        match phase {
            Phase::Failed => tracing::warn!(service, phase = phase.as_str(), "{message}"),
            _ => tracing::info!(service, phase = phase.as_str(), "{message}"),
        }
        let _ = self.events.send(ServiceEvent {
            service: service.to_string(),
            phase,
            message,
        });
    }

    fn spec(&self, name: &str) -> Result<&ServiceSpec, StackError> {
        self.config
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StackError::UnknownService {
                name: name.to_string(),
                known: self
                    .config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn container_name(&self, service: &str) -> String {
        format!("{}-{}", self.config.project, service)
    }

    fn labels_for(&self, spec: &ServiceSpec) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::PROJECT.to_string(), self.config.project.clone()),
            (labels::SERVICE.to_string(), spec.name.clone()),
            (labels::CONFIG_HASH.to_string(), config_hash(spec)),
            (labels::SESSION.to_string(), self.session.clone()),
            (
                labels::OWNER_PID.to_string(),
                std::process::id().to_string(),
            ),
            (labels::OWNER_ADDR.to_string(), self.owner_addr.clone()),
            (
                labels::KEEP.to_string(),
                self.config.keep_running.to_string(),
            ),
        ])
    }

    /// Brings the stack up. On failure or cancellation every container this call created is
    /// removed before it returns.
    pub async fn start(self: &Arc<Self>, cancel: CancellationToken) -> Result<(), StackError> {
        self.start_services(&[], cancel).await
    }

    /// Brings the named services (all when empty) and their dependencies up; running ones with
    /// an unchanged config are kept. Other services are left as they are.
    pub async fn start_services(
        self: &Arc<Self>,
        names: &[String],
        cancel: CancellationToken,
    ) -> Result<(), StackError> {
        let selected = self.closure(names)?;
        let _op = self.ops.lock().await;
        for name in &selected {
            self.healing().halted.remove(name);
        }
        let began = Instant::now();
        let plans = match self.prepare(&selected, names.is_empty()).await {
            Ok(plans) => plans,
            Err(e) => {
                // No container was created; the network goes again unless something uses it.
                self.engine.remove_network(&self.network).await;
                // The state (and every progress stream) still says why.
                let message = e.to_string();
                match &e {
                    StackError::PortInUse { service, .. } => {
                        self.set_phase(service, Phase::Failed, message)
                    }
                    _ => {
                        for name in &selected {
                            self.set_phase(name, Phase::Failed, message.clone());
                        }
                    }
                }
                return Err(e);
            }
        };

        let jobs: BTreeSet<String> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.depends_on.iter())
            .filter(|(_, c)| **c == Condition::Completed)
            .map(|(n, _)| n.clone())
            .collect();
        let creating: BTreeSet<String> = plans
            .iter()
            .filter(|(_, p)| matches!(p, Plan::Create))
            .map(|(n, _)| n.clone())
            .collect();
        // The first failure ends the walk: the others stop where they are.
        let halt = cancel.child_token();
        let mut plans = plans;
        let results = walk::walk(
            &self.config.services,
            &selected,
            Direction::Up,
            |name, turn| {
                let this = Arc::clone(self);
                let plan = plans.remove(&name).unwrap_or(Plan::Create);
                let is_job = jobs.contains(&name);
                let halt = halt.clone();
                async move {
                    let result = this.bring_up(&name, plan, turn, is_job, &halt).await;
                    if result.is_err() {
                        halt.cancel();
                    }
                    result
                }
            },
        )
        .await?;

        let mut failure: Option<StackError> = None;
        let mut failed_service: Option<(String, String)> = None;
        for (name, result) in results {
            if let Err(e) = result {
                // Keep the first real failure; cancellations are its echo in the other services.
                let real = !matches!(e, StackError::Cancelled);
                if real {
                    self.set_phase(&name, Phase::Failed, e.to_string());
                    failed_service.get_or_insert((name.clone(), e.to_string()));
                }
                if failure.is_none() || (real && matches!(failure, Some(StackError::Cancelled))) {
                    failure = Some(e);
                }
            }
        }

        match failure {
            None => {
                tracing::info!(
                    project = %self.config.project,
                    services = selected.len(),
                    elapsed_ms = began.elapsed().as_millis() as u64,
                    "stack is up"
                );
                Ok(())
            }
            Some(e) => {
                let created: Vec<String> = self
                    .snapshot()
                    .into_iter()
                    .filter(|s| selected.contains(&s.name) && !s.reused && s.container_id.is_some())
                    .map(|s| s.name)
                    .collect();
                self.stop_locked(&created, Some(Duration::from_secs(2)))
                    .await;
                // A create cut short by cancellation may have left a container whose id never
                // reached us: sweep this session's containers of the services this call created
                // (others of the session, already running, stay).
                if let Ok(left) = self
                    .engine
                    .list_by_label(labels::SESSION, &self.session)
                    .await
                {
                    let ours = |c: &ContainerInfo| {
                        c.labels
                            .get(labels::SERVICE)
                            .is_some_and(|s| creating.contains(s))
                    };
                    for c in left.into_iter().filter(ours) {
                        let _ = self.engine.remove(&c.id, Duration::ZERO).await;
                    }
                }
                // Fails harmlessly while reused containers still use it.
                self.engine.remove_network(&self.network).await;
                // The rollback stopped it too; its state should still say why it failed.
                if let Some((name, message)) = failed_service {
                    self.set_phase(&name, Phase::Failed, message);
                }
                Err(if cancel.is_cancelled() {
                    StackError::Cancelled
                } else {
                    e
                })
            }
        }
    }

    /// Plans the start, checks its host ports, removes stale containers and makes sure the
    /// network exists.
    async fn prepare(
        self: &Arc<Self>,
        selected: &BTreeSet<String>,
        full: bool,
    ) -> Result<BTreeMap<String, Plan>, StackError> {
        // The network is made sure of alongside the listing: a cold start needs it, and for a
        // warm one it exists already, so asking costs nothing on the critical path.
        let early = crate::util::lock(&self.early_network).take();
        let network = async {
            if let Some(underway) = early {
                if let Ok(made) = underway.await {
                    return made;
                }
            }
            // None made ahead, or cut short (a stop came first): make it now.
            self.engine
                .ensure_network(&self.network, &self.config.project)
                .await
        };
        let (existing, network) = tokio::join!(
            self.engine
                .list_by_label(labels::PROJECT, &self.config.project),
            network
        );
        network?;
        let existing = existing?;
        if let Some(owner) = existing.iter().find_map(|c| self.live_owner(c)) {
            return Err(StackError::InUse(crate::owner::OwnerError::InUse {
                project: self.config.project.clone(),
                owner,
            }));
        }
        let (orphans, existing): (Vec<ContainerInfo>, Vec<ContainerInfo>) =
            existing.into_iter().partition(|c| self.is_orphan(c));
        if !orphans.is_empty() {
            tracing::warn!(
                project = %self.config.project,
                containers = orphans.len(),
                "removing containers whose owning process died without stopping them"
            );
        }
        let (plans, mut stale) = self.plan(existing, selected, full);
        stale.extend(orphans);
        if self.engine.publishes_here() {
            self.check_ports(&plans, &stale)?;
        }

        let mut removals = JoinSet::new();
        for c in &stale {
            let this = Arc::clone(self);
            let id = c.id.clone();
            removals.spawn(async move { this.engine.remove(&id, Duration::from_secs(10)).await });
        }
        while let Some(result) = removals.join_next().await {
            if let Ok(Err(e)) = result {
                return Err(e.into());
            }
        }
        Ok(plans)
    }

    /// The live process that created `c` for a stack of its own (not this one): its containers
    /// are not ours to reuse or remove.
    fn live_owner(&self, c: &ContainerInfo) -> Option<crate::owner::Owner> {
        let session = c.labels.get(labels::SESSION)?;
        if session == &self.session {
            return None;
        }
        crate::owner::live_creator(&c.labels, self.engine.host())
    }

    /// A container left by a process of this machine that died without stopping it (and that
    /// nobody asked to keep running): its watchdog missed it, so this start removes it.
    fn is_orphan(&self, c: &ContainerInfo) -> bool {
        if !self.engine.host().starts_with("unix://") {
            // Owner pids name processes of the Engine's machine, which may not be this one.
            return false;
        }
        let keep = c.labels.get(labels::KEEP).is_some_and(|v| v == "true");
        let ours = c.labels.get(labels::SESSION).map(String::as_str) == Some(self.session.as_str());
        let owner = c
            .labels
            .get(labels::OWNER_PID)
            .and_then(|p| p.parse::<u32>().ok());
        !keep && !ours && owner.is_some_and(crate::util::is_dead)
    }

    /// Decides, per selected service, whether to reuse a running container or create one;
    /// returns the containers to remove (changed config, not running, or, when `full`, no
    /// longer in the config).
    fn plan(
        &self,
        existing: Vec<ContainerInfo>,
        selected: &BTreeSet<String>,
        full: bool,
    ) -> (BTreeMap<String, Plan>, Vec<ContainerInfo>) {
        let mut by_service: BTreeMap<String, Vec<ContainerInfo>> = BTreeMap::new();
        for c in existing {
            let service = c.labels.get(labels::SERVICE).cloned().unwrap_or_default();
            by_service.entry(service).or_default().push(c);
        }
        let mut plans = BTreeMap::new();
        let mut stale = Vec::new();
        let mut recreated: BTreeSet<String> = BTreeSet::new();
        for spec in &self.config.services {
            let mut found = by_service.remove(&spec.name).unwrap_or_default();
            if !selected.contains(&spec.name) {
                continue;
            }
            let hash = config_hash(spec);
            let reusable = found.iter().position(|c| {
                c.state == RunState::Running && c.labels.get(labels::CONFIG_HASH) == Some(&hash)
            });
            let deps_recreated = spec.depends_on.keys().any(|d| recreated.contains(d));
            match reusable {
                Some(i) if !deps_recreated => {
                    let c = found.remove(i);
                    plans.insert(spec.name.clone(), Plan::Reuse(c));
                }
                _ => {
                    if !found.is_empty() {
                        tracing::info!(service = %spec.name, "config changed or container not running: recreating");
                    }
                    recreated.insert(spec.name.clone());
                    plans.insert(spec.name.clone(), Plan::Create);
                }
            }
            stale.extend(found);
        }
        if full {
            for (service, containers) in by_service {
                tracing::info!(service = %service, "no longer in the config: removing");
                stale.extend(containers);
            }
        }
        // Dependents of a recreated service are recreated too (they may hold connections to it).
        for name in recreated.clone() {
            for dependent in graph::dependents_of(&self.config.services, &name) {
                if !selected.contains(&dependent) {
                    continue;
                }
                if let Some(Plan::Reuse(c)) = plans.insert(dependent, Plan::Create) {
                    stale.push(c);
                }
            }
        }
        (plans, stale)
    }

    fn check_ports(
        &self,
        plans: &BTreeMap<String, Plan>,
        stale: &[ContainerInfo],
    ) -> Result<(), StackError> {
        let held_by_stale: BTreeSet<u16> = stale
            .iter()
            .flat_map(|c| c.ports.values().map(|(_, p)| *p))
            .collect();
        for spec in &self.config.services {
            if !matches!(plans.get(&spec.name), Some(Plan::Create)) {
                continue;
            }
            for p in spec.ports.iter().filter(|p| p.host_port != 0) {
                if held_by_stale.contains(&p.host_port) {
                    continue;
                }
                // Config parsing guarantees an IP address here.
                let ip: std::net::IpAddr = p.host_ip.parse().unwrap_or([127, 0, 0, 1].into());
                let bind_addr = std::net::SocketAddr::new(ip, p.host_port);
                let result = match p.protocol {
                    Protocol::Tcp => std::net::TcpListener::bind(bind_addr).map(drop),
                    Protocol::Udp => std::net::UdpSocket::bind(bind_addr).map(drop),
                };
                if let Err(e) = result {
                    return Err(StackError::PortInUse {
                        service: spec.name.clone(),
                        host_ip: p.host_ip.clone(),
                        port: p.host_port,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn bring_up(
        &self,
        name: &str,
        plan: Plan,
        mut turn: Turn,
        is_job: bool,
        cancel: &CancellationToken,
    ) -> Result<(), StackError> {
        let spec = self.spec(name)?.clone();
        let id = match plan {
            Plan::Reuse(c) => {
                self.record_container(name, &c, true);
                self.set_phase(name, Phase::Starting, "reusing running container");
                c.id
            }
            Plan::Create => {
                self.set_phase(
                    name,
                    Phase::Pulling,
                    format!("ensuring image {}", spec.image),
                );
                let progress = |line: String| {
                    let _ = self.events.send(ServiceEvent {
                        service: name.to_string(),
                        phase: Phase::Pulling,
                        message: line,
                    });
                };
                cancellable(
                    cancel,
                    self.engine.ensure_image(&spec.image, spec.pull, &progress),
                )
                .await?
                .map_err(|e| {
                    let reason = match e {
                        // Which setting names the image, so the fix is one line away.
                        EngineError::Image { .. } => format!(
                            "{e}. Build or load it (`docker build -t {image} ...`, `docker load`), \
                             or set `services.{name}.image` in dspy-agent.toml (or \
                             config={{\"services\": {{\"{name}\": {{\"image\": ...}}}}}}) to an \
                             image you have",
                            image = spec.image
                        ),
                        other => other.to_string(),
                    };
                    self.start_error(name, reason, String::new())
                })?;
                self.set_phase(name, Phase::Creating, "creating container");
                let gpus = match spec.resources.gpus {
                    GpuRequest::None => false,
                    GpuRequest::Auto => {
                        let has = *self
                            .gpu_runtime
                            .get_or_init(|| self.engine.has_gpu_runtime())
                            .await;
                        if !has {
                            tracing::info!(
                                service = name,
                                "no GPU runtime on this Engine: running on CPU"
                            );
                        }
                        has
                    }
                    GpuRequest::All | GpuRequest::Count(_) => true,
                };
                let container_name = self.container_name(name);
                let plan = ContainerPlan {
                    name: &container_name,
                    network: &self.network,
                    volume_prefix: &self.config.project,
                    spec: &spec,
                    labels: self.labels_for(&spec),
                    gpus,
                };
                let id = cancellable(cancel, self.engine.create_container(&plan))
                    .await?
                    .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
                if let Some(s) = self.lock().get_mut(name) {
                    s.container_id = Some(id.clone());
                }

                let waits = turn.waits_on();
                if !waits.is_empty() {
                    self.set_phase(
                        name,
                        Phase::Waiting,
                        format!(
                            "waiting for {}",
                            waits
                                .iter()
                                .map(|(d, c)| format!("{d} ({c})"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                // A dependency that failed ends this start too; the failure is reported there.
                cancellable(cancel, turn.wait())
                    .await?
                    .map_err(|_| StackError::Cancelled)?;

                self.set_phase(name, Phase::Starting, "starting container");
                cancellable(cancel, self.engine.start(&id))
                    .await?
                    .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
                let info = cancellable(cancel, self.engine.inspect(&id))
                    .await?
                    .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
                self.record_container(name, &info, false);
                id
            }
        };
        turn.reach(Reached::Started);

        if is_job {
            self.wait_completed(name, &id, cancel).await?;
            turn.reach(Reached::Completed);
            self.set_phase(name, Phase::Completed, "ran to completion");
        } else {
            let began = Instant::now();
            self.wait_healthy(&spec, &id, cancel).await?;
            turn.reach(Reached::Healthy);
            self.set_phase(
                name,
                Phase::Healthy,
                format!(
                    "{} probe passed after {} ms",
                    spec.healthcheck.probe.kind(),
                    began.elapsed().as_millis()
                ),
            );
        }
        Ok(())
    }

    fn record_container(&self, name: &str, c: &ContainerInfo, reused: bool) {
        if let Some(s) = self.lock().get_mut(name) {
            s.container_id = Some(c.id.clone());
            s.reused = reused;
            // Containers carry their image's labels.
            s.stand_in = c.labels.get(labels::STAND_IN).is_some_and(|v| v == "true");
            s.engine_state = Some(c.state);
            s.started_at_ms = c.started_at.as_deref().and_then(crate::util::rfc3339_ms);
            s.restart_count = s.restart_count.max(c.restart_count.max(0) as u32);
            s.replicas = c.replicas.clone();
            s.ports = c
                .ports
                .iter()
                .filter(|((_, proto), _)| proto == "tcp")
                .map(|((port, _), (ip, host_port))| (*port, (ip.clone(), *host_port)))
                .collect();
        }
    }

    fn start_error(&self, service: &str, reason: String, logs: String) -> StackError {
        StackError::ServiceStart {
            service: service.to_string(),
            reason: self.redactor.redact(&reason),
            logs: self.redactor.redact(&logs),
        }
    }

    async fn failure_with_logs(&self, service: &str, id: &str, reason: String) -> StackError {
        let logs = self
            .engine
            .logs(id, ERROR_LOG_LINES)
            .await
            .unwrap_or_default();
        self.start_error(service, reason, logs)
    }

    /// Runs one probe, timed; `Err` carries what went wrong, for the error a user finally sees.
    async fn probe(&self, spec: &ServiceSpec, id: &str) -> Result<(), String> {
        let began = std::time::Instant::now();
        let result = self.probe_once(spec, id).await;
        if let Some(m) = self.metrics.get() {
            m.probe_seconds
                .with_label_values(&[
                    spec.name.as_str(),
                    if result.is_ok() { "pass" } else { "fail" },
                ])
                .observe(began.elapsed().as_secs_f64());
        }
        result
    }

    async fn probe_once(&self, spec: &ServiceSpec, id: &str) -> Result<(), String> {
        if !self.engine.publishes_here() {
            return self.probe_replicas(spec, id).await;
        }
        let timeout = spec.healthcheck.timeout;
        let published = |port: u16| -> Result<std::net::SocketAddr, String> {
            let state = self.lock();
            let (ip, host_port) = state
                .get(&spec.name)
                .and_then(|s| s.ports.get(&port).cloned())
                .ok_or_else(|| format!("container port {port} is not published"))?;
            Ok(health::probe_addr(&ip, host_port))
        };
        match &spec.healthcheck.probe {
            probe @ (Probe::Tcp { port } | Probe::Http { port, .. } | Probe::Redis { port }) => {
                network_probe(probe, published(*port)?, timeout).await
            }
            Probe::Exec { command } => {
                match tokio::time::timeout(timeout, self.engine.exec(id, command)).await {
                    Err(_) => Err(format!(
                        "exec {command:?} gave no answer within {timeout:?}"
                    )),
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(out)) if out.exit_code == 0 => Ok(()),
                    Ok(Ok(out)) => Err(format!(
                        "exec {command:?} exited with {}: {}",
                        out.exit_code,
                        format!("{}{}", out.stdout, out.stderr).trim()
                    )),
                }
            }
            Probe::Docker => {
                let ours = tokio::time::timeout(timeout, self.engine.run_image_healthcheck(id));
                match ours.await {
                    Ok(Some(verdict)) => return verdict,
                    Ok(None) => {}
                    Err(_) => {
                        return Err(format!(
                            "the image's HEALTHCHECK gave no answer within {timeout:?}"
                        ))
                    }
                }
                let info = self.engine.inspect(id).await.map_err(|e| e.to_string())?;
                match info.engine_health.as_deref() {
                    Some("healthy") => Ok(()),
                    Some(other) => Err(format!("the image's HEALTHCHECK reports {other}")),
                    None => {
                        Err("the image has no HEALTHCHECK; choose another probe type".to_string())
                    }
                }
            }
            Probe::None => Ok(()),
        }
    }

    /// A cluster service is healthy when every replica is: each is probed at its own node's
    /// published port (host mode) or through the routing mesh at its node's address. An exec
    /// probe or the image's HEALTHCHECK runs inside each replica, where the cluster counts a
    /// replica as running only once it passes.
    async fn probe_replicas(&self, spec: &ServiceSpec, id: &str) -> Result<(), String> {
        let info = self.engine.inspect(id).await.map_err(|e| e.to_string())?;
        if let Some(problem) = &info.problem {
            return Err(problem.clone());
        }
        if info.state != RunState::Running {
            let waiting: Vec<String> = info
                .replicas
                .iter()
                .filter(|r| r.state != "running")
                .map(|r| {
                    format!(
                        "replica {} on {}: {}",
                        r.slot,
                        or_unplaced(&r.node),
                        r.state
                    )
                })
                .collect();
            return Err(if waiting.is_empty() {
                "its replicas are not all running yet".to_string()
            } else {
                format!("not all replicas run: {}", waiting.join("; "))
            });
        }
        // Kept current: each replica's address (a published port 0 differs on every node).
        let reused = self.lock().get(&spec.name).is_some_and(|s| s.reused);
        self.record_container(&spec.name, &info, reused);
        let timeout = spec.healthcheck.timeout;
        let port = match &spec.healthcheck.probe {
            Probe::Tcp { port } | Probe::Http { port, .. } | Probe::Redis { port } => *port,
            Probe::Exec { .. } | Probe::Docker | Probe::None => return Ok(()),
        };
        let checks = info.replicas.iter().map(|r| async move {
            let (ip, host_port) = r
                .ports
                .iter()
                .find(|((p, proto), _)| *p == port && proto == "tcp")
                .map(|(_, addr)| addr.clone())
                .ok_or_else(|| {
                    format!(
                        "replica {} on {}: container port {port} is not published",
                        r.slot, r.node
                    )
                })?;
            let addr = health::probe_addr(&ip, host_port);
            network_probe(&spec.healthcheck.probe, addr, timeout)
                .await
                .map_err(|e| format!("replica {} on {}: {e}", r.slot, r.node))
        });
        let failed: Vec<String> = futures_util::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    async fn wait_healthy(
        &self,
        spec: &ServiceSpec,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StackError> {
        let deadline = Instant::now() + spec.healthcheck.start_period;
        let mut backoff = if self.engine.publishes_here() {
            Backoff::new(spec.healthcheck.interval)
        } else {
            // Each look at a cluster service asks its manager about every task and node: a
            // replica takes a scheduling round of the cluster to start anyway.
            Backoff::starting_at(Duration::from_millis(50), spec.healthcheck.interval)
        };
        loop {
            let last_error = match cancellable(cancel, self.probe(spec, id)).await? {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let info = self
                .engine
                .inspect(id)
                .await
                .map_err(|e| self.start_error(&spec.name, e.to_string(), String::new()))?;
            if let Some(problem) = info.problem {
                return Err(self.failure_with_logs(&spec.name, id, problem).await);
            }
            if matches!(
                info.state,
                RunState::Exited | RunState::Dead | RunState::Restarting
            ) {
                let code = info
                    .exit_code
                    .map(|c| format!(" with code {c}"))
                    .unwrap_or_default();
                return Err(self
                    .failure_with_logs(
                        &spec.name,
                        id,
                        format!("its container exited{code} before it was healthy"),
                    )
                    .await);
            }
            if Instant::now() >= deadline {
                return Err(self
                    .failure_with_logs(
                        &spec.name,
                        id,
                        format!(
                            "not healthy within its start period of {:?}; last {} probe: {last_error}",
                            spec.healthcheck.start_period,
                            spec.healthcheck.probe.kind()
                        ),
                    )
                    .await);
            }
            cancellable(cancel, tokio::time::sleep(backoff.next_delay())).await?;
        }
    }

    async fn wait_completed(
        &self,
        name: &str,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StackError> {
        let mut backoff = Backoff::new(Duration::from_millis(250));
        loop {
            let info = self
                .engine
                .inspect(id)
                .await
                .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
            match (info.state, info.exit_code) {
                (RunState::Exited, Some(0)) => return Ok(()),
                (RunState::Exited | RunState::Dead, code) => {
                    return Err(self
                        .failure_with_logs(
                            name,
                            id,
                            format!("it exited with code {} instead of 0", code.unwrap_or(-1)),
                        )
                        .await)
                }
                _ => cancellable(cancel, tokio::time::sleep(backoff.next_delay())).await?,
            }
        }
    }

    /// Stops and removes the named services (all when empty), each after its dependents, in
    /// parallel where the graph allows. `timeout` overrides each service's stop timeout.
    pub async fn stop_services(self: &Arc<Self>, names: &[String], timeout: Option<Duration>) {
        let _op = self.ops.lock().await;
        self.stop_locked(names, timeout).await;
    }

    async fn stop_locked(self: &Arc<Self>, names: &[String], timeout: Option<Duration>) {
        let chosen: BTreeSet<String> = if names.is_empty() {
            self.config
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect()
        } else {
            names.iter().cloned().collect()
        };
        let walked = walk::walk(
            &self.config.services,
            &chosen,
            Direction::Down,
            |name, mut turn| {
                let this = Arc::clone(self);
                let stop_timeout =
                    timeout.or_else(|| this.spec(&name).ok().map(|s| s.stop_timeout));
                async move {
                    // Its dependents never fail a stop: each ends by being done.
                    let _ = turn.wait().await;
                    let id = this.lock().get(&name).and_then(|s| s.container_id.clone());
                    if let Some(id) = id {
                        this.set_phase(&name, Phase::Stopping, "stopping");
                        this.engine
                            .stop(&id, stop_timeout.unwrap_or_default())
                            .await;
                        // Once it no longer runs, its dependencies may stop; deleting the
                        // stopped container need not hold them up.
                        turn.reach(Reached::Completed);
                        match this.engine.remove_stopped(&id).await {
                            Ok(()) => this.set_phase(&name, Phase::Stopped, "removed"),
                            Err(e) => this.set_phase(
                                &name,
                                Phase::Failed,
                                format!("could not remove: {e}"),
                            ),
                        }
                        if let Some(s) = this.lock().get_mut(&name) {
                            s.container_id = None;
                            s.ports.clear();
                            s.engine_state = None;
                            s.started_at_ms = None;
                        }
                    }
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        )
        .await;
        if let Err(e) = walked {
            tracing::error!(project = %self.config.project, error = %e, "nothing stopped");
            return;
        }
        if names.is_empty() {
            self.engine.remove_network(&self.network).await;
        }
    }

    /// Restarts one service's container and waits until it is healthy again; a service without
    /// a container (stopped, or removed by someone else) is brought up instead.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<(), StackError> {
        let spec = self.spec(name)?.clone();
        let op = self.ops.lock().await;
        let id = self.lock().get(name).and_then(|s| s.container_id.clone());
        let Some(id) = id else {
            // Stopped, or its container is gone: restarting it means bringing it up.
            drop(op);
            self.healing().halted.remove(name);
            return self
                .start_services(&[name.to_string()], self.background.token())
                .await;
        };
        self.healing().halted.remove(name);
        self.set_phase(name, Phase::Starting, "restarting");
        self.engine
            .restart(&id, spec.stop_timeout)
            .await
            .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
        let info = self
            .engine
            .inspect(&id)
            .await
            .map_err(|e| self.start_error(name, e.to_string(), String::new()))?;
        self.record_container(name, &info, false);
        if let Some(s) = self.lock().get_mut(name) {
            s.restart_count += 1;
        }
        let result = self
            .wait_healthy(&spec, &id, &self.background.token())
            .await;
        match &result {
            Ok(()) => self.set_phase(name, Phase::Healthy, "healthy after restart"),
            Err(e) => self.set_phase(name, Phase::Failed, e.to_string()),
        }
        result
    }

    /// Live state from the Engine, merged into the snapshot.
    pub async fn refresh(&self) -> Result<Vec<ServiceState>, StackError> {
        let ids: Vec<(String, String)> = self
            .snapshot()
            .into_iter()
            .filter_map(|s| s.container_id.map(|id| (s.name, id)))
            .collect();
        for (name, id) in ids {
            match self.engine.inspect(&id).await {
                Ok(info) => {
                    if let Some(s) = self.lock().get_mut(&name) {
                        s.engine_state = Some(info.state);
                        s.started_at_ms =
                            info.started_at.as_deref().and_then(crate::util::rfc3339_ms);
                    }
                    let lost = matches!(info.state, RunState::Exited | RunState::Dead);
                    let phase = self.lock().get(&name).map(|s| s.phase);
                    if lost && phase == Some(Phase::Healthy) {
                        // Its `die` event may still be on its way: the follower must take it for
                        // a death to heal, not for a stop of ours, once this marks it failed.
                        self.healing().recovering.insert(name.clone());
                    }
                    // A failure already reported keeps its own reason (a crash loop, say).
                    if lost && !matches!(phase, Some(Phase::Completed | Phase::Failed)) {
                        let code = info.exit_code.unwrap_or(-1);
                        self.set_phase(
                            &name,
                            Phase::Failed,
                            format!("container exited with code {code}"),
                        );
                    }
                }
                Err(e) if e.is_not_found() => {
                    self.set_phase(&name, Phase::Failed, "container is gone");
                    if let Some(s) = self.lock().get_mut(&name) {
                        s.container_id = None;
                        s.engine_state = None;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.snapshot())
    }

    pub async fn logs(&self, name: &str, tail: usize) -> Result<String, StackError> {
        self.spec(name)?;
        let id = self.lock().get(name).and_then(|s| s.container_id.clone());
        match id {
            Some(id) => Ok(self.redactor.redact(&self.engine.logs(&id, tail).await?)),
            None => Ok(String::new()),
        }
    }

    /// A service's output as whole lines (stderr `true`), secrets masked: `tail` 0 is
    /// everything, `since` in seconds since the epoch (0 = from the beginning).
    pub fn log_lines(
        &self,
        name: &str,
        follow: bool,
        tail: usize,
        since: i64,
    ) -> Result<LogLines, StackError> {
        self.spec(name)?;
        let id = self.lock().get(name).and_then(|s| s.container_id.clone());
        let Some(id) = id else {
            return Err(StackError::NotRunning {
                name: name.to_string(),
            });
        };
        let chunks = self.engine.log_stream(&id, follow, tail, since);
        let redactor = self.redactor.clone();
        let lines = futures_util::stream::unfold(
            (chunks, LineSplitter::default(), false),
            |(mut chunks, mut split, done)| async move {
                if done {
                    return None;
                }
                let mut lines = Vec::new();
                let end = match chunks.next().await {
                    Some(Ok((stderr, bytes))) => {
                        split.push(stderr, &bytes, &mut lines);
                        false
                    }
                    Some(Err(e)) => return Some((vec![Err(e)], (chunks, split, true))),
                    None => {
                        split.finish(&mut lines);
                        true
                    }
                };
                Some((lines.into_iter().map(Ok).collect(), (chunks, split, end)))
            },
        )
        .flat_map(futures_util::stream::iter)
        .map(move |line| line.map(|(stderr, text)| (stderr, redactor.redact(&text))));
        Ok(lines.boxed())
    }
}

/// A `tcp`, `http` or `redis` probe of `addr` (any other probe is taken as `tcp`).
async fn network_probe(
    probe: &Probe,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    match probe {
        Probe::Http { path, status, .. } => health::http(addr, path, *status, timeout).await,
        Probe::Redis { .. } => health::redis(addr, timeout).await,
        _ => health::tcp(addr, timeout).await,
    }
}

fn or_unplaced(node: &str) -> &str {
    if node.is_empty() {
        "no node yet"
    } else {
        node
    }
}

/// Runs `fut` unless `cancel` fires first.
async fn cancellable<T>(
    cancel: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, StackError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(StackError::Cancelled),
        v = fut => Ok(v),
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
