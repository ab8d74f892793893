//! The watchdog: a small process that removes a stack's containers when the process owning the
//! stack dies without stopping it (SIGKILL, a crash, the OOM killer).
//!
//! The owner keeps the write end of a pipe that is the watchdog's stdin. However the owner ends,
//! the kernel closes that end and the watchdog reads end-of-file at once. An owner that stops its
//! stack properly says so first (`release`), and the watchdog leaves without touching anything.
//! No container gets the Docker socket; the watchdog talks to the Engine from the host.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::Backend;
use crate::engine::{labels, Engine};

/// What the owner writes before it lets the watchdog go.
const RELEASE: &[u8] = b"release\n";

/// How a process of this package is started: the interpreter, and where the package is.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub python: PathBuf,
    pub package_root: PathBuf,
}

impl Launcher {
    /// A command running `dspy-agent ARGS` in a new interpreter. Without `site` (-S) it starts
    /// tens of milliseconds sooner; the package is imported from where this process found it.
    pub fn command(&self, args: &[&str]) -> Command {
        let bootstrap = format!(
            "import sys; sys.path.insert(0, {:?}); from dspy_agent_infra._cli import main; sys.exit(main())",
            self.package_root.display().to_string()
        );
        let mut command = Command::new(&self.python);
        command.args(["-S", "-c", &bootstrap]).args(args);
        command
    }
}

pub struct Watchdog {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Option<Child>>,
}

impl Watchdog {
    /// Starts the watchdog of `session`; its own process group, so a Ctrl-C meant for the owner
    /// does not reach it.
    pub fn spawn(
        launcher: &Launcher,
        project: &str,
        session: &str,
        backend: Backend,
        docker_host: Option<&str>,
    ) -> std::io::Result<Watchdog> {
        let mut args = vec![
            "watchdog",
            "--project",
            project,
            "--session",
            session,
            "--backend",
            backend.as_str(),
        ];
        if let Some(host) = docker_host {
            args.extend(["--docker-host", host]);
        }
        let mut command = launcher.command(&args);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn()?;
        Ok(Watchdog {
            stdin: Mutex::new(child.stdin.take()),
            child: Mutex::new(Some(child)),
        })
    }

    /// The owner stopped (or kept) its stack itself: the watchdog leaves without cleaning up.
    pub fn release(&self) {
        if let Some(mut stdin) = crate::util::lock(&self.stdin).take() {
            let _ = stdin.write_all(RELEASE);
        }
        if let Some(mut child) = crate::util::lock(&self.child).take() {
            // Reaped on a thread of its own, so the caller does not wait for it.
            std::thread::spawn(move || child.wait());
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping without `release` closes the pipe like a death would: the watchdog cleans
        // up, which is right when the stack was never stopped.
        if let Some(mut child) = crate::util::lock(&self.child).take() {
            std::thread::spawn(move || child.wait());
        }
    }
}

/// The watchdog process: waits for its owner to end, and removes the session's containers
/// (except those the user asked to keep running) unless the owner released it.
pub fn run(project: &str, session: &str, backend: Backend, docker_host: Option<&str>) -> i32 {
    crate::util::ignore_sigpipe();
    let mut said = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut said);
    if said.starts_with(RELEASE) {
        return 0;
    }
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    crate::runtime::get().block_on(async {
        // The Engine may be restarting just then: keep trying for a while.
        let mut docker = None;
        for _ in 0..30 {
            match crate::engine::connect(backend, docker_host, Duration::from_secs(2)).await {
                Ok(d) => {
                    docker = Some(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        let Some(docker) = docker else {
            tracing::error!(session, "the owner of this stack died and the Docker Engine cannot be reached to remove its containers; the next start of project {project:?} will");
            return 1;
        };
        let removed = remove_session(docker.as_ref(), session).await;
        docker
            .remove_network(&crate::util::network_name(project))
            .await;
        tracing::warn!(
            project,
            session,
            removed,
            "the process owning this stack died; its containers (Swarm services on the swarm backend) were removed"
        );
        0
    })
}

/// Removes the containers of `session` that are not marked to keep running.
async fn remove_session(docker: &dyn Engine, session: &str) -> usize {
    let Ok(found) = docker.list_by_label(labels::SESSION, session).await else {
        return 0;
    };
    let mut removed = 0;
    for c in found {
        if c.labels.get(labels::KEEP).is_some_and(|v| v == "true") {
            continue;
        }
        if docker.remove(&c.id, Duration::ZERO).await.is_ok() {
            removed += 1;
        }
    }
    removed
}
