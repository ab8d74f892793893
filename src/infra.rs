//! The assembled core: the one entry point for the bindings, the command line and the daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::access;
use crate::config::{Config, ConfigError, Secret};
use crate::engine::{EngineError, SharedEngine};
use crate::grpc::env_manager::EnvManager;
use crate::grpc::{self, GrpcError};
use crate::health;
use crate::http;
use crate::owner::{Owner, OwnerError, OwnerLock};
use crate::services::logs::Redactor;
use crate::services::supervisor::{NetworkUnderway, ServiceState, StackError, Supervisor};
use crate::tasks::handlers::{self, Handler, ServiceDirectory};
use crate::tasks::model::TaskError;
use crate::tasks::queue::TaskQueue;
use crate::util::Background;
use crate::watchdog::{Launcher, Watchdog};

/// How long to wait for the Docker Engine before reporting it unavailable.
pub const DOCKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error(transparent)]
    InUse(#[from] OwnerError),
    #[error(transparent)]
    Http(#[from] http::BindError),
}

impl InfraError {
    /// The live owner of the project's stack, when that is why this start was refused.
    pub fn in_use(&self) -> Option<&Owner> {
        match self {
            InfraError::InUse(OwnerError::InUse { owner, .. })
            | InfraError::Stack(StackError::InUse(OwnerError::InUse { owner, .. })) => Some(owner),
            _ => None,
        }
    }
}

/// The stack's services as the task handlers see them.
struct Directory(Arc<Supervisor>);

impl ServiceDirectory for Directory {
    fn container_id(&self, service: &str) -> Option<String> {
        self.0
            .snapshot()
            .into_iter()
            .find(|s| s.name == service)
            .and_then(|s| s.container_id)
    }

    fn address(&self, service: &str, port: Option<u16>) -> Option<SocketAddr> {
        let state = self.0.snapshot().into_iter().find(|s| s.name == service)?;
        let (ip, host_port) = match port {
            Some(p) => state.ports.get(&p)?.clone(),
            None => state.ports.values().next()?.clone(),
        };
        Some(health::probe_addr(&ip, host_port))
    }

    fn services(&self) -> Vec<String> {
        self.0.snapshot().into_iter().map(|s| s.name).collect()
    }
}

/// A running stack (possibly of zero services) with its task queue and both gRPC ports.
pub struct Infra {
    config: Arc<Config>,
    supervisor: Option<Arc<Supervisor>>,
    queue: TaskQueue,
    servers: Mutex<Vec<grpc::Server>>,
    orchestrator_addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served.
    http_addr: SocketAddr,
    env_manager_addr: SocketAddr,
    watchdog: Option<Watchdog>,
    /// What both ports require.
    access: access::Required,
    /// The ports as listed for this user's clients, unlisted at shutdown.
    listed: Mutex<Vec<access::Listed>>,
    /// Every task the stack spawned: the gRPC servers and their streams, the queue's dispatcher
    /// and handler runs, the supervisor's event following and healing.
    background: Background,
    /// Held while this stack runs: no other start of the project runs beside it.
    _owner: OwnerLock,
}

impl Infra {
    /// Opens the task queue and serves both gRPC ports, then brings the stack up. A failure
    /// undoes what was started.
    pub async fn start(
        config: Config,
        cancel: CancellationToken,
        launcher: Option<Launcher>,
    ) -> Result<Infra, InfraError> {
        let infra = Infra::open(config, None, launcher).await?;
        if let Err(e) = infra.start_services(&[], cancel).await {
            infra.shutdown(false).await;
            return Err(e);
        }
        Ok(infra)
    }

    /// Opens the task queue, serves the orchestrator and env-manager ports and connects to the
    /// Engine (only when there is a service to run), without starting any service yet.
    /// `own_log` is the file the env-manager serves as its own log (the daemon's). With a
    /// `launcher`, a watchdog process removes the stack's containers should this process die
    /// without stopping them.
    pub async fn open(
        config: Config,
        own_log: Option<PathBuf>,
        launcher: Option<Launcher>,
    ) -> Result<Infra, InfraError> {
        let config = Arc::new(config);
        // Before anything else: the task store, the token and the containers are the owner's
        // alone.
        access::private_dir(&config.state_dir)?;
        let mut owner = OwnerLock::acquire(&config.state_dir, &config.project)?;
        crate::tasks::spans::init();
        let required = access::required(&config)?;
        let store = crate::tasks::store::open(
            &config.tasks.store,
            config.tasks.durability,
            config.tasks.lease,
        );
        // The Engine is reached while the store opens: with services to run, the cold start's
        // critical path begins there.
        let connect = async {
            if config.services.is_empty() {
                return Ok(None);
            }
            let engine = crate::engine::connect(
                config.backend,
                config.docker_host.as_deref(),
                DOCKER_CONNECT_TIMEOUT,
            )
            .await?;
            Ok::<_, EngineError>(Some(engine))
        };
        let (store, engine) = tokio::join!(store, connect);
        let store = store?;
        let background = Background::default();
        // The project network is the first thing a cold start waits for on the Engine: it is
        // made now, beside binding the ports, and the start picks it up.
        let engine = engine?.map(|e| {
            let (made, name, project) = (
                Arc::clone(&e),
                crate::util::network_name(&config.project),
                config.project.clone(),
            );
            let network =
                background.spawn(async move { made.ensure_network(&name, &project).await });
            (e, network)
        });
        let queue = TaskQueue::start(
            store,
            config.tasks.lease,
            config.tasks.concurrency,
            background.clone(),
            Arc::default(),
        )
        .await?;
        let limit = |t: &str| config.tasks.limits.get(t).copied();
        for t in ["ping", "test", "echo"] {
            queue.register(t, Arc::new(handlers::Builtin(t)), limit(t));
        }
        queue.declare(&config.tasks.types)?;
        if let Some(retention) = config.tasks.retention {
            queue.keep_finished_for(retention);
        }
        let serving = grpc::Serving {
            guard: grpc::auth::Guard::new(
                required.token.as_ref().map(|t| t.expose()),
                &required.source,
            ),
            tls: config.tls.clone(),
            background: background.clone(),
            metrics: Arc::clone(queue.instruments()),
        };
        let redactor = Redactor::for_stack(&config, required.token.as_ref().map(|t| t.expose()));
        let opened = Self::open_rest(&config, &queue, own_log, serving, engine, redactor).await;
        match opened {
            Ok(Opened {
                supervisor,
                servers,
                http_addr,
            }) => {
                let ports = crate::owner::Owner {
                    pid: 0,
                    addr: servers[0].addr.to_string(),
                    env_manager_addr: servers[1].addr.to_string(),
                    http_addr: http_addr.to_string(),
                };
                if let Err(e) = owner.record(ports) {
                    tracing::warn!(error = %e, "cannot record this stack's address in its owner lock; a second start of the project will not find it to attach");
                }
                let listed = announce(&config, &required, &servers);
                warn_clear_text(&config, &servers, http_addr);
                let watchdog = match (&supervisor, launcher) {
                    (Some(s), Some(launcher)) => Watchdog::spawn(
                        &launcher,
                        &config.project,
                        s.session(),
                        config.backend,
                        config.docker_host.as_deref(),
                    )
                    .map_err(|e| {
                        tracing::warn!(error = %e, "no watchdog: should this process be killed, its containers stay until the next start removes them");
                    })
                    .ok(),
                    _ => None,
                };
                if let Some(s) = &supervisor {
                    s.follow_engine();
                }
                Ok(Infra {
                    background,
                    orchestrator_addr: servers[0].addr,
                    http_addr,
                    env_manager_addr: servers[1].addr,
                    config,
                    supervisor,
                    queue,
                    servers: Mutex::new(servers),
                    watchdog,
                    access: required,
                    listed: Mutex::new(listed),
                    _owner: owner,
                })
            }
            Err((e, servers)) => {
                background.cancel();
                for s in servers {
                    s.shutdown().await;
                }
                background.stop().await;
                Err(e)
            }
        }
    }

    /// Serves both ports and prepares the supervisor; on failure hands back what it started.
    async fn open_rest(
        config: &Arc<Config>,
        queue: &TaskQueue,
        own_log: Option<PathBuf>,
        serving: grpc::Serving,
        engine: Option<(SharedEngine, NetworkUnderway)>,
        redactor: Redactor,
    ) -> Result<Opened, (InfraError, Vec<grpc::Server>)> {
        let background = &serving.background.clone();
        let guard = serving.guard.clone();
        let mut servers = Vec::new();
        let env_manager_addr = Arc::new(std::sync::OnceLock::new());
        let workers = grpc::workers::Workers::new(queue.clone());
        match grpc::serve_orchestrator(
            &config.orchestrator_addr,
            queue.clone(),
            config.project.clone(),
            Arc::clone(&env_manager_addr),
            Arc::clone(&workers),
            serving.clone(),
        )
        .await
        {
            Ok(s) => servers.push(s),
            Err(e) => return Err((e.into(), servers)),
        }
        let owner_addr = servers[0].addr.to_string();
        let (supervisor, engine) = match engine {
            Some((engine, network)) => (
                Some(Self::prepare_supervisor(
                    config, queue, owner_addr, background, &engine, network, redactor,
                )),
                Some(engine),
            ),
            None => (None, None),
        };
        let manager = EnvManager::new(
            Arc::clone(config),
            supervisor.clone(),
            engine.clone(),
            own_log,
            background.clone(),
        );
        match grpc::serve_env_manager(&config.env_manager_addr, manager, serving).await {
            Ok(s) => {
                let _ = env_manager_addr.set(s.addr.to_string());
                servers.push(s);
            }
            Err(e) => return Err((e.into(), servers)),
        }
        let sources = http::Sources {
            queue: queue.clone(),
            supervisor: supervisor.clone(),
            engine,
            guard,
            workers,
            project: config.project.clone(),
        };
        match http::serve(&config.http_addr, sources, config.tls.as_ref(), background).await {
            Ok(http_addr) => Ok(Opened {
                supervisor,
                servers,
                http_addr,
            }),
            Err(e) => Err((e.into(), servers)),
        }
    }

    /// Makes the supervisor and registers the handlers that use the Engine.
    fn prepare_supervisor(
        config: &Arc<Config>,
        queue: &TaskQueue,
        owner_addr: String,
        background: &Background,
        engine: &SharedEngine,
        network: NetworkUnderway,
        redactor: Redactor,
    ) -> Arc<Supervisor> {
        let supervisor = Arc::new(Supervisor::new(
            Arc::clone(engine),
            Arc::clone(config),
            new_session_id(),
            owner_addr,
            background.clone(),
            redactor,
        ));
        supervisor.network_underway(network);
        supervisor.record_probes(Arc::clone(queue.instruments()));
        let directory: Arc<dyn ServiceDirectory> = Arc::new(Directory(Arc::clone(&supervisor)));
        let limit = |t: &str| config.tasks.limits.get(t).copied();
        let exec = handlers::Exec {
            engine: Arc::clone(engine),
            directory: Arc::clone(&directory),
        };
        queue.register("exec", Arc::new(exec), limit("exec"));
        let container = handlers::Container {
            engine: Arc::clone(engine),
            project: config.project.clone(),
        };
        queue.register("container", Arc::new(container), limit("container"));
        let http = handlers::Http {
            directory,
            timeout: Duration::from_secs(300),
        };
        queue.register("http", Arc::new(http), limit("http"));
        supervisor
    }

    /// Brings the named services (all when empty) and their dependencies up.
    pub async fn start_services(
        &self,
        names: &[String],
        cancel: CancellationToken,
    ) -> Result<(), InfraError> {
        match &self.supervisor {
            Some(s) => Ok(s.start_services(names, cancel).await?),
            None if names.is_empty() => Ok(()),
            None => Err(no_such_service(&names[0])),
        }
    }

    pub fn supervisor(&self) -> Option<&Arc<Supervisor>> {
        self.supervisor.as_ref()
    }

    /// Where the env-manager gRPC service listens (the real port when 0 was asked for).
    pub fn env_manager_addr(&self) -> SocketAddr {
        self.env_manager_addr
    }

    pub fn queue(&self) -> &TaskQueue {
        &self.queue
    }

    /// Where the orchestrator gRPC service listens (the real port when 0 was asked for).
    /// Where `/metrics` and `/healthz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn orchestrator_addr(&self) -> SocketAddr {
        self.orchestrator_addr
    }

    /// Serves `task_type` with `handler`, with the configured concurrency limit.
    pub fn register_handler(&self, task_type: &str, handler: Arc<dyn Handler>) {
        let limit = self.config.tasks.limits.get(task_type).copied();
        self.queue.register(task_type, handler, limit);
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn services(&self) -> Vec<ServiceState> {
        self.supervisor
            .as_ref()
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// Services with their state checked against the Engine now.
    pub async fn status(&self) -> Result<Vec<ServiceState>, InfraError> {
        match &self.supervisor {
            Some(s) => Ok(s.refresh().await?),
            None => Ok(Vec::new()),
        }
    }

    pub async fn logs(&self, service: &str, tail: usize) -> Result<String, InfraError> {
        match &self.supervisor {
            Some(s) => Ok(s.logs(service, tail).await?),
            None => Err(no_such_service(service)),
        }
    }

    pub async fn restart(&self, service: &str) -> Result<ServiceState, InfraError> {
        let s = self
            .supervisor
            .as_ref()
            .ok_or_else(|| no_such_service(service))?;
        s.restart(service).await?;
        s.snapshot()
            .into_iter()
            .find(|st| st.name == service)
            .ok_or_else(|| no_such_service(service))
    }

    /// Addresses of the running services as environment variables (see [`service_env`]).
    pub fn env(&self) -> BTreeMap<String, String> {
        service_env(
            &self.orchestrator_addr.to_string(),
            &self.env_manager_addr.to_string(),
            &self.services(),
        )
    }

    /// Stops the task queue and the orchestrator port, then stops and removes the stack's
    /// containers (named volumes stay) unless `keep_running`.
    pub async fn shutdown(&self, keep_running: bool) {
        // Following, healing, dispatching, handler runs and open streams end first, so nothing
        // reacts to the stop that follows.
        self.background.cancel();
        crate::util::lock(&self.listed).clear();
        let servers = std::mem::take(&mut *crate::util::lock(&self.servers));
        for server in servers {
            server.shutdown().await;
        }
        if let Some(s) = &self.supervisor {
            if keep_running {
                tracing::info!(project = %self.config.project, "leaving the stack running");
            } else {
                s.stop_services(&[], None).await;
            }
        }
        self.background.stop().await;
        crate::tasks::spans::flush().await;
        if let Some(w) = &self.watchdog {
            w.release();
        }
    }

    /// The token both ports require, when they require one.
    pub fn token(&self) -> Option<&Secret> {
        self.access.token.as_ref()
    }

    /// How many of the stack's background tasks still run: none once `shutdown` returns.
    pub fn background_tasks(&self) -> usize {
        self.background.running()
    }
}

/// What `open_rest` started.
struct Opened {
    supervisor: Option<Arc<Supervisor>>,
    servers: Vec<grpc::Server>,
    http_addr: SocketAddr,
}

/// Lists both ports for this user's clients when they require the state folder's token, and
/// says how callers find it: the token itself once, when this start made it.
fn announce(
    config: &Config,
    required: &access::Required,
    servers: &[grpc::Server],
) -> Vec<access::Listed> {
    let Some(token) = &required.token else {
        tracing::warn!(orchestrator = %servers[0].addr, env_manager = %servers[1].addr, "both gRPC ports are open to anyone who can reach them (allow_remote_without_token)");
        return Vec::new();
    };
    if required.made {
        tracing::info!(
            token = token.expose(),
            file = %access::token_path(&config.state_dir).display(),
            "made the token both gRPC ports require (shown this once; `dspy-agent token` prints it again)"
        );
    }
    if config.token.is_some() {
        return Vec::new();
    }
    let mut listed = Vec::new();
    for server in servers {
        match access::list_port(server.addr, &config.state_dir) {
            Ok(l) => listed.push(l),
            Err(e) => {
                tracing::warn!(port = %server.addr, error = %e, "cannot list the port for this user's clients: give them the token (`dspy-agent token`)")
            }
        }
    }
    listed
}

/// Warns, once a start, about every port that other machines can reach and that speaks plain
/// text: the token (and all else) crosses the network readable by anyone on the way.
fn warn_clear_text(config: &Config, servers: &[grpc::Server], http_addr: SocketAddr) {
    if config.tls.is_some() {
        return;
    }
    let ports = servers
        .iter()
        .map(|s| s.addr)
        .chain([http_addr])
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.to_string())
        .collect::<Vec<_>>();
    if !ports.is_empty() {
        tracing::warn!(
            ports = %ports.join(", "),
            "these ports can be reached from other machines and speak plain text, so the token crosses the network in clear; set [tls] (cert and key) in dspy-agent.toml, or bind them to 127.0.0.1"
        );
    }
}

fn no_such_service(name: &str) -> InfraError {
    InfraError::Stack(StackError::UnknownService {
        name: name.to_string(),
        known: "none".to_string(),
    })
}

fn new_session_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// The addresses an agent needs, as environment variables: both gRPC ports and, for each
/// service `NAME` with a published port, `NAME_HOST`, `NAME_PORT` and `NAME_URL` (for example
/// `REDIS_URL=redis://127.0.0.1:6379`).
pub fn service_env(
    orchestrator_addr: &str,
    env_manager_addr: &str,
    services: &[ServiceState],
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        (
            "ORCHESTRATOR_GRPC_ADDR".to_string(),
            orchestrator_addr.to_string(),
        ),
        (
            "ENV_MANAGER_GRPC_ADDR".to_string(),
            env_manager_addr.to_string(),
        ),
    ]);
    for s in services {
        let Some((_, (_, port))) = s.ports.iter().next() else {
            continue;
        };
        let key: String = s
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.insert(format!("{key}_HOST"), s.host());
        env.insert(format!("{key}_PORT"), port.to_string());
        if let Some(url) = s.url() {
            env.insert(format!("{key}_URL"), url);
        }
    }
    env
}
