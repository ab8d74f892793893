//! `start` and `stop`: launching the daemon, following its start, stopping it, and cleaning up
//! after a daemon (or an agent) that died.

use super::*;
use crate::services::supervisor::Phase;

pub(super) async fn start(options: LoadOptions, launcher: Launcher) -> Result<i32, Failure> {
    let config = Config::load(options.clone())?;
    let began = Instant::now();
    let requested = options.services.as_deref();
    match daemon::find(&config.state_dir) {
        Ok(Found::Running(info)) => {
            println!(
                "dspy-agent is already running for project {:?}{}; nothing changed",
                config.project,
                info.as_ref()
                    .map(|i| format!(" (pid {})", i.pid))
                    .unwrap_or_default()
            );
            return follow_start(&config, began, false, requested).await;
        }
        Ok(Found::Stale(_) | Found::None) if Runner::agent(&config).is_some() => {
            // One stack per project: an agent's own stack is used as it is, as a second
            // AgentInfra.start() uses it.
            let agent = Runner::agent(&config).map(|r| r.who()).unwrap_or_default();
            println!(
                "project {:?} runs in {agent}; its stack is used as it is (status, logs, restart and tasks work on it; stopping it is the agent's)",
                config.project
            );
            return follow_start(&config, began, false, requested).await;
        }
        Ok(Found::Stale(info)) => clean_stale(&config, info).await,
        Ok(Found::None) => {}
        Err(e) => return Err(fail(format!("cannot read the pid file: {e}"))),
    }

    let mut command = launcher.command(&["daemon"]);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(c) = &options.config_file {
        command.arg("--config").arg(options.cwd.join(c));
    }
    if let Some(p) = &options.project {
        command.arg("--project").arg(p);
    }
    if let Some(s) = &options.services {
        command.arg("--services").arg(s.join(","));
    }
    let mut child = command.spawn().map_err(|e| {
        fail(format!(
            "cannot run the daemon with {}: {e}",
            launcher.python.display()
        ))
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .unwrap_or_default();
    if ready.trim().is_empty() {
        let mut errors = String::new();
        let _ = stderr.read_to_string(&mut errors);
        let code = tokio::task::spawn_blocking(move || child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|s| s.code());
        if code == Some(daemon::EXIT_ALREADY_RUNNING) {
            println!(
                "another `dspy-agent start` is starting project {:?}; following it",
                config.project
            );
            return follow_start(&config, began, false, requested).await;
        }
        return Err(Failure(
            if code == Some(EXIT_USAGE) {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            },
            format!("the daemon did not start:\n{}", errors.trim_end()),
        ));
    }
    let info: DaemonInfo = serde_json::from_str(&ready).map_err(|e| {
        fail(format!(
            "the daemon announced itself unreadably ({e}): {ready}"
        ))
    })?;
    // The daemon runs on alone; nobody waits for it.
    std::thread::spawn(move || child.wait());
    println!(
        "daemon started (pid {}); orchestrator on {}, env-manager on {}",
        info.pid, info.orchestrator_addr, info.env_manager_addr
    );
    follow_start(&config, began, true, requested).await
}

/// Removes what a dead daemon left: its pid file and its containers.
pub(super) async fn clean_stale(config: &Config, info: Option<DaemonInfo>) {
    let pid = info.as_ref().map(|i| i.pid);
    println!(
        "found a stale pid file{} (the daemon died without cleaning up); removing what it left",
        pid.map(|p| format!(" of pid {p}")).unwrap_or_default()
    );
    // The lock is gone, so the daemon is (a zombie at most is left of it).
    if let Some(pid) = pid {
        sweep(config, Some(pid)).await;
    }
    let _ = daemon::remove_stale(&config.state_dir);
}

/// The project's Docker Engine, if it answers.
pub(super) async fn engine(config: &Config) -> Option<crate::engine::SharedEngine> {
    crate::engine::connect(
        config.backend,
        config.docker_host.as_deref(),
        crate::infra::DOCKER_CONNECT_TIMEOUT,
    )
    .await
    .ok()
}

/// Removes the project's containers (only those owned by `owner` when given), at once.
pub(super) async fn sweep(config: &Config, owner: Option<u32>) -> usize {
    let found: Vec<ContainerInfo> = undaemoned(config)
        .await
        .into_iter()
        .filter(|c| {
            let owned =
                owner.is_none_or(|pid| c.labels.get(labels::OWNER_PID) == Some(&pid.to_string()));
            let kept = c.labels.get(labels::KEEP).is_some_and(|v| v == "true");
            owned && !kept
        })
        .collect();
    remove_containers(config, &found, Duration::ZERO, false).await
}

/// Follows the stack's health until every service is healthy (0) or one failed (1). When this
/// command started the daemon (`owned`), a failure also stops it, so nothing is left behind.
/// Follows the start of the stack until every service is healthy or one fails; `requested`
/// services the stack does not run are named.
pub(super) async fn follow_start(
    config: &Config,
    began: Instant,
    owned: bool,
    requested: Option<&[String]>,
) -> Result<i32, Failure> {
    let info = wait_ready(config).await?;
    let client = env_client(config, &info).await?;
    // Subscribe first: the stream starts with every service's current state, so nothing that
    // happens after the names are known is missed.
    let mut stream = client
        .phases()
        .await
        .map_err(|s| rpc_failure("cannot follow the start", s))?;
    let names: Vec<String> = client
        .status()
        .await
        .map_err(|s| rpc_failure("cannot follow the start", s))?
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut phases: BTreeMap<String, Phase> = BTreeMap::new();
    let failed = loop {
        if phases.len() == names.len() && all_healthy(&phases) {
            break None;
        }
        let update = match stream.next().await {
            Some(Ok(u)) => u,
            Some(Err(s)) => return Err(rpc_failure("lost the daemon while starting", s)),
            None => return Err(fail("the daemon went away while starting; `dspy-agent logs --service env-manager` shows why")),
        };
        let t = began.elapsed().as_secs_f64();
        println!(
            "[{t:6.2}s] {:<14} {:<9} {}",
            update.service,
            update.phase.as_str(),
            first_line(&update.message)
        );
        if update.phase == Phase::Failed {
            break Some((update.service, update.message));
        }
        phases.insert(update.service, update.phase);
    };
    match failed {
        None => {
            println!(
                "all {} services healthy in {:.2}s; `dspy-agent status` shows them",
                phases.len(),
                began.elapsed().as_secs_f64()
            );
            let missing: Vec<&String> = requested
                .unwrap_or_default()
                .iter()
                .filter(|s| !names.contains(s))
                .collect();
            if !missing.is_empty() {
                eprintln!(
                    "note: the running stack has no {} (it runs {}): {} started it with other services; stop it and start again with them, or add them to the config it was started with",
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    names.join(", "),
                    info.who()
                );
            }
            Ok(EXIT_OK)
        }
        Some((service, message)) => {
            drop(stream);
            eprintln!("error: {}", failure_text(&service, &message));
            if let (true, Some(daemon)) = (owned, &info.daemon) {
                eprintln!("stopping the daemon, so nothing is left behind");
                stop_daemon(config, daemon, None).await;
            }
            Ok(EXIT_FAILURE)
        }
    }
}

pub(super) fn failure_text(service: &str, message: &str) -> String {
    if message.contains(service) {
        message.to_string()
    } else {
        format!("service {service:?} failed: {message}")
    }
}

pub(super) fn all_healthy(phases: &BTreeMap<String, Phase>) -> bool {
    phases
        .values()
        .all(|p| matches!(p, Phase::Healthy | Phase::Completed))
}

pub(super) fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Who runs the stack, once its daemon has announced itself (it may still be opening its
/// ports).
pub(super) async fn wait_ready(config: &Config) -> Result<Runner, Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match running(config) {
            Ok(info) => return Ok(info),
            Err(Failure(EXIT_FAILURE, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(f) => return Err(f),
        }
    }
}

/// Stops the stack over gRPC, then the daemon by signal; kills it and removes the project's
/// containers if it does not go. Returns the services that were stopped.
pub(super) async fn stop_daemon(
    config: &Config,
    info: &DaemonInfo,
    timeout: Option<u32>,
) -> Vec<String> {
    let mut stopped = Vec::new();
    if let Ok(client) = env_client(config, &Runner::of_daemon(info.clone())).await {
        if let Ok(names) = client.stop(timeout).await {
            stopped = names;
        }
    }
    daemon::signal(info.pid, libc::SIGTERM);
    let grace = Duration::from_secs(u64::from(timeout.unwrap_or(10)) + 20);
    if !daemon::wait_gone(&config.state_dir, grace).await {
        eprintln!(
            "the daemon (pid {}) did not exit within {grace:?}; killing it",
            info.pid
        );
        daemon::signal(info.pid, libc::SIGKILL);
        daemon::wait_gone(&config.state_dir, Duration::from_secs(5)).await;
        sweep(config, None).await;
        let _ = daemon::remove_stale(&config.state_dir);
    }
    stopped
}

pub(super) async fn stop(options: LoadOptions, timeout: Option<u32>) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let began = Instant::now();
    match daemon::find(&config.state_dir) {
        Ok(Found::Running(Some(info))) => {
            let stopped = stop_daemon(&config, &info, timeout).await;
            for s in &stopped {
                println!("stopped {s}");
            }
            println!(
                "dspy-agent stopped (project {:?}) in {:.2}s",
                config.project,
                began.elapsed().as_secs_f64()
            );
            Ok(EXIT_OK)
        }
        Ok(Found::Running(None)) => {
            // Still opening its ports: wait for it, then stop it properly.
            if let Some(daemon) = wait_ready(&config).await?.daemon {
                stop_daemon(&config, &daemon, timeout).await;
            }
            println!("dspy-agent stopped (project {:?})", config.project);
            Ok(EXIT_OK)
        }
        Ok(Found::Stale(info)) => {
            clean_stale(&config, info).await;
            println!(
                "dspy-agent was not running for project {:?}; its leftovers are removed",
                config.project
            );
            Ok(EXIT_OK)
        }
        Ok(Found::None) => stop_without_daemon(&config).await,
        Err(e) => Err(fail(format!("cannot read the pid file: {e}"))),
    }
}

/// The project's containers that no daemon runs: a stack kept running by an agent
/// (`keep_running=True`), or one an agent runs now. Empty when the Engine cannot be reached.
pub(super) async fn undaemoned(config: &Config) -> Vec<ContainerInfo> {
    let Some(docker) = engine(config).await else {
        return Vec::new();
    };
    let mut found = docker
        .list_by_label(labels::PROJECT, &config.project)
        .await
        .unwrap_or_default();
    found.sort_by(|a, b| {
        a.labels
            .get(labels::SERVICE)
            .cmp(&b.labels.get(labels::SERVICE))
    });
    found
}

/// The live process that runs these containers' stack, if one does: the holder of the state
/// folder's lock, or a creator (on this machine) that still runs.
pub(super) fn live_owner(config: &Config, found: &[ContainerInfo]) -> Option<Owner> {
    let host = config
        .docker_host
        .as_deref()
        .unwrap_or(crate::engine::DEFAULT_HOST);
    owner::holder(&config.state_dir).or_else(|| {
        found
            .iter()
            .find_map(|c| owner::live_creator(&c.labels, host))
    })
}

pub(super) fn describe_owner(owner: &Option<Owner>, found: &[ContainerInfo]) -> String {
    match owner {
        Some(o) if o.addr.is_empty() => format!("run by process {} (no daemon)", o.pid),
        Some(o) => format!(
            "run by process {} (no daemon; orchestrator {})",
            o.pid, o.addr
        ),
        None => {
            let pid = found
                .iter()
                .find_map(|c| c.labels.get(labels::OWNER_PID).cloned())
                .unwrap_or_else(|| "?".into());
            if found
                .iter()
                .any(|c| c.labels.get(labels::KEEP).is_some_and(|v| v == "true"))
            {
                format!("kept running by process {pid}, which has exited")
            } else {
                format!("left behind by process {pid}, which exited without removing it")
            }
        }
    }
}

/// `stop` with no daemon: removes a kept stack, and refuses to touch one a live agent runs.
pub(super) async fn stop_without_daemon(config: &Config) -> Result<i32, Failure> {
    let found = undaemoned(config).await;
    if let Some(owner) = live_owner(config, &found) {
        return Err(fail(format!(
            "project {:?} is {}; stop it there (leave its `async with`, or end that process), \
             it is not this command's to remove",
            config.project,
            describe_owner(&Some(owner), &found)
        )));
    }
    if found.is_empty() {
        return Err(Failure(
            EXIT_NOT_RUNNING,
            format!(
                "dspy-agent is not running for project {:?}; nothing to stop",
                config.project
            ),
        ));
    }
    println!(
        "project {:?} is {}: removing its containers",
        config.project,
        describe_owner(&None, &found)
    );
    let removed = remove_containers(config, &found, Duration::from_secs(10), true).await;
    println!(
        "removed {removed} container(s) of project {:?}",
        config.project
    );
    Ok(EXIT_OK)
}

/// Removes `found` (each with `grace` to stop, naming each when `report`) and the project's
/// network.
pub(super) async fn remove_containers(
    config: &Config,
    found: &[ContainerInfo],
    grace: Duration,
    report: bool,
) -> usize {
    let Some(docker) = engine(config).await else {
        return 0;
    };
    let mut removed = 0;
    for c in found {
        if docker.remove(&c.id, grace).await.is_ok() {
            if report {
                let service = c.labels.get(labels::SERVICE).cloned().unwrap_or_default();
                println!("stopped {service}");
            }
            removed += 1;
        }
    }
    docker
        .remove_network(&crate::util::network_name(&config.project))
        .await;
    removed
}
