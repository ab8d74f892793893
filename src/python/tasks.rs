//! Task watches, and the gRPC client behind `OrchestratorClient`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::sync::broadcast;

use crate::grpc::pb;
use crate::grpc::pb::orchestrator_service_client::OrchestratorServiceClient;
use crate::tasks::model::{NewTask, TaskError, TaskRecord};
use crate::tasks::queue::TaskQueue;

use super::bridge::{Bridge, CallError};
use super::errors::{exc, py_error, task_error};
use super::types::{SubmitResponse, Task, TaskInfo};
use crate::grpc::auth::{AuthChannel, Bearer};

/// An open watch on task state changes; `next_nowait()` answers through the bridge with the next
/// change, or None when the queue has stopped.
#[pyclass(module = "dspy_agent_infra._native")]
pub struct TaskWatch {
    state: Arc<tokio::sync::Mutex<WatchState>>,
    bridge: Arc<Bridge>,
}

enum WatchSource {
    Local {
        queue: TaskQueue,
        events: broadcast::Receiver<Arc<TaskRecord>>,
    },
    Remote(Box<tonic::Streaming<pb::TaskInfo>>),
}

struct WatchState {
    pending: VecDeque<TaskInfo>,
    ids: HashSet<String>,
    source: WatchSource,
}

impl TaskWatch {
    pub async fn local(
        queue: TaskQueue,
        ids: Vec<String>,
        include_current: bool,
        bridge: Arc<Bridge>,
    ) -> Result<TaskWatch, TaskError> {
        let events = queue.subscribe();
        let mut pending = VecDeque::new();
        if include_current {
            for id in &ids {
                pending.push_back((&queue.get(id).await?).into());
            }
        }
        Ok(TaskWatch {
            state: Arc::new(tokio::sync::Mutex::new(WatchState {
                pending,
                ids: ids.into_iter().collect(),
                source: WatchSource::Local { queue, events },
            })),
            bridge,
        })
    }

    fn remote(stream: tonic::Streaming<pb::TaskInfo>, bridge: Arc<Bridge>) -> TaskWatch {
        TaskWatch {
            state: Arc::new(tokio::sync::Mutex::new(WatchState {
                pending: VecDeque::new(),
                ids: HashSet::new(),
                source: WatchSource::Remote(Box::new(stream)),
            })),
            bridge,
        }
    }
}

#[pymethods]
impl TaskWatch {
    /// The next change (a `TaskInfo`, or None once the source ended) under the returned token.
    fn next_nowait(&self) -> u64 {
        let state = Arc::clone(&self.state);
        self.bridge.spawn(async move {
            let mut s = state.lock().await;
            if let Some(info) = s.pending.pop_front() {
                return Ok(Some(info));
            }
            let ids = s.ids.clone();
            match &mut s.source {
                WatchSource::Local { queue, events } => loop {
                    match events.recv().await {
                        Ok(r) if ids.is_empty() || ids.contains(&r.task.task_id) => {
                            return Ok(Some(TaskInfo::from(&*r)))
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Missed changes: report the watched tasks' current states instead.
                            let mut current = VecDeque::new();
                            for id in &ids {
                                current.push_back((&queue.get(id).await?).into());
                            }
                            if let Some(first) = current.pop_front() {
                                s.pending = current;
                                return Ok(Some(first));
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            return Ok::<_, CallError>(None)
                        }
                    }
                },
                WatchSource::Remote(stream) => match stream.message().await {
                    Ok(Some(info)) => Ok(Some(TaskInfo::from(info))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.into()),
                },
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

/// Submits `task` to an orchestrator over gRPC.
pub async fn remote_submit(
    mut client: OrchestratorServiceClient<AuthChannel>,
    task: NewTask,
) -> Result<SubmitResponse, tonic::Status> {
    let request = pb::SubmitTaskRequest {
        task_id: task.task_id,
        task_type: task.task_type,
        payload: task.payload,
        metadata: task.metadata.into_iter().collect::<HashMap<_, _>>(),
        priority: task.priority,
        timeout_ms: task
            .timeout
            .map(|t| t.as_millis().max(1) as u64)
            .unwrap_or(0),
        max_retries: task.max_retries,
    };
    let r = client.submit_task(request).await?.into_inner();
    Ok(SubmitResponse {
        success: r.success,
        task_id: r.task_id,
        error: r.error,
        duplicate: r.duplicate,
    })
}

/// A task's status from an orchestrator over gRPC.
pub async fn remote_status(
    mut client: OrchestratorServiceClient<AuthChannel>,
    task_id: String,
) -> Result<TaskInfo, tonic::Status> {
    let r = client
        .get_task_status(pb::GetTaskStatusRequest { task_id })
        .await?;
    Ok(TaskInfo::from(r.into_inner()))
}

/// Cancels a task of an orchestrator over gRPC: whether it was cancelled, and its state.
pub async fn remote_cancel(
    mut client: OrchestratorServiceClient<AuthChannel>,
    task_id: String,
) -> Result<(bool, Option<TaskInfo>), tonic::Status> {
    let r = client
        .cancel_task(pb::CancelTaskRequest { task_id })
        .await?
        .into_inner();
    Ok((r.cancelled, r.task.map(TaskInfo::from)))
}

/// Every state change of the given tasks of an orchestrator over gRPC.
pub async fn remote_watch(
    mut client: OrchestratorServiceClient<AuthChannel>,
    task_ids: Vec<String>,
    include_current: bool,
    bridge: Arc<Bridge>,
) -> Result<TaskWatch, tonic::Status> {
    let stream = client
        .stream_task_results(pb::StreamTaskResultsRequest {
            task_ids,
            include_current,
        })
        .await?
        .into_inner();
    Ok(TaskWatch::remote(stream, bridge))
}

/// Waits for a task of an orchestrator over gRPC to finish; `None` after `timeout`.
pub async fn remote_wait(
    mut client: OrchestratorServiceClient<AuthChannel>,
    task_id: String,
    timeout: Option<Duration>,
) -> Result<Option<TaskInfo>, tonic::Status> {
    let wait = async {
        let mut stream = client
            .stream_task_results(pb::StreamTaskResultsRequest {
                task_ids: vec![task_id.clone()],
                include_current: true,
            })
            .await?
            .into_inner();
        while let Some(info) = stream.message().await? {
            if info.status >= pb::TaskState::Completed as i32 {
                return Ok(TaskInfo::from(info));
            }
        }
        Err(tonic::Status::unavailable(format!(
            "the orchestrator closed the stream before task {task_id:?} finished"
        )))
    };
    match timeout {
        Some(t) => match tokio::time::timeout(t, wait).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        },
        None => wait.await.map(Some),
    }
}

/// The transport behind `OrchestratorClient`: a lazily connected gRPC channel.
#[pyclass(frozen, module = "dspy_agent_infra._native")]
pub struct GrpcClient {
    client: OrchestratorServiceClient<AuthChannel>,
    target: String,
    /// Carries the answers of the task calls to the event loop, a batch per wake-up.
    bridge: Arc<Bridge>,
}

impl GrpcClient {
    fn client(&self) -> OrchestratorServiceClient<AuthChannel> {
        self.client.clone()
    }

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
        let bearer = Bearer::new(token.as_deref())
            .map_err(|e| py_error::<exc::ConfigError>(format!("token: {e}"), vec![]))?;
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let server_name = server_name.unwrap_or_else(|| "localhost".into());
        let endpoint = crate::grpc::auth::endpoint_trusting(
            &format!("{host}:{port}"),
            tls_ca.as_deref().map(|ca| (ca, server_name.as_str())),
        )
        .map_err(|e| py_error::<exc::InfraError>(e, vec![]))?
        .connect_timeout(Duration::from_secs(2));
        // The channel needs the runtime's reactor even though it connects lazily.
        let _guard = crate::runtime::get().enter();
        let channel = endpoint.connect_lazy();
        let client = OrchestratorServiceClient::new(bearer.channel(channel))
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
        let scheme = if tls_ca.is_some() { "https" } else { "http" };
        let target = format!("{scheme}://{host}:{port}");
        let bridge = Bridge::new().map_err(|e| {
            py_error::<exc::InfraError>(
                format!("cannot create the event loop's wake-up socket: {e}"),
                vec![],
            )
        })?;
        Ok(GrpcClient {
            client,
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
        let client = self.client();
        Ok(self.call(async move { Ok::<_, CallError>(remote_submit(client, task).await?) }))
    }

    /// The task's `TaskInfo`, under the returned token.
    fn status_nowait(&self, task_id: String) -> u64 {
        let client = self.client();
        self.call(async move { Ok::<_, CallError>(remote_status(client, task_id).await?) })
    }

    /// Cancels the task; `(cancelled, TaskInfo)` under the returned token.
    fn cancel_nowait(&self, task_id: String) -> u64 {
        let client = self.client();
        self.call(async move { Ok::<_, CallError>(remote_cancel(client, task_id).await?) })
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
        let status = match status.as_deref() {
            None => pb::TaskState::Unspecified,
            Some(name) => pb::TaskState::from_str_name(name).ok_or_else(|| {
                py_error::<exc::InvalidTaskError>(format!("{name:?} is not a task status"), vec![])
            })?,
        };
        let mut client = self.client();
        Ok(self.call(async move {
            let r = client
                .list_tasks(pb::ListTasksRequest {
                    status: status as i32,
                    task_type: task_type.unwrap_or_default(),
                    page_size,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let tasks: Vec<TaskInfo> = r.tasks.into_iter().map(TaskInfo::from).collect();
            Ok::<_, CallError>((tasks, Some(r.next_page_token).filter(|t| !t.is_empty())))
        }))
    }

    /// A `TaskWatch` under the returned token.
    fn watch_nowait(&self, task_ids: Vec<String>, include_current: bool) -> u64 {
        let client = self.client();
        let bridge = Arc::clone(&self.bridge);
        self.call(async move {
            Ok::<_, CallError>(remote_watch(client, task_ids, include_current, bridge).await?)
        })
    }

    /// `(healthy, version, project)` under the returned token.
    fn health_nowait(&self) -> u64 {
        let mut client = self.client();
        self.call(async move {
            // Nothing listening (or the connection failing below gRPC) is an answer here: not
            // healthy. A refusal, such as a wrong token, is still an error.
            match client.health(pb::HealthRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    Ok::<_, CallError>((r.healthy, r.version, r.project))
                }
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
        let mut client = self.client();
        self.call(async move {
            let m = client
                .get_metrics(pb::GetMetricsRequest {})
                .await?
                .into_inner();
            let by_status: BTreeMap<String, u64> = m.tasks_by_status.into_iter().collect();
            Ok::<_, CallError>((
                by_status,
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
