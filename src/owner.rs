//! Who runs a project's stack. A running stack is held by one process, its owner; nobody else
//! may remove its containers or run its task store. Two marks say so:
//!
//! - `owner.lock` in the project's state folder, exclusively locked by the owner for as long as
//!   its stack runs, holding its pid and orchestrator address. It covers containers the owner
//!   reused from an earlier, kept stack, whose labels name their first owner.
//! - the `owner-pid` and `owner-addr` labels of every container it creates, which cover owners
//!   with another state folder or another user on the same Engine.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::labels as docker_labels;

/// The live owner of a project's stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Its orchestrator's address, where a second start can attach; empty while unknown.
    #[serde(default)]
    pub addr: String,
    /// Its env-manager's and HTTP port's addresses, for the command line; empty while unknown.
    #[serde(default)]
    pub env_manager_addr: String,
    #[serde(default)]
    pub http_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("project {project:?} is in use: process {} runs its stack (orchestrator {}), and this start could not attach to it. Attach to it by address (ORCHESTRATOR_GRPC_ADDR={}, with its token if it has one), or run a separate stack under another project (AgentInfra.start(project=...) or DSPY_AGENT_PROJECT)",
        owner.pid,
        if owner.addr.is_empty() { "address unknown" } else { owner.addr.as_str() },
        if owner.addr.is_empty() { "HOST:PORT" } else { owner.addr.as_str() })]
    InUse { project: String, owner: Owner },
    #[error("cannot lock {path}: {message}")]
    Io { path: String, message: String },
}

/// The owner's lock on its project's state folder, held until dropped.
#[derive(Debug)]
pub struct OwnerLock {
    file: File,
}

pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("owner.lock")
}

impl OwnerLock {
    /// Takes the lock for this process, or names the process that holds it.
    pub fn acquire(state_dir: &Path, project: &str) -> Result<OwnerLock, OwnerError> {
        let path = lock_path(state_dir);
        let io = |e: std::io::Error| OwnerError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let owner = read_owner(&mut file).unwrap_or_default();
                return Err(OwnerError::InUse {
                    project: project.to_string(),
                    owner,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut lock = OwnerLock { file };
        lock.record(Owner::default()).map_err(io)?;
        Ok(lock)
    }

    /// Writes this process's pid and the addresses of `ports` for a second start, and the
    /// command line, to find.
    pub fn record(&mut self, ports: Owner) -> std::io::Result<()> {
        let owner = Owner {
            pid: std::process::id(),
            ..ports
        };
        let text = serde_json::to_vec(&owner).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(&text)?;
        self.file.flush()
    }
}

/// The process holding the project's state folder now, if any (`None` also when the folder has
/// no lock file yet).
pub fn holder(state_dir: &Path) -> Option<Owner> {
    let mut file = File::open(lock_path(state_dir)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => Some(read_owner(&mut file).unwrap_or_default()),
        Err(TryLockError::Error(_)) => None,
    }
}

/// The live process of this machine that created a container for a stack it still runs, from
/// the container's labels. Containers made to be kept running are handed on when their stack
/// stops, so for those only the state folder's lock tells; and on an Engine of another machine
/// (`docker_host` not a Unix socket) a pid names nothing here.
pub fn live_creator(labels: &BTreeMap<String, String>, docker_host: &str) -> Option<Owner> {
    let keep = labels.get(docker_labels::KEEP).is_some_and(|v| v == "true");
    if keep || !docker_host.starts_with("unix://") {
        return None;
    }
    let pid = labels.get(docker_labels::OWNER_PID)?.parse::<u32>().ok()?;
    (!crate::util::is_dead(pid)).then(|| Owner {
        pid,
        addr: labels
            .get(docker_labels::OWNER_ADDR)
            .cloned()
            .unwrap_or_default(),
        ..Owner::default()
    })
}

fn read_owner(file: &mut File) -> Option<Owner> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_first_owner() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = OwnerLock::acquire(dir.path(), "p").unwrap();
        first
            .record(Owner {
                addr: "127.0.0.1:50052".into(),
                env_manager_addr: "127.0.0.1:50051".into(),
                ..Owner::default()
            })
            .unwrap();
        match OwnerLock::acquire(dir.path(), "p") {
            Err(OwnerError::InUse { owner, project }) => {
                assert_eq!(project, "p");
                assert_eq!(owner.pid, std::process::id());
                assert_eq!(owner.addr, "127.0.0.1:50052");
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        let held = holder(dir.path()).unwrap();
        assert_eq!(held.pid, std::process::id());
        assert_eq!(held.env_manager_addr, "127.0.0.1:50051");
        drop(first);
        assert_eq!(holder(dir.path()), None);
        OwnerLock::acquire(dir.path(), "p").expect("free again once the owner is gone");
    }
}
