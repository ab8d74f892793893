//! Every mapping of a core error to an exception of `dspy_agent_infra.errors`. The classes are
//! Rust types (`import_exception!`), so a misspelt class does not compile, and every match is
//! exhaustive, so a new error kind cannot reach Python without a class chosen for it.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::PyTypeInfo;

use crate::engine::EngineError;
use crate::infra::InfraError;
use crate::services::supervisor::StackError;
use crate::stack::AttachError;
use crate::tasks::model::TaskError;

/// The exception classes of `dspy_agent_infra.errors`.
pub mod exc {
    pyo3::import_exception!(dspy_agent_infra.errors, InfraError);
    pyo3::import_exception!(dspy_agent_infra.errors, ConfigError);
    pyo3::import_exception!(dspy_agent_infra.errors, DockerUnavailableError);
    pyo3::import_exception!(dspy_agent_infra.errors, ServiceStartError);
    pyo3::import_exception!(dspy_agent_infra.errors, PortInUseError);
    pyo3::import_exception!(dspy_agent_infra.errors, StackInUseError);
    pyo3::import_exception!(dspy_agent_infra.errors, UnknownServiceError);
    pyo3::import_exception!(dspy_agent_infra.errors, TaskError);
    pyo3::import_exception!(dspy_agent_infra.errors, InvalidTaskError);
    pyo3::import_exception!(dspy_agent_infra.errors, TaskConflictError);
    pyo3::import_exception!(dspy_agent_infra.errors, UnknownTaskTypeError);
    pyo3::import_exception!(dspy_agent_infra.errors, TaskNotFoundError);
    pyo3::import_exception!(dspy_agent_infra.errors, OrchestratorUnavailableError);
}

/// A keyword attribute of an exception.
pub enum Attr {
    Text(String),
    Port(u32),
}

/// Builds an exception of class `E` with keyword attributes.
pub fn py_error<E: PyTypeInfo>(message: String, attrs: Vec<(&str, Attr)>) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let kwargs = PyDict::new(py);
            for (k, v) in attrs {
                match v {
                    Attr::Text(t) => kwargs.set_item(k, t)?,
                    Attr::Port(n) => kwargs.set_item(k, n)?,
                }
            }
            let exc = E::type_object(py).call((message.clone(),), Some(&kwargs))?;
            Ok(PyErr::from_value(exc))
        };
        build().unwrap_or_else(|e| e)
    })
}

fn port_in_use(message: String, service: String, port: u16, host_ip: String) -> PyErr {
    py_error::<exc::PortInUseError>(
        message.clone(),
        vec![
            ("service", Attr::Text(service)),
            ("reason", Attr::Text(message)),
            ("port", Attr::Port(port.into())),
            ("host_ip", Attr::Text(host_ip)),
        ],
    )
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn in_use(message: String, owner: &crate::owner::Owner) -> PyErr {
    py_error::<exc::StackInUseError>(
        message,
        vec![
            ("pid", Attr::Port(owner.pid)),
            ("address", Attr::Text(owner.addr.clone())),
        ],
    )
}

fn engine_error(message: String, e: EngineError) -> PyErr {
    match e {
        EngineError::Unavailable { host, .. } => {
            py_error::<exc::DockerUnavailableError>(message, vec![("host", Attr::Text(host))])
        }
        EngineError::Image { .. } | EngineError::Api { .. } => {
            py_error::<exc::InfraError>(message, vec![])
        }
    }
}

fn stack_error(message: String, e: StackError) -> PyErr {
    match e {
        StackError::Engine(e) => engine_error(message, e),
        StackError::Config(_) => py_error::<exc::ConfigError>(message, vec![]),
        StackError::ServiceStart {
            service,
            reason,
            logs,
        } => py_error::<exc::ServiceStartError>(
            message,
            vec![
                ("service", Attr::Text(service)),
                ("reason", Attr::Text(reason)),
                ("logs", Attr::Text(logs)),
            ],
        ),
        StackError::PortInUse {
            service,
            port,
            host_ip,
            ..
        } => port_in_use(message, service, port, host_ip),
        StackError::UnknownService { name, .. } => {
            py_error::<exc::UnknownServiceError>(message, vec![("service", Attr::Text(name))])
        }
        StackError::InUse(crate::owner::OwnerError::InUse { owner, .. }) => in_use(message, &owner),
        StackError::InUse(_) | StackError::Cancelled | StackError::NotRunning { .. } => {
            py_error::<exc::InfraError>(message, vec![])
        }
    }
}

pub fn to_py_err(error: InfraError) -> PyErr {
    let message = error.to_string();
    match error {
        InfraError::Config(_) => py_error::<exc::ConfigError>(message, vec![]),
        InfraError::Engine(e) => engine_error(message, e),
        InfraError::Stack(e) => stack_error(message, e),
        InfraError::InUse(crate::owner::OwnerError::InUse { owner, .. }) => in_use(message, &owner),
        InfraError::InUse(_) => py_error::<exc::InfraError>(message, vec![]),
        InfraError::Task(e) => task_error(e),
        InfraError::Grpc(crate::grpc::GrpcError::Bind { addr, what, .. }) => {
            port_in_use(message, what.into(), port_of(&addr), addr)
        }
        InfraError::Http(crate::http::BindError { addr, .. }) => {
            port_in_use(message, "http".into(), port_of(&addr), addr)
        }
    }
}

pub fn attach_error(e: AttachError) -> PyErr {
    let message = e.to_string();
    match e {
        AttachError::OtherProject { addr, .. } => {
            port_in_use(message, "orchestrator".into(), port_of(&addr), addr)
        }
        AttachError::Unauthenticated { .. } => {
            py_error::<exc::OrchestratorUnavailableError>(message, vec![])
        }
        AttachError::NoEnvManager { .. } | AttachError::Rpc { .. } => {
            py_error::<exc::InfraError>(message, vec![])
        }
    }
}

/// A service call to an attached stack's env-manager failed.
pub fn service_error(service: &str, s: tonic::Status) -> PyErr {
    match s.code() {
        tonic::Code::NotFound => py_error::<exc::UnknownServiceError>(
            s.message().to_string(),
            vec![("service", Attr::Text(service.to_string()))],
        ),
        _ => py_error::<exc::InfraError>(
            format!("the attached stack's env-manager: {}", s.message()),
            vec![],
        ),
    }
}

pub fn task_error(e: TaskError) -> PyErr {
    let message = e.to_string();
    match &e {
        TaskError::Invalid { .. } => py_error::<exc::InvalidTaskError>(message, vec![]),
        TaskError::Conflict { .. } => py_error::<exc::TaskConflictError>(message, vec![]),
        TaskError::UnknownType { .. } => py_error::<exc::UnknownTaskTypeError>(message, vec![]),
        TaskError::NotFound { .. } => py_error::<exc::TaskNotFoundError>(message, vec![]),
        TaskError::Store { .. } => py_error::<exc::TaskError>(message, vec![]),
    }
}

/// An orchestrator's answer, by its gRPC code.
pub fn status_error(s: tonic::Status) -> PyErr {
    use tonic::Code;
    let message = s.message().to_string();
    let unreachable =
        |message: String| py_error::<exc::OrchestratorUnavailableError>(message, vec![]);
    match s.code() {
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => {
            py_error::<exc::InvalidTaskError>(message, vec![])
        }
        Code::AlreadyExists => py_error::<exc::TaskConflictError>(message, vec![]),
        Code::FailedPrecondition => py_error::<exc::UnknownTaskTypeError>(message, vec![]),
        Code::NotFound => py_error::<exc::TaskNotFoundError>(message, vec![]),
        Code::Unauthenticated => {
            unreachable(format!("the orchestrator refused the call: {message}"))
        }
        // The orchestrator never answers with these: the connection failed below gRPC (TLS on
        // one side only, for one).
        Code::Unknown | Code::Cancelled => unreachable(format!(
            "the orchestrator is not reachable: {message} (if it speaks TLS, pass tls_ca)"
        )),
        Code::Unavailable | Code::DeadlineExceeded | Code::PermissionDenied => {
            unreachable(format!("the orchestrator is not reachable: {message}"))
        }
        Code::Ok | Code::Aborted | Code::Unimplemented | Code::Internal | Code::DataLoss => {
            py_error::<exc::TaskError>(message, vec![])
        }
    }
}
