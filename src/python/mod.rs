//! PyO3 bindings: thin wrappers that clone a handle and queue the core's future on the shared
//! runtime; its answer, or its error as an exception of `dspy_agent_infra.errors` (`errors.rs`),
//! reaches the event loop through the bridge (`bridge.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod bridge;
use bridge::CallError;
mod errors;
use errors::{exc, py_error, to_py_err};
mod exit;
mod tasks;
mod types;

use crate::config::{Config, ConfigError, ConfigLayer, LoadOptions};
use crate::infra::{Infra, InfraError};
use crate::services::supervisor::ServiceState;
use crate::stack::{Remote, Stack};

/// One service of a running stack, as Python sees it.
#[pyclass(frozen, get_all, module = "dspy_agent_infra._native")]
#[derive(Clone)]
pub struct ServiceInfo {
    name: String,
    status: String,
    image: String,
    container_id: Option<String>,
    host: String,
    ports: BTreeMap<u16, u16>,
    url: Option<String>,
    reused: bool,
    message: String,
    /// The image is a local stand-in (see `scripts/provision.sh`), not the real service.
    stand_in: bool,
    /// On the swarm backend, each copy with its node; empty otherwise.
    replicas: Vec<ReplicaInfo>,
}

/// One copy of a service on the swarm backend.
#[pyclass(frozen, get_all, module = "dspy_agent_infra._native")]
#[derive(Clone)]
pub struct ReplicaInfo {
    slot: u32,
    node: String,
    node_addr: String,
    state: String,
    /// Published TCP ports of this copy: container port -> port on its node.
    ports: BTreeMap<u16, u16>,
    error: Option<String>,
}

#[pymethods]
impl ReplicaInfo {
    fn __repr__(&self) -> String {
        format!(
            "ReplicaInfo(slot={}, node='{}', state='{}')",
            self.slot, self.node, self.state
        )
    }
}

impl From<ServiceState> for ServiceInfo {
    fn from(s: ServiceState) -> Self {
        ServiceInfo {
            url: s.url(),
            host: s.host(),
            name: s.name,
            status: s.phase.as_str().to_string(),
            image: s.image,
            container_id: s.container_id,
            ports: s.ports.iter().map(|(c, (_, h))| (*c, *h)).collect(),
            reused: s.reused,
            message: s.message,
            stand_in: s.stand_in,
            replicas: s
                .replicas
                .into_iter()
                .map(|r| ReplicaInfo {
                    slot: r.slot,
                    node: r.node,
                    node_addr: r.node_addr,
                    state: r.state,
                    ports: r
                        .ports
                        .iter()
                        .filter(|((_, proto), _)| proto == "tcp")
                        .map(|((c, _), (_, h))| (*c, *h))
                        .collect(),
                    error: r.error,
                })
                .collect(),
        }
    }
}

#[pymethods]
impl ServiceInfo {
    fn __repr__(&self) -> String {
        let quoted = |v: Option<&str>| v.map(|v| format!("'{v}'")).unwrap_or_else(|| "None".into());
        format!(
            "ServiceInfo(name='{}', status='{}', url={}, container_id={})",
            self.name,
            self.status,
            quoted(self.url.as_deref()),
            quoted(
                self.container_id
                    .as_deref()
                    .map(|id| &id[..id.len().min(12)])
            )
        )
    }
}

/// This interpreter and the folder this package is imported from, to start helper processes.
fn launcher(py: Python<'_>) -> Option<crate::watchdog::Launcher> {
    let python: PathBuf = py
        .import("sys")
        .ok()?
        .getattr("executable")
        .ok()?
        .extract()
        .ok()?;
    let file: PathBuf = py
        .import("dspy_agent_infra")
        .ok()?
        .getattr("__file__")
        .ok()?
        .extract()
        .ok()?;
    let package_root = file.parent()?.parent()?.to_path_buf();
    (!python.as_os_str().is_empty()).then_some(crate::watchdog::Launcher {
        python,
        package_root,
    })
}

use crate::util::lock;

/// Python's logging levels are cached on the Rust side; each new `Core` picks up changes made
/// since (users configure logging before they start a stack).
static LOG_RESET: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

struct CoreState {
    project: String,
    keep_running: bool,
    pending: Mutex<Option<Config>>,
    /// The stack once started: this process's own, or one another process runs.
    stack: Mutex<Option<Arc<dyn Stack>>>,
    cancel: CancellationToken,
    started: watch::Sender<bool>,
    /// `FORKS` when this state was made: a child forked since must start its own stack.
    forks: u64,
    token: Option<String>,
    tls_trust: Option<(Vec<u8>, String)>,
    /// How to start this package's watchdog; `None` in an interpreter without an executable.
    launcher: Option<crate::watchdog::Launcher>,
    /// Handler runs and answers to calls on their way to the event loop.
    bridge: Arc<bridge::Bridge>,
}

fn not_running() -> PyErr {
    py_error::<exc::InfraError>(
        "the stack is not running; use it inside `async with AgentInfra.start() as infra:`".into(),
        vec![],
    )
}

impl CoreState {
    fn stack(&self) -> PyResult<Arc<dyn Stack>> {
        self.check_pid()?;
        lock(&self.stack).clone().ok_or_else(not_running)
    }

    fn check_pid(&self) -> PyResult<()> {
        if crate::runtime::forks() != self.forks {
            return Err(PyRuntimeError::new_err(
                "this AgentInfra belongs to the parent process; a forked child must start its own",
            ));
        }
        Ok(())
    }
}

/// The native half of `AgentInfra`: configuration loaded at construction, the stack after
/// `start()`.
#[pyclass(frozen, module = "dspy_agent_infra._native")]
pub struct Core {
    state: Arc<CoreState>,
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (*, services=None, config=None, config_file=None, project=None, docker_host=None, backend=None, keep_running=None, state_dir=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        services: Option<Vec<String>>,
        config: Option<Bound<'_, PyAny>>,
        config_file: Option<PathBuf>,
        project: Option<String>,
        docker_host: Option<String>,
        backend: Option<String>,
        keep_running: Option<bool>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let overlay = match config {
            None => None,
            Some(mapping) => {
                let json: String = py
                    .import("json")?
                    .call_method1("dumps", (mapping,))
                    .map_err(|e| {
                        py_error::<exc::ConfigError>(
                            format!("the config argument must be a JSON-like mapping: {e}"),
                            vec![],
                        )
                    })?
                    .extract()?;
                let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
                    to_py_err(InfraError::Config(ConfigError::invalid(
                        "config",
                        e.to_string(),
                    )))
                })?;
                Some(ConfigLayer::from_json(value).map_err(|e| to_py_err(e.into()))?)
            }
        };
        if let Some(handle) = LOG_RESET.get() {
            handle.reset();
        }
        let mut options = LoadOptions::from_process();
        options.config_file = config_file;
        options.overlay = overlay;
        options.services = services;
        options.project = project;
        options.docker_host = docker_host;
        options.backend = backend;
        options.keep_running = keep_running;
        options.state_dir = state_dir;
        let config = py
            .detach(|| Config::load(options))
            .map_err(|e| to_py_err(e.into()))?;
        let (started, _) = watch::channel(false);
        let launcher = launcher(py);
        let token = config.token.as_ref().map(|t| t.expose().to_string());
        let tls_trust = config
            .tls
            .as_ref()
            .map(|t| (t.ca_pem.clone(), t.server_name.clone()));
        Ok(Core {
            state: Arc::new(CoreState {
                project: config.project.clone(),
                keep_running: config.keep_running,
                pending: Mutex::new(Some(config)),
                stack: Mutex::new(None),
                cancel: CancellationToken::new(),
                started,
                forks: crate::runtime::forks(),
                token,
                tls_trust,
                launcher,
                bridge: bridge::Bridge::new().map_err(|e| {
                    py_error::<exc::InfraError>(
                        format!("cannot create the event loop's wake-up socket: {e}"),
                        vec![],
                    )
                })?,
            }),
        })
    }

    #[getter]
    fn project(&self) -> String {
        self.state.project.clone()
    }

    #[getter]
    fn keep_running(&self) -> bool {
        self.state.keep_running
    }

    /// Names of the services this stack will run, dependencies first.
    #[getter]
    fn planned_services(&self) -> Vec<String> {
        let stack = lock(&self.state.stack).clone();
        match stack {
            Some(stack) => stack.services().into_iter().map(|s| s.name).collect(),
            None => lock(&self.state.pending)
                .as_ref()
                .map(|c| c.services.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default(),
        }
    }

    /// Starts the stack, or attaches to the one of this project another process runs; answers
    /// under the returned token whether it attached.
    fn start_nowait(&self) -> PyResult<u64> {
        self.state.check_pid()?;
        let config = lock(&self.state.pending).take().ok_or_else(|| {
            py_error::<exc::InfraError>(
                "this AgentInfra was already started; call AgentInfra.start() again for a new one"
                    .into(),
                vec![],
            )
        })?;
        let state = Arc::clone(&self.state);
        // Spawned, so that a cancelled `await` does not drop a half-started stack: `abort()`
        // cancels this task and waits for its rollback.
        let task = crate::runtime::get().spawn(async move {
            // A stack of this project already served at the configured address is used as it
            // is, instead of starting a second one.
            let outcome = match Remote::find(&config).await {
                Ok(Some(remote)) => {
                    *lock(&state.stack) = Some(Arc::new(remote));
                    Ok(true)
                }
                Err(e) => Err(CallError::from(e)),
                Ok(None) => {
                    let mut at_owner = config.clone();
                    match Infra::start(config, state.cancel.clone(), state.launcher.clone()).await {
                        Ok(infra) => {
                            *lock(&state.stack) = Some(Arc::new(infra));
                            Ok(false)
                        }
                        Err(e) => {
                            // The project's stack runs in another live process: use it there,
                            // never beside it.
                            let owner_addr = e.in_use().map(|o| o.addr.clone()).unwrap_or_default();
                            at_owner.orchestrator_addr = owner_addr.clone();
                            let found = if owner_addr.is_empty() {
                                Ok(None)
                            } else {
                                Remote::find(&at_owner).await
                            };
                            match found {
                                Ok(Some(remote)) => {
                                    *lock(&state.stack) = Some(Arc::new(remote));
                                    Ok(true)
                                }
                                _ => Err(CallError::from(e)),
                            }
                        }
                    }
                }
            };
            state.started.send_replace(true);
            outcome
        });
        Ok(self.state.bridge.spawn(async move {
            task.await
                .map_err(|e| CallError::Failed(format!("the start task failed: {e}")))?
        }))
    }

    /// Cancels a start in progress and removes what it created; stops a finished one.
    fn abort_nowait(&self) -> u64 {
        let state = Arc::clone(&self.state);
        self.state.bridge.spawn(async move {
            state.cancel.cancel();
            let mut started = state.started.subscribe();
            if lock(&state.pending).is_none() {
                let _ = started.wait_for(|done| *done).await;
            }
            let stack = lock(&state.stack).take();
            if let Some(stack) = stack {
                stack.stop(false).await;
            }
            Ok::<_, CallError>(())
        })
    }

    /// Stops and removes the stack's containers unless `keep_running`.
    fn stop_nowait(&self, keep_running: bool) -> PyResult<u64> {
        self.state.check_pid()?;
        let stack = lock(&self.state.stack).take();
        let task = crate::runtime::get().spawn(async move {
            // An attached stack belongs to whoever started it: this only detaches.
            if let Some(stack) = stack {
                stack.stop(keep_running).await;
            }
        });
        Ok(self.state.bridge.spawn(async move {
            task.await
                .map_err(|e| CallError::Failed(format!("the stop task failed: {e}")))
        }))
    }

    /// "host:port" of the orchestrator gRPC service.
    #[getter]
    fn orchestrator_addr(&self) -> PyResult<String> {
        Ok(self.state.stack()?.orchestrator_addr())
    }

    /// `host:port` of `/metrics` and `/healthz` (None for a stack another process runs).
    #[getter]
    fn http_addr(&self) -> PyResult<Option<String>> {
        Ok(self.state.stack()?.http_addr())
    }

    /// What clients of this stack's ports trust, when they speak TLS: (CA PEM, server name).
    #[getter]
    fn tls_trust(&self) -> Option<(Vec<u8>, String)> {
        self.state.tls_trust.clone()
    }

    /// The token the gRPC ports require (None when they require none).
    #[getter]
    fn token(&self) -> Option<String> {
        match lock(&self.state.stack).as_ref() {
            Some(stack) => stack.token().map(|t| t.expose().to_string()),
            None => self.state.token.clone(),
        }
    }

    /// Whether this stack is one another process runs, attached to at start.
    #[getter]
    fn attached(&self) -> bool {
        lock(&self.state.stack)
            .as_ref()
            .is_some_and(|s| s.attached())
    }

    /// "host:port" of the env-manager gRPC service.
    #[getter]
    fn env_manager_addr(&self) -> PyResult<String> {
        Ok(self.state.stack()?.env_manager_addr())
    }

    /// Serves `task_type` with the Python function the event loop that entered the stack looks up
    /// by task type.
    fn register_handler(&self, task_type: String) -> PyResult<()> {
        let stack = self.state.stack()?;
        crate::tasks::model::validate_task_type(&task_type).map_err(errors::task_error)?;
        // Plain functions too run from the event loop (in its executor's threads): every call
        // into Python then starts from a thread Python owns and waits for at exit.
        let handler: Arc<dyn crate::tasks::handlers::Handler> = Arc::new(bridge::BridgedHandler {
            bridge: Arc::clone(&self.state.bridge),
        });
        stack.register_handler(&task_type, handler);
        Ok(())
    }

    /// The descriptor the event loop watches: readable when `take_messages` has something.
    #[getter]
    fn wake_fd(&self) -> i32 {
        self.state.bridge.wake_fd()
    }

    /// Handler runs to start or cancel and answers to calls, queued since the last take.
    fn take_messages(&self, py: Python<'_>) -> PyResult<bridge::Batch> {
        bridge::take_messages(py, &self.state.bridge)
    }

    /// Queues a task; the answer (a `SubmitResponse`) comes back through the bridge under the
    /// returned token. Invalid input is refused here, at once.
    #[pyo3(signature = (task_id, task_type, payload, metadata, priority, timeout, max_retries))]
    #[allow(clippy::too_many_arguments)]
    fn submit_nowait(
        &self,
        task_id: String,
        task_type: String,
        payload: Vec<u8>,
        metadata: Option<BTreeMap<String, String>>,
        priority: i32,
        timeout: Option<f64>,
        max_retries: u32,
    ) -> PyResult<u64> {
        let stack = self.state.stack()?;
        let task = tasks::new_task(
            task_id,
            task_type,
            payload,
            metadata,
            priority,
            timeout,
            max_retries,
        )?;
        task.validate().map_err(errors::task_error)?;
        Ok(self
            .state
            .bridge
            .spawn(async move { stack.submit(task).await.map(types::SubmitResponse::from) }))
    }

    /// Waits until the task reaches a final state; the answer is its `TaskInfo`, or None after
    /// `timeout` seconds.
    #[pyo3(signature = (task_id, timeout=None))]
    fn wait_nowait(&self, task_id: String, timeout: Option<f64>) -> PyResult<u64> {
        let stack = self.state.stack()?;
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(std::time::Duration::from_secs_f64(t.min(1e9)))
            }
            Some(t) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "timeout {t} must be 0 or more seconds"
                )))
            }
        };
        Ok(self.state.bridge.spawn(async move {
            let done = stack.wait(&task_id, timeout).await?;
            Ok(done.as_ref().map(types::TaskInfo::from))
        }))
    }

    /// A coroutine handler finished run `token` with `value`, or failed with `error`.
    #[pyo3(signature = (token, value, error=None))]
    fn complete(&self, token: u64, value: Bound<'_, PyAny>, error: Option<String>) {
        let result = match error {
            Some(e) => Err(e),
            None => types::encode_result(&value),
        };
        self.state.bridge.complete(token, result);
    }

    /// The task's `TaskInfo`, answered under the returned token.
    fn status_nowait(&self, task_id: String) -> PyResult<u64> {
        let stack = self.state.stack()?;
        Ok(self
            .state
            .bridge
            .spawn(async move { stack.get(&task_id).await.map(|r| types::TaskInfo::from(&r)) }))
    }

    /// Cancels the task; answered under the returned token with `(cancelled, TaskInfo)`.
    fn cancel_nowait(&self, task_id: String) -> PyResult<u64> {
        let stack = self.state.stack()?;
        Ok(self.state.bridge.spawn(async move {
            let (cancelled, record) = stack.cancel(&task_id).await?;
            Ok((cancelled, record.as_ref().map(types::TaskInfo::from)))
        }))
    }

    /// A `TaskWatch` under the returned token; its changes come through this core's bridge.
    fn watch_nowait(&self, task_ids: Vec<String>, include_current: bool) -> PyResult<u64> {
        let stack = self.state.stack()?;
        let bridge = Arc::clone(&self.state.bridge);
        Ok(self.state.bridge.spawn(async move {
            let changes = stack.watch(task_ids, include_current).await?;
            Ok(tasks::TaskWatch::new(changes, bridge))
        }))
    }

    fn services(&self) -> PyResult<Vec<ServiceInfo>> {
        let services = self.state.stack()?.services();
        Ok(services.into_iter().map(ServiceInfo::from).collect())
    }

    fn env(&self) -> PyResult<BTreeMap<String, String>> {
        Ok(self.state.stack()?.env())
    }

    /// The services checked against the Engine now, under the returned token.
    fn status_services_nowait(&self) -> PyResult<u64> {
        let stack = self.state.stack()?;
        Ok(self.state.bridge.spawn(async move {
            let services = stack.status().await?;
            Ok(services
                .into_iter()
                .map(ServiceInfo::from)
                .collect::<Vec<_>>())
        }))
    }

    /// A service's last `tail` log lines, under the returned token.
    fn logs_nowait(&self, service: String, tail: usize) -> PyResult<u64> {
        let stack = self.state.stack()?;
        Ok(self
            .state
            .bridge
            .spawn(async move { stack.logs(&service, tail).await }))
    }

    /// Restarts a service; its `ServiceInfo` once healthy, under the returned token.
    fn restart_nowait(&self, service: String) -> PyResult<u64> {
        let stack = self.state.stack()?;
        Ok(self
            .state
            .bridge
            .spawn(async move { stack.restart(&service).await.map(ServiceInfo::from) }))
    }
}

/// Runs the `dspy-agent` command line with `argv` (program name first) and returns its exit
/// code; `start` runs the daemon with the interpreter `python`, importing this package from
/// `package_root`.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<String>, python: PathBuf, package_root: PathBuf) -> i32 {
    let launcher = crate::watchdog::Launcher {
        python,
        package_root,
    };
    py.detach(|| crate::cli::main(argv, launcher))
}

/// The encoded `FileDescriptorSet` of proto/, from which `dspy_agent_infra.pb` builds its stubs.
#[pyfunction]
fn file_descriptor_set(py: Python<'_>) -> Bound<'_, pyo3::types::PyBytes> {
    pyo3::types::PyBytes::new(py, crate::grpc::pb::FILE_DESCRIPTOR_SET)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records (and `tracing` events, through its `log` feature) go to Python's
    // `logging`, under the `dspy_agent_infra` logger; other crates only from warnings up.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter(log::LevelFilter::Warn)
        .filter_target("dspy_agent_infra".to_string(), log::LevelFilter::Debug);
    let handle = logger.reset_handle();
    if log::set_boxed_logger(Box::new(exit::GatedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
        let _ = LOG_RESET.set(handle);
    }
    let quiesce = wrap_pyfunction!(exit::quiesce, m)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (&quiesce,))?;
    m.add_function(quiesce)?;
    // Counting forks from now on: a forked child must not use its parent's stack.
    crate::runtime::forks();
    m.add_class::<Core>()?;
    m.add_class::<ServiceInfo>()?;
    m.add_class::<ReplicaInfo>()?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add_function(wrap_pyfunction!(file_descriptor_set, m)?)?;
    tasks::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
