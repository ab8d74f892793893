//! A service as the core runs it: fully resolved, validated values only.
//!
//! The raw, partial form that config layers write (`ServicePatch`) is parsed here into these
//! types, so every string a user wrote ("512m", "0:6379", "on-failure:3") is checked once, with
//! an error that names the service and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// A fully resolved service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Keys of `env` whose values must never be shown or logged.
    pub secret_env: BTreeSet<String>,
    pub ports: Vec<PortSpec>,
    pub volumes: Vec<MountSpec>,
    pub depends_on: BTreeMap<String, Condition>,
    pub healthcheck: HealthCheck,
    pub resources: Resources,
    pub restart: RestartPolicy,
    pub pull: PullPolicy,
    pub labels: BTreeMap<String, String>,
    #[serde(with = "duration_ms")]
    pub stop_timeout: Duration,
    /// URL scheme used for the service's address in `infra.env` and `ServiceInfo.url`.
    pub scheme: String,
    /// How the process runs beyond image and command; left out of the hash while unset, so
    /// that services which set none of it keep their containers.
    #[serde(skip_serializing_if = "RunOptions::is_unset")]
    pub run: RunOptions,
    /// Replicas, placement and rollout, on the swarm backend only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swarm: Option<SwarmOptions>,
}

/// How a service runs as a Swarm service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwarmOptions {
    pub replicas: u32,
    pub constraints: Vec<String>,
    /// Node attributes to spread replicas over.
    pub spread: Vec<String>,
    pub max_per_node: Option<u32>,
    pub endpoint_mode: EndpointMode,
    pub publish_mode: PublishMode,
    pub update: UpdateOptions,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            replicas: 1,
            constraints: Vec::new(),
            spread: Vec::new(),
            max_per_node: None,
            endpoint_mode: EndpointMode::Vip,
            publish_mode: PublishMode::Ingress,
            update: UpdateOptions::default(),
        }
    }
}

/// How other services find the replicas: a virtual IP, or DNS round robin over their addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

/// Where a published port listens: on every node through the routing mesh, or on the node of
/// each replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    Ingress,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateOptions {
    pub parallelism: u32,
    #[serde(with = "duration_ms")]
    pub delay: Duration,
    pub order: UpdateOrder,
    pub failure_action: FailureAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Duration>,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        UpdateOptions {
            parallelism: 1,
            delay: Duration::ZERO,
            order: UpdateOrder::StopFirst,
            failure_action: FailureAction::Pause,
            monitor: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    StopFirst,
    StartFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    Pause,
    Continue,
    Rollback,
}

/// The process's user, folder, entry point and confinement, as `docker run` sets them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RunOptions {
    pub entrypoint: Option<Vec<String>>,
    /// "USER", "UID" or "UID:GID".
    pub user: Option<String>,
    pub working_dir: Option<String>,
    /// The root filesystem is mounted read-only.
    pub read_only: bool,
    /// In-memory mounts: container path to mount options ("" for the defaults).
    pub tmpfs: BTreeMap<String, String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// The process cannot gain privileges (setuid binaries) beyond what it starts with.
    pub no_new_privileges: bool,
    /// An init process (the Engine's tini) reaps zombies and forwards signals.
    pub init: bool,
}

impl RunOptions {
    pub fn is_unset(&self) -> bool {
        *self == RunOptions::default()
    }
}

/// `container_port` published on `host_ip:host_port`; host port 0 lets the Engine choose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortSpec {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A named volume (kept when the stack stops) or a bind mount of a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountSpec {
    pub kind: MountKind,
    /// Volume name (without the project prefix) or absolute host path.
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    Volume,
    Bind,
}

/// What a dependent waits for before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// The dependency's container is running.
    Started,
    /// The dependency passed its health check.
    Healthy,
    /// The dependency ran to completion with exit code 0 (a one-shot job).
    Completed,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Condition::Started => "started",
            Condition::Healthy => "healthy",
            Condition::Completed => "completed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Cap of the backoff between probes while the service comes up.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// Limit for a single probe.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Consecutive failures after the start period before the service counts as failed.
    pub retries: u32,
    /// Time the service has to pass its first probe.
    #[serde(with = "duration_ms")]
    pub start_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connect to the published `port` (a container port).
    Tcp { port: u16 },
    /// HTTP GET `path` on the published `port`, passing when the status equals `status`.
    Http {
        port: u16,
        path: String,
        status: u16,
    },
    /// Redis `PING` answered by `+PONG` on the published `port`.
    Redis { port: u16 },
    /// A command run inside the container, passing on exit code 0.
    Exec { command: Vec<String> },
    /// The image's own HEALTHCHECK as reported by the Engine.
    Docker,
    /// No probe: the service counts as healthy once it runs.
    None,
}

impl Probe {
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp { .. } => "tcp",
            Probe::Http { .. } => "http",
            Probe::Redis { .. } => "redis",
            Probe::Exec { .. } => "exec",
            Probe::Docker => "docker",
            Probe::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Resources {
    /// CPU limit in billionths of a CPU (the Engine's NanoCpus).
    pub nano_cpus: Option<i64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// Memory the container is guaranteed (a soft limit) in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_reservation_bytes: Option<i64>,
    pub gpus: GpuRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuRequest {
    #[default]
    None,
    /// Every GPU when the Engine offers the NVIDIA runtime, none otherwise.
    Auto,
    All,
    Count(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    OnFailure { max_retries: Option<u32> },
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only when the image is not present locally.
    Missing,
    Always,
    /// Never pull; a missing image is an error.
    Never,
}

/// Container names, DNS aliases and label values all accept this shape.
pub fn validate_name(what: &str, name: &str) -> Result<(), ConfigError> {
    let valid_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if name.len() > 63 || !valid_first || !valid_rest {
        return Err(ConfigError::invalid(
            what,
            format!(
                "{name:?} is not a valid name: use 1 to 63 letters, digits, '_', '-' or '.', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Parses "6379", "0:6379", "16379:6379", "127.0.0.1:16379:6379", each with an optional
/// "/udp" or "/tcp". A bare container port is published on the same host port.
pub fn parse_port(field: &str, text: &str, default_host_ip: &str) -> Result<PortSpec, ConfigError> {
    let bad = |why: &str| {
        ConfigError::invalid(
            field,
            format!("{text:?} is not a port mapping ({why}); write \"CONTAINER\", \"HOST:CONTAINER\" or \"IP:HOST:CONTAINER\", with HOST 0 for any free port"),
        )
    };
    let (mapping, protocol) = match text.rsplit_once('/') {
        Some((m, "tcp")) => (m, Protocol::Tcp),
        Some((m, "udp")) => (m, Protocol::Udp),
        Some(_) => return Err(bad("protocol must be tcp or udp")),
        None => (text, Protocol::Tcp),
    };
    let parts: Vec<&str> = mapping.rsplitn(3, ':').collect();
    let number = |s: &str, allow_zero: bool| -> Result<u16, ConfigError> {
        match s.trim().parse::<u16>() {
            Ok(0) if !allow_zero => Err(bad("container port must be 1 to 65535")),
            Ok(n) => Ok(n),
            Err(_) => Err(bad(&format!("{s:?} is not a number from 0 to 65535"))),
        }
    };
    let (host_ip, host_port, container_port) = match parts.as_slice() {
        [c] => {
            let c = number(c, false)?;
            (default_host_ip.to_string(), c, c)
        }
        [c, h] => (
            default_host_ip.to_string(),
            number(h, true)?,
            number(c, false)?,
        ),
        [c, h, ip] => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(bad(&format!("{ip:?} is not an IP address")));
            }
            (ip.to_string(), number(h, true)?, number(c, false)?)
        }
        _ => return Err(bad("too many ':'")),
    };
    Ok(PortSpec {
        host_ip,
        host_port,
        container_port,
        protocol,
    })
}

/// Parses "name:/path[:ro|:rw]" (named volume) or "/host/path:/path[:ro|:rw]" (bind mount;
/// relative host paths start with "./" and are resolved against `base_dir`).
pub fn parse_mount(
    field: &str,
    text: &str,
    base_dir: &std::path::Path,
) -> Result<MountSpec, ConfigError> {
    let bad = |why: &str| {
        ConfigError::invalid(
            field,
            format!("{text:?} is not a volume ({why}); write \"NAME:/container/path\" or \"/host/path:/container/path\", optionally ending in \":ro\""),
        )
    };
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        [_, _, mode] => return Err(bad(&format!("mode {mode:?} must be ro or rw"))),
        _ => return Err(bad("expected SOURCE:TARGET")),
    };
    if !target.starts_with('/') {
        return Err(bad("the container path must be absolute"));
    }
    let (kind, source) = if source.starts_with('/') {
        (MountKind::Bind, source.to_string())
    } else if source.starts_with("./") || source.starts_with("../") || source == "." {
        (
            MountKind::Bind,
            base_dir.join(source).to_string_lossy().into_owned(),
        )
    } else {
        validate_name(field, source)
            .map_err(|_| bad("a volume name uses letters, digits, '_', '-', '.'"))?;
        (MountKind::Volume, source.to_string())
    };
    Ok(MountSpec {
        kind,
        source,
        target: target.to_string(),
        read_only,
    })
}

/// Parses a duration: a number with a unit (`ms`, `s`, `m`, `h`, `d`, `w`; none is seconds),
/// or several in a row, largest first as Go and Compose write them: "250ms", "5s", "1.5m",
/// "1m30s", "7d", "2w".
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            field,
            format!("{text:?} is not a duration; write for example \"250ms\", \"5s\", \"2m\", \"1h30m\" or \"7d\""),
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(split);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit.trim() {
            "ms" => 0.001,
            "" | "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            _ => return Err(bad()),
        };
        let n: f64 = number.parse().map_err(|_| bad())?;
        seconds += n * scale;
        rest = next.trim_start();
    }
    if seconds.is_finite() && (0.0..1e10).contains(&seconds) {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(bad())
    }
}

/// Parses memory sizes as Docker does: "512m", "2g", "1.5G", "300k", "1048576" (bytes).
pub fn parse_memory(field: &str, text: &str) -> Result<i64, ConfigError> {
    let lower = text.trim().to_ascii_lowercase();
    let trimmed = lower.trim_end_matches('b');
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let scale: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => f64::NAN,
    };
    // The Engine refuses limits under 6 MiB.
    const MIN: f64 = 6.0 * 1024.0 * 1024.0;
    match number.parse::<f64>() {
        Ok(n) if scale.is_finite() && n * scale >= MIN && n * scale < 9.0e18 => {
            Ok((n * scale) as i64)
        }
        Ok(n) if scale.is_finite() && n * scale < MIN => Err(ConfigError::invalid(
            field,
            format!("{text:?} is below the Docker Engine's minimum of 6m"),
        )),
        _ => Err(ConfigError::invalid(
            field,
            format!("{text:?} is not a memory size; write for example \"512m\" or \"2g\""),
        )),
    }
}

/// Parses a CPU limit such as "1.5" or 2 into the Engine's NanoCpus.
pub fn parse_cpus(field: &str, text: &str) -> Result<i64, ConfigError> {
    match text.trim().parse::<f64>() {
        Ok(n) if (0.01..=1024.0).contains(&n) => Ok((n * 1e9).round() as i64),
        _ => Err(ConfigError::invalid(
            field,
            format!("{text:?} is not a CPU count; write a number from 0.01 to 1024, for example \"1.5\""),
        )),
    }
}

pub fn parse_gpus(field: &str, text: &str) -> Result<GpuRequest, ConfigError> {
    match text.trim() {
        "" | "none" | "0" => Ok(GpuRequest::None),
        "auto" => Ok(GpuRequest::Auto),
        "all" => Ok(GpuRequest::All),
        n => match n.parse::<u32>() {
            Ok(count) => Ok(GpuRequest::Count(count)),
            Err(_) => Err(ConfigError::invalid(
                field,
                format!(
                    "{text:?} is not a GPU request; write \"auto\", \"all\", \"none\" or a count"
                ),
            )),
        },
    }
}

pub fn parse_restart(field: &str, text: &str) -> Result<RestartPolicy, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            field,
            format!("{text:?} is not a restart policy; write \"no\", \"on-failure\", \"on-failure:N\" or \"always\""),
        )
    };
    match text.trim() {
        "no" => Ok(RestartPolicy::No),
        "always" => Ok(RestartPolicy::Always),
        "on-failure" => Ok(RestartPolicy::OnFailure { max_retries: None }),
        other => match other.strip_prefix("on-failure:") {
            Some(n) => n
                .parse::<u32>()
                .map(|n| RestartPolicy::OnFailure {
                    max_retries: Some(n),
                })
                .map_err(|_| bad()),
            None => Err(bad()),
        },
    }
}

/// Checks a capability name ("NET_ADMIN", "CAP_NET_ADMIN" or "ALL") and writes it as the
/// Engine expects, without the prefix.
pub fn parse_capability(field: &str, text: &str) -> Result<String, ConfigError> {
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name).to_string();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err(ConfigError::invalid(
            field,
            format!("{text:?} is not a capability; write a name such as \"NET_ADMIN\", or \"ALL\""),
        ));
    }
    Ok(name)
}

/// Parses "/path" or "/path:OPTIONS" ("/run:size=64m,mode=1777") of an in-memory mount.
pub fn parse_tmpfs(field: &str, text: &str) -> Result<(String, String), ConfigError> {
    let (path, options) = text.split_once(':').unwrap_or((text, ""));
    if !path.starts_with('/') || path.chars().any(char::is_whitespace) {
        return Err(ConfigError::invalid(
            field,
            format!("{text:?} is not a tmpfs mount; write an absolute container path, optionally with options: \"/run:size=64m\""),
        ));
    }
    Ok((path.to_string(), options.to_string()))
}

pub fn parse_pull(field: &str, text: &str) -> Result<PullPolicy, ConfigError> {
    match text.trim() {
        "missing" => Ok(PullPolicy::Missing),
        "always" => Ok(PullPolicy::Always),
        "never" => Ok(PullPolicy::Never),
        _ => Err(ConfigError::invalid(
            field,
            format!("{text:?} is not a pull policy; write \"missing\", \"always\" or \"never\""),
        )),
    }
}

/// Serializes durations as whole milliseconds so the config hash is stable.
mod duration_ms {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// A service with no probe and short timeouts, for tests of logic over the graph.
#[cfg(test)]
pub fn test_service(name: &str, deps: &[&str], port: Option<u16>) -> ServiceSpec {
    ServiceSpec {
        secret_env: Default::default(),
        name: name.into(),
        image: "img".into(),
        command: None,
        env: Default::default(),
        ports: port
            .map(|p| PortSpec {
                host_ip: "127.0.0.1".into(),
                host_port: p,
                container_port: 80,
                protocol: Protocol::Tcp,
            })
            .into_iter()
            .collect(),
        volumes: vec![],
        depends_on: deps
            .iter()
            .map(|d| (d.to_string(), Condition::Healthy))
            .collect(),
        healthcheck: HealthCheck {
            probe: Probe::None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            retries: 3,
            start_period: Duration::from_secs(1),
        },
        resources: Resources::default(),
        restart: RestartPolicy::No,
        pull: PullPolicy::Never,
        labels: Default::default(),
        stop_timeout: Duration::from_secs(1),
        scheme: "tcp".into(),
        run: RunOptions::default(),
        swarm: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_every_form() {
        let p = parse_port("f", "6379", "127.0.0.1").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (6379, 6379, Protocol::Tcp)
        );
        let p = parse_port("f", "0:6379", "127.0.0.1").unwrap();
        assert_eq!((p.host_port, p.container_port), (0, 6379));
        let p = parse_port("f", "0.0.0.0:16379:6379/udp", "127.0.0.1").unwrap();
        assert_eq!(p.host_ip, "0.0.0.0");
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (16379, 6379, Protocol::Udp)
        );
        for bad in [
            "",
            "x",
            "70000",
            "1:2:3:4",
            "6379/sctp",
            "0",
            "host:1:2",
            "1:0",
        ] {
            assert!(parse_port("svc.ports", bad, "127.0.0.1").is_err(), "{bad}");
        }
    }

    #[test]
    fn mounts() {
        let base = std::path::Path::new("/proj");
        let m = parse_mount("f", "data:/data", base).unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.read_only),
            (MountKind::Volume, "data", false)
        );
        let m = parse_mount("f", "./models:/models:ro", base).unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.read_only),
            (MountKind::Bind, "/proj/./models", true)
        );
        for bad in ["data", "data:rel", "a:/b:xx", "bad name:/x"] {
            assert!(parse_mount("f", bad, base).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_memory_cpus() {
        assert_eq!(
            parse_duration("f", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("f", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("f", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("f", "3").unwrap(), Duration::from_secs(3));
        assert_eq!(
            parse_duration("f", "7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_duration("f", "2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(
            parse_duration("f", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("f", "1m 30s").unwrap(),
            Duration::from_secs(90)
        );
        for bad in [
            "",
            "-1s",
            "5 parsecs",
            "1e999",
            "ms",
            "1x",
            "3d-1h",
            "99999w",
        ] {
            assert!(parse_duration("f", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_memory("f", "512m").unwrap(), 512 * 1024 * 1024);
        assert_eq!(parse_memory("f", "2GB").unwrap(), 2 * 1024 * 1024 * 1024);
        for bad in ["", "lots", "1k", "-5m", "5q"] {
            assert!(parse_memory("f", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("f", "1.5").unwrap(), 1_500_000_000);
        for bad in ["0", "-1", "two", "NaN", "inf"] {
            assert!(parse_cpus("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_and_names() {
        assert_eq!(
            parse_restart("f", "on-failure:3").unwrap(),
            RestartPolicy::OnFailure {
                max_retries: Some(3)
            }
        );
        assert!(parse_restart("f", "sometimes").is_err());
        assert_eq!(parse_pull("f", "never").unwrap(), PullPolicy::Never);
        assert_eq!(parse_gpus("f", "2").unwrap(), GpuRequest::Count(2));
        assert!(validate_name("f", "model_server").is_ok());
        for bad in ["", "-x", "a b", "ü", &"x".repeat(64)] {
            assert!(validate_name("f", bad).is_err(), "{bad}");
        }
    }
}
