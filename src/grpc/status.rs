//! The one conversion of core errors to gRPC statuses. Each match is exhaustive, so a new error
//! kind cannot reach a client without a code chosen for it.

use tonic::Status;

use crate::config::ConfigError;
use crate::engine::{ApiErrorKind, EngineError};
use crate::services::supervisor::StackError;
use crate::tasks::model::TaskError;

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Status {
        let message = e.to_string();
        match e {
            TaskError::Invalid { .. } => Status::invalid_argument(message),
            TaskError::Conflict { .. } => Status::already_exists(message),
            TaskError::UnknownType { .. } => Status::failed_precondition(message),
            TaskError::NotFound { .. } => Status::not_found(message),
            TaskError::Store { .. } => Status::internal(message),
        }
    }
}

impl From<StackError> for Status {
    fn from(e: StackError) -> Status {
        let message = e.to_string();
        match e {
            StackError::UnknownService { .. } => Status::not_found(message),
            StackError::PortInUse { .. } | StackError::InUse(_) | StackError::NotRunning { .. } => {
                Status::failed_precondition(message)
            }
            StackError::Engine(e) => e.into(),
            StackError::Config(e) => e.into(),
            StackError::ServiceStart { .. } | StackError::Cancelled => Status::aborted(message),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let message = e.to_string();
        match e {
            EngineError::Unavailable { .. } => Status::unavailable(message),
            EngineError::Image { .. } => Status::failed_precondition(message),
            EngineError::Api { kind, .. } => match kind {
                ApiErrorKind::NotFound => Status::not_found(message),
                ApiErrorKind::Conflict => Status::failed_precondition(message),
                ApiErrorKind::Other => Status::internal(message),
            },
        }
    }
}

/// A config error reaches a client only when a running stack finds its own config wrong.
impl From<ConfigError> for Status {
    fn from(e: ConfigError) -> Status {
        Status::failed_precondition(e.to_string())
    }
}
