//! Who may call a stack's gRPC ports. Loopback is no boundary on a machine shared by several
//! users, so by default both ports require a token: the first start makes one and keeps it in
//! the project's state folder, readable by its owner only. Processes of the same user find it
//! without being told: each serving stack lists its ports in the user's own state folder
//! (`ports/PORT`, naming the state folder that holds the token), and a client given only an
//! address on this machine reads the token through that list.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{check_token_text, user_state_base, Config, ConfigError, Secret};

/// The token file in a project's state folder.
pub const TOKEN_FILE: &str = "token";
/// Random bytes in a made token (written as hex).
const TOKEN_BYTES: usize = 32;

pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` (and its parents) and keeps it private: this user's, mode 0700. A folder of
/// this user's that others can enter is closed, with a warning; one of another user's, or one
/// whose mode does not hold (some shared filesystems), is refused: a token or task store kept
/// there would not be private.
pub fn private_dir(dir: &Path) -> Result<(), ConfigError> {
    let refuse = |message: String| ConfigError::invalid("state_dir", message);
    let io = |e: std::io::Error| refuse(format!("cannot create {}: {e}", dir.display()));
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = fs::metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(refuse(format!("{} is not a folder", dir.display())));
    }
    if meta.uid() != euid() {
        return Err(refuse(format!(
            "{} belongs to user {}, not to this one ({}), so the stack's token and task store cannot be kept private there. Use a folder of your own: state_dir in dspy-agent.toml, DSPY_AGENT_STATE_DIR, or AgentInfra.start(state_dir=...)",
            dir.display(),
            meta.uid(),
            euid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            refuse(format!(
                "{} can be entered by other users (mode {:o}) and cannot be closed: {e}. Use a folder of your own on a local filesystem (state_dir, DSPY_AGENT_STATE_DIR)",
                dir.display(),
                meta.mode() & 0o777
            ))
        })?;
        let now = fs::metadata(dir).map_err(io)?.mode();
        if now & 0o077 != 0 {
            return Err(refuse(format!(
                "{} stays open to other users (mode {:o} after chmod 700; a shared or mounted filesystem?). Use a folder of your own on a local filesystem (state_dir, DSPY_AGENT_STATE_DIR)",
                dir.display(),
                now & 0o777
            )));
        }
        tracing::warn!(folder = %dir.display(), was = format!("{:o}", meta.mode() & 0o777), "closed the state folder to other users (mode 700): it holds the stack's token and task store");
    }
    Ok(())
}

/// The token kept in `state_dir`, checked; `None` when there is none yet.
pub fn read_token(state_dir: &Path) -> Result<Option<Secret>, ConfigError> {
    let path = token_path(state_dir);
    let invalid = |message: String| ConfigError::invalid("token", message);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(invalid(format!("cannot read {}: {e}", path.display()))),
    };
    // The opened file itself is checked, not its name, which could change in between.
    let meta = file
        .metadata()
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    if meta.uid() != euid() {
        return Err(invalid(format!(
            "{} belongs to user {}, not to this one: remove it (the next start makes a new one) or set DSPY_AGENT_TOKEN",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{} can be read by other users (mode {:o}), who could then call the stack's ports: run `chmod 600 {}`, or remove it and start again for a new token",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let text = text.trim();
    check_token_text(text).map_err(|m| {
        invalid(format!(
            "{}: {m}; remove it and start again for a new token",
            path.display()
        ))
    })?;
    Ok(Some(Secret::new(text.to_string())))
}

/// The token in `state_dir`, made first when there is none; `true` when it was made now.
pub fn ensure_token(state_dir: &Path) -> Result<(Secret, bool), ConfigError> {
    private_dir(state_dir)?;
    if let Some(token) = read_token(state_dir)? {
        return Ok((token, false));
    }
    let path = token_path(state_dir);
    let io = |e: std::io::Error| {
        ConfigError::invalid("token", format!("cannot write {}: {e}", path.display()))
    };
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| ConfigError::invalid("token", format!("no randomness for a token: {e}")))?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Written whole under another name, then linked into place: a reader never sees half a
    // token, and of two processes making one at once, the first link wins and both use it.
    let tmp = state_dir.join(format!(".token.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::hard_link(&tmp, &path)
    })();
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok((Secret::new(text), true)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read_token(state_dir)?
            .map(|t| (t, false))
            .ok_or_else(|| io(e)),
        Err(e) => Err(io(e)),
    }
}

/// What a stack's ports require, and where a refused caller finds it.
#[derive(Debug, Clone)]
pub struct Required {
    pub token: Option<Secret>,
    /// Where the token lives, for the refusal message.
    pub source: String,
    /// Whether the token was made by this start (it is then shown once in the log).
    pub made: bool,
}

/// The token a starting stack's ports require: the configured one; none when the user opened
/// them (`allow_remote_without_token`); otherwise the one in the state folder, made at the
/// first start.
pub fn required(config: &Config) -> Result<Required, ConfigError> {
    if let Some(token) = &config.token {
        return Ok(Required {
            token: Some(token.clone()),
            source: "DSPY_AGENT_TOKEN (or token in dspy-agent.toml) where the stack runs".into(),
            made: false,
        });
    }
    if config.allow_without_token {
        return Ok(Required {
            token: None,
            source: String::new(),
            made: false,
        });
    }
    let (token, made) = ensure_token(&config.state_dir)?;
    Ok(Required {
        token: Some(token),
        source: format!(
            "{} on the stack's machine (`dspy-agent token` prints it)",
            token_path(&config.state_dir).display()
        ),
        made,
    })
}

/// One entry of the user's list of served ports.
#[derive(Debug, Serialize, Deserialize)]
struct Listing {
    pid: u32,
    addr: String,
    state_dir: PathBuf,
}

fn ports_dir() -> PathBuf {
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    user_state_base(&env).join("ports")
}

/// A port listed for this user's clients, unlisted when dropped.
#[derive(Debug)]
pub struct Listed {
    path: PathBuf,
}

/// Lists the port `addr` serves with the token of `state_dir`, for this user's clients to find.
/// Entries of processes that ended are cleared on the way.
pub fn list_port(addr: std::net::SocketAddr, state_dir: &Path) -> Result<Listed, ConfigError> {
    let dir = ports_dir();
    private_dir(&dir)?;
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let stale = fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Listing>(&b).ok())
                .is_none_or(|l| crate::util::is_dead(l.pid));
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let path = dir.join(addr.port().to_string());
    let listing = Listing {
        pid: std::process::id(),
        addr: addr.to_string(),
        state_dir: state_dir.to_path_buf(),
    };
    let text = serde_json::to_vec(&listing)
        .map_err(|e| ConfigError::invalid("state_dir", format!("cannot list port {addr}: {e}")))?;
    let tmp = dir.join(format!(".{}.{}.tmp", addr.port(), std::process::id()));
    fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| {
            ConfigError::invalid("state_dir", format!("cannot write {}: {e}", path.display()))
        })?;
    Ok(Listed { path })
}

impl Drop for Listed {
    fn drop(&mut self) {
        // Only while the entry is still this process's: another stack may have the port now.
        let ours = fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Listing>(&b).ok())
            .is_some_and(|l| l.pid == std::process::id());
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Where a client connects for an address it was given, and the token it sends there.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    /// "IP:PORT" or "HOST:PORT": what to dial. Where this user's live stack lists the port, its
    /// exact address, never a name that might resolve to another.
    pub addr: String,
    pub token: Option<Secret>,
}

/// The route of a client of this user to `addr` ("HOST:PORT"). Where a live stack of this user
/// lists that port and `addr` names it (its address, a name resolving to it, a loopback name
/// for a loopback or wildcard listing), the client dials the listed address itself and sends
/// the configured token or the stack's own. Otherwise it dials `addr` as given with the
/// configured token only: a stack's token never goes to whatever else answers on that port
/// number (`localhost` may resolve to `::1`, where another user can listen).
pub fn route(configured: Option<&Secret>, addr: &str) -> Result<Route, ConfigError> {
    let as_given = || Route {
        addr: addr.to_string(),
        token: configured.cloned(),
    };
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Ok(as_given());
    };
    let Ok(port) = port.parse::<u16>() else {
        return Ok(as_given());
    };
    let Some(listing) = fs::read(ports_dir().join(port.to_string()))
        .ok()
        .and_then(|b| serde_json::from_slice::<Listing>(&b).ok())
        .filter(|l| !crate::util::is_dead(l.pid))
    else {
        return Ok(as_given());
    };
    let Ok(listed) = listing.addr.parse::<SocketAddr>() else {
        return Ok(as_given());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Some(dial) = dial_for(host, port, listed) else {
        return Ok(as_given());
    };
    let token = match configured {
        Some(t) => Some(t.clone()),
        None => read_token(&listing.state_dir)?,
    };
    Ok(Route {
        addr: dial.to_string(),
        token,
    })
}

/// The address to dial when `host` names the stack listed at `listed`, else `None`.
fn dial_for(host: &str, port: u16, listed: SocketAddr) -> Option<SocketAddr> {
    let family_loopback = |ip: IpAddr| match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    // A wildcard listing is reached on its family's loopback address.
    let reachable = if listed.ip().is_unspecified() {
        family_loopback(listed.ip())
    } else {
        listed.ip()
    };
    let names_it = |ip: IpAddr| {
        ip == listed.ip()
            || ip == reachable
            || (listed.ip().is_unspecified()
                && ip.is_unspecified()
                && ip.is_ipv4() == listed.is_ipv4())
    };
    let named = match host.parse::<IpAddr>() {
        Ok(ip) => names_it(ip),
        Err(_) => {
            let loopback_name = host.eq_ignore_ascii_case("localhost");
            let resolved: Vec<IpAddr> = (host, port)
                .to_socket_addrs()
                .map(|a| a.map(|s| s.ip()).collect())
                .unwrap_or_default();
            resolved.into_iter().any(names_it) || (loopback_name && reachable.is_loopback())
        }
    };
    named.then(|| SocketAddr::new(reachable, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_token_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("project");
        let (first, made) = ensure_token(&state).unwrap();
        assert!(made);
        assert_eq!(first.expose().len(), 2 * TOKEN_BYTES);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&token_path(&state)), 0o600);
        let (again, made) = ensure_token(&state).unwrap();
        assert!(!made);
        assert_eq!(again, first);
        assert_eq!(read_token(&state).unwrap(), Some(first));
    }

    #[test]
    fn an_open_state_folder_of_ours_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("open");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = ensure_token(dir.path()).unwrap();
        let path = token_path(dir.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("mode 644"), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        let e = ensure_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_short_or_garbled_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_path(dir.path());
        for bad in ["short\n", "has a space in the middle of it\n"] {
            let _ = fs::remove_file(&path);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap()
                .write_all(bad.as_bytes())
                .unwrap();
            let e = read_token(dir.path()).unwrap_err().to_string();
            assert!(e.contains("remove it"), "{e}");
        }
    }

    #[test]
    fn the_configured_token_goes_where_it_was_given_and_nothing_is_found_for_an_unlisted_port() {
        let token = Secret::new("a-configured-token-0123456789".into());
        assert_eq!(
            route(Some(&token), "127.0.0.1:1").unwrap(),
            Route {
                addr: "127.0.0.1:1".into(),
                token: Some(token)
            }
        );
        assert_eq!(route(None, "not an address").unwrap().token, None);
    }

    #[test]
    fn a_listed_port_is_dialled_at_its_own_address_only() {
        let at = |listed: &str, host: &str| {
            dial_for(host, 4000, listed.parse().unwrap()).map(|a| a.to_string())
        };
        let v4 = Some("127.0.0.1:4000".to_string());
        let v6 = Some("[::1]:4000".to_string());
        // `localhost` means this machine: the listed address, whatever the name resolves to
        // first (the stock hosts file lists ::1 first).
        assert_eq!(at("127.0.0.1:4000", "localhost"), v4);
        assert_eq!(at("127.0.0.1:4000", "127.0.0.1"), v4);
        assert_eq!(at("127.0.0.1:4000", "::1"), None);
        assert_eq!(at("127.0.0.1:4000", "127.0.0.2"), None);
        assert_eq!(at("0.0.0.0:4000", "localhost"), v4);
        assert_eq!(at("0.0.0.0:4000", "0.0.0.0"), v4);
        assert_eq!(at("0.0.0.0:4000", "::1"), None);
        assert_eq!(at("[::1]:4000", "localhost"), v6);
        assert_eq!(at("[::1]:4000", "127.0.0.1"), None);
        assert_eq!(
            at("10.0.0.5:4000", "10.0.0.5"),
            Some("10.0.0.5:4000".into())
        );
        assert_eq!(at("10.0.0.5:4000", "localhost"), None);
        assert_eq!(at("10.0.0.5:4000", "name.invalid"), None);
    }
}
