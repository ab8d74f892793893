//! The Docker Engine API (and Podman's compatible one): the only module that talks to bollard.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, DeviceRequest, EndpointSettings, HostConfig, Mount, MountType,
    NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy as EngineRestart,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use async_trait::async_trait;

use super::{
    labels, ApiErrorKind, ContainerEvent, ContainerInfo, ContainerPlan, Engine, EngineError,
    EngineInfo, ExecOutput, RunState, Usage, DEFAULT_HOST,
};
use crate::config::spec::{GpuRequest, MountKind, PullPolicy, RestartPolicy};

/// An Engine error; one that means the Engine cannot be reached at all (the socket is gone,
/// nothing answers) becomes `Unavailable`, which says how to fix it.
pub(super) fn api_error(
    host: &str,
    context: impl Into<String>,
    e: bollard::errors::Error,
) -> EngineError {
    use bollard::errors::Error as E;
    match e {
        E::HyperLegacyError { .. }
        | E::IOError { .. }
        | E::RequestTimeoutError
        | E::SocketNotFoundError(_) => EngineError::Unavailable {
            host: host.to_string(),
            message: engine_message(&e),
        },
        _ => EngineError::Api {
            context: context.into(),
            message: engine_message(&e),
            kind: match status_of(&e) {
                Some(404) => ApiErrorKind::NotFound,
                Some(409) => ApiErrorKind::Conflict,
                _ => ApiErrorKind::Other,
            },
        },
    }
}

pub(super) fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A service's volumes as Engine mounts; named volumes carry the project's prefix.
pub(super) fn volume_mounts(plan: &ContainerPlan<'_>) -> Vec<Mount> {
    plan.spec
        .volumes
        .iter()
        .map(|m| Mount {
            target: Some(m.target.clone()),
            source: Some(match m.kind {
                MountKind::Volume => format!("{}_{}", plan.volume_prefix, m.source),
                MountKind::Bind => m.source.clone(),
            }),
            typ: Some(match m.kind {
                MountKind::Volume => MountType::VOLUME,
                MountKind::Bind => MountType::BIND,
            }),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect()
}

pub(super) fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

#[derive(Clone)]
pub struct Docker {
    client: bollard::Docker,
    host: String,
    /// Podman's Docker-compatible API: it leaves images' HEALTHCHECKs to systemd timers, which
    /// a machine without systemd never runs.
    podman: bool,
}

impl Docker {
    /// Connects and negotiates the API version; gives up after `timeout` so an absent Engine
    /// is reported at once instead of hanging.
    pub async fn connect(host: Option<&str>, timeout: Duration) -> Result<Docker, EngineError> {
        let host = host.unwrap_or(DEFAULT_HOST).to_string();
        let unavailable = |message: String| EngineError::Unavailable {
            host: host.clone(),
            message,
        };
        let client =
            bollard::Docker::connect_with_host(&host).map_err(|e| unavailable(e.to_string()))?;
        let client = match tokio::time::timeout(timeout, client.negotiate_version()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unavailable(engine_message(&e))),
            Err(_) => return Err(unavailable(format!("no answer within {timeout:?}"))),
        };
        let podman = match tokio::time::timeout(timeout, client.version()).await {
            Ok(Ok(v)) => v
                .components
                .unwrap_or_default()
                .iter()
                .any(|c| c.name.contains("Podman")),
            _ => false,
        };
        Ok(Docker {
            client,
            host,
            podman,
        })
    }

    pub(super) fn client(&self) -> &bollard::Docker {
        &self.client
    }
}

#[async_trait]
impl Engine for Docker {
    fn host(&self) -> &str {
        &self.host
    }

    async fn has_gpu_runtime(&self) -> bool {
        match self.client.info().await {
            Ok(info) => info.runtimes.is_some_and(|r| r.contains_key("nvidia")),
            Err(_) => false,
        }
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), EngineError> {
        let present = match self.client.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if status_of(&e) == Some(404) => false,
            Err(e) => return Err(api_error(&self.host, format!("inspect image {image:?}"), e)),
        };
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::Missing => !present,
            PullPolicy::Never if present => false,
            PullPolicy::Never => {
                return Err(EngineError::Image {
                    image: image.to_string(),
                    message: "it is not present locally and the pull policy is \"never\"; build or load it, or set pull = \"missing\"".into(),
                })
            }
        };
        if !pull {
            return Ok(());
        }
        progress(format!("pulling {image}"));
        let options = CreateImageOptionsBuilder::new().from_image(image).build();
        let mut stream = self.client.create_image(Some(options), None, None);
        let mut last_status = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        let line = match info.id {
                            Some(id) => format!("{id}: {status}"),
                            None => status,
                        };
                        if line != last_status {
                            progress(line.clone());
                            last_status = line;
                        }
                    }
                }
                Err(e) if present => {
                    // `always` with a local copy: keep using it when the registry is away.
                    let message = engine_message(&e);
                    tracing::warn!(image, error = %message, "pull failed, using the local image");
                    progress(format!("pull failed ({message}); using the local image"));
                    return Ok(());
                }
                Err(e) => {
                    return Err(EngineError::Image {
                        image: image.to_string(),
                        message: format!(
                            "it is not present locally and pulling it failed: {}",
                            engine_message(&e)
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    async fn ensure_network(&self, name: &str, project: &str) -> Result<(), EngineError> {
        let filters = HashMap::from([("name", vec![name])]);
        let existing = self
            .client
            .list_networks(Some(
                ListNetworksOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| api_error(&self.host, format!("list networks named {name:?}"), e))?;
        if existing.iter().any(|n| n.name.as_deref() == Some(name)) {
            return Ok(());
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(
                labels::PROJECT.to_string(),
                project.to_string(),
            )])),
            ..Default::default()
        };
        match self.client.create_network(request).await {
            Ok(_) => Ok(()),
            // Another start of the same project created it meanwhile.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(api_error(&self.host, format!("create network {name:?}"), e)),
        }
    }

    async fn remove_network(&self, name: &str) {
        if let Err(e) = self.client.remove_network(name).await {
            if !matches!(status_of(&e), Some(404) | Some(403) | Some(409)) {
                tracing::debug!(network = name, error = %engine_message(&e), "network not removed");
            }
        }
    }

    async fn list_by_label(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, EngineError> {
        let filter = format!("{label}={value}");
        let filters = HashMap::from([("label", vec![filter.as_str()])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .client
            .list_containers(Some(options))
            .await
            .map_err(|e| api_error(&self.host, "list containers", e))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let mut ports = BTreeMap::new();
                for p in c.ports.unwrap_or_default() {
                    if let Some(public) = p.public_port {
                        let proto = p.typ.map(|t| t.to_string()).unwrap_or_else(|| "tcp".into());
                        ports.insert((p.private_port, proto), (p.ip.unwrap_or_default(), public));
                    }
                }
                ContainerInfo {
                    id: c.id.unwrap_or_default(),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    state: RunState::parse(&c.state.map(|s| s.to_string()).unwrap_or_default()),
                    exit_code: None,
                    engine_health: None,
                    started_at: None,
                    ports,
                    restart_count: 0,
                    replicas: Vec::new(),
                    problem: None,
                }
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, EngineError> {
        let c = self
            .client
            .inspect_container(id, None)
            .await
            .map_err(|e| api_error(&self.host, format!("inspect container {id}"), e))?;
        let state = c.state.unwrap_or_default();
        let mut ports = BTreeMap::new();
        for (key, bindings) in c.network_settings.and_then(|n| n.ports).unwrap_or_default() {
            let Some((port, proto)) = key.split_once('/') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            if let Some(b) = bindings.unwrap_or_default().into_iter().next() {
                if let Some(host_port) = b.host_port.and_then(|p| p.parse::<u16>().ok()) {
                    ports.insert(
                        (port, proto.to_string()),
                        (b.host_ip.unwrap_or_default(), host_port),
                    );
                }
            }
        }
        Ok(ContainerInfo {
            id: c.id.unwrap_or_else(|| id.to_string()),
            labels: c
                .config
                .and_then(|cfg| cfg.labels)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            state: RunState::parse(&state.status.map(|s| s.to_string()).unwrap_or_default()),
            exit_code: state.exit_code,
            engine_health: state
                .health
                .and_then(|h| h.status)
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty() && s != "none"),
            started_at: state.started_at,
            ports,
            restart_count: c.restart_count.unwrap_or(0),
            replicas: Vec::new(),
            problem: None,
        })
    }

    async fn create_container(&self, plan: &ContainerPlan<'_>) -> Result<String, EngineError> {
        let spec = plan.spec;
        let mut port_bindings = HashMap::new();
        let mut exposed = Vec::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.container_port, p.protocol);
            exposed.push(key.clone());
            port_bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(p.host_ip.clone()),
                    host_port: Some(if p.host_port == 0 {
                        String::new()
                    } else {
                        p.host_port.to_string()
                    }),
                }]),
            );
        }
        let mounts = volume_mounts(plan);
        let restart_policy = match spec.restart {
            RestartPolicy::No => EngineRestart {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            },
            RestartPolicy::Always => EngineRestart {
                name: Some(RestartPolicyNameEnum::ALWAYS),
                maximum_retry_count: None,
            },
            RestartPolicy::OnFailure { max_retries } => EngineRestart {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: max_retries.map(i64::from),
            },
        };
        let device_requests = plan.gpus.then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: Some(match spec.resources.gpus {
                    GpuRequest::Count(n) => i64::from(n),
                    _ => -1,
                }),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        let host_config = HostConfig {
            port_bindings: Some(port_bindings),
            mounts: Some(mounts),
            restart_policy: Some(restart_policy),
            nano_cpus: spec.resources.nano_cpus,
            memory: spec.resources.memory_bytes,
            memory_reservation: spec.resources.memory_reservation_bytes,
            device_requests,
            network_mode: Some(plan.network.to_string()),
            privileged: Some(false),
            readonly_rootfs: Some(spec.run.read_only),
            tmpfs: (!spec.run.tmpfs.is_empty())
                .then(|| spec.run.tmpfs.clone().into_iter().collect()),
            cap_add: (!spec.run.cap_add.is_empty()).then(|| spec.run.cap_add.clone()),
            cap_drop: (!spec.run.cap_drop.is_empty()).then(|| spec.run.cap_drop.clone()),
            security_opt: spec
                .run
                .no_new_privileges
                .then(|| vec!["no-new-privileges:true".to_string()]),
            init: spec.run.init.then_some(true),
            ..Default::default()
        };
        let mut all_labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        all_labels.extend(plan.labels.clone());
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.command.clone(),
            entrypoint: spec.run.entrypoint.clone(),
            user: spec.run.user.clone(),
            working_dir: spec.run.working_dir.clone(),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            exposed_ports: Some(exposed),
            hostname: Some(spec.name.replace('_', "-")),
            labels: Some(all_labels),
            stop_timeout: Some(spec.stop_timeout.as_secs() as i64),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    plan.network.to_string(),
                    EndpointSettings {
                        aliases: Some(vec![spec.name.clone()]),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(plan.name).build();
        match self
            .client
            .create_container(Some(options.clone()), body.clone())
            .await
        {
            Ok(r) => Ok(r.id),
            Err(e) if status_of(&e) == Some(409) => {
                // A leftover container holds the name (for example from a crashed run): replace it.
                self.remove(plan.name, Duration::ZERO).await?;
                self.client
                    .create_container(Some(options), body)
                    .await
                    .map(|r| r.id)
                    .map_err(|e| {
                        api_error(&self.host, format!("create container {:?}", plan.name), e)
                    })
            }
            Err(e) => Err(api_error(
                &self.host,
                format!("create container {:?}", plan.name),
                e,
            )),
        }
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        match self.client.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(api_error(&self.host, "start container", e)),
        }
    }

    async fn restart(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        let options = bollard::query_parameters::RestartContainerOptionsBuilder::new()
            .t(timeout.as_secs() as i32)
            .build();
        self.client
            .restart_container(id, Some(options))
            .await
            .map_err(|e| api_error(&self.host, "restart container", e))
    }

    async fn stop(&self, id: &str, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        let options = StopContainerOptionsBuilder::new()
            .t(timeout.as_secs() as i32)
            .build();
        match self.client.stop_container(id, Some(options)).await {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(304) | Some(404)) => {}
            Err(e) => {
                tracing::debug!(container = id, error = %engine_message(&e), "stop failed; removing by force")
            }
        }
    }

    async fn remove_stopped(&self, id: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.client.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: gone already; 409: removal already in progress.
            Err(e) if matches!(status_of(&e), Some(404) | Some(409)) => Ok(()),
            Err(e) => Err(api_error(&self.host, format!("remove container {id}"), e)),
        }
    }

    async fn logs(&self, id: &str, tail: usize) -> Result<String, EngineError> {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&tail.to_string())
            .build();
        let mut stream = self.client.logs(id, Some(options));
        let mut out = String::new();
        while let Some(item) = stream.next().await {
            let chunk =
                item.map_err(|e| api_error(&self.host, format!("logs of container {id}"), e))?;
            out.push_str(&String::from_utf8_lossy(chunk.as_ref()));
        }
        Ok(out)
    }

    fn log_stream(
        &self,
        id: &str,
        follow: bool,
        tail: usize,
        since: i64,
    ) -> BoxStream<'static, Result<(bool, bytes::Bytes), EngineError>> {
        let tail = if tail == 0 {
            "all".to_string()
        } else {
            tail.to_string()
        };
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .since(i32::try_from(since).unwrap_or(i32::MAX))
            .build();
        let context = format!("logs of container {id}");
        let host = self.host.clone();
        self.client
            .logs(id, Some(options))
            .map(move |item| match item {
                Ok(LogOutput::StdErr { message }) => Ok((true, message)),
                Ok(other) => Ok((false, other.into_bytes())),
                Err(e) => Err(api_error(&host, context.clone(), e)),
            })
            .boxed()
    }

    async fn stats(&self, id: &str) -> Result<Usage, EngineError> {
        let options = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(false)
            .build();
        let mut stream = self.client.stats(id, Some(options));
        let stats = match stream.next().await {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                return Err(api_error(&self.host, format!("stats of container {id}"), e))
            }
            None => return Ok(Usage::default()),
        };
        let total = |c: &Option<bollard::models::ContainerCpuStats>| {
            let c = c.as_ref();
            (
                c.and_then(|c| c.cpu_usage.as_ref())
                    .and_then(|u| u.total_usage)
                    .unwrap_or(0),
                c.and_then(|c| c.system_cpu_usage).unwrap_or(0),
                c.and_then(|c| c.online_cpus).unwrap_or(1),
            )
        };
        let (cpu, system, cpus) = total(&stats.cpu_stats);
        let (pre_cpu, pre_system, _) = total(&stats.precpu_stats);
        let cpu_delta = cpu.saturating_sub(pre_cpu) as f64;
        let system_delta = system.saturating_sub(pre_system) as f64;
        let cpu_percent = if system_delta > 0.0 {
            cpu_delta / system_delta * f64::from(cpus) * 100.0
        } else {
            0.0
        };
        let memory = stats.memory_stats.unwrap_or_default();
        // Like `docker stats`: page cache the kernel can drop is not counted as used.
        let cache = memory
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("inactive_file")
                    .or_else(|| s.get("total_inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        let (rx, tx) = stats
            .networks
            .unwrap_or_default()
            .values()
            .fold((0, 0), |(rx, tx), n| {
                (rx + n.rx_bytes.unwrap_or(0), tx + n.tx_bytes.unwrap_or(0))
            });
        Ok(Usage {
            cpu_percent,
            memory_bytes: memory.usage.unwrap_or(0).saturating_sub(cache),
            memory_limit_bytes: memory.limit.unwrap_or(0),
            network_rx_bytes: rx,
            network_tx_bytes: tx,
        })
    }

    fn container_events(
        &self,
        project: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, EngineError>> {
        let label = format!("{}={project}", labels::PROJECT);
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            (
                "event",
                // Podman's Docker-compatible API filters on its own names ("died") and says
                // "remove" where Docker says "destroy"; Docker ignores names it lacks.
                vec![
                    "start".to_string(),
                    "die".to_string(),
                    "died".to_string(),
                    "destroy".to_string(),
                    "remove".to_string(),
                ],
            ),
            ("label", vec![label]),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        let host = self.host.clone();
        self.client
            .events(Some(options))
            .map(move |item| {
                let event = item.map_err(|e| api_error(&host, "follow Engine events", e))?;
                let actor = event.actor.unwrap_or_default();
                let exit_code = actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("exitCode"))
                    .and_then(|c| c.parse().ok());
                let action = match event.action.unwrap_or_default().as_str() {
                    "remove" => "destroy".to_string(),
                    "died" => "die".to_string(),
                    other => other.to_string(),
                };
                Ok(ContainerEvent {
                    id: actor.id.unwrap_or_default(),
                    action,
                    exit_code,
                })
            })
            .boxed()
    }

    async fn engine_info(&self) -> Result<EngineInfo, EngineError> {
        let info = self
            .client
            .info()
            .await
            .map_err(|e| api_error(&self.host, "Engine info", e))?;
        Ok(EngineInfo {
            version: info.server_version.unwrap_or_default(),
            cpus: info.ncpu.unwrap_or(0).max(0) as u32,
            memory_bytes: info.mem_total.unwrap_or(0).max(0) as u64,
        })
    }

    async fn run_once(
        &self,
        image: &str,
        command: Option<Vec<String>>,
        env: Vec<String>,
        labels: HashMap<String, String>,
    ) -> Result<ExecOutput, EngineError> {
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: command,
            env: Some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .client
            .create_container(None, body)
            .await
            .map_err(|e| match status_of(&e) {
                Some(404) => EngineError::Image {
                    image: image.to_string(),
                    message: "it is not present locally".into(),
                },
                _ => api_error(&self.host, format!("create a container from {image:?}"), e),
            })?
            .id;
        let guard = RemoveOnDrop {
            docker: self.clone(),
            id: Some(id.clone()),
        };
        self.start(&id).await?;
        let mut wait = self.client.wait_container(&id, None);
        let exit_code = match wait.next().await {
            Some(Ok(r)) => r.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(api_error(&self.host, format!("wait for container {id}"), e))
            }
            None => -1,
        };
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
        let mut logs = self.client.logs(&id, Some(options));
        let (mut stdout, mut stderr) = (String::new(), String::new());
        while let Some(item) = logs.next().await {
            match item.map_err(|e| api_error(&self.host, format!("logs of container {id}"), e))? {
                LogOutput::StdErr { message } => {
                    stderr.push_str(&String::from_utf8_lossy(&message))
                }
                other => stdout.push_str(&String::from_utf8_lossy(other.as_ref())),
            }
        }
        drop(guard);
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }

    async fn run_image_healthcheck(&self, id: &str) -> Option<Result<(), String>> {
        if !self.podman {
            return None;
        }
        let test = match self.client.inspect_container(id, None).await {
            Ok(c) => c.config.and_then(|c| c.healthcheck).and_then(|h| h.test),
            Err(e) => return Some(Err(engine_message(&e))),
        };
        // HEALTHCHECK's forms: ["CMD", args...], ["CMD-SHELL", line], ["NONE"].
        let command: Vec<String> = match test.as_deref() {
            Some([kind, args @ ..]) if kind == "CMD" && !args.is_empty() => args.to_vec(),
            Some([kind, line]) if kind == "CMD-SHELL" => {
                vec!["/bin/sh".into(), "-c".into(), line.clone()]
            }
            _ => return None,
        };
        Some(match self.exec(id, &command).await {
            Ok(out) if out.exit_code == 0 => Ok(()),
            Ok(out) => Err(format!(
                "the image's HEALTHCHECK {command:?} exited with {}: {}",
                out.exit_code,
                format!("{}{}", out.stdout, out.stderr).trim()
            )),
            Err(e) => Err(e.to_string()),
        })
    }

    async fn exec(&self, id: &str, command: &[String]) -> Result<ExecOutput, EngineError> {
        let exec = self
            .client
            .create_exec(
                id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(command.to_vec()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| api_error(&self.host, format!("exec in container {id}"), e))?;
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .client
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| api_error(&self.host, format!("exec in container {id}"), e))?
        {
            while let Some(item) = output.next().await {
                match item
                    .map_err(|e| api_error(&self.host, format!("exec in container {id}"), e))?
                {
                    LogOutput::StdErr { message } => {
                        stderr.push_str(&String::from_utf8_lossy(&message))
                    }
                    other => stdout.push_str(&String::from_utf8_lossy(other.as_ref())),
                }
            }
        }
        let inspect = self
            .client
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| api_error(&self.host, format!("exec in container {id}"), e))?;
        Ok(ExecOutput {
            exit_code: inspect.exit_code.unwrap_or(-1),
            stdout,
            stderr,
        })
    }
}

/// Removes a one-off container when dropped, whether its run finished or was abandoned.
struct RemoveOnDrop {
    docker: Docker,
    id: Option<String>,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let (Some(id), Ok(handle)) = (self.id.take(), tokio::runtime::Handle::try_current()) {
            let docker = self.docker.clone();
            handle.spawn(async move {
                let _ = docker.remove(&id, Duration::ZERO).await;
            });
        }
    }
}
