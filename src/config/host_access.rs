//! What a service may reach of the machine it runs on. A container with a container engine's
//! socket, or with a capability that escapes confinement, controls the machine: both are
//! refused unless the service says so (`allow_docker_socket`, `allow_privileged`).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Where container engines put their sockets, for root.
const ENGINE_SOCKETS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/podman/podman.sock",
    "/var/run/podman/podman.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
];

/// Folders that hold engine sockets and their state: anything in them (or above them) is the
/// engine's. `/run/user/UID` is where rootless Docker and rootless Podman listen.
const ENGINE_FOLDERS: &[&str] = &[
    "/run/user",
    "/var/run/user",
    "/run/containerd",
    "/var/run/containerd",
    "/run/podman",
    "/var/run/podman",
    "/run/docker",
    "/var/run/docker",
    "/run/crio",
    "/var/run/crio",
    "/var/lib/docker",
    "/var/lib/containers",
];

/// Socket file names of container engines, found anywhere.
const SOCKET_NAMES: &[&str] = &["docker.sock", "podman.sock", "containerd.sock", "crio.sock"];

/// A mounted folder is searched this deep for engine sockets, and through this many entries at
/// most (a mount of a large tree is judged by the known places alone).
const SEARCH_DEPTH: usize = 2;
const SEARCH_ENTRIES: usize = 4096;

/// Capabilities that let a process leave its container or read and change the host: loading
/// kernel modules, mounting, raw devices and memory, tracing host processes, reading any file
/// by handle, and the like. `ALL` holds them all.
pub const PRIVILEGED_CAPABILITIES: &[&str] = &[
    "ALL",
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_PTRACE",
    "SYS_BOOT",
    "DAC_READ_SEARCH",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "BPF",
];

/// The first capability of `caps` (upper case, without `CAP_`) that amounts to privilege.
pub fn privileged_capability(caps: &[String]) -> Option<&str> {
    caps.iter()
        .map(String::as_str)
        .find(|c| PRIVILEGED_CAPABILITIES.contains(c))
}

/// The Unix socket of `docker_host` (`unix:///path`), the one this stack's engine listens on.
pub fn own_socket(docker_host: Option<&str>) -> Option<PathBuf> {
    docker_host
        .and_then(|h| h.strip_prefix("unix://"))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn real(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn engine_named(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| SOCKET_NAMES.iter().any(|s| n.ends_with(s)))
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The engine socket, or engine folder, that a bind mount of `source` would expose: `source`
/// is a socket (by type, by name or through a link), holds or lies above one of the known
/// sockets or `own` (this stack's), lies inside an engine's folder, or holds an engine socket
/// within two levels.
pub fn exposed_by(source: &Path, own: Option<&Path>) -> Option<PathBuf> {
    let real_source = real(source);
    if engine_named(source) || engine_named(&real_source) || is_socket(&real_source) {
        return Some(real_source);
    }
    let sockets = ENGINE_SOCKETS.iter().map(Path::new).chain(own);
    for socket in sockets {
        let socket_real = real(socket);
        let above = |s: &Path| s.starts_with(source) || s.starts_with(&real_source);
        if above(socket) || above(&socket_real) {
            return Some(socket.to_path_buf());
        }
    }
    for folder in ENGINE_FOLDERS.iter().map(Path::new) {
        let inside = |s: &Path| s.starts_with(folder) || folder.starts_with(s);
        if inside(source) || inside(&real_source) {
            return Some(folder.to_path_buf());
        }
    }
    search(&real_source)
}

/// An engine socket within `SEARCH_DEPTH` levels of `folder`.
fn search(folder: &Path) -> Option<PathBuf> {
    let mut pending = vec![(folder.to_path_buf(), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > SEARCH_ENTRIES {
                return None;
            }
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_socket() && engine_named(&path) {
                return Some(path);
            }
            if kind.is_symlink() && engine_named(&path) {
                return Some(path);
            }
            if kind.is_dir() && depth + 1 < SEARCH_DEPTH {
                pending.push((path, depth + 1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sockets_their_folders_and_everything_above_are_exposed() {
        for source in [
            "/var/run/docker.sock",
            "/var/run",
            "/run",
            "/",
            "/run/user/1000",
            "/run/user/1000/podman",
            "/run/user",
            "/run/containerd",
            "/var/lib/docker/volumes",
        ] {
            assert!(
                exposed_by(Path::new(source), None).is_some(),
                "{source} passes"
            );
        }
        for source in ["/srv/data", "/home/agent/models", "/tmp/cache"] {
            assert_eq!(
                exposed_by(Path::new(source), None),
                None,
                "{source} refused"
            );
        }
    }

    #[test]
    fn the_stacks_own_socket_and_its_folder_are_exposed_wherever_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let engine = dir.path().join("engsock");
        std::fs::create_dir(&engine).unwrap();
        let own = engine.join("engine.socket");
        let _listener = std::os::unix::net::UnixListener::bind(&own).unwrap();
        let owned = own_socket(Some(&format!("unix://{}", own.display()))).unwrap();
        assert_eq!(owned, own);
        assert!(exposed_by(&engine, Some(&owned)).is_some());
        assert!(exposed_by(&own, None).is_some(), "a socket by its type");
        // A folder holding an engine socket two levels down, found without being told.
        let deep = dir.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(deep.join("docker.sock")).unwrap();
        assert!(exposed_by(&dir.path().join("a"), None).is_some());
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        assert_eq!(exposed_by(&plain, Some(&owned)), None);
    }

    #[test]
    fn privilege_is_named() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            privileged_capability(&caps(&["NET_ADMIN", "ALL"])),
            Some("ALL")
        );
        assert_eq!(
            privileged_capability(&caps(&["SYS_ADMIN"])),
            Some("SYS_ADMIN")
        );
        assert_eq!(privileged_capability(&caps(&["NET_BIND_SERVICE"])), None);
        assert_eq!(own_socket(Some("tcp://127.0.0.1:2375")), None);
    }
}
