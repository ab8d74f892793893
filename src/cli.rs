//! The `dspy-agent` command line. It runs in the Python wheel's entry point (`dspy-agent` or
//! `python -m dspy_agent_infra`) and talks to the project's daemon over its two gRPC ports.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 the daemon is not running.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use tonic::transport::Channel;

use crate::config::spec::parse_duration;
use crate::config::{Config, ConfigError, LoadOptions, CONFIG_FILE_NAME};
use crate::daemon::{self, DaemonInfo, Found};
use crate::engine::{labels, ContainerInfo, Docker, Engine, RunState};
use crate::grpc::auth::{endpoint, AuthChannel, Bearer};
use crate::grpc::env_manager::OWN_LOG_SERVICE;
use crate::grpc::{env_pb, pb, MAX_MESSAGE_BYTES};
use crate::owner::{self, Owner};
use crate::tasks::store::now_ms;
use crate::util::rfc3339_ms;
use crate::watchdog::{self, Launcher};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_NOT_RUNNING: i32 = 3;

#[derive(Parser)]
#[command(
    name = "dspy-agent",
    version,
    about = "Runs a DSPy agent's service stack, task queue and gRPC ports in the background"
)]
struct Cli {
    /// Config file (default: $DSPY_AGENT_CONFIG, then ./dspy-agent.toml)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Project name (default: $DSPY_AGENT_PROJECT, then the config, then "dspy-agent")
    #[arg(long, global = true)]
    project: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the daemon and the stack in the background; returns once every service is healthy
    Start {
        /// Services to run (their dependencies come along), comma-separated
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
    },
    /// Stop every service, dependents first, and the daemon
    Stop {
        /// Seconds each service gets to exit before it is killed
        #[arg(long, value_name = "S")]
        timeout: Option<u32>,
    },
    /// Show each service's state, health, ports, container and uptime
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show service output (all services, or one; "env-manager" is the daemon's own log)
    Logs {
        #[arg(long, short = 's')]
        service: Option<String>,
        /// Keep following new output
        #[arg(long, short = 'f')]
        follow: bool,
        /// Lines from the end of each log (default: all)
        #[arg(long, short = 'n', value_name = "N")]
        tail: Option<u32>,
        /// Only output newer than this: a duration ("10m", "30s") or a time (RFC 3339 or Unix seconds)
        #[arg(long, value_name = "T")]
        since: Option<String>,
    },
    /// Restart one service and wait until it is healthy again
    Restart { service: String },
    /// Create, show or check the configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Submit, inspect and follow tasks on the orchestrator
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// Print the version
    Version,
    /// Run the daemon in this process (what `start` launches)
    #[command(hide = true)]
    Daemon {
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
    },
    /// Watch a stack's owner and remove its containers if it dies (what the core launches)
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        session: String,
        #[arg(long = "docker-host")]
        docker_host: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Write a commented dspy-agent.toml
    Init {
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Print the configuration in effect, every layer merged
    Show,
    /// Check the configuration and report every problem
    Validate,
    /// Print which config file is in use
    Path,
}

#[derive(Subcommand)]
enum TasksCmd {
    /// Queue a task and print its id
    Submit(SubmitArgs),
    /// Print a task's state, result and error
    Status {
        task_id: String,
        #[arg(long)]
        json: bool,
    },
    /// List tasks, oldest first
    List {
        /// pending, running, completed, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        #[arg(long = "type", value_name = "TYPE")]
        task_type: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print every state change of the given tasks (all tasks when none are given)
    Watch { task_ids: Vec<String> },
    /// Cancel a pending or running task
    Cancel { task_id: String },
}

#[derive(Args)]
struct SubmitArgs {
    task_type: String,
    /// The payload (JSON or any text); "-" reads it from stdin
    payload: Option<String>,
    /// Task id (default: a new unique one)
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Seconds before an attempt is cancelled
    #[arg(long)]
    timeout: Option<f64>,
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// KEY=VALUE, repeatable
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Wait for the task to finish and print its result
    #[arg(long)]
    wait: bool,
}

/// A failure to report: the message and the exit code.
struct Failure(i32, String);

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure(EXIT_USAGE, format!("error: {e}"))
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure(EXIT_FAILURE, message.into())
}

/// Runs the command line.
pub fn main(args: Vec<String>, launcher: Launcher) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    EXIT_OK
                }
                _ => EXIT_USAGE,
            };
        }
    };
    let mut options = LoadOptions::from_process();
    options.config_file = cli.config.clone();
    options.project = cli.project.clone();
    match cli.command {
        Cmd::Daemon { services } => {
            options.services = services;
            return daemon::run(options, launcher);
        }
        Cmd::Watchdog {
            session,
            docker_host,
        } => {
            let project = cli.project.unwrap_or_default();
            return watchdog::run(&project, &session, docker_host.as_deref());
        }
        _ => {}
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .try_init();
    let runtime = crate::runtime::get();
    match runtime.block_on(run(cli, options, launcher)) {
        Ok(code) => code,
        Err(Failure(code, message)) => {
            eprintln!("{}", message.trim_end());
            code
        }
    }
}

async fn run(cli: Cli, mut options: LoadOptions, launcher: Launcher) -> Result<i32, Failure> {
    match cli.command {
        Cmd::Start { services } => {
            options.services = services;
            start(options, launcher).await
        }
        Cmd::Stop { timeout } => stop(options, timeout).await,
        Cmd::Status { json } => status(options, json).await,
        Cmd::Logs {
            service,
            follow,
            tail,
            since,
        } => logs(options, service, follow, tail.unwrap_or(0), since).await,
        Cmd::Restart { service } => restart(options, service).await,
        Cmd::Config(c) => config(options, c),
        Cmd::Tasks(t) => tasks(options, t).await,
        Cmd::Version => {
            println!("dspy-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(EXIT_OK)
        }
        Cmd::Daemon { .. } | Cmd::Watchdog { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// The running daemon, or the exit a command takes when there is none.
fn running(config: &Config) -> Result<DaemonInfo, Failure> {
    let not_running = |extra: &str| {
        Failure(
            EXIT_NOT_RUNNING,
            format!(
                "dspy-agent is not running for project {:?}{extra}; start it with `dspy-agent start`",
                config.project
            ),
        )
    };
    match daemon::find(&config.state_dir) {
        Ok(Found::Running(Some(info))) => Ok(info),
        Ok(Found::Running(None)) => Err(fail(format!(
            "the daemon of project {:?} is still starting; try again in a moment",
            config.project
        ))),
        Ok(Found::None) => Err(not_running("")),
        Ok(Found::Stale(info)) => Err(not_running(&format!(
            " (its daemon{} died without cleaning up; `dspy-agent stop` removes what it left)",
            info.map(|i| format!(", pid {},", i.pid))
                .unwrap_or_default()
        ))),
        Err(e) => Err(fail(format!(
            "cannot read {}: {e}",
            daemon::pid_path(&config.state_dir).display()
        ))),
    }
}

/// A connection to `addr` (over TLS when configured); `unreachable` words the failure.
async fn connect(
    config: &Config,
    addr: &str,
    unreachable: impl FnOnce(tonic::transport::Error) -> Failure,
) -> Result<Channel, Failure> {
    endpoint(addr, config.tls.as_ref())
        .map_err(|e| fail(format!("error: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(unreachable)
}

async fn channel(config: &Config, addr: &str) -> Result<Channel, Failure> {
    connect(config, addr, |e| {
        fail(format!(
            "cannot reach the daemon at {addr}: {e}. `dspy-agent logs --service env-manager` shows its log"
        ))
    })
    .await
}

/// Adds the configured token to a channel's calls.
fn authed(config: &Config, channel: Channel) -> Result<AuthChannel, Failure> {
    let bearer = Bearer::new(config.token.as_ref().map(|t| t.expose()))
        .map_err(|e| Failure(EXIT_USAGE, format!("error: token: {e}")))?;
    Ok(bearer.channel(channel))
}

async fn env_client(
    config: &Config,
    info: &DaemonInfo,
) -> Result<env_pb::env_manager_service_client::EnvManagerServiceClient<AuthChannel>, Failure> {
    let channel = channel(config, &info.env_manager_addr).await?;
    Ok(env_pb::env_manager_service_client::EnvManagerServiceClient::new(authed(config, channel)?))
}

async fn orchestrator_client(
    config: &Config,
) -> Result<pb::orchestrator_service_client::OrchestratorServiceClient<AuthChannel>, Failure> {
    // Without a daemon, the configured address may still hold an orchestrator (an agent's own).
    let addr = match daemon::find(&config.state_dir) {
        Ok(Found::Running(Some(info))) => info.orchestrator_addr,
        // Still opening its ports, or its pid file was being read as it was written.
        Ok(Found::Running(None)) => wait_ready(config).await?.orchestrator_addr,
        Ok(Found::None | Found::Stale(_)) => config.orchestrator_addr.clone(),
        Err(e) => {
            return Err(fail(format!(
                "cannot read {}: {e}",
                daemon::pid_path(&config.state_dir).display()
            )))
        }
    };
    let channel = connect(config, &addr, |e| {
        Failure(
            EXIT_NOT_RUNNING,
            format!("no orchestrator at {addr} ({e}); start one with `dspy-agent start`"),
        )
    })
    .await?;
    Ok(
        pb::orchestrator_service_client::OrchestratorServiceClient::new(authed(config, channel)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

fn rpc_failure(what: &str, s: tonic::Status) -> Failure {
    let code = match s.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => EXIT_USAGE,
        _ => EXIT_FAILURE,
    };
    Failure(code, format!("error: {what}: {}", s.message()))
}

fn phase_name(p: i32) -> &'static str {
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

async fn start(options: LoadOptions, launcher: Launcher) -> Result<i32, Failure> {
    let config = Config::load(options.clone())?;
    let began = Instant::now();
    match daemon::find(&config.state_dir) {
        Ok(Found::Running(info)) => {
            println!(
                "dspy-agent is already running for project {:?}{}; nothing changed",
                config.project,
                info.as_ref()
                    .map(|i| format!(" (pid {})", i.pid))
                    .unwrap_or_default()
            );
            return follow_start(&config, began, false).await;
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
            return follow_start(&config, began, false).await;
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
    follow_start(&config, began, true).await
}

/// Removes what a dead daemon left: its pid file and its containers.
async fn clean_stale(config: &Config, info: Option<DaemonInfo>) {
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
async fn engine(config: &Config) -> Option<Docker> {
    Docker::connect(
        config.docker_host.as_deref(),
        crate::infra::DOCKER_CONNECT_TIMEOUT,
    )
    .await
    .ok()
}

/// Removes the project's containers (only those owned by `owner` when given), at once.
async fn sweep(config: &Config, owner: Option<u32>) -> usize {
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
async fn follow_start(config: &Config, began: Instant, owned: bool) -> Result<i32, Failure> {
    let info = wait_ready(config).await?;
    let mut client = env_client(config, &info).await?;
    // Subscribe first: the stream starts with every service's current state, so nothing that
    // happens after the names are known is missed.
    let mut stream = client
        .stream_health(env_pb::StreamHealthRequest::default())
        .await
        .map_err(|s| rpc_failure("cannot follow the start", s))?
        .into_inner();
    let names: Vec<String> = client
        .get_services_status(env_pb::GetServicesStatusRequest::default())
        .await
        .map_err(|s| rpc_failure("cannot follow the start", s))?
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut phases: BTreeMap<String, i32> = BTreeMap::new();
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
            phase_name(update.phase),
            first_line(&update.message)
        );
        if update.phase == env_pb::ServicePhase::Failed as i32 {
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
            Ok(EXIT_OK)
        }
        Some((service, message)) => {
            drop(stream);
            eprintln!("error: {}", failure_text(&service, &message));
            if owned {
                eprintln!("stopping the daemon, so nothing is left behind");
                stop_daemon(config, &info, None).await;
            }
            Ok(EXIT_FAILURE)
        }
    }
}

fn failure_text(service: &str, message: &str) -> String {
    if message.contains(service) {
        message.to_string()
    } else {
        format!("service {service:?} failed: {message}")
    }
}

fn all_healthy(phases: &BTreeMap<String, i32>) -> bool {
    phases.values().all(|p| {
        *p == env_pb::ServicePhase::Healthy as i32 || *p == env_pb::ServicePhase::Completed as i32
    })
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// The daemon's info once it has announced itself (it may still be opening its ports).
async fn wait_ready(config: &Config) -> Result<DaemonInfo, Failure> {
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
async fn stop_daemon(config: &Config, info: &DaemonInfo, timeout: Option<u32>) -> Vec<String> {
    let mut stopped = Vec::new();
    if let Ok(mut client) = env_client(config, info).await {
        let request = env_pb::StopServicesRequest {
            services: Vec::new(),
            timeout_seconds: timeout.unwrap_or(0),
        };
        if let Ok(r) = client.stop_services(request).await {
            stopped = r.into_inner().stopped;
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

async fn stop(options: LoadOptions, timeout: Option<u32>) -> Result<i32, Failure> {
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
            let info = wait_ready(&config).await?;
            stop_daemon(&config, &info, timeout).await;
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
async fn undaemoned(config: &Config) -> Vec<ContainerInfo> {
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
fn live_owner(config: &Config, found: &[ContainerInfo]) -> Option<Owner> {
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

fn describe_owner(owner: &Option<Owner>, found: &[ContainerInfo]) -> String {
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
async fn stop_without_daemon(config: &Config) -> Result<i32, Failure> {
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
async fn remove_containers(
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

/// `status` with no daemon: the project's containers as the Engine sees them (exit 3 when there
/// are none).
async fn status_without_daemon(
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

fn uptime(started_at_ms: i64) -> Option<f64> {
    (started_at_ms > 0).then(|| (now_ms() - started_at_ms).max(0) as f64 / 1000.0)
}

fn human_duration(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

async fn status(options: LoadOptions, json: bool) -> Result<i32, Failure> {
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

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `--since`: a duration back from now, an RFC 3339 time, or Unix seconds.
fn parse_since(text: &str) -> Result<i64, Failure> {
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

async fn logs(
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

async fn restart(options: LoadOptions, service: String) -> Result<i32, Failure> {
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

const CONFIG_TEMPLATE: &str = r#"# dspy-agent.toml: the stack `dspy-agent start` and `AgentInfra.start()` run.
# Every key is optional; what is not set here comes from the built-in catalog.
# Environment variables override this file (DSPY_AGENT_PROJECT, ORCHESTRATOR_GRPC_ADDR,
# ENV_MANAGER_GRPC_ADDR, ENV_MANAGER_DOCKER_HOST, DSPY_AGENT_SERVICES, ...).

# Names the containers (PROJECT-SERVICE), the network and the state folder.
# project = "dspy-agent"

# gRPC ports; port 0 picks any free port.
# orchestrator_addr = "127.0.0.1:50052"
# env_manager_addr = "127.0.0.1:50051"

# Where published ports listen on the host.
# publish_host_ip = "127.0.0.1"

[tasks]
# "process" survives the process being killed; "power" also a power cut (fsync per commit).
# durability = "process"
# concurrency = 64
# store = "tasks.db"   # relative to the state folder; ":memory:" keeps nothing

# Each service of the catalog can be changed field by field, and new ones added.
[services.redis]
# image = "redis:7-alpine"
# ports = ["6379:6379"]
# healthcheck = { type = "redis", start_period = "30s" }

[services.reddb]
# depends_on = ["redis"]
# resources = { memory = "1g", cpus = 1 }

[services.infermesh]
# env = { LOG_LEVEL = "info" }

# Off by default: multi-gigabyte images that want a GPU.
[services.ollama]
# enabled = true
# resources = { gpus = "auto" }

[services.model_server]
# enabled = true
"#;

fn config(options: LoadOptions, command: ConfigCmd) -> Result<i32, Failure> {
    match command {
        ConfigCmd::Init { force } => {
            let path = options.cwd.join(
                options
                    .config_file
                    .clone()
                    .unwrap_or_else(|| CONFIG_FILE_NAME.into()),
            );
            if path.exists() && !force {
                return Err(fail(format!(
                    "{} already exists; `--force` replaces it",
                    path.display()
                )));
            }
            std::fs::write(&path, CONFIG_TEMPLATE)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
            println!("wrote {}", path.display());
            Ok(EXIT_OK)
        }
        ConfigCmd::Path => {
            match Config::file_for(&options) {
                Some(p) => println!("{}", p.display()),
                None => println!(
                    "(no config file: built-in defaults and environment variables; `dspy-agent config init` writes {CONFIG_FILE_NAME})"
                ),
            }
            Ok(EXIT_OK)
        }
        ConfigCmd::Validate => {
            let problems = Config::problems(&options);
            let source = Config::file_for(&options)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "defaults and environment".into());
            if problems.is_empty() {
                println!("{source}: valid");
                return Ok(EXIT_OK);
            }
            let text = Config::file_for(&options)
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            for p in &problems {
                let line = locate(&text, p)
                    .map(|l| format!(":{l}"))
                    .unwrap_or_default();
                eprintln!("{source}{line}: {p}");
            }
            eprintln!(
                "{} problem{} found",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            Ok(EXIT_USAGE)
        }
        ConfigCmd::Show => {
            let config = Config::load(options)?;
            let services: BTreeMap<&str, serde_json::Value> = config
                .services
                .iter()
                .map(|s| {
                    let mut value = serde_json::to_value(s).unwrap_or_default();
                    for key in &s.secret_env {
                        value["env"][key] = "(secret; not shown)".into();
                    }
                    (s.name.as_str(), value)
                })
                .collect();
            let out = serde_json::json!({
                "project": config.project,
                "config_file": config.config_file,
                "state_dir": config.state_dir,
                "docker_host": config.docker_host,
                "orchestrator_addr": config.orchestrator_addr,
                "env_manager_addr": config.env_manager_addr,
                "token": config.token.as_ref().map(|_| "(set; not shown)"),
                "keep_running": config.keep_running,
                "tasks": {
                    "store": config.tasks.store.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| ":memory:".into()),
                    "concurrency": config.tasks.concurrency,
                    "limits": config.tasks.limits,
                    "durability": format!("{:?}", config.tasks.durability).to_lowercase(),
                },
                "services": services,
            });
            println!("{out:#}");
            Ok(EXIT_OK)
        }
    }
}

/// The line of the config file a problem is about, found from the field path in its message
/// (`services.redis.resources.memory: ...`) or the service it names.
fn locate(text: &str, problem: &ConfigError) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let find_key = |from: usize, key: &str| {
        lines
            .iter()
            .enumerate()
            .skip(from)
            .take_while(|(i, l)| *i == from || !l.trim_start().starts_with('['))
            .find(|(_, l)| {
                let t = l.trim_start();
                t.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map(|(i, _)| i + 1)
    };
    let header = |table: &str| lines.iter().position(|l| l.trim() == format!("[{table}]"));
    let field = match problem {
        ConfigError::Invalid { field, .. } => field.clone(),
        ConfigError::UnknownDependency { service, .. } => format!("services.{service}.depends_on"),
        ConfigError::Parse { message, .. } => {
            // toml reports "at line N, column M".
            let at = message.find("line ")?;
            return message[at + 5..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok();
        }
        _ => return None,
    };
    let parts: Vec<&str> = field.split('.').collect();
    // The longest table header that prefixes the path, then the next key below it.
    for split in (1..parts.len()).rev() {
        if let Some(h) = header(&parts[..split].join(".")) {
            let key = parts[split].split('[').next()?;
            return find_key(h, key).or(Some(h + 1));
        }
    }
    let key = parts.first()?.split('[').next()?;
    find_key(0, key)
}

async fn tasks(options: LoadOptions, command: TasksCmd) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let mut client = orchestrator_client(&config).await?;
    match command {
        TasksCmd::Submit(a) => {
            let payload = match a.payload.as_deref() {
                Some("-") => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| fail(format!("cannot read the payload from stdin: {e}")))?;
                    buf
                }
                Some(p) => p.as_bytes().to_vec(),
                None => Vec::new(),
            };
            let mut metadata = HashMap::new();
            for m in &a.metadata {
                let (k, v) = m.split_once('=').ok_or_else(|| {
                    Failure(EXIT_USAGE, format!("error: --meta {m:?}: write KEY=VALUE"))
                })?;
                metadata.insert(k.to_string(), v.to_string());
            }
            let timeout_ms = match a.timeout {
                None => 0,
                Some(t) if t.is_finite() && t > 0.0 => ((t * 1000.0) as u64).max(1),
                Some(t) => {
                    return Err(Failure(
                        EXIT_USAGE,
                        format!("error: --timeout: {t} must be a positive number of seconds"),
                    ))
                }
            };
            let task_id = a.id.unwrap_or_else(new_task_id);
            let r = client
                .submit_task(pb::SubmitTaskRequest {
                    task_id: task_id.clone(),
                    task_type: a.task_type,
                    payload,
                    metadata,
                    priority: a.priority,
                    timeout_ms,
                    max_retries: a.retries,
                })
                .await
                .map_err(|s| rpc_failure("submit", s))?
                .into_inner();
            if !r.success {
                return Err(fail(format!("error: submit: {}", r.error)));
            }
            if !a.wait {
                println!("{}", r.task_id);
                return Ok(EXIT_OK);
            }
            let mut stream = client
                .stream_task_results(pb::StreamTaskResultsRequest {
                    task_ids: vec![task_id.clone()],
                    include_current: true,
                })
                .await
                .map_err(|s| rpc_failure("wait", s))?
                .into_inner();
            while let Some(item) = stream.next().await {
                let t = item.map_err(|s| rpc_failure("wait", s))?;
                if t.status >= pb::TaskState::Completed as i32 {
                    return Ok(print_task(&t, false));
                }
            }
            Err(fail("the orchestrator went away before the task finished"))
        }
        TasksCmd::Status { task_id, json } => {
            let t = client
                .get_task_status(pb::GetTaskStatusRequest { task_id })
                .await
                .map_err(|s| rpc_failure("status", s))?
                .into_inner();
            print_task(&t, json);
            Ok(EXIT_OK)
        }
        TasksCmd::List {
            state,
            task_type,
            limit,
            json,
        } => {
            let status = match state.as_deref() {
                None => 0,
                Some(s) => pb::TaskState::from_str_name(&s.to_uppercase())
                    .filter(|s| *s != pb::TaskState::Unspecified)
                    .ok_or_else(|| {
                        Failure(
                            EXIT_USAGE,
                            format!("error: --state: {s:?} is not one of pending, running, completed, failed, cancelled"),
                        )
                    })? as i32,
            };
            let r = client
                .list_tasks(pb::ListTasksRequest {
                    status,
                    task_type: task_type.unwrap_or_default(),
                    page_size: limit,
                    ..Default::default()
                })
                .await
                .map_err(|s| rpc_failure("list", s))?
                .into_inner();
            if json {
                let items: Vec<serde_json::Value> = r.tasks.iter().map(task_json).collect();
                println!("{:#}", serde_json::Value::Array(items));
            } else {
                let rows: Vec<[String; 4]> = r
                    .tasks
                    .iter()
                    .map(|t| {
                        [
                            t.task_id.clone(),
                            t.task_type.clone(),
                            state_name(t.status).to_string(),
                            t.attempts.to_string(),
                        ]
                    })
                    .collect();
                print_table(["TASK", "TYPE", "STATE", "ATTEMPTS"], &rows);
            }
            Ok(EXIT_OK)
        }
        TasksCmd::Watch { task_ids } => {
            let include_current = !task_ids.is_empty();
            let mut stream = client
                .stream_task_results(pb::StreamTaskResultsRequest {
                    task_ids,
                    include_current,
                })
                .await
                .map_err(|s| rpc_failure("watch", s))?
                .into_inner();
            while let Some(item) = stream.next().await {
                let t = item.map_err(|s| rpc_failure("watch", s))?;
                println!("{}", task_json(&t));
            }
            Ok(EXIT_OK)
        }
        TasksCmd::Cancel { task_id } => {
            let r = client
                .cancel_task(pb::CancelTaskRequest {
                    task_id: task_id.clone(),
                })
                .await
                .map_err(|s| rpc_failure("cancel", s))?
                .into_inner();
            if r.cancelled {
                println!("cancelled {task_id}");
            } else {
                println!(
                    "{task_id} had already finished ({})",
                    r.task
                        .as_ref()
                        .map(|t| state_name(t.status))
                        .unwrap_or("unknown")
                );
            }
            Ok(EXIT_OK)
        }
    }
}

fn new_task_id() -> String {
    format!(
        "cli-{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

fn state_name(s: i32) -> &'static str {
    match pb::TaskState::try_from(s) {
        Ok(pb::TaskState::Pending) => "pending",
        Ok(pb::TaskState::Running) => "running",
        Ok(pb::TaskState::Completed) => "completed",
        Ok(pb::TaskState::Failed) => "failed",
        Ok(pb::TaskState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn task_json(t: &pb::TaskInfo) -> serde_json::Value {
    let result = match std::str::from_utf8(&t.result_payload) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| text.into()),
        Err(_) => serde_json::json!({"bytes": t.result_payload.len()}),
    };
    serde_json::json!({
        "task_id": t.task_id,
        "task_type": t.task_type,
        "status": state_name(t.status),
        "result": result,
        "error": t.error,
        "attempts": t.attempts,
        "created_at_ms": t.created_at_ms,
        "started_at_ms": t.started_at_ms,
        "finished_at_ms": t.finished_at_ms,
    })
}

/// Prints a task; the exit code says whether it completed.
fn print_task(t: &pb::TaskInfo, json: bool) -> i32 {
    if json {
        println!("{:#}", task_json(t));
    } else {
        println!(
            "{}: {} ({} attempt{})",
            t.task_id,
            state_name(t.status),
            t.attempts,
            if t.attempts == 1 { "" } else { "s" }
        );
        if !t.result_payload.is_empty() {
            println!("{}", String::from_utf8_lossy(&t.result_payload));
        }
        if !t.error.is_empty() {
            println!("error: {}", t.error);
        }
    }
    if t.status == pb::TaskState::Completed as i32 {
        EXIT_OK
    } else {
        EXIT_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_point_at_their_line() {
        let text = "project = \"p\"\n\n[services.redis]\nimage = \"r\"\nports = [\"x\"]\n\n[services.redis.resources]\nmemory = \"lots\"\n";
        let memory = ConfigError::invalid("services.redis.resources.memory", "bad");
        assert_eq!(locate(text, &memory), Some(8));
        let port = ConfigError::invalid("services.redis.ports[0]", "bad");
        assert_eq!(locate(text, &port), Some(5));
        let project = ConfigError::invalid("project", "bad");
        assert_eq!(locate(text, &project), Some(1));
    }

    #[test]
    fn since_takes_durations_times_and_seconds() {
        assert_eq!(parse_since("1700000000").ok(), Some(1_700_000_000));
        assert_eq!(parse_since("1970-01-01T00:01:00Z").ok(), Some(60));
        let ago = parse_since("10m").ok().unwrap();
        assert!((now_ms() / 1000 - ago - 600).abs() <= 1);
        assert!(parse_since("soon").is_err());
    }
}
