//! `status`, `logs` and `restart`: the services, through the daemon's env-manager, or read from
//! the Engine when no daemon runs.

use super::*;

pub(super) fn phase_name(p: i32) -> &'static str {
    env_pb::ServicePhase::try_from(p)
        .map(|p| match p {
            env_pb::ServicePhase::Unspecified => "unknown",
            env_pb::ServicePhase::Pending => "pending",
            env_pb::ServicePhase::Pulling => "pulling",
            env_pb::ServicePhase::Creating => "creating",
            env_pb::ServicePhase::Waiting => "waiting",
            env_pb::ServicePhase::Starting => "starting",
            env_pb::ServicePhase::Healthy => "healthy",
            env_pb::ServicePhase::Completed => "completed",
            env_pb::ServicePhase::Failed => "failed",
            env_pb::ServicePhase::Stopping => "stopping",
            env_pb::ServicePhase::Stopped => "stopped",
        })
        .unwrap_or("unknown")
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
            println!(
                "{}",
                serde_json::json!({"project": config.project, "running": false, "message": message})
            );
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
        let services: Vec<serde_json::Value> = found
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": name(c),
                    "state": c.state.as_str(),
                    "container_id": c.id,
                    "ports": ports(c),
                    "kept": c.labels.get(labels::KEEP).is_some_and(|v| v == "true"),
                })
            })
            .collect();
        let out = serde_json::json!({
            "project": config.project,
            "running": true,
            "daemon": null,
            "owner": owner.as_ref().map(|o| serde_json::json!({"pid": o.pid, "orchestrator_addr": o.addr})),
            "healthy": all_running,
            "services": services,
        });
        println!("{out:#}");
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
            println!(
                "{}",
                serde_json::json!({"project": config.project, "running": false, "message": message})
            );
            return Ok(EXIT_NOT_RUNNING);
        }
        Err(f) => return Err(f),
    };
    let mut client = env_client(&config, &info).await?;
    let r = client
        .get_services_status(env_pb::GetServicesStatusRequest {
            include_stats: false,
        })
        .await
        .map_err(|s| rpc_failure("status", s))?
        .into_inner();
    let all_healthy = r.engine_reachable && r.services.iter().all(|s| s.healthy);
    if json {
        let services: Vec<serde_json::Value> = r
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "image": s.image,
                    "phase": phase_name(s.phase),
                    "state": s.state,
                    "healthy": s.healthy,
                    "container_id": s.container_id,
                    "ports": s.ports.iter().map(|p| serde_json::json!({
                        "container_port": p.container_port,
                        "host_ip": p.host_ip,
                        "host_port": p.host_port,
                    })).collect::<Vec<_>>(),
                    "url": s.url,
                    "uptime_seconds": uptime(s.started_at_ms),
                    "restart_count": s.restart_count,
                    "message": s.message,
                    "stand_in": s.stand_in,
                })
            })
            .collect();
        let out = serde_json::json!({
            "project": r.project,
            "running": true,
            "healthy": all_healthy,
            "engine_reachable": r.engine_reachable,
            "engine_error": r.engine_error,
            "daemon": {
                "pid": info.pid,
                "version": info.version,
                "orchestrator_addr": info.orchestrator_addr,
                "env_manager_addr": info.env_manager_addr,
                "uptime_seconds": uptime(info.started_at_ms),
            },
            "services": services,
        });
        println!("{out:#}");
    } else {
        println!(
            "project {:?}: daemon pid {}, up {}; orchestrator {}, env-manager {}",
            r.project,
            info.pid,
            uptime(info.started_at_ms)
                .map(human_duration)
                .unwrap_or_default(),
            info.orchestrator_addr,
            info.env_manager_addr
        );
        if !r.engine_reachable {
            println!("warning: {}", r.engine_error);
        }
        let rows: Vec<[String; 6]> = r
            .services
            .iter()
            .map(|s| {
                [
                    s.name.clone(),
                    if s.state.is_empty() {
                        phase_name(s.phase).to_string()
                    } else {
                        s.state.clone()
                    },
                    if s.healthy {
                        "healthy".to_string()
                    } else {
                        phase_name(s.phase).to_string()
                    },
                    s.ports
                        .iter()
                        .map(|p| format!("{}:{}->{}", p.host_ip, p.host_port, p.container_port))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.container_id.chars().take(12).collect(),
                    uptime(s.started_at_ms)
                        .map(human_duration)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        print_table(
            ["SERVICE", "STATE", "HEALTH", "PORTS", "CONTAINER", "UPTIME"],
            &rows,
        );
        for s in r
            .services
            .iter()
            .filter(|s| !s.healthy && !s.message.is_empty())
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
    let mut client = env_client(&config, &info).await?;
    let services = match service {
        Some(s) => vec![s],
        None => client
            .get_services_status(env_pb::GetServicesStatusRequest::default())
            .await
            .map_err(|s| rpc_failure("logs", s))?
            .into_inner()
            .services
            .into_iter()
            .filter(|s| !s.container_id.is_empty())
            .map(|s| s.name)
            .collect(),
    };
    let width = services.iter().map(String::len).max().unwrap_or(0);
    let prefixed = services.len() > 1;
    let mut streams = futures_util::stream::SelectAll::new();
    for s in &services {
        let request = env_pb::StreamLogsRequest {
            service: s.clone(),
            follow,
            tail,
            since_seconds,
        };
        let stream = client
            .stream_logs(request)
            .await
            .map_err(|st| rpc_failure(&format!("logs of {s}"), st))?
            .into_inner();
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
        let written = if line.stream == env_pb::LogStream::Stderr as i32 {
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
        .restart_service(env_pb::RestartServiceRequest {
            service: service.clone(),
        })
        .await
        .map_err(|s| rpc_failure(&format!("restart {service}"), s))?
        .into_inner();
    println!(
        "restarted {} ({}) in {:.2}s",
        s.name,
        phase_name(s.phase),
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
