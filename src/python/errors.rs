//! Every mapping of a core error to an exception of `dspy_agent_infra.errors`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::docker::DockerError;
use crate::infra::InfraError;
use crate::remote::AttachError;
use crate::services::supervisor::StackError;
use crate::tasks::model::TaskError;

/// A keyword attribute of an exception.
pub enum Attr {
    Text(String),
    Port(u32),
}

/// Builds an exception of `dspy_agent_infra.errors` with keyword attributes.
pub fn py_error(class: &str, message: String, attrs: Vec<(&str, Attr)>) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let cls = py.import("dspy_agent_infra.errors")?.getattr(class)?;
            let kwargs = PyDict::new(py);
            for (k, v) in attrs {
                match v {
                    Attr::Text(t) => kwargs.set_item(k, t)?,
                    Attr::Port(n) => kwargs.set_item(k, n)?,
                }
            }
            let exc = cls.call((message.clone(),), Some(&kwargs))?;
            Ok(PyErr::from_value(exc))
        };
        build().unwrap_or_else(|e| e)
    })
}

fn port_in_use(message: String, service: String, port: u16, host_ip: String) -> PyErr {
    py_error(
        "PortInUseError",
        message.clone(),
        vec![
            ("service", Attr::Text(service)),
            ("reason", Attr::Text(message)),
            ("port", Attr::Port(port.into())),
            ("host_ip", Attr::Text(host_ip)),
        ],
    )
}

pub fn to_py_err(error: InfraError) -> PyErr {
    let message = error.to_string();
    if let Some(owner) = error.in_use() {
        return py_error(
            "StackInUseError",
            message,
            vec![
                ("pid", Attr::Port(owner.pid)),
                ("address", Attr::Text(owner.addr.clone())),
            ],
        );
    }
    match error {
        InfraError::Config(_) => py_error("ConfigError", message, vec![]),
        InfraError::Docker(DockerError::Unavailable { host, .. })
        | InfraError::Stack(StackError::Docker(DockerError::Unavailable { host, .. })) => py_error(
            "DockerUnavailableError",
            message,
            vec![("host", Attr::Text(host))],
        ),
        InfraError::Stack(StackError::ServiceStart {
            service,
            reason,
            logs,
        }) => py_error(
            "ServiceStartError",
            message,
            vec![
                ("service", Attr::Text(service)),
                ("reason", Attr::Text(reason)),
                ("logs", Attr::Text(logs)),
            ],
        ),
        InfraError::Stack(StackError::PortInUse {
            service,
            port,
            host_ip,
            ..
        }) => port_in_use(message, service, port, host_ip),
        InfraError::Stack(StackError::UnknownService { name, .. }) => py_error(
            "UnknownServiceError",
            message,
            vec![("service", Attr::Text(name))],
        ),
        InfraError::Docker(_)
        | InfraError::InUse(_)
        | InfraError::Stack(StackError::Cancelled | StackError::Docker(_) | StackError::InUse(_)) => {
            py_error("InfraError", message, vec![])
        }
        InfraError::Task(e) => task_error(e),
        InfraError::Grpc(crate::grpc::GrpcError::Bind { addr, what, .. }) => {
            let port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            port_in_use(message, what.into(), port, addr)
        }
    }
}

pub fn attach_error(e: AttachError) -> PyErr {
    let message = e.to_string();
    match e {
        AttachError::OtherProject { addr, .. } => {
            let port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            port_in_use(message, "orchestrator".into(), port, addr)
        }
        AttachError::Unauthenticated { .. } => {
            py_error("OrchestratorUnavailableError", message, vec![])
        }
        AttachError::NoEnvManager { .. } | AttachError::Rpc { .. } => {
            py_error("InfraError", message, vec![])
        }
    }
}

/// A service call to an attached stack's env-manager failed.
pub fn service_error(service: &str, s: tonic::Status) -> PyErr {
    match s.code() {
        tonic::Code::NotFound => py_error(
            "UnknownServiceError",
            s.message().to_string(),
            vec![("service", Attr::Text(service.to_string()))],
        ),
        _ => py_error(
            "InfraError",
            format!("the attached stack's env-manager: {}", s.message()),
            vec![],
        ),
    }
}

pub fn task_error(e: TaskError) -> PyErr {
    let message = e.to_string();
    let class = match &e {
        TaskError::Invalid { .. } => "InvalidTaskError",
        TaskError::Conflict { .. } => "TaskConflictError",
        TaskError::UnknownType { .. } => "UnknownTaskTypeError",
        TaskError::NotFound { .. } => "TaskNotFoundError",
        TaskError::Store { .. } => "TaskError",
    };
    py_error(class, message, vec![])
}

pub fn status_error(s: tonic::Status) -> PyErr {
    let message = s.message().to_string();
    let class = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => {
            "InvalidTaskError"
        }
        tonic::Code::AlreadyExists => "TaskConflictError",
        tonic::Code::FailedPrecondition => "UnknownTaskTypeError",
        tonic::Code::NotFound => "TaskNotFoundError",
        // The orchestrator never answers with these: the connection failed below gRPC (TLS on
        // one side only, for one).
        tonic::Code::Unknown | tonic::Code::Cancelled => "OrchestratorUnavailableError",
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied => "OrchestratorUnavailableError",
        _ => "TaskError",
    };
    let message = if s.code() == tonic::Code::Unauthenticated {
        format!("the orchestrator refused the call: {message}")
    } else if matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled) {
        format!("the orchestrator is not reachable: {message} (if it speaks TLS, pass tls_ca)")
    } else if class == "OrchestratorUnavailableError" {
        format!("the orchestrator is not reachable: {message}")
    } else {
        message
    };
    py_error(class, message, vec![])
}
