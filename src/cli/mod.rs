//! The `dspy-agent` command line. It runs in the Python wheel's entry point (`dspy-agent` or
//! `python -m dspy_agent_infra`) and talks to the project's daemon over its two gRPC ports.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 the daemon is not running.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;

use crate::config::spec::parse_duration;
use crate::config::{Config, ConfigError, LoadOptions, CONFIG_FILE_NAME};
use crate::daemon::{self, DaemonInfo, Found};
use crate::engine::{labels, ContainerInfo, RunState};
use crate::grpc::auth::{endpoint, AuthChannel, Bearer};
use crate::grpc::env_manager::OWN_LOG_SERVICE;
use crate::owner::{self, Owner};
use crate::stack::{CallError, ServiceClient, TaskClient};
use crate::tasks::store::now_ms;
use crate::util::rfc3339_ms;
use crate::watchdog::{self, Launcher};

mod config_cmd;
mod daemon_control;
mod export_cmd;
mod import_cmd;
mod render;
mod services;
mod tasks_cmd;

use config_cmd::*;
use daemon_control::*;
use export_cmd::*;
use import_cmd::*;
use render::*;
use services::*;
use tasks_cmd::*;
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
        /// Print JSON instead of a table, in one shape whoever runs the stack: project, running,
        /// healthy, engine_reachable (null when not asked), engine_error, owner (kind "daemon"
        /// or "agent", pid, orchestrator_addr, env_manager_addr, http_addr; null when no live
        /// process owns the containers), daemon (pid, version, uptime_seconds; null unless a
        /// daemon runs it), services (each: name, image, phase, state, healthy, container_id,
        /// ports, url, uptime_seconds, restart_count, message, stand_in, kept, replicas) and
        /// message
        #[arg(long)]
        json: bool,
    },
    /// Show service output (all services, or one; "env-manager" is the daemon's own log)
    Logs {
        /// Only this service's output (also written `--service NAME`)
        #[arg(value_name = "SERVICE", conflicts_with = "service")]
        name: Option<String>,
        /// Only this service's output
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
    Restart {
        /// The service to restart
        service: String,
    },
    /// Create, show or check the configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Submit, inspect and follow tasks on the orchestrator
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// Write the dspy-agent.toml that runs a docker-compose file's services, naming what it cannot carry
    Import {
        /// The compose file (docker-compose.yml, compose.yaml, ...)
        file: PathBuf,
        /// The config file to write (default: ./dspy-agent.toml; "-" prints it)
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// Services to carry (their dependencies come along), comma-separated
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
        /// Turn on services of this Compose profile (repeatable)
        #[arg(long = "profile", value_name = "NAME")]
        profiles: Vec<String>,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Write the stack as manifests of another orchestrator
    #[command(subcommand)]
    Export(ExportCmd),
    /// Print the token both gRPC ports require, for clients in other languages or on other machines
    /// (made now when the project has none yet)
    Token,
    /// Print the address of the running daemon's dashboard (and open it in a browser when
    /// this session has a display)
    Dashboard {
        /// Only print the address
        #[arg(long)]
        no_browser: bool,
    },
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
        #[arg(long, default_value = "docker")]
        backend: String,
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
    /// Print the configuration in effect as dspy-agent.toml is written: every layer merged, the
    /// defaults included, secrets hidden
    Show {
        /// Say after each setting where it came from: default, catalog, the file, environment
        /// or arguments
        #[arg(long)]
        origin: bool,
    },
    /// Check the configuration and report every problem
    Validate,
    /// Print which config file is in use
    Path,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Kubernetes objects: a Deployment (StatefulSet with named volumes), Service, ConfigMap and Secret per service
    Kubernetes {
        /// A folder to write one SERVICE.yaml per service into (default: print them all)
        #[arg(long, short = 'o', value_name = "DIR")]
        output: Option<PathBuf>,
        /// The namespace to put the objects in (default: the one `kubectl` uses)
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Services to export (their dependencies come along), comma-separated
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
    },
}

#[derive(Subcommand)]
enum TasksCmd {
    /// Queue a task and print its id
    Submit(SubmitArgs),
    /// Print a task's state, result and error
    Status {
        /// The task's id
        task_id: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List tasks, oldest first
    List {
        /// pending, running, completed, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this type
        #[arg(long = "type", value_name = "TYPE")]
        task_type: Option<String>,
        /// Most tasks listed
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print every state change of the given tasks (all tasks when none are given)
    Watch {
        /// The tasks to follow (all when none are given)
        task_ids: Vec<String>,
    },
    /// Cancel a pending or running task
    Cancel {
        /// The task's id
        task_id: String,
    },
    /// Delete finished tasks (completed, failed, cancelled) older than a duration
    Prune {
        /// A duration: "1h", "7d", "30m"; "0s" deletes every finished task
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
}

#[derive(Args)]
struct SubmitArgs {
    /// The task's type: a built-in one (ping, echo, exec, http) or one a handler serves
    task_type: String,
    /// The payload (JSON or any text); "-" reads it from stdin
    payload: Option<String>,
    /// Task id (default: a new unique one)
    #[arg(long)]
    id: Option<String>,
    /// Higher runs first among waiting tasks of its type
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Seconds before an attempt is cancelled
    #[arg(long)]
    timeout: Option<f64>,
    /// Attempts after a failed one
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// KEY=VALUE, repeatable
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Wait for the task to finish and print its result
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (a duration: "30s", "10m"); exit 1 with the task's
    /// state then
    #[arg(long, value_name = "DURATION", requires = "wait")]
    wait_timeout: Option<String>,
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
            backend,
        } => {
            let project = cli.project.unwrap_or_default();
            let backend = if backend == "swarm" {
                crate::config::Backend::Swarm
            } else {
                crate::config::Backend::Docker
            };
            return watchdog::run(&project, &session, backend, docker_host.as_deref());
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
            name,
            service,
            follow,
            tail,
            since,
        } => logs(options, name.or(service), follow, tail.unwrap_or(0), since).await,
        Cmd::Restart { service } => restart(options, service).await,
        Cmd::Config(c) => config(options, c),
        Cmd::Tasks(t) => tasks(options, t).await,
        Cmd::Token => token(options),
        Cmd::Dashboard { no_browser } => dashboard(options, no_browser),
        Cmd::Export(ExportCmd::Kubernetes {
            output,
            namespace,
            services,
        }) => {
            options.services = services;
            export_kubernetes(options, output, namespace)
        }
        Cmd::Import {
            file,
            output,
            services,
            profiles,
            force,
        } => import(
            options,
            ImportArgs {
                file,
                output,
                services,
                profiles,
                force,
            },
        ),
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
fn dashboard(options: LoadOptions, no_browser: bool) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let info = running(&config)?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = match info.http_addr.rsplit_once(':') {
        // A wildcard address is reached on loopback from here.
        Some(("0.0.0.0" | "[::]", port)) => format!("127.0.0.1:{port}"),
        _ => info.http_addr.clone(),
    };
    let url = format!("{scheme}://{host}/");
    println!("{url}");
    if crate::access::required(&config)?.token.is_some() {
        println!("sign in with the project's token: `dspy-agent token` prints it");
    }
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
    if !no_browser && display {
        let opener = std::env::var("BROWSER").unwrap_or_else(|_| "xdg-open".into());
        let opened = std::process::Command::new(&opener)
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if opened.is_err() {
            eprintln!("note: could not run {opener:?} to open a browser; open the address above");
        }
    }
    Ok(EXIT_OK)
}

/// Who runs a project's stack, and where it serves: its daemon, or a process of this user (a
/// Python agent's own stack) that holds the project's state folder.
struct Runner {
    pid: u32,
    /// The daemon's own record; `None` when an agent runs the stack.
    daemon: Option<DaemonInfo>,
    orchestrator_addr: String,
    env_manager_addr: String,
    http_addr: String,
}

impl Runner {
    fn of_daemon(info: DaemonInfo) -> Runner {
        Runner {
            pid: info.pid,
            orchestrator_addr: info.orchestrator_addr.clone(),
            env_manager_addr: info.env_manager_addr.clone(),
            http_addr: info.http_addr.clone(),
            daemon: Some(info),
        }
    }

    /// The live agent process that runs the project's stack, once it serves its ports.
    fn agent(config: &Config) -> Option<Runner> {
        let owner = crate::owner::holder(&config.state_dir)?;
        let serving = owner.pid != 0
            && !crate::util::is_dead(owner.pid)
            && !owner.env_manager_addr.is_empty();
        serving.then_some(Runner {
            pid: owner.pid,
            daemon: None,
            orchestrator_addr: owner.addr,
            env_manager_addr: owner.env_manager_addr,
            http_addr: owner.http_addr,
        })
    }

    /// "the daemon (pid N)" or "process N (a Python agent's own stack)".
    fn who(&self) -> String {
        match self.daemon {
            Some(_) => format!("the daemon (pid {})", self.pid),
            None => format!("process {} (an agent that runs the stack itself)", self.pid),
        }
    }
}

fn running(config: &Config) -> Result<Runner, Failure> {
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
        Ok(Found::Running(Some(info))) => Ok(Runner::of_daemon(info)),
        Ok(Found::Running(None)) => Err(fail(format!(
            "the daemon of project {:?} is still starting; try again in a moment",
            config.project
        ))),
        Ok(Found::None) => Runner::agent(config).ok_or_else(|| not_running("")),
        Ok(Found::Stale(info)) => Runner::agent(config).ok_or_else(|| {
            not_running(&format!(
                " (its daemon{} died without cleaning up; `dspy-agent stop` removes what it left)",
                info.map(|i| format!(", pid {},", i.pid))
                    .unwrap_or_default()
            ))
        }),
        Err(e) => Err(fail(format!(
            "cannot read {}: {e}",
            daemon::pid_path(&config.state_dir).display()
        ))),
    }
}

/// A connection to `addr` (over TLS when configured); `unreachable` words the failure.
/// A channel to the port at `addr` whose calls carry the token it requires: the configured one,
/// or the one of this user's stack serving there, which goes only to the address that stack
/// lists (`access::route`).
async fn connect(
    config: &Config,
    addr: &str,
    unreachable: impl FnOnce(tonic::transport::Error) -> Failure,
) -> Result<AuthChannel, Failure> {
    let route = crate::access::route(config.token.as_ref(), addr)?;
    let bearer = Bearer::new(route.token.as_ref().map(|t| t.expose()))
        .map_err(|e| Failure(EXIT_USAGE, format!("error: token: {e}")))?;
    let channel = endpoint(&route.addr, config.tls.as_ref())
        .map_err(|e| fail(format!("error: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(unreachable)?;
    Ok(bearer.channel(channel))
}

async fn env_client(config: &Config, info: &Runner) -> Result<ServiceClient, Failure> {
    let addr = &info.env_manager_addr;
    let channel = connect(config, addr, |e| {
        fail(format!(
            "cannot reach the daemon at {addr}: {e}. `dspy-agent logs --service env-manager` shows its log"
        ))
    })
    .await?;
    Ok(ServiceClient::new(channel))
}

/// The task client of the project's orchestrator: the daemon's, or one at the configured address.
async fn orchestrator_client(config: &Config) -> Result<TaskClient, Failure> {
    // Without a daemon, the configured address may still hold an orchestrator (an agent's own).
    let addr = match daemon::find(&config.state_dir) {
        Ok(Found::Running(Some(info))) => info.orchestrator_addr,
        // Still opening its ports, or its pid file was being read as it was written.
        Ok(Found::Running(None)) => wait_ready(config).await?.orchestrator_addr,
        // An agent's own stack, else whatever serves the configured address.
        Ok(Found::None | Found::Stale(_)) => Runner::agent(config)
            .map(|r| r.orchestrator_addr)
            .unwrap_or_else(|| config.orchestrator_addr.clone()),
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
    Ok(TaskClient::new(channel))
}

fn rpc_failure(what: &str, s: tonic::Status) -> Failure {
    let code = match s.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => EXIT_USAGE,
        _ => EXIT_FAILURE,
    };
    Failure(code, format!("error: {what}: {}", s.message()))
}

/// Writes `text` whole under another name and moves it into place (a reader never sees half a
/// file, and a file that was there keeps no old mode); mode 600 when it holds secret values.
fn write_file(path: &std::path::Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
