//! What is wrong with a configuration, with the field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("cannot read config file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("service {service:?} depends on {dependency:?}, which is not defined (defined services: {known})")]
    UnknownDependency {
        service: String,
        dependency: String,
        known: String,
    },
    #[error("unknown service {name:?}; defined services: {known}")]
    UnknownService { name: String, known: String },
    #[error("dependency cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("host port {port} is published by both {first:?} and {second:?}; give one of them another port, or 0 for any free port")]
    DuplicatePort {
        port: u16,
        first: String,
        second: String,
    },
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
