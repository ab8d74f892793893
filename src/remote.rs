//! Attach mode: a stack that another process runs (a `dspy-agent start` daemon, another agent),
//! used over its two gRPC ports instead of starting a second one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tonic::transport::Channel;

use crate::config::{Config, Tls};
use crate::grpc::auth::{endpoint, AuthChannel, Bearer};
use crate::grpc::env_manager::service_state;
use crate::grpc::worker_client::WorkerClient;
use crate::grpc::{env_pb, pb, MAX_MESSAGE_BYTES};
use crate::services::supervisor::ServiceState;
use crate::tasks::handlers::Handler;

/// How long the probe for a running orchestrator may take; nothing listening answers at once.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("an orchestrator of project {found:?} already listens on {addr}, not one of project {wanted:?}. Use project {found:?}, or set ORCHESTRATOR_GRPC_ADDR (orchestrator_addr) to another address")]
    OtherProject {
        addr: String,
        found: String,
        wanted: String,
    },
    #[error("the orchestrator on {addr} serves no env-manager, so its services cannot be reached from here")]
    NoEnvManager { addr: String },
    #[error("an orchestrator of this project runs on {addr}, but refuses this process: {message}")]
    Unauthenticated { addr: String, message: String },
    #[error("{what}: {message}")]
    Rpc { what: String, message: String },
}

pub type OrchestratorClient =
    pb::orchestrator_service_client::OrchestratorServiceClient<AuthChannel>;
type EnvClient = env_pb::env_manager_service_client::EnvManagerServiceClient<AuthChannel>;

pub struct Remote {
    pub project: String,
    pub orchestrator_addr: String,
    pub env_manager_addr: String,
    orchestrator: OrchestratorClient,
    env: EnvClient,
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
        let Some(channel) = connect(addr, config.tls.as_ref(), PROBE_TIMEOUT).await else {
            return Ok(None);
        };
        let bearer = Bearer::new(config.token.as_ref().map(|t| t.expose())).map_err(|message| {
            AttachError::Unauthenticated {
                addr: addr.clone(),
                message,
            }
        })?;
        let channel = bearer.channel(channel);
        let mut orchestrator =
            pb::orchestrator_service_client::OrchestratorServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let health =
            match tokio::time::timeout(PROBE_TIMEOUT, orchestrator.health(pb::HealthRequest {}))
                .await
            {
                Ok(Ok(h)) => h.into_inner(),
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
        let env_channel = connect(
            &health.env_manager_addr,
            config.tls.as_ref(),
            Duration::from_secs(2),
        )
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
            project: health.project,
            orchestrator_addr: addr.clone(),
            env_manager_addr: health.env_manager_addr,
            orchestrator,
            env: env_pb::env_manager_service_client::EnvManagerServiceClient::new(
                bearer.channel(env_channel),
            ),
            services: Mutex::new(Vec::new()),
            worker,
        };
        remote.status().await?;
        tracing::info!(orchestrator = %remote.orchestrator_addr, env_manager = %remote.env_manager_addr, "attached to a running stack");
        Ok(Some(remote))
    }

    pub fn orchestrator(&self) -> OrchestratorClient {
        self.orchestrator.clone()
    }

    /// The services as last fetched.
    pub fn services(&self) -> Vec<ServiceState> {
        crate::util::lock(&self.services).clone()
    }

    /// The services, fetched now.
    pub async fn status(&self) -> Result<Vec<ServiceState>, AttachError> {
        let r = self
            .env
            .clone()
            .get_services_status(env_pb::GetServicesStatusRequest::default())
            .await
            .map_err(|s| rpc("services status", s))?
            .into_inner();
        let states: Vec<ServiceState> = r.services.into_iter().map(service_state).collect();
        *crate::util::lock(&self.services) = states.clone();
        Ok(states)
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        crate::infra::service_env(
            &self.orchestrator_addr,
            &self.env_manager_addr,
            &self.services(),
        )
    }

    /// The last `tail` lines of a service's output (all when 0), stdout and stderr together.
    pub async fn logs(&self, service: &str, tail: usize) -> Result<String, tonic::Status> {
        let request = env_pb::StreamLogsRequest {
            service: service.to_string(),
            follow: false,
            tail: u32::try_from(tail).unwrap_or(u32::MAX),
            since_seconds: 0,
        };
        let mut stream = self.env.clone().stream_logs(request).await?.into_inner();
        let mut out = String::new();
        while let Some(line) = stream.next().await {
            out.push_str(&line?.line);
            out.push('\n');
        }
        Ok(out)
    }

    pub async fn restart(&self, service: &str) -> Result<ServiceState, tonic::Status> {
        let s = self
            .env
            .clone()
            .restart_service(env_pb::RestartServiceRequest {
                service: service.to_string(),
            })
            .await?
            .into_inner();
        let _ = self.status().await;
        Ok(service_state(s))
    }

    /// Serves `task_type` with `handler` for the remote orchestrator, through this process's
    /// worker stream.
    pub fn serve(&self, task_type: &str, handler: Arc<dyn Handler>) {
        self.worker.serve(task_type, handler);
    }

    /// Waits until the orchestrator serves the types handed to `serve`, so that a submit right
    /// after registering a handler is not refused.
    pub async fn ready(&self) {
        self.worker.ready().await;
    }

    /// Detaches: the worker stream closes (the orchestrator requeues what it was running); the
    /// stack keeps running.
    pub fn close(&self) {
        self.worker.close();
    }
}

fn rpc(what: &str, s: tonic::Status) -> AttachError {
    AttachError::Rpc {
        what: what.to_string(),
        message: s.message().to_string(),
    }
}
