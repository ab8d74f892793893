//! Attach mode: a stack that another process runs (a `dspy-agent start` daemon, another agent),
//! used over its two gRPC ports instead of starting a second one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tonic::transport::Channel;

use super::{CallError, Stack, Submitted, TaskChanges};
use crate::config::{Config, Secret, Tls};
use crate::grpc::auth::{endpoint, AuthChannel, Bearer};
use crate::grpc::convert::{self, service_state};
use crate::grpc::worker_client::WorkerClient;
use crate::grpc::{env_pb, pb, MAX_MESSAGE_BYTES};
use crate::services::supervisor::{Phase, ServiceState};
use crate::tasks::handlers::Handler;
use crate::tasks::model::{NewTask, TaskRecord, TaskState};
use crate::tasks::queue::QueueMetrics;

/// How long the probe for a running orchestrator may take; nothing listening answers at once.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("an orchestrator of project {found:?} already listens on {addr}, not one of project {wanted:?}. Use project {found:?}, or give project {wanted:?} ports of its own, all three: ORCHESTRATOR_GRPC_ADDR, ENV_MANAGER_GRPC_ADDR and DSPY_AGENT_HTTP_ADDR (orchestrator_addr, env_manager_addr and http_addr in dspy-agent.toml), \"127.0.0.1:0\" each for any free port")]
    OtherProject {
        addr: String,
        found: String,
        wanted: String,
    },
    #[error("the orchestrator on {addr} serves no env-manager, so its services cannot be reached from here")]
    NoEnvManager { addr: String },
    #[error("an orchestrator on {addr} refuses this process (another user's stack, or this project's with a token this process lacks): {message}. To run a separate stack, set ORCHESTRATOR_GRPC_ADDR (orchestrator_addr) to another port, or \"127.0.0.1:0\" for any free one")]
    Unauthenticated { addr: String, message: String },
    #[error("{what}: {message}")]
    Rpc { what: String, message: String },
}

type OrchestratorClient = pb::orchestrator_service_client::OrchestratorServiceClient<AuthChannel>;
type EnvClient = env_pb::env_manager_service_client::EnvManagerServiceClient<AuthChannel>;

/// A stack another process runs, attached to over its two gRPC ports.
pub struct Remote {
    /// What this process sends on both ports.
    token: Option<Secret>,
    orchestrator_addr: String,
    env_manager_addr: String,
    tasks: TaskClient,
    env: ServiceClient,
    services: Mutex<Vec<ServiceState>>,
    /// Serves this process's task handlers for the remote orchestrator.
    worker: WorkerClient,
}

async fn connect(addr: &str, tls: Option<&Tls>, timeout: Duration) -> Option<Channel> {
    let endpoint = endpoint(addr, tls).ok()?.connect_timeout(timeout);
    endpoint.connect().await.ok()
}

impl Remote {
    /// Looks for a healthy orchestrator of `config.project` at `config.orchestrator_addr`.
    /// `None` when nothing answers there (or the address asks for any free port).
    pub async fn find(config: &Config) -> Result<Option<Remote>, AttachError> {
        let addr = &config.orchestrator_addr;
        if addr.ends_with(":0") {
            return Ok(None);
        }
        // The token goes only to the address this user's stack lists for the port.
        let route = crate::access::route(config.token.as_ref(), addr).map_err(|e| {
            AttachError::Unauthenticated {
                addr: addr.clone(),
                message: e.to_string(),
            }
        })?;
        let Some(channel) = connect(&route.addr, config.tls.as_ref(), PROBE_TIMEOUT).await else {
            return Ok(None);
        };
        let token = route.token;
        let bearer = Bearer::new(token.as_ref().map(|t| t.expose())).map_err(|message| {
            AttachError::Unauthenticated {
                addr: addr.clone(),
                message,
            }
        })?;
        let channel = bearer.channel(channel);
        let tasks = TaskClient::new(channel.clone());
        let health = match tokio::time::timeout(PROBE_TIMEOUT, tasks.health()).await {
            Ok(Ok(h)) => h,
            Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                return Err(AttachError::Unauthenticated {
                    addr: addr.clone(),
                    message: s.message().to_string(),
                })
            }
            // Something listens there, but not a healthy orchestrator: starting our own will
            // report the port as taken.
            _ => return Ok(None),
        };
        if !health.healthy {
            return Ok(None);
        }
        if health.project != config.project {
            return Err(AttachError::OtherProject {
                addr: addr.clone(),
                found: health.project,
                wanted: config.project.clone(),
            });
        }
        if health.env_manager_addr.is_empty() {
            return Err(AttachError::NoEnvManager { addr: addr.clone() });
        }
        let env_route =
            crate::access::route(token.as_ref(), &health.env_manager_addr).map_err(|e| {
                AttachError::Unauthenticated {
                    addr: health.env_manager_addr.clone(),
                    message: e.to_string(),
                }
            })?;
        let env_channel = connect(&env_route.addr, config.tls.as_ref(), Duration::from_secs(2))
            .await
            .ok_or_else(|| AttachError::Rpc {
                what: format!("env-manager at {}", health.env_manager_addr),
                message: "does not answer".into(),
            })?;
        let name = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
            std::process::id()
        );
        let capacity = u32::try_from(config.tasks.concurrency).unwrap_or(u32::MAX);
        let worker = WorkerClient::connect(channel.clone(), name, capacity)
            .await
            .map_err(|s| rpc("worker stream", s))?;
        let remote = Remote {
            token,
            orchestrator_addr: addr.clone(),
            env_manager_addr: health.env_manager_addr,
            tasks,
            env: ServiceClient::new(bearer.channel(env_channel)),
            services: Mutex::new(Vec::new()),
            worker,
        };
        let running = remote.fetch_services().await?;
        tracing::info!(orchestrator = %remote.orchestrator_addr, env_manager = %remote.env_manager_addr, "attached to a running stack");
        let missing = missing_services(config, &running);
        if !missing.is_empty() {
            tracing::warn!(
                missing = %missing.join(", "),
                running = %running.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                "the running stack this start attached to has no such services: its owner started it with others; stop it and start again with them, or add them to the config its owner uses"
            );
        }
        Ok(Some(remote))
    }

    /// The services, fetched now.
    async fn fetch_services(&self) -> Result<Vec<ServiceState>, AttachError> {
        let status = self
            .env
            .status()
            .await
            .map_err(|s| rpc("services status", s))?;
        *crate::util::lock(&self.services) = status.services.clone();
        Ok(status.services)
    }

    /// The last `tail` lines of a service's output (all when 0), stdout and stderr together.
    async fn service_logs(&self, service: &str, tail: usize) -> Result<String, tonic::Status> {
        let tail = u32::try_from(tail).unwrap_or(u32::MAX);
        let mut stream = self.env.logs(service, false, tail, 0).await?;
        let mut out = String::new();
        while let Some(line) = stream.next().await {
            out.push_str(&line?.line);
            out.push('\n');
        }
        Ok(out)
    }

    async fn restart_service(&self, service: &str) -> Result<ServiceState, tonic::Status> {
        let s = self.env.restart(service).await?;
        let _ = self.fetch_services().await;
        Ok(s)
    }
}

/// The services `config` asks for that the running stack lacks.
fn missing_services(config: &Config, running: &[ServiceState]) -> Vec<String> {
    config
        .services
        .iter()
        .map(|s| s.name.clone())
        .filter(|name| !running.iter().any(|r| &r.name == name))
        .collect()
}

fn rpc(what: &str, s: tonic::Status) -> AttachError {
    AttachError::Rpc {
        what: what.to_string(),
        message: s.message().to_string(),
    }
}

/// What an orchestrator in another process says of itself.
#[derive(Debug, Clone)]
pub struct OrchestratorHealth {
    pub healthy: bool,
    pub version: String,
    pub project: String,
    /// Where its env-manager listens; empty when it has none.
    pub env_manager_addr: String,
}

/// What another process's env-manager says of its stack.
#[derive(Debug, Clone)]
pub struct StackStatus {
    pub project: String,
    /// Why the Engine cannot be reached, when it cannot.
    pub engine_error: Option<String>,
    pub services: Vec<ServiceState>,
}

/// One line of a service's output.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub service: String,
    pub line: String,
    pub stderr: bool,
}

/// A service's step during a start, as it happens.
#[derive(Debug, Clone)]
pub struct PhaseChange {
    pub service: String,
    pub phase: Phase,
    pub message: String,
}

pub type Changes<T> = BoxStream<'static, Result<T, tonic::Status>>;

/// The service calls of an env-manager in another process, answered in domain types: what an
/// attached stack and the command line use.
#[derive(Clone)]
pub struct ServiceClient {
    client: EnvClient,
}

impl ServiceClient {
    pub fn new(channel: AuthChannel) -> ServiceClient {
        ServiceClient {
            client: env_pb::env_manager_service_client::EnvManagerServiceClient::new(channel),
        }
    }

    pub async fn status(&self) -> Result<StackStatus, tonic::Status> {
        let r = self
            .client
            .clone()
            .get_services_status(env_pb::GetServicesStatusRequest::default())
            .await?
            .into_inner();
        Ok(StackStatus {
            project: r.project,
            engine_error: (!r.engine_reachable).then_some(r.engine_error),
            services: r.services.into_iter().map(service_state).collect(),
        })
    }

    /// A service's output: the last `tail` lines (all when 0) since `since_seconds` (Unix
    /// time; 0 = from the start), then new lines as they come when `follow`.
    pub async fn logs(
        &self,
        service: &str,
        follow: bool,
        tail: u32,
        since_seconds: i64,
    ) -> Result<Changes<LogLine>, tonic::Status> {
        let request = env_pb::StreamLogsRequest {
            service: service.to_string(),
            follow,
            tail,
            since_seconds,
        };
        let stream = self.client.clone().stream_logs(request).await?.into_inner();
        Ok(stream
            .map(|line| {
                line.map(|l| LogLine {
                    stderr: l.stream == env_pb::LogStream::Stderr as i32,
                    service: l.service,
                    line: l.line,
                })
            })
            .boxed())
    }

    /// Restarts a service and waits until it is healthy again.
    pub async fn restart(&self, service: &str) -> Result<ServiceState, tonic::Status> {
        let s = self
            .client
            .clone()
            .restart_service(env_pb::RestartServiceRequest {
                service: service.to_string(),
            })
            .await?
            .into_inner();
        Ok(service_state(s))
    }

    /// Every service's phase changes, each service's current phase first.
    pub async fn phases(&self) -> Result<Changes<PhaseChange>, tonic::Status> {
        let stream = self
            .client
            .clone()
            .stream_health(env_pb::StreamHealthRequest::default())
            .await?
            .into_inner();
        Ok(stream
            .map(|u| {
                u.map(|u| PhaseChange {
                    phase: convert::phase_from_pb(u.phase),
                    service: u.service,
                    message: u.message,
                })
            })
            .boxed())
    }

    /// Stops every service, dependents first (`timeout` seconds each before a kill; their own
    /// stop timeout when `None`); the names of those stopped.
    pub async fn stop(&self, timeout: Option<u32>) -> Result<Vec<String>, tonic::Status> {
        let r = self
            .client
            .clone()
            .stop_services(env_pb::StopServicesRequest {
                services: Vec::new(),
                timeout_seconds: timeout.unwrap_or(0),
            })
            .await?
            .into_inner();
        Ok(r.stopped)
    }
}

/// The task calls of an orchestrator in another process, answered in domain types: what an
/// attached stack, `OrchestratorClient` and the command line use.
#[derive(Clone)]
pub struct TaskClient {
    client: OrchestratorClient,
}

impl TaskClient {
    pub fn new(channel: AuthChannel) -> TaskClient {
        TaskClient {
            client: OrchestratorClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    fn raw(&self) -> OrchestratorClient {
        self.client.clone()
    }

    pub async fn submit(&self, task: NewTask) -> Result<Submitted, tonic::Status> {
        let r = self
            .raw()
            .submit_task(convert::submit_request(task))
            .await?
            .into_inner();
        Ok(Submitted {
            task_id: r.task_id,
            duplicate: r.duplicate,
        })
    }

    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, tonic::Status> {
        let r = self
            .raw()
            .get_task_status(pb::GetTaskStatusRequest {
                task_id: task_id.to_string(),
            })
            .await?;
        Ok(convert::task_record(r.into_inner()))
    }

    /// A page of tasks, oldest first, and the next page's token.
    pub async fn list(
        &self,
        state: Option<TaskState>,
        task_type: Option<String>,
        page_size: u32,
        page_token: Option<String>,
    ) -> Result<(Vec<TaskRecord>, Option<String>), tonic::Status> {
        let r = self
            .raw()
            .list_tasks(pb::ListTasksRequest {
                status: state.map_or(pb::TaskState::Unspecified, convert::state_to_pb) as i32,
                task_type: task_type.unwrap_or_default(),
                page_size,
                page_token: page_token.unwrap_or_default(),
            })
            .await?
            .into_inner();
        let tasks = r.tasks.into_iter().map(convert::task_record).collect();
        Ok((tasks, Some(r.next_page_token).filter(|t| !t.is_empty())))
    }

    /// Deletes finished tasks older than `older_than`; returns how many.
    /// What the orchestrator says of itself.
    pub async fn health(&self) -> Result<OrchestratorHealth, tonic::Status> {
        let r = self.raw().health(pb::HealthRequest {}).await?.into_inner();
        Ok(OrchestratorHealth {
            healthy: r.healthy,
            version: r.version,
            project: r.project,
            env_manager_addr: r.env_manager_addr,
        })
    }

    pub async fn metrics(&self) -> Result<QueueMetrics, tonic::Status> {
        let m = self
            .raw()
            .get_metrics(pb::GetMetricsRequest {})
            .await?
            .into_inner();
        Ok(QueueMetrics {
            by_state: m.tasks_by_status.into_iter().collect(),
            submitted: m.submitted,
            completed: m.completed,
            failed: m.failed,
            cancelled: m.cancelled,
            running: m.running,
            uptime: Duration::try_from_secs_f64(m.uptime_seconds).unwrap_or_default(),
            task_types: m.task_types,
        })
    }

    pub async fn prune(&self, older_than: Duration) -> Result<u64, tonic::Status> {
        let older_than_ms = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        let r = self
            .raw()
            .prune_tasks(pb::PruneTasksRequest { older_than_ms })
            .await?
            .into_inner();
        Ok(r.deleted)
    }

    pub async fn cancel(&self, task_id: &str) -> Result<(bool, Option<TaskRecord>), tonic::Status> {
        let r = self
            .raw()
            .cancel_task(pb::CancelTaskRequest {
                task_id: task_id.to_string(),
            })
            .await?
            .into_inner();
        Ok((r.cancelled, r.task.map(convert::task_record)))
    }

    pub async fn watch(
        &self,
        task_ids: Vec<String>,
        include_current: bool,
    ) -> Result<TaskChanges, tonic::Status> {
        let stream = self
            .raw()
            .stream_task_results(pb::StreamTaskResultsRequest {
                task_ids,
                include_current,
            })
            .await?
            .into_inner();
        Ok(stream
            .map(|item| item.map(convert::task_record).map_err(CallError::Rpc))
            .boxed())
    }

    /// Waits for the task to finish; `None` after `timeout`.
    pub async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskRecord>, tonic::Status> {
        let wait = async {
            let mut stream = self
                .raw()
                .stream_task_results(pb::StreamTaskResultsRequest {
                    task_ids: vec![task_id.to_string()],
                    include_current: true,
                })
                .await?
                .into_inner();
            while let Some(info) = stream.message().await? {
                let record = convert::task_record(info);
                if record.state.is_final() {
                    return Ok(record);
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
}

#[async_trait]
impl Stack for Remote {
    fn attached(&self) -> bool {
        true
    }

    fn orchestrator_addr(&self) -> String {
        self.orchestrator_addr.clone()
    }

    fn env_manager_addr(&self) -> String {
        self.env_manager_addr.clone()
    }

    fn http_addr(&self) -> Option<String> {
        None
    }

    fn token(&self) -> Option<Secret> {
        self.token.clone()
    }

    fn services(&self) -> Vec<ServiceState> {
        crate::util::lock(&self.services).clone()
    }

    async fn status(&self) -> Result<Vec<ServiceState>, CallError> {
        Ok(self.fetch_services().await?)
    }

    async fn logs(&self, service: &str, tail: usize) -> Result<String, CallError> {
        self.service_logs(service, tail)
            .await
            .map_err(|status| CallError::Service {
                service: service.to_string(),
                status,
            })
    }

    async fn restart(&self, service: &str) -> Result<ServiceState, CallError> {
        self.restart_service(service)
            .await
            .map_err(|status| CallError::Service {
                service: service.to_string(),
                status,
            })
    }

    fn register_handler(&self, task_type: &str, handler: Arc<dyn Handler>) {
        self.worker.serve(task_type, handler);
    }

    async fn submit(&self, task: NewTask) -> Result<Submitted, CallError> {
        // A submit right after registering a handler must find its type served.
        self.worker.ready().await;
        Ok(self.tasks.submit(task).await?)
    }

    async fn get(&self, task_id: &str) -> Result<TaskRecord, CallError> {
        Ok(self.tasks.get(task_id).await?)
    }

    async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskRecord>, CallError> {
        Ok(self.tasks.wait(task_id, timeout).await?)
    }

    async fn cancel(&self, task_id: &str) -> Result<(bool, Option<TaskRecord>), CallError> {
        Ok(self.tasks.cancel(task_id).await?)
    }

    async fn watch(
        &self,
        task_ids: Vec<String>,
        include_current: bool,
    ) -> Result<TaskChanges, CallError> {
        Ok(self.tasks.watch(task_ids, include_current).await?)
    }

    /// Detaches: the worker stream closes (the orchestrator requeues what it was running) and
    /// its handler runs end; the stack keeps running.
    async fn stop(&self, _keep_running: bool) {
        self.worker.close().await;
    }
}
