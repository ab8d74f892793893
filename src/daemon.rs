//! The background daemon behind `dspy-agent start`: it holds the core (both gRPC ports and the
//! stack) until SIGTERM or SIGINT.
//!
//! Its pid file, `daemon.pid` in the project's state folder, is also its lock: the daemon holds an
//! exclusive lock on it for its whole life, so a pid file nobody holds a lock on was left by a
//! daemon that died, whatever its recorded pid now belongs to.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LoadOptions};
use crate::infra::Infra;
use crate::watchdog::Launcher;

pub const PID_FILE: &str = "daemon.pid";
pub const LOG_FILE: &str = "daemon.log";
/// The log of the previous run, kept after a clean exit for `dspy-agent logs`.
pub const LAST_LOG_FILE: &str = "daemon.log.1";

/// Exit code of a daemon that found another one holding the project.
pub const EXIT_ALREADY_RUNNING: i32 = 4;

/// What the pid file records; the daemon prints the same as its ready line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub project: String,
    pub version: String,
    pub orchestrator_addr: String,
    pub env_manager_addr: String,
    /// Where `/metrics` and `/healthz` are served (absent from files of earlier versions).
    #[serde(default)]
    pub http_addr: String,
    pub log: PathBuf,
    pub started_at_ms: i64,
}

/// What the state folder says about a project's daemon.
#[derive(Debug)]
pub enum Found {
    /// No pid file.
    None,
    /// A daemon holds the pid file; `None` while it is still opening its ports.
    Running(Option<DaemonInfo>),
    /// A pid file nobody holds: its daemon died without cleaning up.
    Stale(Option<DaemonInfo>),
}

pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PID_FILE)
}

fn read_info(file: &mut File) -> Option<DaemonInfo> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Looks for the project's daemon without disturbing it.
pub fn find(state_dir: &Path) -> std::io::Result<Found> {
    let mut file = match File::open(pid_path(state_dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let info = read_info(&mut file);
            file.unlock()?;
            Ok(Found::Stale(info))
        }
        Err(TryLockError::WouldBlock) => Ok(Found::Running(read_info(&mut file))),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Removes a stale pid file, unless a daemon has taken it over meanwhile.
pub fn remove_stale(state_dir: &Path) -> std::io::Result<()> {
    let path = pid_path(state_dir);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if file.try_lock().is_ok() {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

/// The pid file, locked for this process.
struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// Takes the lock, or `None` when another daemon holds it.
    fn acquire(state_dir: &Path) -> std::io::Result<Option<PidFile>> {
        let path = pid_path(state_dir);
        // A command reading the file holds a shared lock for a moment; a daemon holds its lock
        // for good. Only a lock that stays taken means another daemon.
        let mut busy = 0;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) if busy < 10 => {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
            // An exiting daemon removes the file while it holds the lock: make sure the lock
            // is on the file that is still at `path`, or try again on the new one.
            let same = std::fs::metadata(&path)
                .map(|m| m.ino() == file.metadata().map(|f| f.ino()).unwrap_or(0))
                .unwrap_or(false);
            if same {
                return Ok(Some(PidFile { file, path }));
            }
        }
    }

    fn write(&mut self, info: &DaemonInfo) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        std::io::Seek::rewind(&mut self.file)?;
        self.file.write_all(&text)?;
        self.file.sync_data()
    }

    /// Removes the file while still holding the lock, so no reader sees it unlocked.
    fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Points this process's stdout and stderr at `file`, so that everything it prints later (the
/// log, a panic) lands there and not in the pipe of the command that started it.
fn redirect_output(file: &File) -> std::io::Result<()> {
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are valid for the call; dup2 replaces `fd` atomically.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs the daemon to the end and returns the process exit code. Before its ready line, errors
/// go to stderr (the starting command shows them); after it, everything goes to the log file.
pub fn run(options: LoadOptions, launcher: Launcher) -> i32 {
    crate::util::ignore_sigpipe();
    let config = match Config::load(options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&config.state_dir) {
        eprintln!(
            "error: cannot create the state folder {}: {e}",
            config.state_dir.display()
        );
        return 1;
    }
    let mut pid_file = match PidFile::acquire(&config.state_dir) {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!(
                "dspy-agent is already running for project {:?} (pid file {})",
                config.project,
                pid_path(&config.state_dir).display()
            );
            return EXIT_ALREADY_RUNNING;
        }
        Err(e) => {
            eprintln!(
                "error: cannot lock {}: {e}",
                pid_path(&config.state_dir).display()
            );
            return 1;
        }
    };
    // Leave the starting terminal's session, so its hangup or Ctrl-C does not reach us.
    // SAFETY: setsid has no memory effects; it fails harmlessly if we already lead a group.
    unsafe {
        libc::setsid();
    }
    let log_path = config.state_dir.join(LOG_FILE);
    let log = match File::create(&log_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot create {}: {e}", log_path.display());
            return 1;
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .try_init();

    let runtime = crate::runtime::get();
    let state_dir = config.state_dir.clone();
    let project = config.project.clone();
    let infra = match runtime.block_on(Infra::open(config, Some(log_path.clone()), Some(launcher)))
    {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            pid_file.remove();
            return 1;
        }
    };
    let info = DaemonInfo {
        pid: std::process::id(),
        project,
        version: env!("CARGO_PKG_VERSION").to_string(),
        orchestrator_addr: infra.orchestrator_addr().to_string(),
        env_manager_addr: infra.env_manager_addr().to_string(),
        http_addr: infra.http_addr().to_string(),
        log: log_path.clone(),
        started_at_ms: crate::tasks::store::now_ms(),
    };
    let ready = pid_file.write(&info).and_then(|()| {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &info).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
        out.flush()
    });
    if let Err(e) = ready.and_then(|()| redirect_output(&log)) {
        eprintln!("error: cannot announce the daemon: {e}");
        runtime.block_on(infra.shutdown(false));
        pid_file.remove();
        return 1;
    }
    tracing::info!(pid = info.pid, orchestrator = %info.orchestrator_addr, env_manager = %info.env_manager_addr, "daemon ready");

    let code = runtime.block_on(async {
        let stop = CancellationToken::new();
        let signals = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for signals");
                return 1;
            }
        };
        let starting = {
            let stop = stop.clone();
            async {
                if let Err(e) = infra.start_services(&[], stop).await {
                    // The stack stays down; status shows the failure until `dspy-agent stop`.
                    tracing::error!("{e}");
                }
            }
        };
        tokio::pin!(starting);
        tokio::pin!(signals);
        tokio::select! {
            () = &mut starting => signals.await,
            () = &mut signals => {
                stop.cancel();
                starting.await;
            }
        }
        tracing::info!("stopping");
        infra.shutdown(false).await;
        tracing::info!("stopped");
        0
    });
    let _ = std::fs::rename(&log_path, state_dir.join(LAST_LOG_FILE));
    pid_file.remove();
    code
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Waits until no daemon holds the project's pid file, up to `limit`.
pub async fn wait_gone(state_dir: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut backoff = crate::health::Backoff::new(Duration::from_millis(100));
    loop {
        if !matches!(find(state_dir), Ok(Found::Running(_))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_tells_running_stale_and_absent_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(find(dir.path()).unwrap(), Found::None));
        let mut held = PidFile::acquire(dir.path()).unwrap().unwrap();
        let info = DaemonInfo {
            pid: 42,
            project: "p".into(),
            version: "0".into(),
            orchestrator_addr: "127.0.0.1:1".into(),
            env_manager_addr: "127.0.0.1:2".into(),
            http_addr: "127.0.0.1:3".into(),
            log: dir.path().join(LOG_FILE),
            started_at_ms: 1,
        };
        held.write(&info).unwrap();
        match find(dir.path()).unwrap() {
            Found::Running(Some(i)) => assert_eq!(i.pid, 42),
            other => panic!("expected running, got {other:?}"),
        }
        assert!(PidFile::acquire(dir.path()).unwrap().is_none());
        // A daemon that dies leaves its file behind, unlocked.
        drop(held);
        match find(dir.path()).unwrap() {
            Found::Stale(Some(i)) => assert_eq!(i.pid, 42),
            other => panic!("expected stale, got {other:?}"),
        }
        remove_stale(dir.path()).unwrap();
        assert!(matches!(find(dir.path()).unwrap(), Found::None));
        let again = PidFile::acquire(dir.path()).unwrap().unwrap();
        again.remove();
        assert!(matches!(find(dir.path()).unwrap(), Found::None));
    }
}
