//! The assembled core: the one entry point for the bindings, the command line and the daemon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::docker::{Docker, DockerError};
use crate::services::supervisor::{ServiceState, StackError, Supervisor};

/// How long to wait for the Docker Engine before reporting it unavailable.
pub const DOCKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Stack(#[from] StackError),
}

/// A running stack (possibly of zero services).
pub struct Infra {
    config: Arc<Config>,
    supervisor: Option<Arc<Supervisor>>,
}

impl Infra {
    /// Connects to the Engine (only when there is a service to run) and brings the stack up.
    pub async fn start(config: Config, cancel: CancellationToken) -> Result<Infra, InfraError> {
        let config = Arc::new(config);
        if config.services.is_empty() {
            return Ok(Infra {
                config,
                supervisor: None,
            });
        }
        let docker = Docker::connect(config.docker_host.as_deref(), DOCKER_CONNECT_TIMEOUT).await?;
        let supervisor = Arc::new(Supervisor::new(
            docker,
            Arc::clone(&config),
            new_session_id(),
        ));
        supervisor.start(cancel).await?;
        Ok(Infra {
            config,
            supervisor: Some(supervisor),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn supervisor(&self) -> Option<&Arc<Supervisor>> {
        self.supervisor.as_ref()
    }

    pub fn services(&self) -> Vec<ServiceState> {
        self.supervisor
            .as_ref()
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// Services with their state checked against the Engine now.
    pub async fn status(&self) -> Result<Vec<ServiceState>, InfraError> {
        match &self.supervisor {
            Some(s) => Ok(s.refresh().await?),
            None => Ok(Vec::new()),
        }
    }

    pub async fn logs(&self, service: &str, tail: usize) -> Result<String, InfraError> {
        match &self.supervisor {
            Some(s) => Ok(s.logs(service, tail).await?),
            None => Err(no_such_service(service)),
        }
    }

    pub async fn restart(&self, service: &str) -> Result<ServiceState, InfraError> {
        let s = self
            .supervisor
            .as_ref()
            .ok_or_else(|| no_such_service(service))?;
        s.restart(service).await?;
        s.snapshot()
            .into_iter()
            .find(|st| st.name == service)
            .ok_or_else(|| no_such_service(service))
    }

    /// Addresses of the running services as environment variables: for each service `NAME`,
    /// `NAME_HOST`, `NAME_PORT` and `NAME_URL` (e.g. `REDIS_URL=redis://127.0.0.1:6379`).
    pub fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for s in self.services() {
            let Some((_, (_, port))) = s.ports.iter().next() else {
                continue;
            };
            let key: String = s
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.insert(format!("{key}_HOST"), s.host());
            env.insert(format!("{key}_PORT"), port.to_string());
            if let Some(url) = s.url() {
                env.insert(format!("{key}_URL"), url);
            }
        }
        env
    }

    /// Stops and removes the stack's containers (named volumes stay), unless `keep_running`.
    pub async fn shutdown(&self, keep_running: bool) {
        if let Some(s) = &self.supervisor {
            if keep_running {
                tracing::info!(project = %self.config.project, "leaving the stack running");
            } else {
                s.stop_services(&[], None).await;
            }
        }
    }
}

fn no_such_service(name: &str) -> InfraError {
    InfraError::Stack(StackError::UnknownService {
        name: name.to_string(),
        known: "none".to_string(),
    })
}

fn new_session_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}
