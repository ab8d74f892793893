//! `status`, `logs` and `restart`: the services, through the daemon's env-manager, or read from
//! the Engine when no daemon runs.

use super::*;
use crate::services::supervisor::ServiceState;

/// `status --json`: one shape whoever runs the stack (its daemon, an agent's own process) and
/// when nothing does; docs/CLI.md (`status --help`) lists the keys.
#[derive(serde::Serialize)]
struct StatusJson<'a> {
    project: &'a str,
    running: bool,
    healthy: bool,
    /// `null` where the Engine was not asked.
    engine_reachable: Option<bool>,
    engine_error: &'a str,
    owner: serde_json::Value,
    daemon: serde_json::Value,
    services: Vec<serde_json::Value>,
    message: &'a str,
}

impl StatusJson<'_> {
    fn print(&self) {
        println!("{}", serde_json::to_string_pretty(self).unwrap_or_default());
    }
}

fn not_running_json(project: &str, message: &str) {
    StatusJson {
        project,
        running: false,
        healthy: false,
        engine_reachable: None,
        engine_error: "",
        owner: serde_json::Value::Null,
        daemon: serde_json::Value::Null,
        services: Vec::new(),
        message,
    }
    .print();
}

fn port_json(container_port: u16, host_ip: &str, host_port: u16) -> serde_json::Value {
    serde_json::json!({"container_port": container_port, "host_ip": host_ip, "host_port": host_port})
}

/// A service as the Engine alone shows it, in the keys of a running stack's services.
fn container_json(c: &ContainerInfo) -> serde_json::Value {
    let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
    let running = c.state == RunState::Running;
    serde_json::json!({
        "name": label(labels::SERVICE),
        "image": "",
        "phase": "",
        "state": c.state.as_str(),
        "healthy": running && c.engine_health.as_deref().is_none_or(|h| h == "healthy"),
        "container_id": c.id,
        "ports": c.ports.iter().map(|((port, _), (ip, host))| port_json(*port, ip, *host)).collect::<Vec<_>>(),
        "url": "",
        "uptime_seconds": null,
        "restart_count": c.restart_count,
        "message": c.problem.clone().unwrap_or_default(),
        "stand_in": label(labels::STAND_IN) == "true",
        "kept": label(labels::KEEP) == "true",
        "replicas": [],
    })
}

/// `status` with no daemon: the project's containers as the Engine sees them (exit 3 when there
/// are none).
pub(super) async fn status_without_daemon(
    config: &Config,
    json: bool,
    message: String,
) -> Result<i32, Failure> {
    let found = undaemoned(config).await;
    if found.is_empty() {
        if json {
            not_running_json(&config.project, &message);
            return Ok(EXIT_NOT_RUNNING);
        }
        return Err(Failure(EXIT_NOT_RUNNING, message));
    }
    let owner = live_owner(config, &found);
    let all_running = found.iter().all(|c| c.state == RunState::Running);
    let ports = |c: &ContainerInfo| {
        c.ports
            .iter()
            .map(|((port, _), (ip, host))| format!("{ip}:{host}->{port}"))
            .collect::<Vec<_>>()
    };
    let name = |c: &ContainerInfo| c.labels.get(labels::SERVICE).cloned().unwrap_or_default();
    if json {
        let owner_json = owner.as_ref().map_or(serde_json::Value::Null, |o| {
            serde_json::json!({
                "kind": "agent",
                "pid": o.pid,
                "orchestrator_addr": o.addr,
                "env_manager_addr": o.env_manager_addr,
                "http_addr": o.http_addr,
            })
        });
        let services = found.iter().map(container_json).collect();
        let message = format!(
            "project {:?}: {}",
            config.project,
            describe_owner(&owner, &found)
        );
        StatusJson {
            project: &config.project,
            running: true,
            healthy: all_running,
            engine_reachable: Some(true),
            engine_error: "",
            owner: owner_json,
            daemon: serde_json::Value::Null,
            services,
            message: &message,
        }
        .print();
    } else {
        println!(
            "project {:?}: {}",
            config.project,
            describe_owner(&owner, &found)
        );
        let rows: Vec<[String; 5]> = found
            .iter()
            .map(|c| {
                [
                    name(c),
                    c.state.as_str().to_string(),
                    c.engine_health.clone().unwrap_or_else(|| "-".into()),
                    ports(c).join(", "),
                    c.id.chars().take(12).collect(),
                ]
            })
            .collect();
        print_table(["SERVICE", "STATE", "HEALTH", "PORTS", "CONTAINER"], &rows);
        if owner.is_none() {
            println!(
                "`dspy-agent stop` removes them; the next start with the same config reuses them"
            );
        }
    }
    Ok(if all_running { EXIT_OK } else { EXIT_FAILURE })
}

pub(super) fn uptime(started_at_ms: i64) -> Option<f64> {
    (started_at_ms > 0).then(|| (now_ms() - started_at_ms).max(0) as f64 / 1000.0)
}

pub(super) fn human_duration(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub(super) async fn status(options: LoadOptions, json: bool) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let info = match running(&config) {
        Ok(i) => i,
        // No daemon ever ran here (a dead one is reported as such): an agent's stack may.
        Err(Failure(EXIT_NOT_RUNNING, message))
            if matches!(daemon::find(&config.state_dir), Ok(Found::None)) =>
        {
            return status_without_daemon(&config, json, message).await
        }
        Err(Failure(EXIT_NOT_RUNNING, message)) if json => {
            not_running_json(&config.project, &message);
            return Ok(EXIT_NOT_RUNNING);
        }
        Err(f) => return Err(f),
    };
    let r = env_client(&config, &info)
        .await?
        .status()
        .await
        .map_err(|s| rpc_failure("status", s))?;
    let all_healthy = r.engine_error.is_none() && r.services.iter().all(|s| s.healthy());
    let started = |s: &ServiceState| match s.engine_state {
        Some(RunState::Running | RunState::Paused) => s.started_at_ms.unwrap_or(0),
        _ => 0,
    };
    if json {
        let services: Vec<serde_json::Value> = r
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "image": s.image,
                    "phase": s.phase.as_str(),
                    "state": s.engine_state.map(|e| e.as_str()).unwrap_or(""),
                    "healthy": s.healthy(),
                    "container_id": s.container_id.clone().unwrap_or_default(),
                    "ports": s.ports.iter().map(|(c, (ip, h))| port_json(*c, ip, *h)).collect::<Vec<_>>(),
                    "url": s.url().unwrap_or_default(),
                    "uptime_seconds": uptime(started(s)),
                    "restart_count": s.restart_count,
                    "message": s.message,
                    "stand_in": s.stand_in,
                    "kept": false,
                    "replicas": s.replicas.iter().map(|r| serde_json::json!({
                        "slot": r.slot,
                        "node": r.node,
                        "node_addr": r.node_addr,
                        "state": r.state,
                        "ports": r.ports.iter().map(|((c, _), (ip, h))| port_json(*c, ip, *h)).collect::<Vec<_>>(),
                        "uptime_seconds": uptime(r.started_at_ms.unwrap_or(0)),
                        "error": r.error,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        // Who runs the stack: its daemon (also under "daemon", with its version and uptime), or
        // an agent.
        let owner = serde_json::json!({
            "kind": if info.daemon.is_some() { "daemon" } else { "agent" },
            "pid": info.pid,
            "orchestrator_addr": info.orchestrator_addr,
            "env_manager_addr": info.env_manager_addr,
            "http_addr": info.http_addr,
        });
        let daemon = info.daemon.as_ref().map_or(serde_json::Value::Null, |d| {
            serde_json::json!({
                "pid": d.pid,
                "version": d.version,
                "orchestrator_addr": d.orchestrator_addr,
                "env_manager_addr": d.env_manager_addr,
                "http_addr": d.http_addr,
                "uptime_seconds": uptime(d.started_at_ms),
            })
        });
        StatusJson {
            project: &r.project,
            running: true,
            healthy: all_healthy,
            engine_reachable: Some(r.engine_error.is_none()),
            engine_error: r.engine_error.as_deref().unwrap_or_default(),
            owner,
            daemon,
            services,
            message: "",
        }
        .print();
    } else {
        let runs = match &info.daemon {
            Some(d) => format!(
                "daemon pid {}, up {}",
                d.pid,
                uptime(d.started_at_ms)
                    .map(human_duration)
                    .unwrap_or_default()
            ),
            None => format!("run by {}", info.who()),
        };
        println!(
            "project {:?}: {runs}; orchestrator {}, env-manager {}, metrics {}://{}/metrics",
            r.project,
            info.orchestrator_addr,
            info.env_manager_addr,
            if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            info.http_addr
        );
        if let Some(e) = &r.engine_error {
            println!("warning: {e}");
        }
        let rows: Vec<[String; 6]> = r
            .services
            .iter()
            .flat_map(|s| {
                let service = [
                    s.name.clone(),
                    match s.engine_state {
                        Some(e) => e.as_str().to_string(),
                        None => s.phase.as_str().to_string(),
                    },
                    if s.healthy() {
                        "healthy".to_string()
                    } else {
                        s.phase.as_str().to_string()
                    },
                    s.ports
                        .iter()
                        .map(|(c, (ip, h))| format!("{ip}:{h}->{c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.container_id
                        .as_deref()
                        .unwrap_or_default()
                        .chars()
                        .take(12)
                        .collect(),
                    uptime(started(s))
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                ];
                // On the swarm backend, each replica below its service, with its node.
                let replicas = s.replicas.iter().map(|r| {
                    [
                        format!("  {}.{}", s.name, r.slot),
                        r.state.clone(),
                        r.error.clone().unwrap_or_else(|| "-".into()),
                        r.ports
                            .iter()
                            .map(|((c, _), (ip, h))| format!("{ip}:{h}->{c}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        format!("@{}", r.node),
                        uptime(r.started_at_ms.unwrap_or(0))
                            .map(human_duration)
                            .unwrap_or_else(|| "-".into()),
                    ]
                });
                std::iter::once(service).chain(replicas).collect::<Vec<_>>()
            })
            .collect();
        print_table(
            ["SERVICE", "STATE", "HEALTH", "PORTS", "CONTAINER", "UPTIME"],
            &rows,
        );
        for s in r
            .services
            .iter()
            .filter(|s| !s.healthy() && !s.message.is_empty())
        {
            println!("{}: {}", s.name, s.message.trim_end());
        }
        let stand_ins: Vec<&str> = r
            .services
            .iter()
            .filter(|s| s.stand_in)
            .map(|s| s.name.as_str())
            .collect();
        if !stand_ins.is_empty() {
            // A warning, beside the table rather than in it.
            eprintln!(
                "note: {} run{} local stand-in images (tagged by scripts/provision.sh when no registry was reachable), not the real services",
                stand_ins.join(", "),
                if stand_ins.len() == 1 { "s" } else { "" }
            );
        }
    }
    Ok(if all_healthy { EXIT_OK } else { EXIT_FAILURE })
}

/// `--since`: a duration back from now, an RFC 3339 time, or Unix seconds.
pub(super) fn parse_since(text: &str) -> Result<i64, Failure> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    if let Some(ms) = rfc3339_ms(text) {
        return Ok(ms / 1000);
    }
    let ago = parse_duration("--since", text).map_err(|_| {
        Failure(
            EXIT_USAGE,
            format!("error: --since: {text:?} is not a duration (\"10m\"), an RFC 3339 time or Unix seconds"),
        )
    })?;
    Ok(now_ms() / 1000 - ago.as_secs() as i64)
}

pub(super) async fn logs(
    options: LoadOptions,
    service: Option<String>,
    follow: bool,
    tail: u32,
    since: Option<String>,
) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let since_seconds = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
    let info = match running(&config) {
        Ok(i) => i,
        Err(f) if service.as_deref() == Some(OWN_LOG_SERVICE) => {
            // The daemon is gone: its last log is still worth reading.
            for name in [daemon::LOG_FILE, daemon::LAST_LOG_FILE] {
                let path = config.state_dir.join(name);
                if let Ok(text) = std::fs::read_to_string(&path) {
                    eprintln!("(the daemon is not running; this is {})", path.display());
                    let lines: Vec<&str> = text.lines().collect();
                    let skip = if tail == 0 {
                        0
                    } else {
                        lines.len().saturating_sub(tail as usize)
                    };
                    for l in &lines[skip..] {
                        println!("{l}");
                    }
                    return Ok(EXIT_OK);
                }
            }
            return Err(f);
        }
        Err(f) => return Err(f),
    };
    let client = env_client(&config, &info).await?;
    let services = match service {
        Some(s) => vec![s],
        None => client
            .status()
            .await
            .map_err(|s| rpc_failure("logs", s))?
            .services
            .into_iter()
            .filter(|s| s.container_id.is_some())
            .map(|s| s.name)
            .collect(),
    };
    let width = services.iter().map(String::len).max().unwrap_or(0);
    let prefixed = services.len() > 1;
    let mut streams = futures_util::stream::SelectAll::new();
    for s in &services {
        let stream = client
            .logs(s, follow, tail, since_seconds)
            .await
            .map_err(|st| rpc_failure(&format!("logs of {s}"), st))?;
        streams.push(stream);
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    while let Some(item) = streams.next().await {
        let line = item.map_err(|s| rpc_failure("logs", s))?;
        let text = if prefixed {
            format!("{:<width$} | {}\n", line.service, line.line)
        } else {
            format!("{}\n", line.line)
        };
        let written = if line.stderr {
            stderr.lock().write_all(text.as_bytes())
        } else {
            stdout.lock().write_all(text.as_bytes())
        };
        if written.is_err() {
            break;
        }
    }
    Ok(EXIT_OK)
}

pub(super) async fn restart(options: LoadOptions, service: String) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let info = running(&config)?;
    let began = Instant::now();
    let s = env_client(&config, &info)
        .await?
        .restart(&service)
        .await
        .map_err(|s| rpc_failure(&format!("restart {service}"), s))?;
    println!(
        "restarted {} ({}) in {:.2}s",
        s.name,
        s.phase.as_str(),
        began.elapsed().as_secs_f64()
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_times_and_seconds() {
        assert_eq!(parse_since("1700000000").ok(), Some(1_700_000_000));
        assert_eq!(parse_since("1970-01-01T00:01:00Z").ok(), Some(60));
        let ago = parse_since("10m").ok().unwrap();
        assert!((now_ms() / 1000 - ago - 600).abs() <= 1);
        assert!(parse_since("soon").is_err());
    }
}
