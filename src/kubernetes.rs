//! `dspy-agent export kubernetes`: the stack as Kubernetes objects, built from the typed API
//! structs of `k8s-openapi` so that what is written has the shape the API server reads.
//!
//! Per service: a Deployment (a StatefulSet when it keeps named volumes, with a claim per
//! volume), a Service giving it its name on the cluster network, a ConfigMap for `env` and a
//! Secret for `secret_env`. Health checks become readiness, liveness and startup probes;
//! `depends_on` becomes init containers that wait for each dependency; resources, GPUs and the
//! process settings carry over. What has no equivalent is named, never dropped silently.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, ExecAction, HTTPGetAction, HostPathVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe as KubeProbe, ResourceRequirements,
    Secret, SecretEnvSource, SecurityContext, Service, ServicePort, ServiceSpec as KubeServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::spec::{
    Condition, GpuRequest, MountKind, Probe, Protocol, PullPolicy, ServiceSpec,
};
use crate::config::Config;

/// The image of the init containers that wait for a dependency.
pub const WAIT_IMAGE: &str = "busybox:1.36";
/// What a claim for a named volume asks for; the cluster's default storage class provides it.
pub const VOLUME_SIZE: &str = "1Gi";

/// One service's objects, as YAML documents, and what did not carry over.
#[derive(Debug)]
pub struct Exported {
    pub service: String,
    /// `---`-separated YAML documents.
    pub yaml: String,
    /// Holds a Secret with values.
    pub secret: bool,
    pub notes: Vec<String>,
}

/// The objects of every service of `config`, in dependency order; in `namespace` when given.
pub fn export(config: &Config, namespace: Option<&str>) -> Result<Vec<Exported>, String> {
    config
        .services
        .iter()
        .map(|spec| service(config, spec, namespace))
        .collect()
}

fn service(
    config: &Config,
    spec: &ServiceSpec,
    namespace: Option<&str>,
) -> Result<Exported, String> {
    let mut notes = Vec::new();
    let name = object_name(&spec.name);
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), name.clone()),
        (
            "app.kubernetes.io/part-of".to_string(),
            object_name(&config.project),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "dspy-agent".to_string(),
        ),
    ]);
    let meta = |object: &str| ObjectMeta {
        name: Some(object.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };
    let mut docs: Vec<String> = Vec::new();
    let mut push = |doc: Result<String, yaml_serde::Error>| -> Result<(), String> {
        docs.push(doc.map_err(|e| format!("service {:?}: {e}", spec.name))?);
        Ok(())
    };

    // Environment: plain values in a ConfigMap, secret ones in a Secret.
    let (secret_env, plain_env): (BTreeMap<_, _>, BTreeMap<_, _>) = spec
        .env
        .clone()
        .into_iter()
        .partition(|(k, _)| spec.secret_env.contains(k));
    let mut env_from = Vec::new();
    if !plain_env.is_empty() {
        let map_name = format!("{name}-env");
        push(crate::yaml::to_string(&ConfigMap {
            metadata: meta(&map_name),
            data: Some(plain_env),
            ..ConfigMap::default()
        }))?;
        env_from.push(EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: map_name,
                optional: None,
            }),
            ..EnvFromSource::default()
        });
    }
    let secret = !secret_env.is_empty();
    if secret {
        let secret_name = format!("{name}-secret");
        push(crate::yaml::to_string(&Secret {
            metadata: meta(&secret_name),
            string_data: Some(secret_env),
            type_: Some("Opaque".into()),
            ..Secret::default()
        }))?;
        env_from.push(EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: secret_name,
                optional: None,
            }),
            ..EnvFromSource::default()
        });
    }

    // Its name on the cluster network, as on the project network.
    if !spec.ports.is_empty() {
        push(crate::yaml::to_string(&Service {
            metadata: meta(&name),
            spec: Some(KubeServiceSpec {
                selector: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    name.clone(),
                )])),
                ports: Some(
                    spec.ports
                        .iter()
                        .map(|p| ServicePort {
                            name: Some(port_name(p.container_port, p.protocol)),
                            port: i32::from(p.container_port),
                            target_port: Some(IntOrString::Int(i32::from(p.container_port))),
                            protocol: Some(protocol(p.protocol)),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..KubeServiceSpec::default()
            }),
            ..Service::default()
        }))?;
        if spec.ports.iter().any(|p| p.host_port != 0) {
            notes.push(format!(
                "services.{}.ports: host ports stay on the cluster network (a ClusterIP Service); `kubectl port-forward service/{name} PORT` reaches one from a workstation",
                spec.name
            ));
        }
    }

    let (volumes, mounts, claims) = volumes(spec, &mut notes);
    let container = Container {
        name: name.clone(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(
            match spec.pull {
                PullPolicy::Missing => "IfNotPresent",
                PullPolicy::Always => "Always",
                PullPolicy::Never => "Never",
            }
            .into(),
        ),
        command: spec.run.entrypoint.clone(),
        args: spec.command.clone(),
        working_dir: spec.run.working_dir.clone(),
        env_from: (!env_from.is_empty()).then_some(env_from),
        ports: (!spec.ports.is_empty()).then(|| {
            spec.ports
                .iter()
                .map(|p| ContainerPort {
                    container_port: i32::from(p.container_port),
                    name: Some(port_name(p.container_port, p.protocol)),
                    protocol: Some(protocol(p.protocol)),
                    ..ContainerPort::default()
                })
                .collect()
        }),
        resources: resources(spec, &mut notes),
        security_context: security(spec, &mut notes),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        readiness_probe: probe(spec, ProbeUse::Ready),
        liveness_probe: probe(spec, ProbeUse::Alive),
        startup_probe: probe(spec, ProbeUse::Starting),
        ..Container::default()
    };
    if matches!(spec.healthcheck.probe, Probe::Docker) {
        notes.push(format!(
            "services.{}.healthcheck: the image's own HEALTHCHECK is not run by Kubernetes; give a tcp, http or exec check for probes",
            spec.name
        ));
    }
    if spec.run.init {
        notes.push(format!(
            "services.{}.init: no init process is added; the image's entry point runs as PID 1",
            spec.name
        ));
    }
    let init_containers = waits(config, spec, &mut notes);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            annotations: (!spec.labels.is_empty()).then(|| spec.labels.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            volumes: (!volumes.is_empty()).then_some(volumes),
            termination_grace_period_seconds: Some(spec.stop_timeout.as_secs() as i64),
            ..PodSpec::default()
        }),
    };
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "app.kubernetes.io/name".to_string(),
            name.clone(),
        )])),
        ..LabelSelector::default()
    };
    if claims.is_empty() {
        push(crate::yaml::to_string(&Deployment {
            metadata: meta(&name),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector,
                template,
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }))?;
    } else {
        // Named volumes keep their data: a StatefulSet, with a claim per volume.
        push(crate::yaml::to_string(&StatefulSet {
            metadata: meta(&name),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(name.clone()),
                selector,
                template,
                volume_claim_templates: Some(claims),
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }))?;
    }
    Ok(Exported {
        service: spec.name.clone(),
        yaml: docs.join("---\n"),
        secret,
        notes,
    })
}

/// A Kubernetes object name (RFC 1123: lower case, digits and '-').
fn object_name(name: &str) -> String {
    name.to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

fn port_name(port: u16, p: Protocol) -> String {
    match p {
        Protocol::Tcp => format!("tcp-{port}"),
        Protocol::Udp => format!("udp-{port}"),
    }
}

fn protocol(p: Protocol) -> String {
    match p {
        Protocol::Tcp => "TCP".into(),
        Protocol::Udp => "UDP".into(),
    }
}

/// Pod volumes, the container's mounts and the StatefulSet's claims.
fn volumes(
    spec: &ServiceSpec,
    notes: &mut Vec<String>,
) -> (Vec<Volume>, Vec<VolumeMount>, Vec<PersistentVolumeClaim>) {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut claims = Vec::new();
    for (i, m) in spec.volumes.iter().enumerate() {
        let volume_name = match m.kind {
            MountKind::Volume => object_name(&m.source),
            MountKind::Bind => format!("host-{i}"),
        };
        mounts.push(VolumeMount {
            name: volume_name.clone(),
            mount_path: m.target.clone(),
            read_only: m.read_only.then_some(true),
            ..VolumeMount::default()
        });
        match m.kind {
            MountKind::Volume => claims.push(PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(volume_name),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity(VOLUME_SIZE.into()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }),
            MountKind::Bind => {
                notes.push(format!(
                    "services.{}.volumes: {} is a path on whichever node runs the pod (hostPath); copy what it holds there, or use a ConfigMap or a volume",
                    spec.name, m.source
                ));
                volumes.push(Volume {
                    name: volume_name,
                    host_path: Some(HostPathVolumeSource {
                        path: m.source.clone(),
                        type_: None,
                    }),
                    ..Volume::default()
                });
            }
        }
    }
    for (i, (path, options)) in spec.run.tmpfs.iter().enumerate() {
        let volume_name = format!("tmpfs-{i}");
        let size = options
            .split(',')
            .find_map(|o| o.strip_prefix("size="))
            .map(|s| Quantity(kube_memory(s)));
        volumes.push(Volume {
            name: volume_name.clone(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: size,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume_name,
            mount_path: path.clone(),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts, claims)
}

/// "512m" (Docker's mebibytes) as Kubernetes writes sizes ("512Mi").
fn kube_memory(docker: &str) -> String {
    let lower = docker.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    for (suffix, kube) in [("k", "Ki"), ("m", "Mi"), ("g", "Gi"), ("t", "Ti")] {
        if let Some(n) = lower.strip_suffix(suffix) {
            return format!("{n}{kube}");
        }
    }
    lower.to_string()
}

fn resources(spec: &ServiceSpec, notes: &mut Vec<String>) -> Option<ResourceRequirements> {
    let r = &spec.resources;
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if let Some(n) = r.nano_cpus {
        limits.insert("cpu".to_string(), Quantity(format!("{}m", n / 1_000_000)));
    }
    if let Some(b) = r.memory_bytes {
        limits.insert("memory".to_string(), Quantity(b.to_string()));
    }
    if let Some(b) = r.memory_reservation_bytes {
        requests.insert("memory".to_string(), Quantity(b.to_string()));
    }
    let gpus = match r.gpus {
        GpuRequest::None => None,
        GpuRequest::Count(n) => Some(n),
        GpuRequest::All | GpuRequest::Auto => {
            notes.push(format!(
                "services.{}.resources.gpus: Kubernetes asks for a number of GPUs; 1 is written, change it to what the node offers",
                spec.name
            ));
            Some(1)
        }
    };
    if let Some(n) = gpus {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(n.to_string()));
    }
    (!limits.is_empty() || !requests.is_empty()).then(|| ResourceRequirements {
        limits: (!limits.is_empty()).then_some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..ResourceRequirements::default()
    })
}

fn security(spec: &ServiceSpec, notes: &mut Vec<String>) -> Option<SecurityContext> {
    let run = &spec.run;
    let (mut user, mut group) = (None, None);
    if let Some(u) = &run.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, ""));
        match (uid.parse::<i64>(), gid) {
            (Ok(uid), "") => user = Some(uid),
            (Ok(uid), gid) => match gid.parse::<i64>() {
                Ok(gid) => (user, group) = (Some(uid), Some(gid)),
                Err(_) => notes.push(format!(
                    "services.{}.user: group {gid:?} is a name; Kubernetes takes a number",
                    spec.name
                )),
            },
            (Err(_), _) => notes.push(format!(
                "services.{}.user: {u:?} is a name; Kubernetes runs as a number (runAsUser)",
                spec.name
            )),
        }
    }
    let caps = (!run.cap_add.is_empty() || !run.cap_drop.is_empty()).then(|| Capabilities {
        add: (!run.cap_add.is_empty()).then(|| run.cap_add.clone()),
        drop: (!run.cap_drop.is_empty()).then(|| run.cap_drop.clone()),
    });
    let context = SecurityContext {
        run_as_user: user,
        run_as_group: group,
        read_only_root_filesystem: run.read_only.then_some(true),
        allow_privilege_escalation: run.no_new_privileges.then_some(false),
        capabilities: caps,
        ..SecurityContext::default()
    };
    (context != SecurityContext::default()).then_some(context)
}

enum ProbeUse {
    Ready,
    Alive,
    Starting,
}

/// A probe from the health check: readiness and liveness every `interval` (at least a second),
/// and a startup probe that gives the service its `start_period`.
fn probe(spec: &ServiceSpec, role: ProbeUse) -> Option<KubeProbe> {
    let h = &spec.healthcheck;
    let mut probe = match &h.probe {
        Probe::Tcp { port } | Probe::Redis { port } => KubeProbe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(*port)),
                host: None,
            }),
            ..KubeProbe::default()
        },
        Probe::Http { port, path, .. } => KubeProbe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::Int(i32::from(*port)),
                path: Some(path.clone()),
                ..HTTPGetAction::default()
            }),
            ..KubeProbe::default()
        },
        Probe::Exec { command } => KubeProbe {
            exec: Some(ExecAction {
                command: Some(command.clone()),
            }),
            ..KubeProbe::default()
        },
        Probe::Docker | Probe::None => return None,
    };
    let period = h.interval.as_secs().max(1) as i32;
    probe.period_seconds = Some(period);
    probe.timeout_seconds = Some(h.timeout.as_secs().max(1) as i32);
    match role {
        ProbeUse::Ready => probe.failure_threshold = Some(1),
        ProbeUse::Alive => probe.failure_threshold = Some(h.retries.max(1) as i32),
        ProbeUse::Starting => {
            probe.failure_threshold = Some((h.start_period.as_secs() as i32 / period).max(1))
        }
    }
    Some(probe)
}

/// Init containers that hold the pod until each dependency answers: its HTTP check, else its
/// first port.
fn waits(config: &Config, spec: &ServiceSpec, notes: &mut Vec<String>) -> Vec<Container> {
    let mut waits = Vec::new();
    for (dep, condition) in &spec.depends_on {
        let Some(dep_spec) = config.services.iter().find(|s| &s.name == dep) else {
            continue;
        };
        let host = object_name(dep);
        let script = match (&dep_spec.healthcheck.probe, condition) {
            (Probe::Http { port, path, .. }, Condition::Healthy) => format!(
                "until wget -q -O /dev/null http://{host}:{port}{path}; do echo waiting for {dep}; sleep 2; done"
            ),
            _ => match dep_spec.ports.iter().find(|p| p.protocol == Protocol::Tcp) {
                Some(p) => format!(
                    "until nc -z {host} {}; do echo waiting for {dep}; sleep 2; done",
                    p.container_port
                ),
                None => {
                    notes.push(format!(
                        "services.{}.depends_on.{dep}: {dep} has no port to wait for; the pods start together",
                        spec.name
                    ));
                    continue;
                }
            },
        };
        if *condition == Condition::Completed {
            notes.push(format!(
                "services.{}.depends_on.{dep}: \"completed\" waits for {dep} to answer instead; run {dep} as a Job and apply it first",
                spec.name
            ));
        }
        waits.push(Container {
            name: format!("wait-for-{host}"),
            image: Some(WAIT_IMAGE.into()),
            command: Some(vec!["sh".into(), "-c".into(), script]),
            ..Container::default()
        });
    }
    waits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigLayer, LoadOptions};

    fn exported(toml_text: &str) -> Vec<Exported> {
        let dir = tempfile::tempdir().unwrap();
        let layer: ConfigLayer = toml::from_str(toml_text).unwrap();
        let config = Config::load(LoadOptions {
            cwd: dir.path().to_path_buf(),
            overlay: Some(layer),
            state_dir: Some(dir.path().join("state")),
            ..LoadOptions::default()
        })
        .unwrap();
        export(&config, Some("agents")).unwrap()
    }

    fn docs(e: &Exported) -> Vec<serde_json::Value> {
        e.yaml
            .split("---\n")
            .map(|d| yaml_serde::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn a_service_with_a_volume_becomes_a_stateful_set_with_its_claim() {
        let out = exported(
            r#"
            catalog = false
            [services.db]
            image = "postgres:16"
            ports = ["5432:5432"]
            volumes = ["pgdata:/var/lib/postgresql/data"]
            env = { POSTGRES_USER = "app", POSTGRES_PASSWORD = "pw" }
            secret_env = ["POSTGRES_PASSWORD"]
            healthcheck = { type = "exec", command = ["pg_isready"], start_period = "30s", interval = "5s" }
            resources = { cpus = "1.5", memory = "512m", gpus = "2" }
            [services.api]
            image = "api:1"
            ports = ["8000:8000"]
            depends_on = { db = "healthy" }
            healthcheck = { type = "http", path = "/ready" }
            user = "1000:1000"
            read_only = true
            cap_drop = ["ALL"]
            no_new_privileges = true
            "#,
        );
        assert_eq!(
            out.iter().map(|e| e.service.as_str()).collect::<Vec<_>>(),
            ["db", "api"]
        );
        let db = docs(&out[0]);
        let kinds: Vec<&str> = db.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["ConfigMap", "Secret", "Service", "StatefulSet"]);
        assert!(out[0].secret);
        assert_eq!(db[1]["stringData"]["POSTGRES_PASSWORD"], "pw");
        assert!(db[0]["data"].get("POSTGRES_PASSWORD").is_none());
        let set = &db[3];
        assert_eq!(set["apiVersion"], "apps/v1");
        assert_eq!(set["metadata"]["namespace"], "agents");
        assert_eq!(
            set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
            "pgdata"
        );
        let c = &set["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"]["cpu"], "1500m");
        assert_eq!(
            c["resources"]["limits"]["memory"],
            (512 * 1024 * 1024).to_string()
        );
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert_eq!(c["startupProbe"]["exec"]["command"][0], "pg_isready");
        assert_eq!(c["startupProbe"]["failureThreshold"], 6);
        let api = docs(&out[1]);
        let deployment = api.last().unwrap();
        assert_eq!(deployment["kind"], "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let wait = &pod["initContainers"][0];
        assert_eq!(wait["name"], "wait-for-db");
        assert!(wait["command"][2]
            .as_str()
            .unwrap()
            .contains("nc -z db 5432"));
        let c = &pod["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        let security = &c["securityContext"];
        assert_eq!(
            (
                security["runAsUser"].as_i64(),
                security["runAsGroup"].as_i64()
            ),
            (Some(1000), Some(1000))
        );
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"][0], "ALL");
        assert!(out[1].notes.iter().any(|n| n.contains("port-forward")));
    }
}
