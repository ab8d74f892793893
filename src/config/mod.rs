//! Configuration: built-in defaults, then `dspy-agent.toml`, then environment variables, then the
//! caller's arguments. Every layer has the same shape (`ConfigLayer`) except the environment,
//! and the result is one validated `Config`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod catalog;
pub mod compose;
mod error;
pub mod graph;
pub mod host_access;
pub mod show;
pub mod spec;
mod unknown_keys;

pub use error::ConfigError;
use spec::{Condition, HealthCheck, MountKind, Probe, Resources, RunOptions, ServiceSpec};

pub const CONFIG_FILE_NAME: &str = "dspy-agent.toml";
pub const DEFAULT_PROJECT: &str = "dspy-agent";
pub const DEFAULT_ORCHESTRATOR_ADDR: &str = "127.0.0.1:50052";
pub const DEFAULT_ENV_MANAGER_ADDR: &str = "127.0.0.1:50051";
/// Where `/metrics`, `/healthz` and the dashboard are served (Prometheus' port for exporters).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";
/// Where ports are published when a mapping names no address.
pub const DEFAULT_PUBLISH_HOST_IP: &str = "127.0.0.1";

/// A number or a string, for values users write either way (`cpus = 2`, `cpus = "1.5"`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

/// `depends_on = ["redis"]` (each must be healthy) or `depends_on = { redis = "started" }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum DependsOn {
    List(Vec<String>),
    Map(BTreeMap<String, Condition>),
}

impl DependsOn {
    fn into_map(self) -> BTreeMap<String, Condition> {
        match self {
            DependsOn::List(names) => names.into_iter().map(|n| (n, Condition::Healthy)).collect(),
            DependsOn::Map(map) => map,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthPatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub command: Option<Vec<String>>,
    pub interval: Option<Scalar>,
    pub timeout: Option<Scalar>,
    pub retries: Option<u32>,
    pub start_period: Option<Scalar>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourcesPatch {
    pub cpus: Option<Scalar>,
    pub memory: Option<Scalar>,
    pub memory_reservation: Option<Scalar>,
    pub gpus: Option<Scalar>,
}

/// One layer's view of a service; absent fields leave the lower layer's value in place.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePatch {
    pub enabled: Option<bool>,
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    /// Names of `env` entries whose values are secret: never shown or logged.
    pub secret_env: Option<Vec<String>>,
    /// Let this service mount the Docker Engine's socket (which gives it control of the host).
    pub allow_docker_socket: Option<bool>,
    /// Let this service have capabilities that amount to privilege (`SYS_ADMIN`, `ALL`, ...).
    pub allow_privileged: Option<bool>,
    pub ports: Option<Vec<Scalar>>,
    pub volumes: Option<Vec<String>>,
    pub depends_on: Option<DependsOn>,
    pub healthcheck: Option<HealthPatch>,
    pub resources: Option<ResourcesPatch>,
    pub restart: Option<String>,
    pub pull: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub stop_timeout: Option<Scalar>,
    pub scheme: Option<String>,
    /// Replaces the image's entry point.
    pub entrypoint: Option<Vec<String>>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub read_only: Option<bool>,
    pub tmpfs: Option<Vec<String>>,
    pub cap_add: Option<Vec<String>>,
    pub cap_drop: Option<Vec<String>>,
    pub no_new_privileges: Option<bool>,
    pub init: Option<bool>,
    /// How the service runs as a Swarm service (the swarm backend only).
    pub swarm: Option<SwarmPatch>,
}

/// `[services.NAME.swarm]`: replicas, placement and rollout of a Swarm service.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwarmPatch {
    pub replicas: Option<u32>,
    /// Placement constraints, as `docker service create --constraint` takes them.
    pub constraints: Option<Vec<String>>,
    /// Spread replicas evenly over the values of these node attributes ("node.labels.zone").
    pub spread: Option<Vec<String>>,
    pub max_per_node: Option<u32>,
    /// "vip" (Swarm's default) or "dnsrr".
    pub endpoint_mode: Option<String>,
    /// "ingress" (Swarm's default: the routing mesh) or "host" (each replica on its node).
    pub publish_mode: Option<String>,
    pub update: Option<UpdatePatch>,
}

/// `[services.NAME.swarm.update]`: how a restart or a changed config rolls over the replicas.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdatePatch {
    pub parallelism: Option<u32>,
    pub delay: Option<Scalar>,
    /// "stop-first" (Swarm's default) or "start-first".
    pub order: Option<String>,
    /// "pause" (Swarm's default), "continue" or "rollback".
    pub failure_action: Option<String>,
    pub monitor: Option<Scalar>,
}

fn merge<T>(lower: &mut Option<T>, upper: Option<T>) {
    if upper.is_some() {
        *lower = upper;
    }
}

fn merge_map(
    lower: &mut Option<BTreeMap<String, String>>,
    upper: Option<BTreeMap<String, String>>,
) {
    if let Some(upper) = upper {
        lower.get_or_insert_with(BTreeMap::new).extend(upper);
    }
}

impl ServicePatch {
    fn apply(&mut self, upper: ServicePatch) {
        merge(&mut self.enabled, upper.enabled);
        merge(&mut self.image, upper.image);
        merge(&mut self.command, upper.command);
        merge_map(&mut self.env, upper.env);
        merge(&mut self.allow_docker_socket, upper.allow_docker_socket);
        merge(&mut self.allow_privileged, upper.allow_privileged);
        if let Some(names) = upper.secret_env {
            let lower = self.secret_env.get_or_insert_with(Vec::new);
            lower.extend(names);
            lower.sort();
            lower.dedup();
        }
        merge(&mut self.ports, upper.ports);
        merge(&mut self.volumes, upper.volumes);
        merge(&mut self.depends_on, upper.depends_on);
        if let Some(h) = upper.healthcheck {
            let lower = self.healthcheck.get_or_insert_with(HealthPatch::default);
            if h.kind.is_some() && h.kind != lower.kind {
                // A new probe type does not inherit the old probe's target.
                *lower = HealthPatch {
                    interval: lower.interval.take(),
                    timeout: lower.timeout.take(),
                    retries: lower.retries,
                    start_period: lower.start_period.take(),
                    ..HealthPatch::default()
                };
            }
            merge(&mut lower.kind, h.kind);
            merge(&mut lower.port, h.port);
            merge(&mut lower.path, h.path);
            merge(&mut lower.status, h.status);
            merge(&mut lower.command, h.command);
            merge(&mut lower.interval, h.interval);
            merge(&mut lower.timeout, h.timeout);
            merge(&mut lower.retries, h.retries);
            merge(&mut lower.start_period, h.start_period);
        }
        if let Some(r) = upper.resources {
            let lower = self.resources.get_or_insert_with(ResourcesPatch::default);
            merge(&mut lower.cpus, r.cpus);
            merge(&mut lower.memory, r.memory);
            merge(&mut lower.memory_reservation, r.memory_reservation);
            merge(&mut lower.gpus, r.gpus);
        }
        merge(&mut self.restart, upper.restart);
        merge(&mut self.pull, upper.pull);
        merge_map(&mut self.labels, upper.labels);
        merge(&mut self.stop_timeout, upper.stop_timeout);
        merge(&mut self.scheme, upper.scheme);
        merge(&mut self.entrypoint, upper.entrypoint);
        merge(&mut self.user, upper.user);
        merge(&mut self.working_dir, upper.working_dir);
        merge(&mut self.read_only, upper.read_only);
        merge(&mut self.tmpfs, upper.tmpfs);
        merge(&mut self.cap_add, upper.cap_add);
        merge(&mut self.cap_drop, upper.cap_drop);
        merge(&mut self.no_new_privileges, upper.no_new_privileges);
        merge(&mut self.init, upper.init);
        if let Some(w) = upper.swarm {
            let lower = self.swarm.get_or_insert_with(SwarmPatch::default);
            merge(&mut lower.replicas, w.replicas);
            merge(&mut lower.constraints, w.constraints);
            merge(&mut lower.spread, w.spread);
            merge(&mut lower.max_per_node, w.max_per_node);
            merge(&mut lower.endpoint_mode, w.endpoint_mode);
            merge(&mut lower.publish_mode, w.publish_mode);
            merge(&mut lower.update, w.update);
        }
    }
}

/// The `[tasks]` table: where the queue keeps tasks and how many run at once.
/// `[tls]`: serve both gRPC ports over TLS (PEM files, relative to the config file).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsPatch {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// What clients (the command line, attached agents) trust; default: `cert`.
    pub ca: Option<PathBuf>,
    /// The name clients expect in the certificate; default "localhost".
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TasksPatch {
    /// SQLite file (relative to the state folder), ":memory:" for a throwaway queue, or a
    /// `postgresql://` URL for a queue several orchestrators share.
    pub store: Option<String>,
    /// How long a task stays held by an orchestrator of a shared store that stopped renewing it.
    pub lease: Option<Scalar>,
    /// Tasks of one type running at once, unless `limits` says otherwise.
    pub concurrency: Option<usize>,
    pub limits: Option<BTreeMap<String, usize>>,
    /// "process" (default): committed tasks survive the process being killed; "power": every
    /// commit is also fsynced, so they survive a power cut.
    pub durability: Option<String>,
    /// Declared task types: accepted at submit before anything serves them.
    pub types: Option<BTreeMap<String, TaskTypePatch>>,
    /// How long finished tasks are kept: a duration, or "forever".
    pub retention: Option<Scalar>,
}

/// `[tasks.types.NAME]`: a task type this stack accepts whether or not a handler or worker
/// serves it yet, with defaults for its tasks.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskTypePatch {
    /// Tasks of this type running at once.
    pub concurrency: Option<usize>,
    /// A task's timeout when its submit gives none: a duration ("10m") or seconds.
    pub timeout: Option<Scalar>,
    /// A task's retries when its submit gives none (0).
    pub max_retries: Option<u32>,
}

/// The shape of `dspy-agent.toml` and of the `config=` mapping given to `AgentInfra.start()`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub project: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub docker_host: Option<String>,
    /// "docker" (default: containers on one Engine) or "swarm" (Swarm services on the cluster
    /// whose manager `docker_host` is).
    pub backend: Option<String>,
    pub orchestrator_addr: Option<String>,
    pub env_manager_addr: Option<String>,
    /// The HTTP port of `/metrics`, `/healthz` and the dashboard.
    pub http_addr: Option<String>,
    pub keep_running: Option<bool>,
    /// Host address ports are published on when a mapping names none.
    pub publish_host_ip: Option<String>,
    /// Required on every gRPC call (but health checks) when set; by default a token made at the
    /// first start and kept in the state folder is.
    pub token: Option<String>,
    /// Serve both gRPC ports without a token, to anyone who can reach them, knowingly.
    pub allow_remote_without_token: Option<bool>,
    pub tasks: Option<TasksPatch>,
    pub tls: Option<TlsPatch>,
    /// Start from the built-in services (the default); `false` runs only the services this
    /// layer names, as a file made by `dspy-agent import` does.
    pub catalog: Option<bool>,
    #[serde(default)]
    pub services: BTreeMap<String, ServicePatch>,
}

impl ConfigLayer {
    fn apply(&mut self, upper: ConfigLayer) {
        merge(&mut self.project, upper.project);
        merge(&mut self.state_dir, upper.state_dir);
        merge(&mut self.docker_host, upper.docker_host);
        merge(&mut self.backend, upper.backend);
        merge(&mut self.orchestrator_addr, upper.orchestrator_addr);
        merge(&mut self.http_addr, upper.http_addr);
        merge(&mut self.env_manager_addr, upper.env_manager_addr);
        merge(&mut self.keep_running, upper.keep_running);
        merge(&mut self.publish_host_ip, upper.publish_host_ip);
        merge(&mut self.token, upper.token);
        if let Some(t) = upper.tls {
            let lower = self.tls.get_or_insert_with(TlsPatch::default);
            merge(&mut lower.cert, t.cert);
            merge(&mut lower.key, t.key);
            merge(&mut lower.ca, t.ca);
            merge(&mut lower.server_name, t.server_name);
        }
        merge(
            &mut self.allow_remote_without_token,
            upper.allow_remote_without_token,
        );
        if let Some(t) = upper.tasks {
            let lower = self.tasks.get_or_insert_with(TasksPatch::default);
            merge(&mut lower.store, t.store);
            merge(&mut lower.concurrency, t.concurrency);
            merge(&mut lower.durability, t.durability);
            merge(&mut lower.retention, t.retention);
            merge(&mut lower.lease, t.lease);
            if let Some(limits) = t.limits {
                lower
                    .limits
                    .get_or_insert_with(BTreeMap::new)
                    .extend(limits);
            }
            for (name, upper) in t.types.unwrap_or_default() {
                let types = lower.types.get_or_insert_with(BTreeMap::new);
                let lower = types.entry(name).or_default();
                merge(&mut lower.concurrency, upper.concurrency);
                merge(&mut lower.timeout, upper.timeout);
                merge(&mut lower.max_retries, upper.max_retries);
            }
        }
        for (name, patch) in upper.services {
            self.services.entry(name).or_default().apply(patch);
        }
    }

    pub fn from_toml(path_for_errors: &str, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path_for_errors.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    pub fn from_json(value: serde_json::Value) -> Result<Self, ConfigError> {
        serde_json::from_value(value).map_err(|e| ConfigError::Parse {
            path: "the config argument".to_string(),
            message: e.to_string(),
        })
    }
}

/// What the caller asks for, above the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Explicit config file; otherwise `DSPY_AGENT_CONFIG`, then `./dspy-agent.toml`.
    pub config_file: Option<PathBuf>,
    /// The caller's own layer (for Python, the `config=` mapping).
    pub overlay: Option<ConfigLayer>,
    /// Services to run (their dependencies come along); `None` = every enabled service.
    pub services: Option<Vec<String>>,
    pub project: Option<String>,
    pub docker_host: Option<String>,
    pub backend: Option<String>,
    pub keep_running: Option<bool>,
    pub state_dir: Option<PathBuf>,
    /// Working directory for finding the config file and resolving relative paths.
    pub cwd: PathBuf,
    /// Environment snapshot; taken from the process by `LoadOptions::from_process`.
    pub env: BTreeMap<String, String>,
}

impl LoadOptions {
    pub fn from_process() -> Self {
        LoadOptions {
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            env: std::env::vars().collect(),
            ..LoadOptions::default()
        }
    }
}

/// What runs the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// A container per service on one Docker Engine (or Podman's Docker API).
    #[default]
    Docker,
    /// A Swarm service per service, on the swarm whose manager is the Engine.
    Swarm,
}

impl Backend {
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Docker => "docker",
            Backend::Swarm => "swarm",
        }
    }

    fn parse(text: Option<&str>) -> Result<Backend, ConfigError> {
        match text.map(str::trim) {
            None | Some("docker") => Ok(Backend::Docker),
            Some("swarm") => Ok(Backend::Swarm),
            Some(other) => Err(ConfigError::invalid(
                "backend",
                format!("{other:?} is not a backend; write \"docker\" or \"swarm\" (also DSPY_AGENT_BACKEND)"),
            )),
        }
    }
}

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Committed work survives the process being killed (SIGKILL, a crash); a power cut may
    /// lose the last moments. Commits cost no fsync.
    #[default]
    Process,
    /// Every commit is fsynced: committed work also survives a power cut.
    Power,
}

/// Where the tasks are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A private in-memory SQLite database: the queue ends with the process.
    Memory,
    /// A SQLite file, private to the process that opens it.
    File(PathBuf),
    /// A PostgreSQL database that several orchestrators may share (`postgresql://...`).
    Postgres(String),
}

impl std::fmt::Display for StoreLocation {
    /// The location as messages show it: a PostgreSQL URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Memory => f.write_str(":memory:"),
            StoreLocation::File(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(url) => match url.parse::<tokio_postgres::Config>() {
                Ok(c) => {
                    let host = match c.get_hosts().first() {
                        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                        None => "localhost".into(),
                    };
                    write!(
                        f,
                        "postgresql://{}@{host}:{}/{}",
                        c.get_user().unwrap_or(""),
                        c.get_ports().first().copied().unwrap_or(5432),
                        c.get_dbname().unwrap_or("")
                    )
                }
                Err(_) => f.write_str("postgresql://(unparsable)"),
            },
        }
    }
}

/// Where tasks are kept and how many run at once.
#[derive(Debug, Clone, PartialEq)]
pub struct TasksConfig {
    pub store: StoreLocation,
    /// How long an orchestrator's tasks on a shared store stay held once it stops renewing them.
    pub lease: Duration,
    pub concurrency: usize,
    pub limits: BTreeMap<String, usize>,
    pub durability: Durability,
    /// Declared task types and their defaults.
    pub types: BTreeMap<String, TaskType>,
    /// Finished tasks older than this are deleted; `None` keeps them forever.
    pub retention: Option<Duration>,
}

/// Defaults for the tasks of a declared type, applied where a submit leaves them out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskType {
    pub timeout: Option<Duration>,
    /// Applied when a submit asks for 0 retries.
    pub max_retries: Option<u32>,
}

/// The validated configuration the core runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub project: String,
    pub state_dir: PathBuf,
    /// `None` = the Engine's usual default (`DOCKER_HOST`, then the local socket).
    pub docker_host: Option<String>,
    pub backend: Backend,
    pub orchestrator_addr: String,
    pub env_manager_addr: String,
    pub http_addr: String,
    /// The configured token every gRPC call must carry (health checks aside); never logged or
    /// shown. Without one, `access::required` makes or reads the state folder's.
    pub token: Option<Secret>,
    /// Serve both ports without any token (`allow_remote_without_token`).
    pub allow_without_token: bool,
    /// Both gRPC ports speak TLS with this identity.
    pub tls: Option<Tls>,
    pub keep_running: bool,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    pub tasks: TasksConfig,
    /// The services to run, dependencies included, in a valid start order.
    pub services: Vec<ServiceSpec>,
}

/// The merged layers and what they were read from, before validation.
struct Layered {
    layer: ConfigLayer,
    selection: Option<Vec<String>>,
    file: Option<PathBuf>,
    base_dir: PathBuf,
}

impl Config {
    pub fn load(options: LoadOptions) -> Result<Config, ConfigError> {
        let l = layered(&options)?;
        resolve(l.layer, l.selection, l.file, &l.base_dir, &options.env)
    }

    /// The config file in use: the explicit one, `DSPY_AGENT_CONFIG`, or `./dspy-agent.toml`
    /// when it exists.
    pub fn file_for(options: &LoadOptions) -> Option<PathBuf> {
        match &options.config_file {
            Some(path) => Some(options.cwd.join(path)),
            None => match options
                .env
                .get("DSPY_AGENT_CONFIG")
                .filter(|v| !v.is_empty())
            {
                Some(path) => Some(options.cwd.join(path)),
                None => Some(options.cwd.join(CONFIG_FILE_NAME)).filter(|p| p.is_file()),
            },
        }
    }

    /// Every problem of the configuration, not only the first: each service (enabled or not),
    /// the addresses, the task settings and the dependency graph are checked on their own.
    /// A file's unknown keys are each one problem: the rest of the file is checked without
    /// them.
    pub fn problems(options: &LoadOptions) -> Vec<ConfigError> {
        let file = Config::file_for(options);
        let text = match &file {
            Some(path) => match read_config_file(path) {
                Ok(text) => Some((path.display().to_string(), text)),
                Err(e) => return vec![e],
            },
            None => None,
        };
        let (mut found, cleaned) = match &text {
            Some((path, text)) => {
                let (unknown, cleaned) = unknown_keys::without_unknown_keys(path, text);
                (unknown, Some(cleaned))
            }
            None => (Vec::new(), None),
        };
        match layered_from(options, file, cleaned.as_deref()) {
            Ok(l) => found.extend(problems_of(l, &options.env)),
            Err(e) => found.push(e),
        }
        found
    }

    /// Every problem of `layer` taken alone, as the only layer (the built-in services
    /// included unless it says `catalog = false`), with relative paths against `base_dir`.
    pub fn problems_of_layer(layer: ConfigLayer, base_dir: &Path) -> Vec<ConfigError> {
        let mut base = if layer.catalog == Some(false) {
            ConfigLayer::default()
        } else {
            catalog::layer()
        };
        base.apply(layer);
        let l = Layered {
            layer: base,
            selection: None,
            file: None,
            base_dir: base_dir.to_path_buf(),
        };
        problems_of(l, &BTreeMap::new())
    }
}

fn problems_of(l: Layered, env: &BTreeMap<String, String>) -> Vec<ConfigError> {
    let layer = l.layer;
    let mut found = Vec::new();
    let project = layer
        .project
        .clone()
        .unwrap_or_else(|| DEFAULT_PROJECT.to_string());
    if let Err(e) = spec::validate_name("project", &project) {
        found.push(e);
    }
    for (field, addr, default) in [
        (
            "orchestrator_addr",
            &layer.orchestrator_addr,
            DEFAULT_ORCHESTRATOR_ADDR,
        ),
        (
            "env_manager_addr",
            &layer.env_manager_addr,
            DEFAULT_ENV_MANAGER_ADDR,
        ),
        ("http_addr", &layer.http_addr, DEFAULT_HTTP_ADDR),
    ] {
        if let Err(e) = check_addr(field, addr.as_deref().unwrap_or(default)) {
            found.push(e);
        }
    }
    let backend = match check_backend(&layer) {
        Ok(b) => b,
        Err(e) => {
            found.push(e);
            Backend::Docker
        }
    };
    let publish_host_ip = layer
        .publish_host_ip
        .clone()
        .unwrap_or_else(|| DEFAULT_PUBLISH_HOST_IP.to_string());
    if publish_host_ip.parse::<std::net::IpAddr>().is_err() {
        found.push(ConfigError::invalid(
            "publish_host_ip",
            format!("{publish_host_ip:?} is not an IP address"),
        ));
    }
    let state_dir = layer
        .state_dir
        .clone()
        .map(|p| l.base_dir.join(p))
        .unwrap_or_else(|| default_state_dir(env, &project));
    if let Err(e) = resolve_tasks(layer.tasks.clone().unwrap_or_default(), &state_dir) {
        found.push(e);
    }
    let known: Vec<&String> = layer.services.keys().collect();
    let known_list = known
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    for (name, patch) in &layer.services {
        let own_socket = host_access::own_socket(layer.docker_host.as_deref());
        match resolve_service(
            name,
            patch.clone(),
            &publish_host_ip,
            &l.base_dir,
            backend,
            own_socket.as_deref(),
        ) {
            Ok(spec) => {
                for dep in spec.depends_on.keys() {
                    if !layer.services.contains_key(dep) {
                        found.push(ConfigError::UnknownDependency {
                            service: name.clone(),
                            dependency: dep.clone(),
                            known: known_list.clone(),
                        });
                    }
                }
            }
            Err(e) => found.push(e),
        }
    }
    for name in l.selection.iter().flatten() {
        if !layer.services.contains_key(name) {
            found.push(ConfigError::UnknownService {
                name: name.clone(),
                known: known_list.clone(),
            });
        }
    }
    // The graph (cycles, shared host ports) can only be checked once every part is valid.
    if found.is_empty() {
        if let Err(e) = resolve(layer, l.selection, l.file, &l.base_dir, env) {
            found.push(e);
        }
    }
    found
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn layered(options: &LoadOptions) -> Result<Layered, ConfigError> {
    layered_from(options, Config::file_for(options), None)
}

/// The layers of `options` with the config `file`, read from disk unless its `text` is given.
fn layered_from(
    options: &LoadOptions,
    file: Option<PathBuf>,
    text: Option<&str>,
) -> Result<Layered, ConfigError> {
    let file_layer = match &file {
        Some(path) => {
            let read;
            let text = match text {
                Some(t) => t,
                None => {
                    read = read_config_file(path)?;
                    &read
                }
            };
            Some(ConfigLayer::from_toml(&path.display().to_string(), text)?)
        }
        None => None,
    };
    let layers = layers_of(options, file_layer);
    let mut layer = ConfigLayer::default();
    for (_, upper) in layers {
        layer.apply(upper);
    }

    let selection = options.services.clone().or_else(|| {
        options.env.get("DSPY_AGENT_SERVICES").map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
    });

    let base_dir = file
        .as_ref()
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| options.cwd.clone());
    Ok(Layered {
        layer,
        selection,
        file,
        base_dir,
    })
}

/// Where a layer of the configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Catalog,
    File,
    Environment,
    /// The caller's own: `AgentInfra.start(config=..., project=...)`, or the command line's
    /// `--project`.
    Arguments,
}

/// The layers of `options`, lowest first: the catalog (unless a layer says `catalog = false`),
/// the file, the environment, the caller's arguments.
fn layers_of(options: &LoadOptions, file_layer: Option<ConfigLayer>) -> Vec<(Source, ConfigLayer)> {
    let use_catalog = [options.overlay.as_ref(), file_layer.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|l| l.catalog)
        .unwrap_or(true);
    let mut layers = Vec::new();
    if use_catalog {
        layers.push((Source::Catalog, catalog::layer()));
    }
    if let Some(file_layer) = file_layer {
        layers.push((Source::File, file_layer));
    }
    layers.push((Source::Environment, env_layer(&options.env)));
    let mut arguments = options.overlay.clone().unwrap_or_default();
    arguments.apply(ConfigLayer {
        project: options.project.clone(),
        docker_host: options.docker_host.clone(),
        backend: options.backend.clone(),
        keep_running: options.keep_running,
        state_dir: options.state_dir.clone(),
        ..ConfigLayer::default()
    });
    layers.push((Source::Arguments, arguments));
    layers
}

fn env_layer(env: &BTreeMap<String, String>) -> ConfigLayer {
    let get = |key: &str| env.get(key).filter(|v| !v.is_empty()).cloned();
    ConfigLayer {
        project: get("DSPY_AGENT_PROJECT"),
        state_dir: get("DSPY_AGENT_STATE_DIR").map(PathBuf::from),
        docker_host: get("ENV_MANAGER_DOCKER_HOST").or_else(|| get("DOCKER_HOST")),
        backend: get("DSPY_AGENT_BACKEND"),
        orchestrator_addr: get("ORCHESTRATOR_GRPC_ADDR"),
        http_addr: get("DSPY_AGENT_HTTP_ADDR"),
        env_manager_addr: get("ENV_MANAGER_GRPC_ADDR"),
        token: get("DSPY_AGENT_TOKEN"),
        tasks: get("DSPY_AGENT_TASK_STORE").map(|store| TasksPatch {
            store: Some(store),
            ..TasksPatch::default()
        }),
        ..ConfigLayer::default()
    }
}

fn default_state_dir(env: &BTreeMap<String, String>, project: &str) -> PathBuf {
    user_state_base(env).join(project)
}

/// This user's folder of dspy-agent state: `$XDG_STATE_HOME/dspy-agent`, else
/// `~/.local/state/dspy-agent`, else a folder of this user's id in the temporary folder.
pub fn user_state_base(env: &BTreeMap<String, String>) -> PathBuf {
    let base = env
        .get("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env.get("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(h).join(".local/state"))
        });
    match base {
        Some(base) => base.join("dspy-agent"),
        // SAFETY: geteuid has no preconditions and cannot fail.
        None => std::env::temp_dir().join(format!("dspy-agent-{}", unsafe { libc::geteuid() })),
    }
}

/// The TLS identity of the gRPC ports, read from its PEM files.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Secret,
    pub ca_pem: Vec<u8>,
    pub server_name: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn resolve_tls(patch: Option<TlsPatch>, base_dir: &Path) -> Result<Option<Tls>, ConfigError> {
    let Some(p) = patch else { return Ok(None) };
    let read = |field: &str, path: Option<&PathBuf>| -> Result<Vec<u8>, ConfigError> {
        let path = path.ok_or_else(|| {
            ConfigError::invalid(format!("tls.{field}"), "is required with [tls]: a PEM file")
        })?;
        let path = base_dir.join(path);
        let data = std::fs::read(&path).map_err(|e| {
            ConfigError::invalid(
                format!("tls.{field}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        if !data.windows(10).any(|w| w == b"-----BEGIN") {
            return Err(ConfigError::invalid(
                format!("tls.{field}"),
                format!("{} is not a PEM file", path.display()),
            ));
        }
        Ok(data)
    };
    let cert_pem = read("cert", p.cert.as_ref())?;
    let key_pem = read("key", p.key.as_ref())?;
    let ca_pem = match &p.ca {
        Some(_) => read("ca", p.ca.as_ref())?,
        None => cert_pem.clone(),
    };
    Ok(Some(Tls {
        cert_pem,
        key_pem: Secret(String::from_utf8_lossy(&key_pem).into_owned()),
        ca_pem,
        server_name: p.server_name.unwrap_or_else(|| "localhost".into()),
    }))
}

/// A value that must never appear in logs, status output or error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Shortest token accepted: a guessable one protects nothing.
const MIN_TOKEN_CHARS: usize = 16;

/// Whether `addr` ("HOST:PORT") can only be reached from this machine.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why `token` cannot be one, if it cannot.
pub fn check_token_text(token: &str) -> Result<(), String> {
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        return Err(format!("is {chars} characters long; use at least {MIN_TOKEN_CHARS}, for example the output of `openssl rand -hex 24`"));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces (it travels as a header)".into());
    }
    Ok(())
}

/// ":PORT" (Go's way of writing every interface) as "0.0.0.0:PORT"; other forms as they are.
fn every_interface(addr: String) -> String {
    if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr
    }
}

fn check_addr(field: &str, addr: &str) -> Result<(), ConfigError> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| {
        ConfigError::invalid(
            field,
            format!("{addr:?} is not HOST:PORT, for example \"127.0.0.1:50052\""),
        )
    })?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ConfigError::invalid(
            field,
            format!("{addr:?} is not HOST:PORT, for example \"127.0.0.1:50052\""),
        ));
    }
    Ok(())
}

fn resolve(
    layer: ConfigLayer,
    selection: Option<Vec<String>>,
    config_file: Option<PathBuf>,
    base_dir: &Path,
    env: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let backend = check_backend(&layer)?;
    let project = layer.project.unwrap_or_else(|| DEFAULT_PROJECT.to_string());
    spec::validate_name("project", &project)?;
    let orchestrator_addr = every_interface(
        layer
            .orchestrator_addr
            .unwrap_or_else(|| DEFAULT_ORCHESTRATOR_ADDR.to_string()),
    );
    check_addr("orchestrator_addr", &orchestrator_addr)?;
    let env_manager_addr = every_interface(
        layer
            .env_manager_addr
            .unwrap_or_else(|| DEFAULT_ENV_MANAGER_ADDR.to_string()),
    );
    check_addr("env_manager_addr", &env_manager_addr)?;
    let http_addr = every_interface(
        layer
            .http_addr
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.to_string()),
    );
    check_addr("http_addr", &http_addr)?;
    if let Some(t) = &layer.token {
        check_token_text(t).map_err(|m| ConfigError::invalid("token", m))?;
    }
    let token = layer.token.clone().map(Secret);
    let publish_host_ip = layer
        .publish_host_ip
        .unwrap_or_else(|| DEFAULT_PUBLISH_HOST_IP.to_string());
    if publish_host_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(ConfigError::invalid(
            "publish_host_ip",
            format!("{publish_host_ip:?} is not an IP address"),
        ));
    }

    let known: BTreeSet<&String> = layer.services.keys().collect();
    let known_list = || {
        known
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let wanted: BTreeSet<String> = match &selection {
        Some(names) => {
            for name in names {
                if !known.contains(name) {
                    return Err(ConfigError::UnknownService {
                        name: name.clone(),
                        known: known_list(),
                    });
                }
            }
            names.iter().cloned().collect()
        }
        None => layer
            .services
            .iter()
            .filter(|(_, p)| p.enabled.unwrap_or(true))
            .map(|(n, _)| n.clone())
            .collect(),
    };

    // Dependencies of a wanted service come along, as with `docker compose up SERVICE`.
    let own_socket = host_access::own_socket(layer.docker_host.as_deref());
    let mut specs: BTreeMap<String, ServiceSpec> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.into_iter().collect();
    while let Some(name) = queue.pop() {
        if specs.contains_key(&name) {
            continue;
        }
        let patch = layer.services.get(&name).cloned().unwrap_or_default();
        let spec = resolve_service(
            &name,
            patch,
            &publish_host_ip,
            base_dir,
            backend,
            own_socket.as_deref(),
        )?;
        for dep in spec.depends_on.keys() {
            if !known.contains(dep) {
                return Err(ConfigError::UnknownDependency {
                    service: name.clone(),
                    dependency: dep.clone(),
                    known: known_list(),
                });
            }
            queue.push(dep.clone());
        }
        specs.insert(name, spec);
    }

    let services = graph::validate(specs.into_values().collect())?;
    let state_dir = layer
        .state_dir
        .map(|p| base_dir.join(p))
        .unwrap_or_else(|| default_state_dir(env, &project));
    let tasks = resolve_tasks(layer.tasks.unwrap_or_default(), &state_dir)?;
    Ok(Config {
        project,
        state_dir,
        docker_host: layer.docker_host,
        backend,
        orchestrator_addr,
        env_manager_addr,
        http_addr,
        token,
        allow_without_token: layer.allow_remote_without_token.unwrap_or(false),
        tls: resolve_tls(layer.tls, base_dir)?,
        keep_running: layer.keep_running.unwrap_or(false),
        config_file,
        tasks,
        services,
    })
}

/// The backend, and the settings that only the other backend knows refused by name.
fn check_backend(layer: &ConfigLayer) -> Result<Backend, ConfigError> {
    let backend = Backend::parse(layer.backend.as_deref())?;
    if backend == Backend::Swarm && layer.publish_host_ip.is_some() {
        return Err(ConfigError::invalid(
            "publish_host_ip",
            "has no effect on the swarm backend: Swarm publishes ports on every address of its nodes; remove it, and keep services that must stay private unpublished (their dependents reach them over the stack's overlay network)",
        ));
    }
    Ok(backend)
}

fn resolve_tasks(t: TasksPatch, state_dir: &Path) -> Result<TasksConfig, ConfigError> {
    let store = match t.store.as_deref().map(str::trim) {
        Some(":memory:") => StoreLocation::Memory,
        Some("") => {
            return Err(ConfigError::invalid(
                "tasks.store",
                "must be a file path, \":memory:\" or a postgresql:// URL",
            ))
        }
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            match url.parse::<tokio_postgres::Config>() {
                Ok(c) if !c.get_hosts().is_empty() => StoreLocation::Postgres(url.to_string()),
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        "tasks.store",
                        "the PostgreSQL URL names no host; write postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
                    ))
                }
                Err(e) => {
                    return Err(ConfigError::invalid(
                        "tasks.store",
                        format!("is not a PostgreSQL URL ({e}); write postgresql://USER:PASSWORD@HOST:PORT/DATABASE"),
                    ))
                }
            }
        }
        Some(path) => StoreLocation::File(state_dir.join(path)),
        None => StoreLocation::File(state_dir.join("tasks.db")),
    };
    let lease = match t.lease {
        None => Duration::from_secs(30),
        Some(l) => {
            let lease = spec::parse_duration("tasks.lease", &l.text())?;
            if lease < Duration::from_millis(300) {
                return Err(ConfigError::invalid(
                    "tasks.lease",
                    "must be at least 300ms: an orchestrator renews its leases every third of it",
                ));
            }
            lease
        }
    };
    let concurrency = t.concurrency.unwrap_or(64);
    if concurrency == 0 || concurrency > 100_000 {
        return Err(ConfigError::invalid(
            "tasks.concurrency",
            format!("{concurrency} must be from 1 to 100000"),
        ));
    }
    let mut limits = t.limits.unwrap_or_default();
    let mut types = BTreeMap::new();
    for (name, declared) in t.types.unwrap_or_default() {
        let field = |key: &str| format!("tasks.types.{name}.{key}");
        if name.trim().is_empty() {
            return Err(ConfigError::invalid("tasks.types", "a type name is empty"));
        }
        if let Some(n) = declared.concurrency {
            if n == 0 || n > 100_000 {
                return Err(ConfigError::invalid(
                    field("concurrency"),
                    format!("{n} must be from 1 to 100000"),
                ));
            }
            match limits.get(&name) {
                Some(limit) if *limit != n => {
                    return Err(ConfigError::invalid(
                        field("concurrency"),
                        format!("{n} differs from tasks.limits.{name} = {limit}; keep one of them"),
                    ))
                }
                _ => {
                    limits.insert(name.clone(), n);
                }
            }
        }
        let timeout = match declared.timeout {
            None => None,
            Some(t) => {
                let timeout = spec::parse_duration(&field("timeout"), &t.text())?;
                if timeout.is_zero() {
                    return Err(ConfigError::invalid(field("timeout"), "must be above 0"));
                }
                Some(timeout)
            }
        };
        types.insert(
            name,
            TaskType {
                timeout,
                max_retries: declared.max_retries,
            },
        );
    }
    for (task_type, n) in &limits {
        if *n == 0 || *n > 100_000 {
            return Err(ConfigError::invalid(
                format!("tasks.limits.{task_type}"),
                format!("{n} must be from 1 to 100000"),
            ));
        }
    }
    let durability = match t.durability.as_deref() {
        None | Some("process") => Durability::Process,
        Some("power") => Durability::Power,
        Some(other) => {
            return Err(ConfigError::invalid(
                "tasks.durability",
                format!("{other:?} is not a durability; write \"process\" or \"power\""),
            ))
        }
    };
    let retention = match t.retention {
        None => Some(Duration::from_secs(7 * 24 * 3600)),
        Some(Scalar::Str(s)) if s.trim() == "forever" => None,
        Some(r) => {
            let retention = spec::parse_duration("tasks.retention", &r.text())?;
            if retention.is_zero() {
                return Err(ConfigError::invalid(
                    "tasks.retention",
                    "must be above 0; write \"forever\" to keep every finished task",
                ));
            }
            Some(retention)
        }
    };
    Ok(TasksConfig {
        store,
        lease,
        concurrency,
        limits,
        durability,
        types,
        retention,
    })
}

/// `own_socket` is the Unix socket of the engine this stack talks to, which no service may
/// mount unless it says so.
fn resolve_service(
    name: &str,
    patch: ServicePatch,
    publish_host_ip: &str,
    base_dir: &Path,
    backend: Backend,
    own_socket: Option<&Path>,
) -> Result<ServiceSpec, ConfigError> {
    let field = |f: &str| format!("services.{name}.{f}");
    spec::validate_name(&format!("services.{name}"), name)?;
    let run = resolve_run(name, &patch)?;
    let swarm = match (backend, &patch.swarm) {
        (Backend::Docker, Some(_)) => {
            return Err(ConfigError::invalid(
                field("swarm"),
                "is a Swarm setting and the backend is \"docker\"; set backend = \"swarm\" (or DSPY_AGENT_BACKEND=swarm), or remove it",
            ))
        }
        (Backend::Docker, None) => None,
        (Backend::Swarm, s) => Some(resolve_swarm(name, s.clone().unwrap_or_default())?),
    };
    if let Some(o) = &swarm {
        let ports_given = patch.ports.as_ref().is_some_and(|p| !p.is_empty());
        if ports_given
            && o.endpoint_mode == spec::EndpointMode::Dnsrr
            && o.publish_mode == spec::PublishMode::Ingress
        {
            return Err(ConfigError::invalid(
                field("swarm.publish_mode"),
                "Swarm's routing mesh (publish_mode = \"ingress\", its default) needs a virtual IP, and endpoint_mode is \"dnsrr\": write publish_mode = \"host\", or leave endpoint_mode at \"vip\"",
            ));
        }
    }
    if backend == Backend::Swarm {
        if let Some(p) = patch
            .ports
            .iter()
            .flatten()
            .find(|p| p.text().matches(':').count() >= 2)
        {
            return Err(ConfigError::invalid(
                field("ports"),
                format!("{:?} names a host address, which Swarm cannot bind: it publishes on every address of its nodes; write \"HOST:CONTAINER\"", p.text()),
            ));
        }
    }
    let image = patch
        .image
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| {
            ConfigError::invalid(
                field("image"),
                "a service needs an image, for example image = \"redis:7-alpine\"",
            )
        })?;
    if image.chars().any(char::is_whitespace) {
        return Err(ConfigError::invalid(
            field("image"),
            format!("{image:?} is not an image reference"),
        ));
    }

    let ports = patch
        .ports
        .unwrap_or_default()
        .iter()
        .map(|p| spec::parse_port(&field("ports"), &p.text(), publish_host_ip))
        .collect::<Result<Vec<_>, _>>()?;
    let volumes = patch
        .volumes
        .unwrap_or_default()
        .iter()
        .map(|v| spec::parse_mount(&field("volumes"), v, base_dir))
        .collect::<Result<Vec<_>, _>>()?;
    if !patch.allow_docker_socket.unwrap_or(false) {
        for m in volumes.iter().filter(|m| m.kind == MountKind::Bind) {
            if let Some(socket) = host_access::exposed_by(Path::new(&m.source), own_socket) {
                return Err(ConfigError::invalid(
                    field("volumes"),
                    format!("{:?} exposes a container engine's socket ({}), which gives the container control of this machine; mount a folder without it, or set allow_docker_socket = true for this service if that is meant", m.source, socket.display()),
                ));
            }
        }
    }
    if !patch.allow_privileged.unwrap_or(false) {
        if let Some(cap) = host_access::privileged_capability(&run.cap_add) {
            return Err(ConfigError::invalid(
                field("cap_add"),
                format!("{cap:?} lets the container leave its confinement and control this machine; add only the capabilities it needs (\"NET_BIND_SERVICE\", ...), or set allow_privileged = true for this service if that is meant"),
            ));
        }
    }
    let depends_on = patch
        .depends_on
        .map(DependsOn::into_map)
        .unwrap_or_default();
    if depends_on.contains_key(name) {
        return Err(ConfigError::Cycle {
            cycle: vec![name.to_string(), name.to_string()],
        });
    }
    let env = patch.env.unwrap_or_default();
    let secret_env: BTreeSet<String> = patch.secret_env.unwrap_or_default().into_iter().collect();
    if let Some(missing) = secret_env.iter().find(|k| !env.contains_key(*k)) {
        return Err(ConfigError::invalid(
            field("secret_env"),
            format!("{missing:?} is not in env; name variables that env sets"),
        ));
    }
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(ConfigError::invalid(
                field("env"),
                format!("{key:?} is not a variable name"),
            ));
        }
    }

    let healthcheck = resolve_health(name, patch.healthcheck.unwrap_or_default(), &ports)?;

    let r = patch.resources.unwrap_or_default();
    let resources = Resources {
        nano_cpus: r
            .cpus
            .map(|c| spec::parse_cpus(&field("resources.cpus"), &c.text()))
            .transpose()?,
        memory_bytes: r
            .memory
            .map(|m| spec::parse_memory(&field("resources.memory"), &m.text()))
            .transpose()?,
        memory_reservation_bytes: r
            .memory_reservation
            .map(|m| spec::parse_memory(&field("resources.memory_reservation"), &m.text()))
            .transpose()?,
        gpus: r
            .gpus
            .map(|g| spec::parse_gpus(&field("resources.gpus"), &g.text()))
            .transpose()?
            .unwrap_or_default(),
    };
    let restart = spec::parse_restart(&field("restart"), patch.restart.as_deref().unwrap_or("no"))?;
    let pull = spec::parse_pull(&field("pull"), patch.pull.as_deref().unwrap_or("missing"))?;
    let stop_timeout = patch
        .stop_timeout
        .map(|t| spec::parse_duration(&field("stop_timeout"), &t.text()))
        .transpose()?
        .unwrap_or(Duration::from_secs(10));
    let scheme = patch.scheme.unwrap_or_else(|| match healthcheck.probe {
        Probe::Http { .. } => "http".to_string(),
        Probe::Redis { .. } => "redis".to_string(),
        _ => "tcp".to_string(),
    });

    Ok(ServiceSpec {
        name: name.to_string(),
        image,
        command: patch.command,
        env,
        secret_env,
        ports,
        volumes,
        depends_on,
        healthcheck,
        resources,
        restart,
        pull,
        labels: patch.labels.unwrap_or_default(),
        stop_timeout,
        scheme,
        run,
        swarm,
    })
}

fn resolve_swarm(name: &str, p: SwarmPatch) -> Result<spec::SwarmOptions, ConfigError> {
    let field = |f: &str| format!("services.{name}.swarm.{f}");
    let replicas = p.replicas.unwrap_or(1);
    if replicas == 0 || replicas > 1000 {
        return Err(ConfigError::invalid(
            field("replicas"),
            format!("{replicas} must be from 1 to 1000 (stop a service to run none)"),
        ));
    }
    let constraints = p.constraints.unwrap_or_default();
    for c in &constraints {
        let (key, value) = c
            .split_once("==")
            .or_else(|| c.split_once("!="))
            .unwrap_or(("", ""));
        if key.trim().is_empty() || value.trim().is_empty() {
            return Err(ConfigError::invalid(
                field("constraints"),
                format!("{c:?} is not a constraint; write \"ATTRIBUTE == VALUE\" or \"ATTRIBUTE != VALUE\", for example \"node.labels.gpu == true\""),
            ));
        }
    }
    let spread = p.spread.unwrap_or_default();
    if let Some(bad) = spread.iter().find(|s| !s.starts_with("node.")) {
        return Err(ConfigError::invalid(
            field("spread"),
            format!("{bad:?} is not a node attribute; write for example \"node.labels.zone\""),
        ));
    }
    let endpoint_mode = match p.endpoint_mode.as_deref() {
        None | Some("vip") => spec::EndpointMode::Vip,
        Some("dnsrr") => spec::EndpointMode::Dnsrr,
        Some(other) => {
            return Err(ConfigError::invalid(
                field("endpoint_mode"),
                format!("{other:?} is not an endpoint mode; write \"vip\" or \"dnsrr\""),
            ))
        }
    };
    let publish_mode = match p.publish_mode.as_deref() {
        None | Some("ingress") => spec::PublishMode::Ingress,
        Some("host") => spec::PublishMode::Host,
        Some(other) => {
            return Err(ConfigError::invalid(
                field("publish_mode"),
                format!("{other:?} is not a publish mode; write \"ingress\" or \"host\""),
            ))
        }
    };
    let u = p.update.unwrap_or_default();
    let duration = |key: &str, v: Option<Scalar>| {
        v.map(|t| spec::parse_duration(&field(&format!("update.{key}")), &t.text()))
            .transpose()
    };
    let order = match u.order.as_deref() {
        None | Some("stop-first") => spec::UpdateOrder::StopFirst,
        Some("start-first") => spec::UpdateOrder::StartFirst,
        Some(other) => {
            return Err(ConfigError::invalid(
                field("update.order"),
                format!("{other:?} is not an order; write \"stop-first\" or \"start-first\""),
            ))
        }
    };
    let failure_action = match u.failure_action.as_deref() {
        None | Some("pause") => spec::FailureAction::Pause,
        Some("continue") => spec::FailureAction::Continue,
        Some("rollback") => spec::FailureAction::Rollback,
        Some(other) => {
            return Err(ConfigError::invalid(
                field("update.failure_action"),
                format!(
                "{other:?} is not a failure action; write \"pause\", \"continue\" or \"rollback\""
            ),
            ))
        }
    };
    Ok(spec::SwarmOptions {
        replicas,
        constraints,
        spread,
        max_per_node: p.max_per_node,
        endpoint_mode,
        publish_mode,
        update: spec::UpdateOptions {
            parallelism: u.parallelism.unwrap_or(1),
            delay: duration("delay", u.delay)?.unwrap_or_default(),
            order,
            failure_action,
            monitor: duration("monitor", u.monitor)?,
        },
    })
}

fn resolve_run(name: &str, patch: &ServicePatch) -> Result<RunOptions, ConfigError> {
    let field = |f: &str| format!("services.{name}.{f}");
    let caps = |f: &str, list: &Option<Vec<String>>| {
        list.iter()
            .flatten()
            .map(|c| spec::parse_capability(&field(f), c))
            .collect::<Result<Vec<_>, _>>()
    };
    if let Some(user) = &patch.user {
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::invalid(
                field("user"),
                format!("{user:?} is not a user; write a name, a UID or UID:GID"),
            ));
        }
    }
    if let Some(dir) = &patch.working_dir {
        if !dir.starts_with('/') {
            return Err(ConfigError::invalid(
                field("working_dir"),
                format!("{dir:?} must be an absolute container path"),
            ));
        }
    }
    if patch.entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
        return Err(ConfigError::invalid(
            field("entrypoint"),
            "is empty; leave it out to keep the image's entry point",
        ));
    }
    Ok(RunOptions {
        entrypoint: patch.entrypoint.clone(),
        user: patch.user.clone(),
        working_dir: patch.working_dir.clone(),
        read_only: patch.read_only.unwrap_or(false),
        tmpfs: patch
            .tmpfs
            .iter()
            .flatten()
            .map(|t| spec::parse_tmpfs(&field("tmpfs"), t))
            .collect::<Result<_, _>>()?,
        cap_add: caps("cap_add", &patch.cap_add)?,
        cap_drop: caps("cap_drop", &patch.cap_drop)?,
        no_new_privileges: patch.no_new_privileges.unwrap_or(false),
        init: patch.init.unwrap_or(false),
    })
}

fn resolve_health(
    name: &str,
    h: HealthPatch,
    ports: &[spec::PortSpec],
) -> Result<HealthCheck, ConfigError> {
    let field = |f: &str| format!("services.{name}.healthcheck.{f}");
    let first_tcp = ports
        .iter()
        .find(|p| p.protocol == spec::Protocol::Tcp)
        .map(|p| p.container_port);
    let kind = h
        .kind
        .clone()
        .unwrap_or_else(|| if first_tcp.is_some() { "tcp" } else { "none" }.to_string());
    let probe_port = || -> Result<u16, ConfigError> {
        let port = h.port.or(first_tcp).ok_or_else(|| {
            ConfigError::invalid(
                field("type"),
                format!("a {kind} probe needs a published TCP port; add one to ports, or use type = \"exec\""),
            )
        })?;
        if !ports
            .iter()
            .any(|p| p.container_port == port && p.protocol == spec::Protocol::Tcp)
        {
            return Err(ConfigError::invalid(
                field("port"),
                format!("{port} is not one of the service's published TCP container ports"),
            ));
        }
        Ok(port)
    };
    let probe = match kind.as_str() {
        "tcp" => Probe::Tcp {
            port: probe_port()?,
        },
        "http" => {
            let path = h.path.clone().unwrap_or_else(|| "/health".to_string());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::invalid(
                    field("path"),
                    format!("{path:?} must be a URL path starting with '/'"),
                ));
            }
            let status = h.status.unwrap_or(200);
            if !(100..=599).contains(&status) {
                return Err(ConfigError::invalid(
                    field("status"),
                    format!("{status} is not an HTTP status"),
                ));
            }
            Probe::Http {
                port: probe_port()?,
                path,
                status,
            }
        }
        "redis" => Probe::Redis {
            port: probe_port()?,
        },
        "exec" => {
            let command = h.command.clone().filter(|c| !c.is_empty()).ok_or_else(|| {
                ConfigError::invalid(
                    field("command"),
                    "an exec probe needs a command, for example [\"redis-cli\", \"ping\"]",
                )
            })?;
            Probe::Exec { command }
        }
        "docker" => Probe::Docker,
        "none" => Probe::None,
        other => {
            return Err(ConfigError::invalid(
                field("type"),
                format!(
                    "{other:?} is not a probe type; use tcp, http, redis, exec, docker or none"
                ),
            ))
        }
    };
    let duration =
        |f: &str, v: &Option<Scalar>, default: Duration| -> Result<Duration, ConfigError> {
            v.as_ref()
                .map(|s| spec::parse_duration(&field(f), &s.text()))
                .transpose()
                .map(|d| d.unwrap_or(default))
        };
    let interval = duration("interval", &h.interval, Duration::from_millis(250))?;
    if interval < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            field("interval"),
            "must be at least 10ms",
        ));
    }
    let timeout = duration("timeout", &h.timeout, Duration::from_secs(2))?;
    if timeout.is_zero() {
        return Err(ConfigError::invalid(
            field("timeout"),
            "must be more than 0",
        ));
    }
    Ok(HealthCheck {
        probe,
        interval,
        timeout,
        retries: h.retries.unwrap_or(3),
        start_period: duration("start_period", &h.start_period, Duration::from_secs(60))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(toml: Option<&str>) -> (tempfile::TempDir, LoadOptions) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = toml {
            std::fs::write(dir.path().join(CONFIG_FILE_NAME), text).unwrap();
        }
        let opts = LoadOptions {
            cwd: dir.path().to_path_buf(),
            ..LoadOptions::default()
        };
        (dir, opts)
    }

    #[test]
    fn defaults_run_the_catalogs_enabled_services() {
        let (_d, opts) = options(None);
        let cfg = Config::load(opts).unwrap();
        let names: Vec<_> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["redis", "infermesh", "reddb"]);
        assert_eq!(cfg.project, "dspy-agent");
        assert_eq!(cfg.orchestrator_addr, "127.0.0.1:50052");
    }

    #[test]
    fn a_port_alone_means_every_interface_and_a_short_token_is_refused() {
        let (_d, mut opts) = options(None);
        opts.env
            .insert("ORCHESTRATOR_GRPC_ADDR".into(), ":50052".into());
        let cfg = Config::load(opts.clone()).unwrap();
        assert_eq!(cfg.orchestrator_addr, "0.0.0.0:50052");
        assert!(cfg.token.is_none() && !cfg.allow_without_token);
        opts.env.insert("DSPY_AGENT_TOKEN".into(), "short".into());
        let err = Config::load(opts).unwrap_err().to_string();
        assert!(
            err.contains("token") && err.contains("at least 16"),
            "{err}"
        );
    }

    #[test]
    fn process_settings_are_checked_and_the_catalog_can_be_left_out() {
        let (_d, opts) = options(Some(
            "catalog = false\n[services.web]\nimage = \"x\"\nuser = \"1000:1000\"\nworking_dir = \"/app\"\ntmpfs = [\"/run:size=8m\"]\ncap_drop = [\"all\"]\ncap_add = [\"CAP_NET_ADMIN\"]\n",
        ));
        let cfg = Config::load(opts).unwrap();
        assert_eq!(cfg.services.len(), 1);
        let run = &cfg.services[0].run;
        assert_eq!(run.user.as_deref(), Some("1000:1000"));
        assert_eq!(run.tmpfs["/run"], "size=8m");
        assert_eq!(
            (run.cap_drop.as_slice(), run.cap_add.as_slice()),
            (&["ALL".to_string()][..], &["NET_ADMIN".to_string()][..])
        );
        for (bad, field) in [
            ("working_dir = \"app\"", "services.web.working_dir"),
            ("tmpfs = [\"run\"]", "services.web.tmpfs"),
            ("cap_add = [\"net admin\"]", "services.web.cap_add"),
            ("user = \"a b\"", "services.web.user"),
            ("entrypoint = []", "services.web.entrypoint"),
        ] {
            let (_d, opts) = options(Some(&format!("[services.web]\nimage = \"x\"\n{bad}\n")));
            let e = Config::load(opts).unwrap_err().to_string();
            assert!(e.starts_with(field), "{bad}: {e}");
        }
    }

    #[test]
    fn declared_task_types_with_their_defaults() {
        let (_d, opts) = options(Some(
            "[tasks.types.rl_training]\nconcurrency = 2\ntimeout = \"10m\"\nmax_retries = 3\n[tasks.types.eval]\n",
        ));
        let cfg = Config::load(opts).unwrap();
        assert_eq!(
            cfg.tasks.types["rl_training"],
            TaskType {
                timeout: Some(Duration::from_secs(600)),
                max_retries: Some(3),
            }
        );
        assert_eq!(cfg.tasks.types["eval"], TaskType::default());
        assert_eq!(cfg.tasks.limits["rl_training"], 2);
        assert_eq!(
            cfg.tasks.retention,
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        let (_d, opts) = options(Some("[tasks]\nretention = \"forever\"\n"));
        assert_eq!(Config::load(opts).unwrap().tasks.retention, None);
        let (_d, opts) = options(Some("[tasks]\nretention = \"90m\"\n"));
        assert_eq!(
            Config::load(opts).unwrap().tasks.retention,
            Some(Duration::from_secs(5400))
        );

        for (text, field) in [
            (
                "[tasks.types.x]\ntimeout = \"soon\"\n",
                "tasks.types.x.timeout",
            ),
            ("[tasks.types.x]\ntimeout = 0\n", "tasks.types.x.timeout"),
            (
                "[tasks.limits]\nx = 1\n[tasks.types.x]\nconcurrency = 2\n",
                "tasks.types.x.concurrency",
            ),
            (
                "[tasks.types.x]\nconcurrency = 0\n",
                "tasks.types.x.concurrency",
            ),
            ("[tasks]\nretention = 0\n", "tasks.retention"),
            ("[tasks]\nretention = \"a while\"\n", "tasks.retention"),
            ("[tasks]\nlease = \"100ms\"\n", "tasks.lease"),
            (
                "[tasks]\nstore = \"postgresql://u:p@localhost:99999/db\"\n",
                "tasks.store",
            ),
            ("[tasks]\nstore = \"postgresql://\"\n", "tasks.store"),
        ] {
            let (_d, opts) = options(Some(text));
            let err = Config::load(opts).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?}: {err}");
        }
        // A PostgreSQL URL is kept as given; messages show it without the password.
        let (_d, opts) = options(Some(
            "[tasks]\nstore = \"postgresql://agents:s3cret@db:5433/q\"\nlease = \"2s\"\n",
        ));
        let tasks = Config::load(opts).unwrap().tasks;
        assert_eq!(tasks.lease, Duration::from_secs(2));
        assert_eq!(tasks.store.to_string(), "postgresql://agents@db:5433/q");
        let (_d, opts) = options(Some("[tasks.types.x]\nretries = 1\n"));
        assert!(Config::load(opts)
            .unwrap_err()
            .to_string()
            .contains("retries"));
    }

    #[test]
    fn layers_apply_in_order() {
        let (_d, mut opts) = options(Some(
            "project = \"from-file\"\n[services.redis]\nports = [\"16379:6379\"]\nenv = { A = \"1\" }\n",
        ));
        opts.env
            .insert("DSPY_AGENT_PROJECT".into(), "from-env".into());
        opts.env
            .insert("DOCKER_HOST".into(), "unix:///fallback.sock".into());
        opts.env.insert(
            "ENV_MANAGER_DOCKER_HOST".into(),
            "unix:///preferred.sock".into(),
        );
        opts.services = Some(vec!["redis".into()]);
        let cfg = Config::load(opts.clone()).unwrap();
        assert_eq!(cfg.project, "from-env");
        assert_eq!(cfg.docker_host.as_deref(), Some("unix:///preferred.sock"));
        assert_eq!(cfg.services[0].ports[0].host_port, 16379);
        assert_eq!(cfg.services[0].env["A"], "1");
        opts.project = Some("from-args".into());
        assert_eq!(Config::load(opts).unwrap().project, "from-args");
    }

    #[test]
    fn selecting_a_service_brings_its_dependencies() {
        let (_d, mut opts) = options(None);
        opts.services = Some(vec!["reddb".into()]);
        let cfg = Config::load(opts).unwrap();
        let names: Vec<_> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["redis", "reddb"]);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                "[services.redis]\nports = [\"abc\"]\n",
                "services.redis.ports",
            ),
            (
                "[services.redis]\nresources = { memory = \"lots\" }\n",
                "services.redis.resources.memory",
            ),
            (
                "[services.redis]\nresources = { cpus = -1 }\n",
                "services.redis.resources.cpus",
            ),
            ("[services.x]\nenabled = true\n", "services.x.image"),
            (
                "[services.\"bad name\"]\nimage = \"a\"\n",
                "services.bad name",
            ),
            (
                "[services.redis]\nhealthcheck = { type = \"smoke\" }\n",
                "healthcheck.type",
            ),
            (
                "[services.redis]\nrestart = \"sometimes\"\n",
                "services.redis.restart",
            ),
            ("[services.redis]\nbogus = 1\n", "unknown field `bogus`"),
            ("[services.redis\n", "line 1"),
        ];
        for (text, needle) in cases {
            let (_d, opts) = options(Some(text));
            let err = Config::load(opts).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn graph_errors_are_reported() {
        let (_d, opts) = options(Some(
            "[services.ingest]\nimage = \"x\"\ndepends_on = [\"embed\"]\n[services.embed]\nimage = \"x\"\ndepends_on = [\"rank\"]\n[services.rank]\nimage = \"x\"\ndepends_on = [\"ingest\"]\n",
        ));
        let err = Config::load(opts).unwrap_err().to_string();
        // The whole cycle, closed, each service once.
        let path: Vec<&str> = err
            .strip_prefix("dependency cycle: ")
            .unwrap_or_else(|| panic!("{err}"))
            .split(" -> ")
            .collect();
        assert_eq!(path.len(), 4, "{err}");
        assert_eq!(path[0], path[3], "{err}");
        let mut names = path[..3].to_vec();
        names.sort_unstable();
        assert_eq!(names, ["embed", "ingest", "rank"], "{err}");

        let (_d, opts) = options(Some(
            "[services.a]\nimage = \"x\"\ndepends_on = [\"nope\"]\n",
        ));
        let err = Config::load(opts).unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && err.contains("\"a\""), "{err}");

        let (_d, opts) = options(Some("[services.a]\nimage = \"x\"\nports = [\"6379:1\"]\n"));
        let err = Config::load(opts).unwrap_err().to_string();
        assert!(
            err.contains("6379") && err.contains("redis") && err.contains("\"a\""),
            "{err}"
        );

        let (_d, mut opts) = options(None);
        opts.services = Some(vec!["nosuch".into()]);
        assert!(Config::load(opts)
            .unwrap_err()
            .to_string()
            .contains("nosuch"));
    }

    #[test]
    fn the_docker_socket_is_mounted_only_when_allowed() {
        let mount = "[services.a]\nimage = \"x\"\nvolumes = [\"/var/run/docker.sock:/var/run/docker.sock\"]\n";
        let (_d, opts) = options(Some(mount));
        let err = Config::load(opts).unwrap_err().to_string();
        assert!(
            err.starts_with("services.a.volumes:") && err.contains("allow_docker_socket"),
            "{err}"
        );
        // A folder above the socket, or a link to it, exposes it as well.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("engine");
        std::os::unix::fs::symlink("/var/run/docker.sock", &link).unwrap();
        for source in ["/var/run", "/run", "/", link.to_str().unwrap()] {
            let text = format!("[services.a]\nimage = \"x\"\nvolumes = [\"{source}:/host\"]\n");
            let (_d, opts) = options(Some(&text));
            let err = Config::load(opts).unwrap_err().to_string();
            assert!(err.contains("allow_docker_socket"), "{source}: {err}");
        }
        let (_d, opts) = options(Some(
            "[services.a]\nimage = \"x\"\nvolumes = [\"/usr/share:/data:ro\", \"data:/data2\"]\n",
        ));
        Config::load(opts).expect("a folder without a socket is fine");
        let (_d, opts) = options(Some(&format!("{mount}allow_docker_socket = true\n")));
        let config = Config::load(opts).unwrap();
        let a = config.services.iter().find(|s| s.name == "a").unwrap();
        assert_eq!(a.volumes[0].source, "/var/run/docker.sock");
    }

    #[test]
    fn swarm_settings_belong_to_the_swarm_backend_and_are_checked() {
        let swarm = "catalog = false\n[services.web]\nimage = \"x\"\nports = [\"0:80\"]\n[services.web.swarm]\nreplicas = 3\nconstraints = [\"node.labels.gpu == true\"]\nspread = [\"node.labels.zone\"]\nendpoint_mode = \"dnsrr\"\npublish_mode = \"host\"\n[services.web.swarm.update]\norder = \"start-first\"\ndelay = \"2s\"\n";
        let (_d, opts) = options(Some(swarm));
        let err = Config::load(opts.clone()).unwrap_err().to_string();
        assert!(
            err.starts_with("services.web.swarm:") && err.contains("backend = \"swarm\""),
            "{err}"
        );
        let mut on_swarm = opts.clone();
        on_swarm
            .env
            .insert("DSPY_AGENT_BACKEND".into(), "swarm".into());
        let cfg = Config::load(on_swarm.clone()).unwrap();
        assert_eq!(cfg.backend, Backend::Swarm);
        let o = cfg.services[0].swarm.clone().unwrap();
        assert_eq!(o.replicas, 3);
        assert_eq!(o.constraints, ["node.labels.gpu == true"]);
        assert_eq!(o.update.order, spec::UpdateOrder::StartFirst);
        assert_eq!(o.update.delay, Duration::from_secs(2));
        // Each bad value names its key.
        for (bad, key) in [
            ("replicas = 3", "replicas = 0", "swarm.replicas"),
            (
                "\"node.labels.gpu == true\"",
                "\"gpu\"",
                "swarm.constraints",
            ),
            (
                "publish_mode = \"host\"",
                "publish_mode = \"ingress\"",
                "swarm.publish_mode",
            ),
            (
                "order = \"start-first\"",
                "order = \"sideways\"",
                "swarm.update.order",
            ),
            ("\"0:80\"", "\"127.0.0.1:0:80\"", "web.ports"),
        ]
        .map(|(from, to, key)| ((from, to), key))
        {
            let text = swarm.replace(bad.0, bad.1);
            let (_d, mut o) = options(Some(&text));
            o.env.insert("DSPY_AGENT_BACKEND".into(), "swarm".into());
            let err = Config::load(o).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        on_swarm
            .env
            .insert("DSPY_AGENT_BACKEND".into(), "kubernetes".into());
        let err = Config::load(on_swarm).unwrap_err().to_string();
        assert!(err.starts_with("backend:"), "{err}");
        let (_d, mut o) = options(Some("publish_host_ip = \"0.0.0.0\"\n"));
        o.env.insert("DSPY_AGENT_BACKEND".into(), "swarm".into());
        let err = Config::load(o).unwrap_err().to_string();
        assert!(err.starts_with("publish_host_ip:"), "{err}");
    }

    #[test]
    fn missing_explicit_config_file_is_an_error() {
        let (_d, mut opts) = options(None);
        opts.config_file = Some("missing.toml".into());
        assert!(Config::load(opts)
            .unwrap_err()
            .to_string()
            .contains("missing.toml"));
    }
}
