//! Docker Swarm: each service of the stack is a Swarm service with its replicas spread over the
//! cluster's nodes. The seam's "container" is the Swarm service (its id); `ContainerInfo`
//! aggregates its tasks, and lists each one as a `Replica` with its node and published ports.
//! Swarm reports no task events, so `container_events` watches the tasks (once a second) and
//! says `die` when a replica is lost and `start` once all of them run again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, EndpointSpecModeEnum, GenericResourcesInner,
    GenericResourcesInnerDiscreteResourceSpec, HealthConfig, Limit, LocalNodeState, Mount,
    MountTmpfsOptions, MountType, NetworkAttachmentConfig, NetworkCreateRequest, Node, NodeState,
    ResourceObject, SecretSpec, Service, ServiceSpec as SwarmServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatusStateEnum, Task, TaskSpec,
    TaskSpecContainerSpec, TaskSpecContainerSpecFile, TaskSpecContainerSpecPrivileges,
    TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecPlacementPreferences,
    TaskSpecPlacementSpread, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListNetworksOptionsBuilder, ListNodesOptions, ListSecretsOptionsBuilder,
    ListServicesOptionsBuilder, ListTasksOptionsBuilder, LogsOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;

use super::docker::{api_error, engine_message, status_of};
use super::{
    labels, ApiErrorKind, ContainerEvent, ContainerInfo, ContainerPlan, Docker, Engine,
    EngineError, EngineInfo, ExecOutput, Replica, RunState, Usage,
};
use crate::config::spec::{
    EndpointMode, FailureAction, GpuRequest, Probe, Protocol, PublishMode, PullPolicy,
    RestartPolicy, SwarmOptions, UpdateOrder,
};

/// On a secret: the Swarm service it was made for, so that its removal takes the secret along.
const SECRET_OF: &str = "dspy-agent.secret-of";
/// On a service: how many replicas it runs once started (it is created with none, so that it
/// starts only after its dependencies are healthy, as a container does).
const REPLICAS: &str = "dspy-agent.replicas";
/// On a service: its health check as JSON. The Engine reports a service's health check under a
/// key that bollard's types do not read, so a spec read back (to scale or update it) would lose
/// it; it is put back from here.
const HEALTH_CHECK: &str = "dspy-agent.health-check";
/// How often the task watcher looks.
const WATCH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Swarm {
    docker: Docker,
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn swarm_error(host: &str, message: String) -> EngineError {
    EngineError::Api {
        context: format!("the swarm backend at {host}"),
        message,
        kind: ApiErrorKind::Other,
    }
}

impl Swarm {
    /// Connects to the Engine at `host`, which must be a manager of an active swarm.
    pub async fn connect(host: Option<&str>, timeout: Duration) -> Result<Swarm, EngineError> {
        let docker = Docker::connect(host, timeout).await?;
        let host = docker.host().to_string();
        let info = docker
            .client()
            .info()
            .await
            .map_err(|e| api_error(&host, "system info", e))?;
        let swarm = info.swarm.unwrap_or_default();
        if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
            return Err(swarm_error(&host, format!(
                "this Docker Engine is not part of a swarm (its state: {}). Run `docker swarm init` on it (or join it to a swarm as a manager), or use backend = \"docker\"",
                swarm.local_node_state.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into())
            )));
        }
        if swarm.control_available != Some(true) {
            return Err(swarm_error(&host,
                "this Docker Engine is a swarm worker, not a manager: point docker_host (DOCKER_HOST) at a manager; `docker node ls` on one lists them".into(),
            ));
        }
        Ok(Swarm { docker })
    }

    fn client(&self) -> &bollard::Docker {
        self.docker.client()
    }

    fn err(&self, context: impl Into<String>, e: bollard::errors::Error) -> EngineError {
        api_error(self.docker.host(), context, e)
    }

    async fn service(&self, id: &str) -> Result<Service, EngineError> {
        self.client()
            .inspect_service(id, None)
            .await
            .map_err(|e| self.err(format!("inspect swarm service {id}"), e))
    }

    /// The tasks of these services, and the cluster's nodes by id.
    async fn tasks_and_nodes(
        &self,
        service_ids: &[String],
    ) -> Result<(Vec<Task>, HashMap<String, Node>), EngineError> {
        if service_ids.is_empty() {
            return Ok((Vec::new(), HashMap::new()));
        }
        let filters = HashMap::from([("service", service_ids.to_vec())]);
        let tasks = self.client().list_tasks(Some(
            ListTasksOptionsBuilder::new().filters(&filters).build(),
        ));
        let nodes = self.client().list_nodes(None::<ListNodesOptions>);
        let (tasks, nodes) = tokio::join!(tasks, nodes);
        let tasks = tasks.map_err(|e| self.err("list swarm tasks", e))?;
        let nodes = nodes
            .map_err(|e| self.err("list swarm nodes", e))?
            .into_iter()
            .filter_map(|n| Some((n.id.clone()?, n)))
            .collect();
        Ok((tasks, nodes))
    }

    async fn services_by_label(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<Service>, EngineError> {
        let filters = HashMap::from([("label", vec![format!("{label}={value}")])]);
        self.client()
            .list_services(Some(
                ListServicesOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| self.err(format!("list swarm services with {label}={value}"), e))
    }

    /// What the container runs, as `docker run` decides it: the entry point (the service's, else
    /// the image's) followed by the command (the service's; else the image's, unless the entry
    /// point was replaced). The secret wrapper must run it itself.
    async fn full_command(
        &self,
        spec: &crate::config::spec::ServiceSpec,
    ) -> Result<Vec<String>, EngineError> {
        // A replaced entry point drops the image's command too: the image is not needed then.
        let image = match spec.run.entrypoint {
            Some(_) => None,
            None => Some(
                self.client()
                    .inspect_image(&spec.image)
                    .await
                    .map_err(|e| self.err(format!("inspect image {:?}", spec.image), e))?
                    .config
                    .unwrap_or_default(),
            ),
        };
        let mut command = match &spec.run.entrypoint {
            Some(e) => e.clone(),
            None => image
                .as_ref()
                .and_then(|c| c.entrypoint.clone())
                .unwrap_or_default(),
        };
        match &spec.command {
            Some(c) => command.extend(c.iter().cloned()),
            None => command.extend(image.and_then(|c| c.cmd).unwrap_or_default()),
        }
        Ok(command)
    }

    /// Makes one Swarm secret per secret variable (named by its content, as secrets cannot
    /// change) and returns the references the service mounts.
    async fn make_secrets(
        &self,
        plan: &ContainerPlan<'_>,
    ) -> Result<Vec<TaskSpecContainerSpecSecrets>, EngineError> {
        let mut refs = Vec::new();
        for key in &plan.spec.secret_env {
            let value = plan.spec.env.get(key).cloned().unwrap_or_default();
            let digest = short_hash(format!("{}\0{key}\0{value}", plan.name).as_bytes());
            let name = format!(
                "{}-{}-{digest}",
                plan.name,
                key.to_lowercase().replace('_', "-")
            );
            let mut secret_labels: HashMap<String, String> =
                plan.labels.clone().into_iter().collect();
            secret_labels.insert(SECRET_OF.into(), plan.name.to_string());
            let spec = SecretSpec {
                name: Some(name.clone()),
                labels: Some(secret_labels),
                data: Some(base64::engine::general_purpose::STANDARD.encode(value.as_bytes())),
                ..Default::default()
            };
            let id = match self.client().create_secret(spec).await {
                Ok(r) => r.id,
                // Made by an earlier start with the same value.
                Err(e) if status_of(&e) == Some(409) => self
                    .client()
                    .inspect_secret(&name)
                    .await
                    .map_err(|e| self.err(format!("inspect secret {name:?}"), e))?
                    .id
                    .unwrap_or_default(),
                Err(e) => return Err(self.err(format!("create secret {name:?}"), e)),
            };
            refs.push(TaskSpecContainerSpecSecrets {
                file: Some(TaskSpecContainerSpecFile {
                    name: Some(secret_file(key)),
                    uid: Some("0".into()),
                    gid: Some("0".into()),
                    // Readable by the container's own user, whoever that is.
                    mode: Some(0o444),
                }),
                secret_id: Some(id),
                secret_name: Some(name),
            });
        }
        Ok(refs)
    }

    /// Removes the secrets made for a service; says whether any is left (still in use by a
    /// task that is ending).
    async fn remove_secrets_of(&self, service_name: &str) -> bool {
        let filters = HashMap::from([("label", vec![format!("{SECRET_OF}={service_name}")])]);
        let Ok(secrets) = self
            .client()
            .list_secrets(Some(
                ListSecretsOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
        else {
            return false;
        };
        let mut left = false;
        for s in secrets {
            if let Some(id) = s.id {
                if let Err(e) = self.client().delete_secret(&id).await {
                    tracing::debug!(secret = id, error = %engine_message(&e), "secret not removed");
                    left = true;
                }
            }
        }
        left
    }

    async fn spec_for(&self, plan: &ContainerPlan<'_>) -> Result<SwarmServiceSpec, EngineError> {
        let spec = plan.spec;
        let options = spec.swarm.clone().unwrap_or_default();
        let api = self.client().client_version();
        let api_at_least = |minor: usize| api.major_version > 1 || api.minor_version >= minor;
        if spec.run.no_new_privileges && !api_at_least(46) {
            return Err(swarm_error(self.host(), format!(
                "services.{}.no_new_privileges needs a swarm whose Engine API is 1.46 or newer (Docker 27), and this one speaks {}.{}: update the Engine, or remove it",
                spec.name, api.major_version, api.minor_version
            )));
        }
        let secrets = self.make_secrets(plan).await?;
        let mut env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| !spec.secret_env.contains(*k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // Swarm hands secrets over as files: a small wrapper exports them as the variables the
        // service expects, then runs its own command; `KEY_FILE` names each file too.
        let (command, args) = if secrets.is_empty() {
            (spec.run.entrypoint.clone(), spec.command.clone())
        } else {
            let original = self.full_command(spec).await?;
            let exports: String = spec
                .secret_env
                .iter()
                .map(|k| {
                    format!(
                        "{k}=\"$(cat /run/secrets/{})\"; export {k}; ",
                        secret_file(k)
                    )
                })
                .collect();
            for k in &spec.secret_env {
                env.push(format!("{k}_FILE=/run/secrets/{}", secret_file(k)));
            }
            let mut args = vec!["sh".to_string()];
            args.extend(original);
            (
                Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("{exports}exec \"$@\""),
                ]),
                Some(args),
            )
        };
        let mut mounts = super::docker::volume_mounts(plan);
        for (target, opts) in &spec.run.tmpfs {
            mounts.push(Mount {
                target: Some(target.clone()),
                typ: Some(MountType::TMPFS),
                tmpfs_options: Some(tmpfs_options(&spec.name, opts)?),
                ..Default::default()
            });
        }
        let health_check = match &spec.healthcheck.probe {
            // Swarm runs it in each replica, wherever that is; a task counts as running only
            // once it passes.
            Probe::Exec { command } => Some(HealthConfig {
                test: Some([vec!["CMD".to_string()], command.clone()].concat()),
                interval: Some(nanos(spec.healthcheck.interval)),
                timeout: Some(nanos(spec.healthcheck.timeout)),
                retries: Some(i64::from(spec.healthcheck.retries)),
                start_period: Some(nanos(spec.healthcheck.start_period)),
                ..Default::default()
            }),
            _ => None,
        };
        let generic = match spec.resources.gpus {
            GpuRequest::Count(n) => Some(vec![GenericResourcesInner {
                discrete_resource_spec: Some(GenericResourcesInnerDiscreteResourceSpec {
                    kind: Some("NVIDIA-GPU".into()),
                    value: Some(i64::from(n)),
                }),
                ..Default::default()
            }]),
            GpuRequest::All => {
                return Err(swarm_error(self.docker.host(), format!(
                    "services.{}.resources.gpus = \"all\" cannot be placed on a swarm: Swarm reserves GPUs by count; write gpus = N (the nodes advertise theirs as the generic resource NVIDIA-GPU)",
                    spec.name
                )))
            }
            // Which node has a GPU is the swarm's to say: request a count to be placed on one.
            GpuRequest::Auto | GpuRequest::None => None,
        };
        let mut all_labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        all_labels.extend(plan.labels.clone());
        all_labels.insert(REPLICAS.into(), options.replicas.to_string());
        if let Some(h) = &health_check {
            all_labels.insert(
                HEALTH_CHECK.into(),
                serde_json::to_string(h).expect("a health check serializes"),
            );
        }
        let restart = match spec.restart {
            RestartPolicy::No => (TaskSpecRestartPolicyConditionEnum::NONE, None),
            RestartPolicy::Always => (TaskSpecRestartPolicyConditionEnum::ANY, None),
            RestartPolicy::OnFailure { max_retries } => (
                TaskSpecRestartPolicyConditionEnum::ON_FAILURE,
                max_retries.map(i64::from),
            ),
        };
        let task_template = TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(spec.image.clone()),
                labels: (!spec.labels.is_empty())
                    .then(|| spec.labels.clone().into_iter().collect()),
                command,
                args,
                hostname: Some(spec.name.replace('_', "-")),
                env: Some(env),
                dir: spec.run.working_dir.clone(),
                user: spec.run.user.clone(),
                read_only: Some(spec.run.read_only),
                mounts: Some(mounts),
                stop_grace_period: Some(nanos(spec.stop_timeout)),
                health_check,
                secrets: (!secrets.is_empty()).then_some(secrets),
                init: spec.run.init.then_some(true),
                capability_add: (!spec.run.cap_add.is_empty()).then(|| spec.run.cap_add.clone()),
                capability_drop: (!spec.run.cap_drop.is_empty()).then(|| spec.run.cap_drop.clone()),
                privileges: spec
                    .run
                    .no_new_privileges
                    .then(|| TaskSpecContainerSpecPrivileges {
                        no_new_privileges: Some(true),
                        ..Default::default()
                    }),
                ..Default::default()
            }),
            resources: Some(TaskSpecResources {
                limits: Some(Limit {
                    nano_cpus: spec.resources.nano_cpus,
                    memory_bytes: spec.resources.memory_bytes,
                    ..Default::default()
                }),
                reservations: Some(ResourceObject {
                    memory_bytes: spec.resources.memory_reservation_bytes,
                    generic_resources: generic,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(restart.0),
                max_attempts: restart.1,
                delay: Some(nanos(Duration::from_secs(1))),
                ..Default::default()
            }),
            placement: Some(placement(&options)),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(plan.network.to_string()),
                aliases: Some(vec![spec.name.clone()]),
                ..Default::default()
            }]),
            ..Default::default()
        };
        Ok(SwarmServiceSpec {
            name: Some(plan.name.to_string()),
            labels: Some(all_labels),
            task_template: Some(task_template),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                ..Default::default()
            }),
            update_config: Some(update_config(&options)),
            endpoint_spec: Some(EndpointSpec {
                mode: Some(match options.endpoint_mode {
                    EndpointMode::Vip => EndpointSpecModeEnum::VIP,
                    EndpointMode::Dnsrr => EndpointSpecModeEnum::DNSRR,
                }),
                ports: Some(
                    spec.ports
                        .iter()
                        .map(|p| EndpointPortConfig {
                            protocol: Some(match p.protocol {
                                Protocol::Tcp => EndpointPortConfigProtocolEnum::TCP,
                                Protocol::Udp => EndpointPortConfigProtocolEnum::UDP,
                            }),
                            target_port: Some(i64::from(p.container_port)),
                            published_port: (p.host_port != 0).then_some(i64::from(p.host_port)),
                            publish_mode: Some(match options.publish_mode {
                                PublishMode::Ingress => EndpointPortConfigPublishModeEnum::INGRESS,
                                PublishMode::Host => EndpointPortConfigPublishModeEnum::HOST,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        })
    }

    /// Changes a service's spec with `change`, read fresh: Swarm itself bumps a new service's
    /// version (allocating its endpoint), so an update out of sequence is read again and
    /// retried.
    async fn update(
        &self,
        id: &str,
        what: &str,
        change: impl Fn(&mut SwarmServiceSpec),
    ) -> Result<(), EngineError> {
        let mut attempt = 0;
        loop {
            let service = self.service(id).await?;
            let version = service.version.and_then(|v| v.index).unwrap_or(0);
            let mut spec = service.spec.unwrap_or_default();
            change(&mut spec);
            restore_health_check(&mut spec);
            let options = UpdateServiceOptionsBuilder::new()
                .version(i32::try_from(version).unwrap_or(i32::MAX))
                .build();
            match self.client().update_service(id, spec, options, None).await {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 10 && engine_message(&e).contains("out of sequence") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(self.err(format!("{what}: swarm service {id}"), e)),
            }
        }
    }

    async fn scale(&self, id: &str, replicas: i64) -> Result<(), EngineError> {
        self.update(id, &format!("scale to {replicas}"), |spec| {
            if let Some(r) = spec.mode.as_mut().and_then(|m| m.replicated.as_mut()) {
                r.replicas = Some(replicas);
            }
        })
        .await
    }

    /// The services with their tasks, as the seam sees them.
    async fn infos(&self, services: Vec<Service>) -> Result<Vec<ContainerInfo>, EngineError> {
        let ids: Vec<String> = services.iter().filter_map(|s| s.id.clone()).collect();
        let (tasks, nodes) = self.tasks_and_nodes(&ids).await?;
        let manager_addr = self.manager_addr().await;
        Ok(services
            .into_iter()
            .map(|s| aggregate(s, &tasks, &nodes, &manager_addr))
            .collect())
    }

    async fn manager_addr(&self) -> String {
        self.client()
            .info()
            .await
            .ok()
            .and_then(|i| i.swarm?.node_addr)
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// The container of a replica that runs on this (the manager's) node, for `exec`.
    async fn local_container(&self, service_id: &str) -> Result<String, EngineError> {
        let info = self
            .client()
            .info()
            .await
            .map_err(|e| self.err("system info", e))?;
        let here = info.swarm.and_then(|s| s.node_id).unwrap_or_default();
        let (tasks, nodes) = self.tasks_and_nodes(&[service_id.to_string()]).await?;
        let mut elsewhere = BTreeSet::new();
        for t in current(&tasks, service_id) {
            let running = t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING);
            let node = t.node_id.clone().unwrap_or_default();
            if running && node == here {
                if let Some(id) = t
                    .status
                    .as_ref()
                    .and_then(|s| s.container_status.as_ref()?.container_id.clone())
                {
                    return Ok(id);
                }
            }
            elsewhere.insert(node_name(&nodes, &node));
        }
        Err(swarm_error(self.docker.host(), format!(
            "no replica of this service runs on the manager's node; its replicas run on {}: run the command with `docker -H NODE exec`, or use a probe other than exec",
            elsewhere.into_iter().collect::<Vec<_>>().join(", ")
        )))
    }
}

fn short_hash(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn secret_file(key: &str) -> String {
    format!("dspy-agent-{key}")
}

fn tmpfs_options(service: &str, opts: &str) -> Result<MountTmpfsOptions, EngineError> {
    let mut out = MountTmpfsOptions::default();
    for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("size", v)) => {
                out.size_bytes = Some(
                    crate::config::spec::parse_memory("tmpfs size", v)
                        .map_err(|e| swarm_error("swarm", e.to_string()))?,
                )
            }
            Some(("mode", v)) => {
                out.mode = Some(i64::from_str_radix(v, 8).map_err(|_| {
                    swarm_error("swarm", format!("services.{service}.tmpfs: mode {v:?} is not octal"))
                })?)
            }
            _ => {
                return Err(swarm_error("swarm", format!(
                    "services.{service}.tmpfs: Swarm takes only size= and mode= for a tmpfs, not {opt:?}; remove it"
                )))
            }
        }
    }
    Ok(out)
}

/// Puts a spec's health check back from its label after a read (see `HEALTH_CHECK`).
fn restore_health_check(spec: &mut SwarmServiceSpec) {
    let saved = spec
        .labels
        .as_ref()
        .and_then(|l| serde_json::from_str::<HealthConfig>(l.get(HEALTH_CHECK)?).ok());
    if let (Some(h), Some(c)) = (
        saved,
        spec.task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut()),
    ) {
        c.health_check.get_or_insert(h);
    }
}

fn placement(o: &SwarmOptions) -> TaskSpecPlacement {
    TaskSpecPlacement {
        constraints: (!o.constraints.is_empty()).then(|| o.constraints.clone()),
        preferences: (!o.spread.is_empty()).then(|| {
            o.spread
                .iter()
                .map(|s| TaskSpecPlacementPreferences {
                    spread: Some(TaskSpecPlacementSpread {
                        spread_descriptor: Some(s.clone()),
                    }),
                })
                .collect()
        }),
        max_replicas: o.max_per_node.map(i64::from),
        ..Default::default()
    }
}

fn update_config(o: &SwarmOptions) -> ServiceSpecUpdateConfig {
    ServiceSpecUpdateConfig {
        parallelism: Some(i64::from(o.update.parallelism)),
        delay: Some(nanos(o.update.delay)),
        order: Some(match o.update.order {
            UpdateOrder::StopFirst => ServiceSpecUpdateConfigOrderEnum::STOP_FIRST,
            UpdateOrder::StartFirst => ServiceSpecUpdateConfigOrderEnum::START_FIRST,
        }),
        failure_action: Some(match o.update.failure_action {
            FailureAction::Pause => ServiceSpecUpdateConfigFailureActionEnum::PAUSE,
            FailureAction::Continue => ServiceSpecUpdateConfigFailureActionEnum::CONTINUE,
            FailureAction::Rollback => ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK,
        }),
        monitor: o.update.monitor.map(nanos),
        ..Default::default()
    }
}

fn node_name(nodes: &HashMap<String, Node>, id: &str) -> String {
    nodes
        .get(id)
        .and_then(|n| n.description.as_ref()?.hostname.clone())
        .unwrap_or_else(|| id.chars().take(12).collect())
}

fn node_ready(nodes: &HashMap<String, Node>, id: &str) -> bool {
    nodes.get(id).and_then(|n| n.status.as_ref()?.state) == Some(NodeState::READY)
}

/// The newest task of each slot of `service_id`: what runs (or tries to) now.
fn current<'a>(tasks: &'a [Task], service_id: &str) -> Vec<&'a Task> {
    let mut by_slot: BTreeMap<i64, &Task> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t.service_id.as_deref() == Some(service_id))
    {
        let slot = t.slot.unwrap_or(0);
        let newer = by_slot.get(&slot).is_none_or(|old| {
            t.created_at.as_deref().unwrap_or("") > old.created_at.as_deref().unwrap_or("")
        });
        if newer {
            by_slot.insert(slot, t);
        }
    }
    by_slot.into_values().collect()
}

fn task_state(t: &Task) -> Option<TaskState> {
    t.status.as_ref().and_then(|s| s.state)
}

/// A Swarm service and its tasks as one seam container.
fn aggregate(
    service: Service,
    tasks: &[Task],
    nodes: &HashMap<String, Node>,
    manager_addr: &str,
) -> ContainerInfo {
    let id = service.id.clone().unwrap_or_default();
    let spec = service.spec.clone().unwrap_or_default();
    let desired = spec
        .mode
        .as_ref()
        .and_then(|m| m.replicated.as_ref()?.replicas)
        .unwrap_or(1);
    let ingress: BTreeMap<(u16, String), (String, u16)> = service
        .endpoint
        .as_ref()
        .and_then(|e| e.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.publish_mode != Some(EndpointPortConfigPublishModeEnum::HOST))
        .filter_map(|p| port_entry(&p, manager_addr))
        .collect();
    let now = current(tasks, &id);
    let replicas: Vec<Replica> = now
        .iter()
        .filter(|t| {
            t.desired_state != Some(TaskState::SHUTDOWN)
                || task_state(t) == Some(TaskState::COMPLETE)
        })
        .map(|t| {
            let node_id = t.node_id.clone().unwrap_or_default();
            let node_addr = nodes
                .get(&node_id)
                .and_then(|n| n.status.as_ref()?.addr.clone())
                .unwrap_or_default();
            let status = t.status.clone().unwrap_or_default();
            let mut ports: BTreeMap<(u16, String), (String, u16)> = status
                .port_status
                .and_then(|p| p.ports)
                .unwrap_or_default()
                .iter()
                .filter_map(|p| port_entry(p, &node_addr))
                .collect();
            if ports.is_empty() && !node_addr.is_empty() {
                // Through the routing mesh, any node's address reaches the service.
                ports = ingress
                    .iter()
                    .map(|(k, (_, port))| (k.clone(), (node_addr.clone(), *port)))
                    .collect();
            }
            let ready = node_ready(nodes, &node_id);
            let state = match status.state {
                Some(TaskState::RUNNING) if !ready => "node-down".to_string(),
                Some(s) => s.to_string(),
                None => "unknown".to_string(),
            };
            Replica {
                slot: u32::try_from(t.slot.unwrap_or(0)).unwrap_or(0),
                task_id: t.id.clone().unwrap_or_default(),
                node: if node_id.is_empty() {
                    String::new()
                } else {
                    node_name(nodes, &node_id)
                },
                node_addr,
                state,
                started_at_ms: (status.state == Some(TaskState::RUNNING))
                    .then(|| {
                        status
                            .timestamp
                            .as_deref()
                            .and_then(crate::util::rfc3339_ms)
                    })
                    .flatten(),
                ports,
                error: status.err.filter(|e| !e.is_empty()),
            }
        })
        .collect();
    let running = replicas.iter().filter(|r| r.state == "running").count() as i64;
    let update = service.update_status.as_ref().and_then(|u| u.state);
    let updating = matches!(
        update,
        Some(
            ServiceUpdateStatusStateEnum::UPDATING | ServiceUpdateStatusStateEnum::ROLLBACK_STARTED
        )
    );
    let mut problem = None;
    if matches!(
        update,
        Some(ServiceUpdateStatusStateEnum::PAUSED | ServiceUpdateStatusStateEnum::ROLLBACK_PAUSED)
    ) {
        problem = Some(format!(
            "its rolling update paused: {}",
            service
                .update_status
                .as_ref()
                .and_then(|u| u.message.clone())
                .unwrap_or_default()
        ));
    }
    if let Some(r) = replicas.iter().find(|r| {
        r.state == "pending"
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("no suitable node"))
    }) {
        problem = Some(format!(
            "Swarm cannot place replica {}: {}; check services.NAME.swarm.constraints against the nodes' labels (`docker node ls`, `docker node inspect`)",
            r.slot,
            r.error.clone().unwrap_or_default()
        ));
    }
    let failed = now
        .iter()
        .find(|t| matches!(task_state(t), Some(TaskState::FAILED | TaskState::REJECTED)));
    let completed = !now.is_empty()
        && now
            .iter()
            .all(|t| task_state(t) == Some(TaskState::COMPLETE));
    let restarts_tasks = spec
        .task_template
        .as_ref()
        .and_then(|t| t.restart_policy.as_ref()?.condition)
        != Some(TaskSpecRestartPolicyConditionEnum::NONE);
    let state = if problem.is_some() {
        RunState::Dead
    } else if completed || (failed.is_some() && !restarts_tasks) {
        RunState::Exited
    } else if failed.is_some() && running < desired {
        RunState::Restarting
    } else if running >= desired && desired > 0 && !updating {
        RunState::Running
    } else {
        RunState::Created
    };
    let exit_code = if completed {
        Some(0)
    } else {
        failed.and_then(|t| t.status.as_ref()?.container_status.as_ref()?.exit_code)
    };
    let restarts = tasks
        .iter()
        .filter(|t| t.service_id.as_deref() == Some(id.as_str()))
        .filter(|t| matches!(task_state(t), Some(TaskState::FAILED | TaskState::REJECTED)))
        .count() as i64;
    let ports = replicas
        .iter()
        .find(|r| r.state == "running" && !r.ports.is_empty())
        .map(|r| r.ports.clone())
        .unwrap_or(ingress);
    ContainerInfo {
        id,
        labels: spec.labels.unwrap_or_default().into_iter().collect(),
        state,
        exit_code,
        engine_health: None,
        // The latest start: uptime counts from the last replica that came back.
        started_at: now
            .iter()
            .filter(|t| task_state(t) == Some(TaskState::RUNNING))
            .filter_map(|t| t.status.as_ref()?.timestamp.clone())
            .max(),
        ports,
        restart_count: restarts,
        replicas,
        problem,
    }
}

fn port_entry(p: &EndpointPortConfig, addr: &str) -> Option<((u16, String), (String, u16))> {
    let target = u16::try_from(p.target_port?).ok()?;
    let published = u16::try_from(p.published_port?).ok()?;
    let proto = p
        .protocol
        .map(|x| x.to_string())
        .unwrap_or_else(|| "tcp".into());
    Some(((target, proto), (addr.to_string(), published)))
}

#[async_trait]
impl Engine for Swarm {
    fn host(&self) -> &str {
        self.docker.host()
    }

    async fn has_gpu_runtime(&self) -> bool {
        // GPUs are asked of the swarm by count, never probed on the manager.
        false
    }

    fn publishes_here(&self) -> bool {
        false
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), EngineError> {
        // Each node pulls for its own tasks; the manager's copy is what the secret wrapper reads
        // the image's command from, and what `pull` checks the name against.
        self.docker.ensure_image(image, policy, progress).await
    }

    async fn ensure_network(&self, name: &str, project: &str) -> Result<(), EngineError> {
        let filters = HashMap::from([("name", vec![name])]);
        let existing = self
            .client()
            .list_networks(Some(
                ListNetworksOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| self.err(format!("list networks named {name:?}"), e))?;
        if let Some(n) = existing.iter().find(|n| n.name.as_deref() == Some(name)) {
            if n.driver.as_deref() != Some("overlay") {
                return Err(swarm_error(self.host(), format!(
                    "the network {name:?} exists with the {:?} driver, and the swarm backend needs an overlay network: remove it (`docker network rm {name}`) once nothing uses it",
                    n.driver.clone().unwrap_or_default()
                )));
            }
            return Ok(());
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("overlay".into()),
            attachable: Some(true),
            labels: Some(HashMap::from([(
                labels::PROJECT.to_string(),
                project.to_string(),
            )])),
            ..Default::default()
        };
        match self.client().create_network(request).await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(self.err(format!("create overlay network {name:?}"), e)),
        }
    }

    async fn remove_network(&self, name: &str) {
        self.docker.remove_network(name).await
    }

    async fn list_by_label(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, EngineError> {
        let services = self.services_by_label(label, value).await?;
        self.infos(services).await
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, EngineError> {
        let service = self.service(id).await?;
        Ok(self.infos(vec![service]).await?.remove(0))
    }

    async fn create_container(&self, plan: &ContainerPlan<'_>) -> Result<String, EngineError> {
        let spec = self.spec_for(plan).await?;
        match self.client().create_service(spec.clone(), None).await {
            Ok(r) => Ok(r.id.unwrap_or_default()),
            Err(e) if status_of(&e) == Some(409) => {
                // A leftover service holds the name: replace it.
                self.remove(plan.name, Duration::ZERO).await?;
                self.client()
                    .create_service(spec, None)
                    .await
                    .map(|r| r.id.unwrap_or_default())
                    .map_err(|e| self.err(format!("create swarm service {:?}", plan.name), e))
            }
            Err(e) => Err(self.err(format!("create swarm service {:?}", plan.name), e)),
        }
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        // Scaled to its replicas; once it runs, Swarm itself replaces lost ones.
        let service = self.service(id).await?;
        let spec = service.spec.clone().unwrap_or_default();
        let Some(wanted) = spec
            .labels
            .as_ref()
            .and_then(|l| l.get(REPLICAS)?.parse::<i64>().ok())
        else {
            return Ok(());
        };
        let now = spec
            .mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref()?.replicas);
        if now == Some(wanted) {
            return Ok(());
        }
        self.scale(id, wanted).await
    }

    async fn restart(&self, id: &str, _timeout: Duration) -> Result<(), EngineError> {
        // A rolling update that replaces every replica, as its update settings say.
        self.update(id, "restart (rolling update)", |spec| {
            if let Some(t) = spec.task_template.as_mut() {
                t.force_update = Some(t.force_update.unwrap_or(0) + 1);
            }
        })
        .await
    }

    async fn stop(&self, id: &str, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        // Scaled to none first, so that dependencies stop only after it has.
        if let Err(e) = self.scale(id, 0).await {
            tracing::debug!(service = id, error = %e, "scale to 0 failed; removing");
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match self.tasks_and_nodes(&[id.to_string()]).await {
                Ok((tasks, _))
                    if tasks.iter().all(|t| {
                        !matches!(
                            task_state(t),
                            Some(TaskState::RUNNING | TaskState::STARTING)
                        )
                    }) =>
                {
                    return
                }
                Err(_) => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn remove_stopped(&self, id: &str) -> Result<(), EngineError> {
        let name = match self.service(id).await {
            Ok(s) => s.spec.and_then(|s| s.name).unwrap_or_default(),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.client().delete_service(id).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(self.err(format!("remove swarm service {id}"), e)),
        }
        // Its tasks let go of the secrets as they end.
        let this = self.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                if !this.remove_secrets_of(&name).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(())
    }

    async fn logs(&self, id: &str, tail: usize) -> Result<String, EngineError> {
        let mut stream = self.log_stream(id, false, tail, 0);
        let mut out = String::new();
        while let Some(chunk) = stream.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk?.1));
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
        let this = self.clone();
        let id = id.to_string();
        // Each replica's output, every line marked `NAME.SLOT@NODE | ` as `docker service logs`
        // marks it.
        stream::once(async move {
            let service = match this.service(&id).await {
                Ok(s) => s,
                Err(e) => return stream::once(async move { Err(e) }).boxed(),
            };
            let name = service
                .spec
                .as_ref()
                .and_then(|s| s.name.clone())
                .unwrap_or_default();
            let (tasks, nodes) = match this.tasks_and_nodes(std::slice::from_ref(&id)).await {
                Ok(v) => v,
                Err(e) => return stream::once(async move { Err(e) }).boxed(),
            };
            let tail = if tail == 0 {
                "all".to_string()
            } else {
                tail.to_string()
            };
            let per_replica = current(&tasks, &id).into_iter().map(|t| {
                let prefix = format!(
                    "{name}.{}@{} | ",
                    t.slot.unwrap_or(0),
                    node_name(&nodes, t.node_id.as_deref().unwrap_or(""))
                );
                let options = LogsOptionsBuilder::new()
                    .stdout(true)
                    .stderr(true)
                    .follow(follow)
                    .tail(&tail)
                    .since(i32::try_from(since).unwrap_or(i32::MAX))
                    .build();
                let host = this.host().to_string();
                let task_id = t.id.clone().unwrap_or_default();
                let mut partial = false;
                this.client()
                    .task_logs(&task_id, Some(options))
                    .map(move |item| match item {
                        Ok(out) => {
                            let stderr =
                                matches!(out, bollard::container::LogOutput::StdErr { .. });
                            let text = String::from_utf8_lossy(&out.into_bytes()).into_owned();
                            let mut marked = String::new();
                            for line in text.split_inclusive('\n') {
                                if !partial {
                                    marked.push_str(&prefix);
                                }
                                marked.push_str(line);
                                partial = !line.ends_with('\n');
                            }
                            Ok((stderr, bytes::Bytes::from(marked)))
                        }
                        Err(e) => Err(api_error(&host, format!("logs of swarm task {task_id}"), e)),
                    })
                    .boxed()
            });
            stream::select_all(per_replica).boxed()
        })
        .flatten()
        .boxed()
    }

    async fn stats(&self, _id: &str) -> Result<Usage, EngineError> {
        Err(swarm_error(
            self.host(),
            "the resource use of Swarm replicas is not collected (each node's `docker stats` shows its own)".into(),
        ))
    }

    fn container_events(
        &self,
        project: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, EngineError>> {
        let this = self.clone();
        let project = project.to_string();
        // service id → whether all its replicas ran at the last look.
        let state: HashMap<String, bool> = HashMap::new();
        stream::unfold(
            (this, project, state, Vec::<ContainerEvent>::new(), true),
            |(this, project, mut seen, mut pending, mut first)| async move {
                loop {
                    if let Some(e) = pending.pop() {
                        return Some((Ok(e), (this, project, seen, pending, first)));
                    }
                    if !first {
                        tokio::time::sleep(WATCH_EVERY).await;
                    }
                    let infos = match this.services_by_label(labels::PROJECT, &project).await {
                        Ok(services) => this.infos(services).await,
                        Err(e) => Err(e),
                    };
                    let infos = match infos {
                        Ok(i) => i,
                        Err(e @ EngineError::Unavailable { .. }) => {
                            return Some((Err(e), (this, project, seen, pending, first)))
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "swarm task watch: retrying");
                            first = false;
                            continue;
                        }
                    };
                    let mut now: HashMap<String, bool> = HashMap::new();
                    for info in &infos {
                        let whole = info.state == RunState::Running;
                        now.insert(info.id.clone(), whole);
                        let before = seen.get(&info.id).copied();
                        match (before, whole) {
                            (Some(true), false) => pending.push(ContainerEvent {
                                id: info.id.clone(),
                                action: "die".into(),
                                exit_code: info.exit_code.or(Some(-1)),
                            }),
                            (Some(false), true) => pending.push(ContainerEvent {
                                id: info.id.clone(),
                                action: "start".into(),
                                exit_code: None,
                            }),
                            _ => {}
                        }
                    }
                    for gone in seen.keys().filter(|id| !now.contains_key(*id)) {
                        pending.push(ContainerEvent {
                            id: gone.clone(),
                            action: "destroy".into(),
                            exit_code: None,
                        });
                    }
                    seen = now;
                    first = false;
                }
            },
        )
        .boxed()
    }

    async fn engine_info(&self) -> Result<EngineInfo, EngineError> {
        self.docker.engine_info().await
    }

    async fn run_once(
        &self,
        image: &str,
        command: Option<Vec<String>>,
        env: Vec<String>,
        labels: HashMap<String, String>,
    ) -> Result<ExecOutput, EngineError> {
        // One-off task containers run on the manager's own Engine.
        self.docker.run_once(image, command, env, labels).await
    }

    async fn exec(&self, id: &str, command: &[String]) -> Result<ExecOutput, EngineError> {
        let container = self.local_container(id).await?;
        self.docker.exec(&container, command).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(restart: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "ID": "svc",
            "Spec": {
                "Name": "p-web",
                "Labels": {"dspy-agent.service": "web"},
                "Mode": {"Replicated": {"Replicas": 2}},
                "TaskTemplate": {"RestartPolicy": {"Condition": restart}},
            },
        }))
        .unwrap()
    }

    fn task(slot: i64, node: &str, state: &str, created: &str, err: &str) -> Task {
        serde_json::from_value(serde_json::json!({
            "ID": format!("t{slot}{created}"),
            "ServiceID": "svc",
            "Slot": slot,
            "NodeID": node,
            "CreatedAt": created,
            "DesiredState": "running",
            "Status": {
                "State": state,
                "Err": err,
                "Timestamp": "2026-12-02T10:00:00Z",
                "ContainerStatus": {"ExitCode": 3},
                "PortStatus": {"Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 30080, "PublishMode": "host"}]},
            },
        }))
        .unwrap()
    }

    fn nodes(down: &str) -> HashMap<String, Node> {
        ["n1", "n2"]
            .iter()
            .map(|id| {
                let node: Node = serde_json::from_value(serde_json::json!({
                    "ID": id,
                    "Description": {"Hostname": format!("host-{id}")},
                    "Status": {"State": if *id == down { "down" } else { "ready" }, "Addr": format!("10.0.0.{}", &id[1..])},
                }))
                .unwrap();
                (id.to_string(), node)
            })
            .collect()
    }

    #[test]
    fn all_replicas_running_is_running_with_each_replica_on_its_node() {
        let tasks = [
            task(1, "n1", "running", "1", ""),
            task(2, "n2", "running", "1", ""),
        ];
        let info = aggregate(service("any"), &tasks, &nodes(""), "10.0.0.1");
        assert_eq!(info.state, RunState::Running);
        assert_eq!(info.replicas.len(), 2);
        assert_eq!(info.replicas[1].node, "host-n2");
        assert_eq!(
            info.replicas[1].ports[&(80, "tcp".to_string())],
            ("10.0.0.2".to_string(), 30080)
        );
        assert!(info.problem.is_none());
    }

    #[test]
    fn a_lost_node_a_failure_and_an_unplaceable_replica_are_told_apart() {
        // The newest task of a slot counts: slot 2 failed once, then runs again.
        let tasks = [
            task(1, "n1", "running", "1", ""),
            task(2, "n2", "failed", "1", "exit 3"),
            task(2, "n2", "running", "2", ""),
        ];
        let info = aggregate(service("any"), &tasks, &nodes("n2"), "10.0.0.1");
        assert_eq!(info.replicas[1].state, "node-down");
        assert_eq!(info.state, RunState::Created);
        assert_eq!(info.restart_count, 1);

        let failed = [
            task(1, "n1", "running", "1", ""),
            task(2, "n2", "failed", "1", "exit 3"),
        ];
        let info = aggregate(service("any"), &failed, &nodes(""), "10.0.0.1");
        assert_eq!(
            (info.state, info.exit_code),
            (RunState::Restarting, Some(3))
        );
        let info = aggregate(service("none"), &failed, &nodes(""), "10.0.0.1");
        assert_eq!(info.state, RunState::Exited);

        let pending = [
            task(1, "n1", "running", "1", ""),
            task(
                2,
                "",
                "pending",
                "1",
                "no suitable node (scheduling constraints not satisfied on 2 nodes)",
            ),
        ];
        let info = aggregate(service("any"), &pending, &nodes(""), "10.0.0.1");
        assert_eq!(info.state, RunState::Dead);
        assert!(info.problem.unwrap().contains("constraints"));
    }
}
