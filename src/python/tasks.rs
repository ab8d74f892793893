//! Task watches, and the gRPC client behind `OrchestratorClient`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pyo3::prelude::*;

use crate::grpc::auth::Bearer;
use crate::stack::{TaskChanges, TaskClient};
use crate::tasks::model::{NewTask, TaskError, TaskState};

use super::bridge::{Bridge, CallError};
use super::errors::{exc, py_error, task_error};
use super::types::{SubmitResponse, Task, TaskInfo};

/// An open watch on task state changes; `next_nowait()` answers through the bridge with the next
/// change, or None when the queue has stopped.
#[pyclass(module = "dspy_agent_infra._native")]
pub struct TaskWatch {
    changes: Arc<tokio::sync::Mutex<TaskChanges>>,
    bridge: Arc<Bridge>,
}

impl TaskWatch {
    pub fn new(changes: TaskChanges, bridge: Arc<Bridge>) -> TaskWatch {
        TaskWatch {
            changes: Arc::new(tokio::sync::Mutex::new(changes)),
            bridge,
        }
    }
}

#[pymethods]
impl TaskWatch {
    /// The next change (a `TaskInfo`, or None once the source ended) under the returned token.
    fn next_nowait(&self) -> u64 {
        let changes = Arc::clone(&self.changes);
        self.bridge.spawn(async move {
            match changes.lock().await.next().await {
                Some(change) => Ok(Some(TaskInfo::from(&change?))),
                None => Ok(None),
            }
        })
    }
}

pub fn new_task(
    task_id: String,
    task_type: String,
    payload: Vec<u8>,
    metadata: Option<BTreeMap<String, String>>,
    priority: i32,
    timeout: Option<f64>,
    max_retries: u32,
) -> PyResult<NewTask> {
    let timeout = match timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(task_error(TaskError::Invalid {
                field: "timeout",
                message: format!("{t} is not a number of seconds above 0"),
            }))
        }
    };
    Ok(NewTask {
        task_id,
        task_type,
        payload,
        metadata: metadata.unwrap_or_default(),
        priority,
        timeout,
        max_retries,
    })
}

/// The transport behind `OrchestratorClient`: a lazily connected gRPC channel.
#[pyclass(frozen, module = "dspy_agent_infra._native")]
pub struct GrpcClient {
    tasks: TaskClient,
    target: String,
    /// Carries the answers of the task calls to the event loop, a batch per wake-up.
    bridge: Arc<Bridge>,
}

impl GrpcClient {
    /// Runs `call` through the bridge; a failure to reach the orchestrator names its address and
    /// what to do about it.
    fn call<T, F>(&self, call: F) -> u64
    where
        F: std::future::Future<Output = Result<T, CallError>> + Send + 'static,
        T: for<'py> IntoPyObject<'py> + Send + 'static,
    {
        let target = self.target.clone();
        self.bridge.spawn(async move {
            call.await.map_err(|e| match e {
                // Unknown and Cancelled: the connection failed below gRPC (nothing listens, or
                // TLS on one side only).
                CallError::Rpc(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    let tls = if s.code() == tonic::Code::Unavailable {
                        ""
                    } else {
                        "; if it speaks TLS, pass tls_ca"
                    };
                    CallError::Rpc(tonic::Status::unavailable(format!(
                        "nothing answers at {target} ({}); start a stack there (`dspy-agent start`, \
                         or AgentInfra.start() in another process) or pass the host and port of \
                         a running one{tls}",
                        s.message()
                    )))
                }
                e => e,
            })
        })
    }
}

#[pymethods]
impl GrpcClient {
    #[new]
    #[pyo3(signature = (host, port, token=None, tls_ca=None, server_name=None))]
    fn new(
        host: &str,
        port: u16,
        token: Option<String>,
        tls_ca: Option<Vec<u8>>,
        server_name: Option<String>,
    ) -> PyResult<Self> {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        // Without a token given, the one of this user's stack serving that port, if any; either
        // goes only to the exact address that stack lists.
        let given = token.map(crate::config::Secret::new);
        let route = crate::access::route(given.as_ref(), &format!("{host}:{port}"))
            .map_err(|e| py_error::<exc::ConfigError>(e.to_string(), vec![]))?;
        let bearer = Bearer::new(route.token.as_ref().map(|t| t.expose()))
            .map_err(|e| py_error::<exc::ConfigError>(format!("token: {e}"), vec![]))?;
        let server_name = server_name.unwrap_or_else(|| "localhost".into());
        let endpoint = crate::grpc::auth::endpoint_trusting(
            &route.addr,
            tls_ca.as_deref().map(|ca| (ca, server_name.as_str())),
        )
        .map_err(|e| py_error::<exc::InfraError>(e, vec![]))?
        .connect_timeout(Duration::from_secs(2));
        // The channel needs the runtime's reactor even though it connects lazily.
        let _guard = crate::runtime::get().enter();
        let channel = endpoint.connect_lazy();
        let tasks = TaskClient::new(bearer.channel(channel));
        let scheme = if tls_ca.is_some() { "https" } else { "http" };
        let target = format!("{scheme}://{host}:{port}");
        let bridge = Bridge::new().map_err(|e| {
            py_error::<exc::InfraError>(
                format!("cannot create the event loop's wake-up socket: {e}"),
                vec![],
            )
        })?;
        Ok(GrpcClient {
            tasks,
            target,
            bridge,
        })
    }

    /// The descriptor the event loop watches: readable when `take_messages` has answers.
    #[getter]
    fn wake_fd(&self) -> i32 {
        self.bridge.wake_fd()
    }

    /// Answers to calls queued since the last take, as (kinds, tokens, answers).
    fn take_messages(&self, py: Python<'_>) -> PyResult<super::bridge::Batch> {
        super::bridge::take_messages(py, &self.bridge)
    }

    #[getter]
    fn target(&self) -> String {
        self.target.clone()
    }

    /// Queues a task; a `SubmitResponse` comes back under the returned token.
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
        let task = new_task(
            task_id,
            task_type,
            payload,
            metadata,
            priority,
            timeout,
            max_retries,
        )?;
        let tasks = self.tasks.clone();
        Ok(self.call(
            async move { Ok::<_, CallError>(SubmitResponse::from(tasks.submit(task).await?)) },
        ))
    }

    /// The task's `TaskInfo`, under the returned token.
    fn status_nowait(&self, task_id: String) -> u64 {
        let tasks = self.tasks.clone();
        self.call(async move { Ok::<_, CallError>(TaskInfo::from(&tasks.get(&task_id).await?)) })
    }

    /// Cancels the task; `(cancelled, TaskInfo)` under the returned token.
    fn cancel_nowait(&self, task_id: String) -> u64 {
        let tasks = self.tasks.clone();
        self.call(async move {
            let (cancelled, record) = tasks.cancel(&task_id).await?;
            Ok::<_, CallError>((cancelled, record.as_ref().map(TaskInfo::from)))
        })
    }

    /// A page of tasks and the next page's token, under the returned token.
    #[pyo3(signature = (status=None, task_type=None, page_size=100, page_token=None))]
    fn list_nowait(
        &self,
        status: Option<String>,
        task_type: Option<String>,
        page_size: u32,
        page_token: Option<String>,
    ) -> PyResult<u64> {
        let state = match status.as_deref() {
            None => None,
            Some(name) => Some(TaskState::parse(name).ok_or_else(|| {
                py_error::<exc::InvalidTaskError>(format!("{name:?} is not a task status"), vec![])
            })?),
        };
        let tasks = self.tasks.clone();
        Ok(self.call(async move {
            let (page, next) = tasks.list(state, task_type, page_size, page_token).await?;
            let page: Vec<TaskInfo> = page.iter().map(TaskInfo::from).collect();
            Ok::<_, CallError>((page, next))
        }))
    }

    /// A `TaskWatch` under the returned token.
    fn watch_nowait(&self, task_ids: Vec<String>, include_current: bool) -> u64 {
        let tasks = self.tasks.clone();
        let bridge = Arc::clone(&self.bridge);
        self.call(async move {
            let changes = tasks.watch(task_ids, include_current).await?;
            Ok::<_, CallError>(TaskWatch::new(changes, bridge))
        })
    }

    /// `(healthy, version, project)` under the returned token.
    fn health_nowait(&self) -> u64 {
        let tasks = self.tasks.clone();
        self.call(async move {
            // Nothing listening (or the connection failing below gRPC) is an answer here: not
            // healthy. A refusal, such as a wrong token, is still an error.
            match tasks.health().await {
                Ok(r) => Ok::<_, CallError>((r.healthy, r.version, r.project)),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    Ok((false, String::new(), String::new()))
                }
                Err(s) => Err(s.into()),
            }
        })
    }

    /// The orchestrator's task counts under the returned token.
    fn metrics_nowait(&self) -> u64 {
        let tasks = self.tasks.clone();
        self.call(async move {
            let m = tasks.metrics().await?;
            Ok::<_, CallError>((
                m.by_state,
                m.submitted,
                m.completed,
                m.failed,
                m.cancelled,
                m.running,
                m.task_types,
            ))
        })
    }
}

/// Adds the task classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TaskInfo>()?;
    m.add_class::<SubmitResponse>()?;
    m.add_class::<Task>()?;
    m.add_class::<TaskWatch>()?;
    m.add_class::<GrpcClient>()?;
    Ok(())
}
