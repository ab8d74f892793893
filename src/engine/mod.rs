//! The container engine seam: what the core asks of a container runtime, and the types that
//! cross it. `docker` implements it over the Docker Engine API (Podman's compatible API too);
//! `swarm` runs each service as a Swarm service on a cluster (a "container" of the seam is then
//! a Swarm service, and its copies are `replicas`); `fake` is an in-memory engine for unit
//! tests of supervision.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::config::spec::{PullPolicy, ServiceSpec};
use crate::config::Backend;

mod docker;
#[cfg(test)]
pub mod fake;
mod swarm;

pub use docker::Docker;
pub use swarm::Swarm;

/// The engine of `backend` at `host`; gives up after `timeout` when nothing answers.
pub async fn connect(
    backend: Backend,
    host: Option<&str>,
    timeout: Duration,
) -> Result<SharedEngine, EngineError> {
    Ok(match backend {
        Backend::Docker => std::sync::Arc::new(Docker::connect(host, timeout).await?),
        Backend::Swarm => std::sync::Arc::new(Swarm::connect(host, timeout).await?),
    })
}

pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Labels every container of a stack carries.
pub mod labels {
    pub const PROJECT: &str = "dspy-agent.project";
    pub const SERVICE: &str = "dspy-agent.service";
    pub const CONFIG_HASH: &str = "dspy-agent.config-hash";
    pub const SESSION: &str = "dspy-agent.session";
    pub const OWNER_PID: &str = "dspy-agent.owner-pid";
    /// The owner's orchestrator address, where a second start of the project can attach.
    pub const OWNER_ADDR: &str = "dspy-agent.owner-addr";
    pub const KEEP: &str = "dspy-agent.keep-running";
    /// On an image (and so on its containers): a local stand-in, not the real service.
    pub const STAND_IN: &str = "dspy-agent.stand-in";
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "cannot reach the Docker Engine at {host}: {message}. {}",
        how_to_start(host)
    )]
    Unavailable { host: String, message: String },
    #[error("image {image:?} is not available: {message}")]
    Image { image: String, message: String },
    #[error("{context}: {message}")]
    Api {
        context: String,
        message: String,
        /// What the Engine's HTTP status says, so that callers never decide on the text.
        kind: ApiErrorKind,
    },
}

/// The fix for an engine that does not answer, for the kind of engine `host` names.
fn how_to_start(host: &str) -> String {
    if host.contains("podman") {
        let socket = host.strip_prefix("unix://").unwrap_or(host);
        format!("Start Podman's API there (`podman system service --time=0 unix://{socket}`), or point ENV_MANAGER_DOCKER_HOST / DOCKER_HOST at a running Engine")
    } else {
        "Start Docker (for example `sudo systemctl start docker`), or point ENV_MANAGER_DOCKER_HOST / DOCKER_HOST at a running Engine".into()
    }
}

/// An Engine API error by its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 404: no such container, image, network...
    NotFound,
    /// 409: a name in use, a container in the wrong state.
    Conflict,
    Other,
}

impl EngineError {
    /// The object the call named does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            EngineError::Api {
                kind: ApiErrorKind::NotFound,
                ..
            }
        )
    }
}

/// Lifecycle state of a container as the Engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Restarting,
    Paused,
    Exited,
    Dead,
    Other,
}

impl RunState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Restarting => "restarting",
            RunState::Paused => "paused",
            RunState::Exited => "exited",
            RunState::Dead => "dead",
            RunState::Other => "unknown",
        }
    }

    /// The Engine's name of a state; an unknown name is `Other`.
    pub fn parse(s: &str) -> Self {
        match s {
            "created" => RunState::Created,
            "running" => RunState::Running,
            "restarting" => RunState::Restarting,
            "paused" => RunState::Paused,
            "exited" => RunState::Exited,
            "dead" => RunState::Dead,
            _ => RunState::Other,
        }
    }
}

/// What the core needs to know about one container.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub state: RunState,
    pub exit_code: Option<i64>,
    /// The Engine's HEALTHCHECK status, when the image has one.
    pub engine_health: Option<String>,
    pub started_at: Option<String>,
    /// (container port, protocol) → (host ip, host port) for published ports.
    pub ports: BTreeMap<(u16, String), (String, u16)>,
    pub restart_count: i64,
    /// The copies of a cluster service, each on its node; empty for a plain container.
    pub replicas: Vec<Replica>,
    /// Why it cannot run as asked (no node satisfies its placement, say), when the engine
    /// knows; waiting longer does not help.
    pub problem: Option<String>,
}

/// One copy of a service on a cluster engine: where it runs and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub slot: u32,
    pub task_id: String,
    /// The node's host name, and the address it is reached at.
    pub node: String,
    pub node_addr: String,
    /// The cluster's state of it: `running`, `starting`, `pending`, `failed`...
    pub state: String,
    /// When it started running, in ms since the epoch.
    pub started_at_ms: Option<i64>,
    /// Published ports of this copy: (container port, protocol) → (address, port).
    pub ports: BTreeMap<(u16, String), (String, u16)>,
    /// The cluster's message about it, when it failed or waits.
    pub error: Option<String>,
}

/// Something that happened to a container.
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub id: String,
    /// `start`, `die`, ...
    pub action: String,
    /// Set on `die`.
    pub exit_code: Option<i64>,
}

/// Resource use of a running container.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// Result of a command run inside a container.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Everything the core decides about a container besides the service spec itself.
pub struct ContainerPlan<'a> {
    pub name: &'a str,
    pub network: &'a str,
    pub volume_prefix: &'a str,
    pub spec: &'a ServiceSpec,
    pub labels: BTreeMap<String, String>,
    pub gpus: bool,
}

/// A container runtime. Every call names containers by id (or by name where the Engine accepts
/// either); errors carry their kind, decided from the runtime's status, never from its text.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Where the runtime listens (`unix:///...`, `tcp://...`): pids in labels name processes of
    /// this machine only when it is a local socket.
    fn host(&self) -> &str;

    /// Whether GPUs can be requested (the NVIDIA runtime is installed).
    async fn has_gpu_runtime(&self) -> bool;

    /// Whether published ports listen on this machine, so that a start can check them first.
    fn publishes_here(&self) -> bool {
        true
    }

    /// Makes `image` present according to `policy`; `progress` receives pull status lines.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), EngineError>;

    /// Creates the project's network unless it exists.
    async fn ensure_network(&self, name: &str, project: &str) -> Result<(), EngineError>;

    /// Removes the network; one still in use by other containers is left alone.
    async fn remove_network(&self, name: &str);

    /// Every container (running or not) that carries `label=value`.
    async fn list_by_label(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, EngineError>;

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, EngineError>;

    /// Creates (does not start) a service's container; returns its id. A leftover container
    /// holding the name is replaced.
    async fn create_container(&self, plan: &ContainerPlan<'_>) -> Result<String, EngineError>;

    /// Starts a container; one already running is fine.
    async fn start(&self, id: &str) -> Result<(), EngineError>;

    async fn restart(&self, id: &str, timeout: Duration) -> Result<(), EngineError>;

    /// SIGTERM, then SIGKILL after `timeout` (at once when zero). A container that is not
    /// running, or gone, is fine; a failure is left to the removal that follows.
    async fn stop(&self, id: &str, timeout: Duration);

    /// Removes a container (killing it if it still runs) with its anonymous volumes; named
    /// volumes stay. One already gone is not an error.
    async fn remove_stopped(&self, id: &str) -> Result<(), EngineError>;

    /// Stops within `timeout`, then removes.
    async fn remove(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.stop(id, timeout).await;
        self.remove_stopped(id).await
    }

    /// The last `tail` lines of a container's output, stdout and stderr interleaved.
    async fn logs(&self, id: &str, tail: usize) -> Result<String, EngineError>;

    /// A container's output as it comes, each chunk tagged stderr (`true`) or stdout.
    /// `tail` 0 = everything; `since` in seconds since the epoch, 0 = from the beginning.
    fn log_stream(
        &self,
        id: &str,
        follow: bool,
        tail: usize,
        since: i64,
    ) -> BoxStream<'static, Result<(bool, bytes::Bytes), EngineError>>;

    /// CPU, memory and network use of a running container.
    async fn stats(&self, id: &str) -> Result<Usage, EngineError>;

    /// `start`, `die` and `destroy` events of `project`'s containers as they happen. Ends when
    /// the runtime goes away.
    fn container_events(
        &self,
        project: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, EngineError>>;

    /// The runtime's version, CPU count and memory.
    async fn engine_info(&self) -> Result<EngineInfo, EngineError>;

    /// Runs a one-off container to completion and returns its exit code and output; the
    /// container is removed afterwards, also when the caller stops waiting.
    async fn run_once(
        &self,
        image: &str,
        command: Option<Vec<String>>,
        env: Vec<String>,
        labels: HashMap<String, String>,
    ) -> Result<ExecOutput, EngineError>;

    /// Runs `command` in a running container and collects its output.
    async fn exec(&self, id: &str, command: &[String]) -> Result<ExecOutput, EngineError>;

    /// Where the runtime does not run images' HEALTHCHECKs itself (Podman without systemd),
    /// runs the container's check once and says how it went; `None` where the runtime runs
    /// them (its verdict is then in `ContainerInfo::engine_health`).
    async fn run_image_healthcheck(&self, _id: &str) -> Option<Result<(), String>> {
        None
    }
}

/// How the layers above hold the engine.
pub type SharedEngine = std::sync::Arc<dyn Engine>;
