//! One interface to a running stack, wherever it runs: `Infra` in this process (`local`), or a
//! stack another process runs, attached over its gRPC ports (`remote`). The Python bindings and
//! the daemon's clients hold an `Arc<dyn Stack>` and never ask which one it is. Domain types
//! (task records, service states) cross it, not protobuf messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::infra::InfraError;
use crate::services::supervisor::ServiceState;
use crate::tasks::handlers::Handler;
use crate::tasks::model::{NewTask, TaskError, TaskRecord};

mod local;
pub mod remote;

pub use remote::{AttachError, Remote, ServiceClient, TaskClient};

/// Why a call on a stack failed. It stays a Rust value until whoever asked turns it into its own
/// error (a Python exception, a command-line message).
#[derive(Debug)]
pub enum CallError {
    Task(TaskError),
    /// An orchestrator in another process answered with this status (or could not be reached).
    Rpc(tonic::Status),
    Infra(InfraError),
    Attach(AttachError),
    /// A service call to an attached stack's env-manager.
    Service {
        service: String,
        status: tonic::Status,
    },
    /// The call's own task failed (a panic in the core).
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Task(e) => e.fmt(f),
            CallError::Rpc(s) => f.write_str(s.message()),
            CallError::Infra(e) => e.fmt(f),
            CallError::Attach(e) => e.fmt(f),
            CallError::Service { service, status } => {
                write!(f, "service {service:?}: {}", status.message())
            }
            CallError::Failed(message) => f.write_str(message),
        }
    }
}

impl From<InfraError> for CallError {
    fn from(e: InfraError) -> Self {
        CallError::Infra(e)
    }
}

impl From<AttachError> for CallError {
    fn from(e: AttachError) -> Self {
        CallError::Attach(e)
    }
}

impl From<TaskError> for CallError {
    fn from(e: TaskError) -> Self {
        CallError::Task(e)
    }
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError::Rpc(s)
    }
}

/// A submit's answer.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub task_id: String,
    /// The same task (same id and content) was submitted before: nothing new was queued.
    pub duplicate: bool,
}

/// Every state change of the watched tasks, as it happens; ends when the queue stops.
pub type TaskChanges = BoxStream<'static, Result<TaskRecord, CallError>>;

#[async_trait]
pub trait Stack: Send + Sync {
    /// Whether another process runs this stack (stopping it here only detaches).
    fn attached(&self) -> bool;
    /// "host:port" of the orchestrator gRPC service.
    fn orchestrator_addr(&self) -> String;
    /// "host:port" of the env-manager gRPC service.
    fn env_manager_addr(&self) -> String;
    /// "host:port" of `/metrics` and `/healthz`, when this process knows it (not when attached).
    fn http_addr(&self) -> Option<String>;
    /// The token both ports require (and this stack's clients send), when there is one.
    fn token(&self) -> Option<crate::config::Secret>;
    /// The services as last known, dependencies first.
    fn services(&self) -> Vec<ServiceState>;
    /// The addresses an agent needs, as environment variables.
    fn env(&self) -> BTreeMap<String, String> {
        crate::infra::service_env(
            &self.orchestrator_addr(),
            &self.env_manager_addr(),
            &self.services(),
        )
    }
    /// The services, checked now.
    async fn status(&self) -> Result<Vec<ServiceState>, CallError>;
    /// A service's last `tail` log lines (all when 0).
    async fn logs(&self, service: &str, tail: usize) -> Result<String, CallError>;
    /// Restarts a service and waits until it is healthy again.
    async fn restart(&self, service: &str) -> Result<ServiceState, CallError>;
    /// Serves `task_type` with `handler` from now on, replacing an earlier one.
    fn register_handler(&self, task_type: &str, handler: Arc<dyn Handler>);
    async fn submit(&self, task: NewTask) -> Result<Submitted, CallError>;
    async fn get(&self, task_id: &str) -> Result<TaskRecord, CallError>;
    /// Waits until the task reaches a final state; `None` after `timeout`.
    async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskRecord>, CallError>;
    /// Cancels the task: whether this cancelled it, and its state.
    async fn cancel(&self, task_id: &str) -> Result<(bool, Option<TaskRecord>), CallError>;
    /// Changes of the given tasks (all when empty), each task's current state first when
    /// `include_current`.
    async fn watch(
        &self,
        task_ids: Vec<String>,
        include_current: bool,
    ) -> Result<TaskChanges, CallError>;
    /// Stops the stack (its containers stay when `keep_running`); an attached stack is only
    /// detached from, and runs on.
    async fn stop(&self, keep_running: bool);
}
