//! `dspy-agent import`: a docker-compose file turned into the `dspy-agent.toml` that runs the
//! same stack. What has no equivalent here is named key by key and written into the file as a
//! comment, never dropped silently; a file that is not YAML, not Compose, or has a variable
//! without a value is refused, and nothing is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use toml::{Table, Value as Toml};
use yaml_serde::Value as Yaml;

use super::error::ConfigError;
use super::spec;
use super::ConfigLayer;

/// Where a compose file is read from and its config written to.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The compose file's folder: where `.env`, `env_file`s and relative bind paths are.
    pub compose_dir: PathBuf,
    /// The folder the config file goes to: relative bind paths are written against it.
    pub output_dir: PathBuf,
    /// Services to carry (their dependencies come along); every one when `None`.
    pub services: Option<Vec<String>>,
    /// Profiles to turn on, as `docker compose --profile`.
    pub profiles: Vec<String>,
    /// The environment for `${VAR}`; `.env` in `compose_dir` fills what it lacks.
    pub env: BTreeMap<String, String>,
}

/// A translated compose file.
#[derive(Debug)]
pub struct Imported {
    /// The `dspy-agent.toml` text.
    pub text: String,
    /// The same, parsed: what the text says, for checking it.
    pub layer: ConfigLayer,
    /// "KEY: why", for every key that has no equivalent.
    pub not_carried: Vec<String>,
    pub services: Vec<String>,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, message)
}

/// Keys of a Compose service that have no equivalent here, with why (the rest say "no
/// equivalent").
const NOT_CARRIED: &[(&str, &str)] = &[
    ("container_name", "containers are named PROJECT-SERVICE"),
    ("hostname", "a container's host name is its service name"),
    (
        "networks",
        "services share one project network and reach each other by service name",
    ),
    (
        "links",
        "services reach each other by service name on the project network",
    ),
    (
        "external_links",
        "services reach each other by service name on the project network",
    ),
    ("network_mode", "every service joins the project network"),
    ("privileged", "containers never run privileged"),
    (
        "logging",
        "logs stay with the Engine's default driver (`dspy-agent logs` reads them)",
    ),
    ("secrets", "give the value in env and name it in secret_env"),
    ("configs", "mount the file with a bind volume"),
    (
        "extends",
        "write the extended service's keys out in the service",
    ),
    ("scale", "one container per service"),
    ("develop", "watch mode belongs to docker compose"),
];

const OTHER_SERVICE_KEYS: &[&str] = &[
    "annotations",
    "attach",
    "blkio_config",
    "cgroup",
    "cgroup_parent",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpuset",
    "credential_spec",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "driver_opts",
    "extra_hosts",
    "group_add",
    "ipc",
    "isolation",
    "label_file",
    "mac_address",
    "mem_swappiness",
    "memswap_limit",
    "models",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "post_start",
    "pre_stop",
    "provider",
    "runtime",
    "shm_size",
    "stdin_open",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tty",
    "ulimits",
    "use_api_socket",
    "userns_mode",
    "uts",
    "volumes_from",
];

const CARRIED: &[&str] = &[
    "build",
    "cap_add",
    "cap_drop",
    "command",
    "cpus",
    "depends_on",
    "deploy",
    "entrypoint",
    "env_file",
    "environment",
    "expose",
    "gpus",
    "healthcheck",
    "image",
    "init",
    "labels",
    "mem_limit",
    "mem_reservation",
    "ports",
    "profiles",
    "pull_policy",
    "read_only",
    "restart",
    "security_opt",
    "stop_grace_period",
    "tmpfs",
    "user",
    "volumes",
    "working_dir",
];

/// `text` with its line continuations joined, as a shell joins them: a backslash before a line
/// break goes with the break, and so does one that stood at a line's end before a folded scalar
/// (`command: >-`) turned the break into a space (` \ ` between words).
fn continued(text: &str) -> String {
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    let words: Vec<&str> = joined.split(' ').collect();
    let last = words.len().saturating_sub(1);
    words
        .iter()
        .enumerate()
        .filter(|(i, w)| !(**w == "\\" && *i > 0 && *i < last))
        .map(|(_, w)| *w)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Environment names whose values are kept out of logs and status (`secret_env`): a word of
/// the name says password, secret, token, key, auth or salt.
fn looks_secret(name: &str) -> bool {
    name.to_ascii_uppercase().split('_').any(|word| {
        matches!(
            word,
            "PASSWORD"
                | "PASSWD"
                | "PASS"
                | "PWD"
                | "SECRET"
                | "TOKEN"
                | "KEY"
                | "AUTH"
                | "SALT"
                | "CREDENTIALS"
        )
    })
}

/// Translates the compose file `text` (named `source` in messages).
pub fn import(source: &str, text: &str, options: &ImportOptions) -> Result<Imported, ConfigError> {
    let mut root: Yaml = yaml_serde::from_str(text).map_err(|e| ConfigError::Parse {
        path: source.to_string(),
        message: format!("not YAML: {e}"),
    })?;
    root.apply_merge().map_err(|e| ConfigError::Parse {
        path: source.to_string(),
        message: format!("a merge key (<<) does not merge: {e}"),
    })?;
    let Yaml::Mapping(top) = root else {
        return Err(ConfigError::Parse {
            path: source.to_string(),
            message: "a compose file is a mapping with a `services` key".into(),
        });
    };
    let mut vars = read_env_file(&options.compose_dir.join(".env"), false, ".env")?;
    vars.extend(options.env.clone());
    let mut profiles: BTreeSet<String> = options.profiles.iter().cloned().collect();
    if let Some(p) = vars.get("COMPOSE_PROFILES") {
        profiles.extend(p.split(',').map(|s| s.trim().to_string()));
    }
    let ctx = Context {
        vars,
        options,
        profiles,
    };

    let mut notes = Vec::new();
    let mut project = None;
    let mut services = None;
    for (key, value) in &top {
        let key = scalar(key).unwrap_or_default();
        match key.as_str() {
            "services" => services = Some(value.clone()),
            "name" => {
                let name = ctx.interpolate("name", &scalar(value).unwrap_or_default())?;
                spec::validate_name("name", &name)?;
                project = Some(name);
            }
            "version" => notes.push("version: obsolete in Compose; nothing to carry".into()),
            "volumes" => notes.extend(top_level_volumes(value)),
            "networks" => notes.push(
                "networks: services share one project network and reach each other by service name"
                    .into(),
            ),
            "secrets" | "configs" | "include" | "models" => {
                notes.push(format!("{key}: no equivalent; see the services that use it"))
            }
            k if k.starts_with("x-") => {}
            other => {
                return Err(invalid(
                    other,
                    "is not a top-level Compose key (name, services, volumes, networks, secrets, configs, include, x-*); fix or remove it",
                ))
            }
        }
    }
    let Some(Yaml::Mapping(all)) = services else {
        return Err(invalid(
            "services",
            "a compose file needs a services mapping",
        ));
    };
    let mut defined: BTreeMap<String, Yaml> = BTreeMap::new();
    for (name, body) in all {
        let name = scalar(&name).unwrap_or_default();
        spec::validate_name(&format!("services.{name}"), &name)?;
        defined.insert(name, body);
    }

    // The services asked for and what they depend on, as `docker compose up SERVICE` does.
    let wanted: Vec<String> = match &options.services {
        Some(names) => {
            for n in names {
                if !defined.contains_key(n) {
                    return Err(ConfigError::UnknownService {
                        name: n.clone(),
                        known: defined.keys().cloned().collect::<Vec<_>>().join(", "),
                    });
                }
            }
            names.clone()
        }
        None => defined.keys().cloned().collect(),
    };
    let mut chosen = BTreeSet::new();
    let mut queue = wanted.clone();
    while let Some(name) = queue.pop() {
        if !chosen.insert(name.clone()) {
            continue;
        }
        if let Some(Yaml::Mapping(body)) = defined.get(&name) {
            if let Some(deps) = body.get("depends_on") {
                for dep in dependency_names(deps) {
                    if !defined.contains_key(&dep) {
                        return Err(ConfigError::UnknownDependency {
                            service: name.clone(),
                            dependency: dep,
                            known: defined.keys().cloned().collect::<Vec<_>>().join(", "),
                        });
                    }
                    queue.push(dep);
                }
            }
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "# Imported from {source} by `dspy-agent import`.\n# Only the services below run (catalog = false); `dspy-agent config validate` checks the file.\n"
    ));
    // Compose names a project after the file's folder unless it says otherwise; so does the
    // config, which keeps the names of its volumes (PROJECT_VOLUME) those of Compose.
    let project = match project {
        Some(p) => p,
        None => {
            let folder = options
                .compose_dir
                .file_name()
                .map(|f| f.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let name: String = folder
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                .collect();
            let name = name.trim_start_matches(['-', '_']).to_string();
            if spec::validate_name("project", &name).is_ok() {
                name
            } else {
                super::DEFAULT_PROJECT.to_string()
            }
        }
    };
    let mut head = Table::new();
    head.insert("project".into(), Toml::String(project.clone()));
    head.insert("catalog".into(), Toml::Boolean(false));
    let mut body_text = String::new();
    let mut all_notes: Vec<String> = notes.clone();
    for name in &chosen {
        let Some(body) = defined.get(name) else {
            continue;
        };
        let (table, service_notes) = ctx.service(name, body, &project)?;
        // Every note names its key in full.
        let service_notes: Vec<String> = service_notes
            .into_iter()
            .map(|n| {
                if n.starts_with("services.") {
                    n
                } else {
                    format!("services.{name}.{n}")
                }
            })
            .collect();
        let mut wrapper = Table::new();
        let mut services = Table::new();
        services.insert(name.clone(), Toml::Table(table));
        wrapper.insert("services".into(), Toml::Table(services));
        body_text.push('\n');
        for note in &service_notes {
            body_text.push_str(&format!("# import: {note}\n"));
        }
        body_text.push_str(&toml::to_string(&wrapper).map_err(|e| {
            invalid(
                format!("services.{name}"),
                format!("cannot be written: {e}"),
            )
        })?);
        all_notes.extend(service_notes);
    }
    if !notes.is_empty() {
        for note in &notes {
            out.push_str(&format!("# import: {note}\n"));
        }
    }
    out.push('\n');
    out.push_str(
        &toml::to_string(&head)
            .map_err(|e| invalid("project", format!("cannot be written: {e}")))?,
    );
    out.push_str(&body_text);
    let layer = ConfigLayer::from_toml("the imported config", &out)?;
    Ok(Imported {
        text: out,
        layer,
        not_carried: all_notes,
        services: chosen.into_iter().collect(),
    })
}

struct Context<'a> {
    vars: BTreeMap<String, String>,
    options: &'a ImportOptions,
    profiles: BTreeSet<String>,
}

impl Context<'_> {
    fn interpolate(&self, key: &str, text: &str) -> Result<String, ConfigError> {
        interpolate(key, text, &self.vars)
    }

    /// A scalar at `key`, interpolated.
    fn string(&self, key: &str, value: &Yaml) -> Result<String, ConfigError> {
        let text = scalar(value).ok_or_else(|| invalid(key, "must be a string or a number"))?;
        self.interpolate(key, &text)
    }

    /// A list of scalars at `key` (a single string is a list of one), interpolated.
    fn strings(&self, key: &str, value: &Yaml) -> Result<Vec<String>, ConfigError> {
        match value {
            Yaml::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.string(&format!("{key}[{i}]"), v))
                .collect(),
            Yaml::Null => Ok(Vec::new()),
            other => Ok(vec![self.string(key, other)?]),
        }
    }

    /// The scalar under `k` of the long-form mapping at `key`, interpolated.
    fn field(
        &self,
        key: &str,
        m: &yaml_serde::Mapping,
        k: &str,
    ) -> Result<Option<String>, ConfigError> {
        m.get(k)
            .map(|v| self.string(&format!("{key}.{k}"), v))
            .transpose()
    }

    /// A command or entry point: a list as it is, a string split as a shell would.
    fn command(&self, key: &str, value: &Yaml) -> Result<Vec<String>, ConfigError> {
        match value {
            Yaml::Sequence(_) => self.strings(key, value),
            other => {
                let text = self.string(key, other)?;
                shlex::split(&continued(&text))
                    .ok_or_else(|| invalid(key, format!("{text:?} has an unclosed quote")))
            }
        }
    }

    /// One service as a `[services.NAME]` table, and what it could not carry.
    fn service(
        &self,
        name: &str,
        body: &Yaml,
        project: &str,
    ) -> Result<(Table, Vec<String>), ConfigError> {
        let key = |k: &str| format!("services.{name}.{k}");
        let Yaml::Mapping(body) = body else {
            return Err(invalid(format!("services.{name}"), "must be a mapping"));
        };
        let mut t = Table::new();
        let mut notes = Vec::new();
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let mut ports: Vec<(String, u16)> = Vec::new();
        let mut tmpfs: Vec<String> = Vec::new();
        let mut resources = Table::new();
        for (k, value) in body {
            let k = scalar(k).unwrap_or_default();
            if k.starts_with("x-") {
                continue;
            }
            if let Some((_, why)) = NOT_CARRIED.iter().find(|(n, _)| *n == k) {
                notes.push(format!("{k}: {why}"));
                continue;
            }
            if OTHER_SERVICE_KEYS.contains(&k.as_str()) {
                notes.push(format!("{k}: no equivalent in dspy-agent.toml"));
                continue;
            }
            if !CARRIED.contains(&k.as_str()) {
                return Err(invalid(
                    key(&k),
                    "is not a Compose service key; fix or remove it (nothing was written)",
                ));
            }
            let here = key(&k);
            match k.as_str() {
                "image" => {
                    t.insert("image".into(), Toml::String(self.string(&here, value)?));
                }
                "build" => {}
                "command" => {
                    t.insert("command".into(), strings_toml(self.command(&here, value)?));
                }
                "entrypoint" => {
                    let entrypoint = self.command(&here, value)?;
                    if entrypoint.is_empty() {
                        notes.push("entrypoint: an empty entry point (the image's removed) has no equivalent".into());
                    } else {
                        t.insert("entrypoint".into(), strings_toml(entrypoint));
                    }
                }
                "environment" => {
                    for (var, val) in self.environment(&here, value, &mut notes)? {
                        env.insert(var, val);
                    }
                }
                "env_file" => {
                    let files = self.env_files(&here, value)?;
                    for (var, val) in files {
                        env.entry(var).or_insert(val);
                    }
                }
                "ports" => {
                    let Yaml::Sequence(items) = value else {
                        return Err(invalid(here, "must be a list"));
                    };
                    for (i, item) in items.iter().enumerate() {
                        ports.extend(self.port(&format!("{here}[{i}]"), item, &mut notes)?);
                    }
                }
                "expose" => notes.push(
                    "expose: services reach each other on every port of the project network; nothing to carry".into(),
                ),
                "volumes" => {
                    let Yaml::Sequence(items) = value else {
                        return Err(invalid(here, "must be a list"));
                    };
                    let mut volumes = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        match self.volume(name, &format!("{here}[{i}]"), item, &mut notes)? {
                            Mount::Volume(v) => volumes.push(v),
                            Mount::Tmpfs(t) => tmpfs.push(t),
                            Mount::None => {}
                        }
                    }
                    t.insert("volumes".into(), strings_toml(volumes));
                }
                "tmpfs" => tmpfs.extend(self.strings(&here, value)?),
                "depends_on" => {
                    t.insert("depends_on".into(), self.depends_on(&here, value, &mut notes)?);
                }
                "healthcheck" => {
                    if let Some(h) = self.healthcheck(&here, value, &mut notes)? {
                        t.insert("healthcheck".into(), Toml::Table(h));
                    }
                }
                "deploy" => self.deploy(&here, value, &mut t, &mut resources, &mut notes)?,
                "restart" => {
                    let policy = self.string(&here, value)?;
                    let ours = match policy.as_str() {
                        "no" | "always" => policy.clone(),
                        p if p == "on-failure" || p.starts_with("on-failure:") => policy.clone(),
                        "unless-stopped" => {
                            notes.push("restart: unless-stopped is carried as always (a service the stack stops stays stopped either way)".into());
                            "always".into()
                        }
                        other => {
                            return Err(invalid(
                                here,
                                format!("{other:?} is not a restart policy (no, always, on-failure[:N], unless-stopped)"),
                            ))
                        }
                    };
                    t.entry("restart").or_insert(Toml::String(ours));
                }
                "user" | "working_dir" => {
                    t.insert(k.clone(), Toml::String(self.string(&here, value)?));
                }
                "read_only" | "init" => {
                    t.insert(k.clone(), Toml::Boolean(boolean(&here, value)?));
                }
                "cap_add" | "cap_drop" => {
                    t.insert(k.clone(), strings_toml(self.strings(&here, value)?));
                }
                "security_opt" => {
                    for opt in self.strings(&here, value)? {
                        let compact = opt.replace(['=', ' '], ":");
                        match compact.as_str() {
                            "no-new-privileges" | "no-new-privileges:true" => {
                                t.insert("no_new_privileges".into(), Toml::Boolean(true));
                            }
                            "no-new-privileges:false" => {}
                            _ => notes.push(format!("security_opt {opt:?}: only no-new-privileges is carried")),
                        }
                    }
                }
                "profiles" => {
                    let listed = self.strings(&here, value)?;
                    let named = self
                        .options
                        .services
                        .as_ref()
                        .is_some_and(|s| s.iter().any(|n| n == name));
                    if !named && !listed.iter().any(|p| self.profiles.contains(p)) {
                        t.insert("enabled".into(), Toml::Boolean(false));
                        notes.push(format!(
                            "profiles {listed:?}: off, as in Compose without --profile; set enabled = true (or import with --profile) to run it"
                        ));
                    }
                }
                "labels" => {
                    let labels = self.pairs(&here, value)?;
                    let mut lt = Table::new();
                    for (lk, lv) in labels {
                        lt.insert(lk, Toml::String(lv.unwrap_or_default()));
                    }
                    t.insert("labels".into(), Toml::Table(lt));
                }
                "stop_grace_period" => {
                    let d = compose_duration(&here, &self.string(&here, value)?)?;
                    t.insert("stop_timeout".into(), Toml::String(d));
                }
                "cpus" => {
                    resources.insert("cpus".into(), Toml::String(self.string(&here, value)?));
                }
                "mem_limit" => {
                    resources.insert("memory".into(), Toml::String(self.string(&here, value)?));
                }
                "mem_reservation" => {
                    resources.insert(
                        "memory_reservation".into(),
                        Toml::String(self.string(&here, value)?),
                    );
                }
                "gpus" => {
                    let gpus = match value {
                        Yaml::Sequence(devices) => gpu_devices(&here, devices, &mut notes)?,
                        other => Some(self.string(&here, other)?),
                    };
                    if let Some(g) = gpus {
                        resources.insert("gpus".into(), Toml::String(g));
                    }
                }
                "pull_policy" => {
                    let policy = self.string(&here, value)?;
                    let ours = match policy.as_str() {
                        "always" => Some("always"),
                        "never" => Some("never"),
                        "missing" | "if_not_present" => Some("missing"),
                        _ => None,
                    };
                    match ours {
                        Some(p) => {
                            t.insert("pull".into(), Toml::String(p.into()));
                        }
                        None => notes.push(format!("pull_policy {policy:?}: no equivalent (always, never, missing)")),
                    }
                }
                _ => unreachable!("every carried key is handled"),
            }
        }
        if !t.contains_key("image") {
            let image = format!("{project}-{name}");
            notes.push(format!("build: images are not built here; build it (`docker compose build {name}` tags {image}) or set image"));
            t.insert("image".into(), Toml::String(image));
        } else if body.contains_key("build") {
            notes.push("build: images are not built here; the service runs its image".into());
        }
        if !env.is_empty() {
            let secret: Vec<String> = env.keys().filter(|k| looks_secret(k)).cloned().collect();
            let mut et = Table::new();
            for (k, v) in env {
                et.insert(k, Toml::String(v));
            }
            t.insert("env".into(), Toml::Table(et));
            if !secret.is_empty() {
                t.insert("secret_env".into(), strings_toml(secret));
            }
        }
        if !ports.is_empty() {
            t.insert(
                "ports".into(),
                strings_toml(ports.iter().map(|(p, _)| p.clone()).collect()),
            );
        }
        if !tmpfs.is_empty() {
            t.insert("tmpfs".into(), strings_toml(tmpfs));
        }
        if !resources.is_empty() {
            t.insert("resources".into(), Toml::Table(resources));
        }
        // A probe of the service's own port from inside becomes the host-side probe, when that
        // port is published; any other stays a command run in the container.
        // A Redis that wants a password answers a plain PING with an error, which `redis-cli
        // ping` exits 0 on: the command stays what passes.
        let password = t
            .get("command")
            .and_then(Toml::as_array)
            .is_some_and(|c| c.iter().any(|w| w.as_str() == Some("--requirepass")));
        if let Some(Toml::Table(h)) = t.get_mut("healthcheck") {
            if let Some(Toml::Integer(port)) = h.get("port").cloned() {
                let published = ports.iter().any(|(_, c)| i64::from(*c) == port);
                let redis = h.get("type").and_then(Toml::as_str) == Some("redis");
                if !published || (redis && password) {
                    let command = h.remove("exec_command");
                    h.remove("port");
                    h.remove("path");
                    h.insert("type".into(), Toml::String("exec".into()));
                    if let Some(c) = command {
                        h.insert("command".into(), c);
                    }
                }
            }
            h.remove("exec_command");
        }
        Ok((t, notes))
    }

    /// `environment` as a list ("K=V", or "K" taken from the environment) or a mapping.
    fn environment(
        &self,
        key: &str,
        value: &Yaml,
        notes: &mut Vec<String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        for (var, val) in self.pairs(key, value)? {
            match val {
                Some(v) => out.push((var, v)),
                None => match self.vars.get(&var) {
                    Some(v) => out.push((var, v.clone())),
                    None => notes.push(format!(
                        "environment {var}: taken from the environment in Compose, and not set here"
                    )),
                },
            }
        }
        Ok(out)
    }

    /// A list of "K=V" / "K" or a mapping of K to a scalar or null, interpolated.
    fn pairs(&self, key: &str, value: &Yaml) -> Result<Vec<(String, Option<String>)>, ConfigError> {
        match value {
            Yaml::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let here = format!("{key}[{i}]");
                    let text = self.string(&here, item)?;
                    Ok(match text.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (text, None),
                    })
                })
                .collect(),
            Yaml::Mapping(map) => map
                .iter()
                .map(|(k, v)| {
                    let k = scalar(k).unwrap_or_default();
                    let here = format!("{key}.{k}");
                    let v = match v {
                        Yaml::Null => None,
                        other => Some(self.string(&here, other)?),
                    };
                    Ok((k, v))
                })
                .collect(),
            Yaml::Null => Ok(Vec::new()),
            _ => Err(invalid(key, "must be a list of KEY=VALUE or a mapping")),
        }
    }

    fn env_files(&self, key: &str, value: &Yaml) -> Result<Vec<(String, String)>, ConfigError> {
        let entries: Vec<(String, bool)> = match value {
            Yaml::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let here = format!("{key}[{i}]");
                    match item {
                        Yaml::Mapping(m) => {
                            let path = m
                                .get("path")
                                .ok_or_else(|| invalid(&here, "needs a path"))?;
                            let required = match m.get("required") {
                                Some(r) => boolean(&format!("{here}.required"), r)?,
                                None => true,
                            };
                            Ok((self.string(&format!("{here}.path"), path)?, required))
                        }
                        other => Ok((self.string(&here, other)?, true)),
                    }
                })
                .collect::<Result<_, ConfigError>>()?,
            other => vec![(self.string(key, other)?, true)],
        };
        let mut out = Vec::new();
        for (path, required) in entries {
            let full = self.options.compose_dir.join(&path);
            let vars = read_env_file(&full, required, key)?;
            for (k, v) in vars {
                out.push((
                    k.clone(),
                    self.interpolate(&format!("{key} {path}: {k}"), &v)?,
                ));
            }
        }
        Ok(out)
    }

    /// A port in the short ("8080:80", "127.0.0.1:8080:80/udp", ranges) or long form, as
    /// mappings this config reads, with their container ports.
    fn port(
        &self,
        key: &str,
        value: &Yaml,
        notes: &mut Vec<String>,
    ) -> Result<Vec<(String, u16)>, ConfigError> {
        let (host_ip, published, target, protocol) = match value {
            Yaml::Mapping(m) => {
                long_form(
                    key,
                    m,
                    &["target", "published", "host_ip", "protocol"],
                    &["mode", "name", "app_protocol"],
                    "a port",
                    notes,
                )?;
                let get = |k: &str| self.field(key, m, k);
                let target = get("target")?
                    .ok_or_else(|| invalid(key, "a port needs a target (the container port)"))?;
                (
                    get("host_ip")?,
                    get("published")?,
                    target,
                    get("protocol")?.unwrap_or_else(|| "tcp".into()),
                )
            }
            other => {
                let text = self.string(key, other)?;
                let (mapping, protocol) = match text.rsplit_once('/') {
                    Some((m, p)) => (m.to_string(), p.to_string()),
                    None => (text.clone(), "tcp".into()),
                };
                // "[::1]:8080:80" and "127.0.0.1:8080:80": the address is what precedes the
                // last two parts.
                let parts: Vec<&str> = mapping.rsplitn(3, ':').collect();
                match parts.as_slice() {
                    [c] => (None, None, c.to_string(), protocol),
                    [c, h] => (None, Some(h.to_string()), c.to_string(), protocol),
                    [c, h, ip] => (
                        Some(ip.to_string()),
                        Some(h.to_string()),
                        c.to_string(),
                        protocol,
                    ),
                    _ => return Err(invalid(key, format!("{text:?} is not a port"))),
                }
            }
        };
        if protocol != "tcp" && protocol != "udp" {
            return Err(invalid(
                key,
                format!("protocol {protocol:?} must be tcp or udp"),
            ));
        }
        let range = |text: &str| -> Result<(u16, u16), ConfigError> {
            let bad = || invalid(key, format!("{text:?} is not a port or a range of ports"));
            match text.split_once('-') {
                Some((a, b)) => Ok((
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                )),
                None => {
                    let n = text.trim().parse().map_err(|_| bad())?;
                    Ok((n, n))
                }
            }
        };
        let (c_from, c_to) = range(&target)?;
        // Compose publishes a port given alone on a host port of the Engine's choosing.
        let (h_from, h_to) = match published.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => range(p)?,
            None => (0, 0),
        };
        let count = c_to.checked_sub(c_from).map(|n| n + 1).unwrap_or(0);
        if count == 0 || count > 1000 {
            return Err(invalid(
                key,
                format!("{target:?} is not an ascending range of ports"),
            ));
        }
        let host_span = h_to.checked_sub(h_from).map(|n| n + 1).unwrap_or(0);
        if h_from != 0 && host_span != count {
            if host_span > count {
                notes.push(format!("{key}: host ports {h_from}-{h_to} are a pool to choose from in Compose; the first {count} are used"));
            } else {
                return Err(invalid(
                    key,
                    format!("publishes {count} container ports on {host_span} host ports"),
                ));
            }
        }
        let ip = host_ip.filter(|i| !i.is_empty());
        Ok((0..count)
            .map(|i| {
                let c = c_from + i;
                let h = if h_from == 0 { 0 } else { h_from + i };
                let mut text = match &ip {
                    Some(ip) => format!("{ip}:{h}:{c}"),
                    None => format!("{h}:{c}"),
                };
                if protocol == "udp" {
                    text.push_str("/udp");
                }
                (text, c)
            })
            .collect())
    }

    fn volume(
        &self,
        service: &str,
        key: &str,
        value: &Yaml,
        notes: &mut Vec<String>,
    ) -> Result<Mount, ConfigError> {
        let (kind, source, target, read_only, size) = match value {
            Yaml::Mapping(m) => {
                long_form(
                    key,
                    m,
                    &["type", "source", "target", "read_only", "tmpfs"],
                    &["bind", "volume", "consistency", "image"],
                    "a volume",
                    notes,
                )?;
                let get = |k: &str| self.field(key, m, k);
                let size = match m.get("tmpfs") {
                    Some(Yaml::Mapping(t)) => t
                        .get("size")
                        .map(|v| self.string(&format!("{key}.tmpfs.size"), v))
                        .transpose()?,
                    _ => None,
                };
                (
                    get("type")?.unwrap_or_else(|| "volume".into()),
                    get("source")?,
                    get("target")?.ok_or_else(|| invalid(key, "a volume needs a target"))?,
                    m.get("read_only")
                        .map(|v| boolean(&format!("{key}.read_only"), v))
                        .transpose()?
                        .unwrap_or(false),
                    size,
                )
            }
            other => {
                let text = self.string(key, other)?;
                let parts: Vec<&str> = text.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [t] => (None, t.to_string(), ""),
                    [s, t] => (Some(s.to_string()), t.to_string(), ""),
                    [s, t, m] => (Some(s.to_string()), t.to_string(), *m),
                    _ => {
                        return Err(invalid(
                            key,
                            format!("{text:?} is not SOURCE:TARGET[:MODE]"),
                        ))
                    }
                };
                let mut read_only = false;
                for flag in mode.split(',').filter(|f| !f.is_empty()) {
                    match flag {
                        "ro" => read_only = true,
                        "rw" => {}
                        other => notes.push(format!("{key}: mode {other:?} has no equivalent")),
                    }
                }
                let kind = match source.as_deref() {
                    Some(s) if s.starts_with(['/', '.', '~']) => "bind",
                    _ => "volume",
                };
                (kind.to_string(), source, target, read_only, None)
            }
        };
        if !target.starts_with('/') {
            return Err(invalid(
                key,
                format!("{target:?}: the container path must be absolute"),
            ));
        }
        let ro = if read_only { ":ro" } else { "" };
        match kind.as_str() {
            "tmpfs" => Ok(Mount::Tmpfs(match size {
                Some(s) => format!("{target}:size={s}"),
                None => target,
            })),
            "bind" => {
                let source = source.ok_or_else(|| invalid(key, "a bind mount needs a source"))?;
                Ok(Mount::Volume(format!(
                    "{}:{target}{ro}",
                    self.host_path(&source)
                )))
            }
            "volume" => match source.filter(|s| !s.is_empty()) {
                Some(s) => Ok(Mount::Volume(format!("{s}:{target}{ro}"))),
                None => {
                    // An anonymous volume: a named one here, which outlives the container.
                    let slug: String = target
                        .trim_matches('/')
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect();
                    let named = format!("{service}-{slug}");
                    notes.push(format!("{key}: the anonymous volume at {target} becomes the named volume {named:?}"));
                    Ok(Mount::Volume(format!("{named}:{target}{ro}")))
                }
            },
            other => {
                notes.push(format!(
                    "{key}: a volume of type {other:?} has no equivalent"
                ));
                Ok(Mount::None)
            }
        }
    }

    /// A host path of the compose file as the config file reads it: relative to the config
    /// file when both are in one folder, absolute otherwise.
    fn host_path(&self, source: &str) -> String {
        let expanded = match source.strip_prefix("~/") {
            Some(rest) => match self.vars.get("HOME") {
                Some(home) => Path::new(home).join(rest),
                None => PathBuf::from(source),
            },
            None => PathBuf::from(source),
        };
        if expanded.is_absolute() {
            return expanded.display().to_string();
        }
        if self.options.compose_dir == self.options.output_dir {
            let text = expanded.display().to_string();
            if text.starts_with("./") || text.starts_with("../") || text == "." {
                text
            } else {
                format!("./{text}")
            }
        } else {
            self.options
                .compose_dir
                .join(expanded)
                .display()
                .to_string()
        }
    }

    fn depends_on(
        &self,
        key: &str,
        value: &Yaml,
        notes: &mut Vec<String>,
    ) -> Result<Toml, ConfigError> {
        let mut t = Table::new();
        match value {
            // The list form waits for the container to start, in Compose.
            Yaml::Sequence(_) => {
                for dep in self.strings(key, value)? {
                    t.insert(dep, Toml::String("started".into()));
                }
            }
            Yaml::Mapping(m) => {
                for (dep, how) in m {
                    let dep = scalar(dep).unwrap_or_default();
                    let here = format!("{key}.{dep}");
                    let mut condition = "started".to_string();
                    if let Yaml::Mapping(how) = how {
                        for (k, v) in how {
                            let k = scalar(k).unwrap_or_default();
                            match k.as_str() {
                                "condition" => {
                                    let c = self.string(&format!("{here}.condition"), v)?;
                                    condition = match c.as_str() {
                                        "service_started" => "started",
                                        "service_healthy" => "healthy",
                                        "service_completed_successfully" => "completed",
                                        other => return Err(invalid(
                                            format!("{here}.condition"),
                                            format!("{other:?} is not a condition (service_started, service_healthy, service_completed_successfully)"),
                                        )),
                                    }
                                    .into();
                                }
                                "restart" => notes.push(format!("depends_on.{dep}.restart: dependents are told of a restart and are not restarted with it")),
                                "required" => notes.push(format!("depends_on.{dep}.required: every dependency is required")),
                                other => return Err(invalid(
                                    format!("{here}.{other}"),
                                    "is not a key of depends_on (condition, restart, required)",
                                )),
                            }
                        }
                    }
                    t.insert(dep, Toml::String(condition));
                }
            }
            _ => return Err(invalid(key, "must be a list of services or a mapping")),
        }
        Ok(Toml::Table(t))
    }

    fn healthcheck(
        &self,
        key: &str,
        value: &Yaml,
        notes: &mut Vec<String>,
    ) -> Result<Option<Table>, ConfigError> {
        let Yaml::Mapping(m) = value else {
            return Err(invalid(key, "must be a mapping"));
        };
        let mut h = Table::new();
        let mut disabled = false;
        for (k, v) in m {
            let k = scalar(k).unwrap_or_default();
            let here = format!("{key}.{k}");
            match k.as_str() {
                "test" => {
                    let test = match v {
                        Yaml::Sequence(_) => self.strings(&here, v)?,
                        other => vec!["CMD-SHELL".into(), self.string(&here, other)?],
                    };
                    match test.first().map(String::as_str) {
                        Some("NONE") => disabled = true,
                        Some("CMD") if test.len() > 1 => {
                            probe_from_command(&mut h, &test[1..]);
                        }
                        Some("CMD-SHELL") if test.len() == 2 => {
                            let words = shlex::split(&test[1]).unwrap_or_default();
                            probe_from_command(&mut h, &words);
                            if h.get("type").and_then(Toml::as_str) == Some("exec") {
                                h.insert(
                                    "command".into(),
                                    strings_toml(vec!["sh".into(), "-c".into(), test[1].clone()]),
                                );
                            }
                            h.insert(
                                "exec_command".into(),
                                strings_toml(vec!["sh".into(), "-c".into(), test[1].clone()]),
                            );
                        }
                        _ => {
                            return Err(invalid(
                                here,
                                "write [\"CMD\", ARGS...], [\"CMD-SHELL\", \"COMMAND\"], a string, or [\"NONE\"]",
                            ))
                        }
                    }
                }
                "interval" | "timeout" | "start_period" => {
                    let d = compose_duration(&here, &self.string(&here, v)?)?;
                    h.insert(k.clone(), Toml::String(d));
                }
                "retries" => {
                    let n: u32 = self
                        .string(&here, v)?
                        .parse()
                        .map_err(|_| invalid(&here, "must be a whole number"))?;
                    h.insert("retries".into(), Toml::Integer(i64::from(n)));
                }
                "disable" => disabled = boolean(&here, v)?,
                "start_interval" => notes.push(
                    "healthcheck.start_interval: probes back off from a short interval while the service starts".into(),
                ),
                other => {
                    return Err(invalid(
                        format!("{key}.{other}"),
                        "is not a key of healthcheck (test, interval, timeout, retries, start_period, start_interval, disable)",
                    ))
                }
            }
        }
        if disabled {
            let mut none = Table::new();
            none.insert("type".into(), Toml::String("none".into()));
            return Ok(Some(none));
        }
        if !h.contains_key("type") {
            // Timings alone: the image's own HEALTHCHECK, as Compose does.
            h.insert("type".into(), Toml::String("docker".into()));
            for timing in ["interval", "timeout", "retries", "start_period"] {
                if h.remove(timing).is_some() {
                    notes.push(format!(
                        "healthcheck.{timing}: the image's own health check keeps its timings"
                    ));
                }
            }
        }
        Ok(Some(h))
    }

    fn deploy(
        &self,
        key: &str,
        value: &Yaml,
        t: &mut Table,
        resources: &mut Table,
        notes: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let Yaml::Mapping(m) = value else {
            return Err(invalid(key, "must be a mapping"));
        };
        for (k, v) in m {
            let k = scalar(k).unwrap_or_default();
            let here = format!("{key}.{k}");
            match k.as_str() {
                "resources" => {
                    let Yaml::Mapping(r) = v else {
                        return Err(invalid(here, "must be a mapping"));
                    };
                    for (rk, rv) in r {
                        let rk = scalar(rk).unwrap_or_default();
                        let rhere = format!("{here}.{rk}");
                        let Yaml::Mapping(amounts) = rv else {
                            return Err(invalid(rhere, "must be a mapping"));
                        };
                        for (ak, av) in amounts {
                            let ak = scalar(ak).unwrap_or_default();
                            let ahere = format!("{rhere}.{ak}");
                            match (rk.as_str(), ak.as_str()) {
                                ("limits", "cpus") => {
                                    resources.insert("cpus".into(), Toml::String(self.string(&ahere, av)?));
                                }
                                ("limits", "memory") => {
                                    resources.insert("memory".into(), Toml::String(self.string(&ahere, av)?));
                                }
                                ("reservations", "memory") => {
                                    resources.insert(
                                        "memory_reservation".into(),
                                        Toml::String(self.string(&ahere, av)?),
                                    );
                                }
                                ("reservations", "devices") => {
                                    let Yaml::Sequence(devices) = av else {
                                        return Err(invalid(ahere, "must be a list"));
                                    };
                                    if let Some(g) = gpu_devices(&ahere, devices, notes)? {
                                        resources.insert("gpus".into(), Toml::String(g));
                                    }
                                }
                                ("reservations", "cpus") => notes.push(
                                    "deploy.resources.reservations.cpus: the Engine reserves CPUs only in a swarm".into(),
                                ),
                                ("limits" | "reservations", "pids" | "generic_resources") => {
                                    notes.push(format!("deploy.resources.{rk}.{ak}: no equivalent"))
                                }
                                _ => {
                                    return Err(invalid(
                                        ahere,
                                        "is not a key of deploy.resources (limits: cpus, memory, pids; reservations: cpus, memory, devices, generic_resources)",
                                    ))
                                }
                            }
                        }
                    }
                }
                "restart_policy" => {
                    let Yaml::Mapping(p) = v else {
                        return Err(invalid(here, "must be a mapping"));
                    };
                    let condition = p
                        .get("condition")
                        .map(|c| self.string(&format!("{here}.condition"), c))
                        .transpose()?
                        .unwrap_or_else(|| "any".into());
                    let attempts = p
                        .get("max_attempts")
                        .map(|c| self.string(&format!("{here}.max_attempts"), c))
                        .transpose()?;
                    let policy = match (condition.as_str(), attempts) {
                        ("none", _) => "no".to_string(),
                        ("on-failure", Some(n)) => format!("on-failure:{n}"),
                        ("on-failure", None) => "on-failure".into(),
                        ("any", None) => "always".into(),
                        ("any", Some(n)) => {
                            notes.push(format!("deploy.restart_policy.max_attempts {n} with condition any: a limit applies to on-failure only; carried as always"));
                            "always".into()
                        }
                        (other, _) => {
                            return Err(invalid(
                                format!("{here}.condition"),
                                format!("{other:?} is not none, on-failure or any"),
                            ))
                        }
                    };
                    for extra in ["delay", "window"] {
                        if p.contains_key(extra) {
                            notes.push(format!("deploy.restart_policy.{extra}: restarts back off on their own"));
                        }
                    }
                    t.insert("restart".into(), Toml::String(policy));
                }
                "replicas" => {
                    if self.string(&here, v)? != "1" {
                        notes.push("deploy.replicas: one container per service".into());
                    }
                }
                "mode" | "placement" | "update_config" | "rollback_config" | "endpoint_mode"
                | "labels" => notes.push(format!("deploy.{k}: no equivalent on one Engine")),
                other => {
                    return Err(invalid(
                        format!("{key}.{other}"),
                        "is not a key of deploy (resources, restart_policy, replicas, mode, placement, update_config, rollback_config, endpoint_mode, labels)",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Checks the keys of a long-form entry (`what`) at `key`: `carried` ones are read, `noted` ones
/// have no equivalent and are named, any other is refused.
fn long_form(
    key: &str,
    m: &yaml_serde::Mapping,
    carried: &[&str],
    noted: &[&str],
    what: &str,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for k in m.keys().filter_map(scalar) {
        if noted.contains(&k.as_str()) {
            notes.push(format!("{key}.{k}: no equivalent"));
        } else if !carried.contains(&k.as_str()) {
            return Err(invalid(
                format!("{key}.{k}"),
                format!(
                    "is not a key of {what} ({})",
                    [carried, noted].concat().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

enum Mount {
    Volume(String),
    Tmpfs(String),
    None,
}

/// GPU device requests as the `gpus` setting: a count, or "all".
fn gpu_devices(
    key: &str,
    devices: &[Yaml],
    notes: &mut Vec<String>,
) -> Result<Option<String>, ConfigError> {
    let mut total: Option<String> = None;
    for (i, d) in devices.iter().enumerate() {
        let here = format!("{key}[{i}]");
        let Yaml::Mapping(d) = d else {
            return Err(invalid(here, "must be a mapping"));
        };
        let capabilities: Vec<String> = match d.get("capabilities") {
            Some(Yaml::Sequence(c)) => c.iter().filter_map(scalar).collect(),
            _ => Vec::new(),
        };
        if !capabilities.iter().any(|c| c == "gpu") && !d.contains_key("driver") {
            notes.push(format!("{here}: only GPU devices are carried"));
            continue;
        }
        if d.contains_key("device_ids") {
            notes.push(format!(
                "{here}.device_ids: GPUs are requested by count here"
            ));
        }
        let count = d
            .get("count")
            .and_then(scalar)
            .unwrap_or_else(|| "all".into());
        total = Some(match count.as_str() {
            "all" | "-1" => "all".into(),
            n => n.parse::<u32>().map(|n| n.to_string()).map_err(|_| {
                invalid(
                    format!("{here}.count"),
                    format!("{n:?} is not a count or \"all\""),
                )
            })?,
        });
    }
    Ok(total)
}

/// Sets a probe from a health command: an HTTP GET or `redis-cli ping` of the service's own
/// address becomes the host-side probe (given its port), anything else runs in the container.
fn probe_from_command(h: &mut Table, words: &[String]) {
    let words: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .take_while(|w| !matches!(*w, "||" | "|" | "&&" | ";"))
        .collect();
    let local = |host: &str| {
        matches!(
            host,
            "localhost" | "127.0.0.1" | "0.0.0.0" | "[::1]" | "::1"
        )
    };
    match words.first().copied() {
        Some("curl" | "wget") => {
            let url = words.iter().skip(1).find(|w| w.starts_with("http://"));
            let flags_ok = words.iter().skip(1).all(|w| {
                w.starts_with("http://")
                    || matches!(
                        *w,
                        "-f" | "--fail"
                            | "-s"
                            | "--silent"
                            | "-S"
                            | "--show-error"
                            | "-fs"
                            | "-sf"
                            | "-fsS"
                            | "-sS"
                            | "-fSs"
                            | "-q"
                            | "--quiet"
                            | "--spider"
                            | "-O"
                            | "-"
                            | "-qO-"
                            | "-qO"
                            | "-O-"
                            | "/dev/null"
                            | "-o"
                            | "--no-verbose"
                            | "-nv"
                            | "--tries=1"
                            | "-L"
                            | "--location"
                    )
            });
            if let (Some(url), true) = (url, flags_ok) {
                let rest = &url["http://".len()..];
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(':') => (h, p.parse::<u16>().ok()),
                    _ => (authority, Some(80)),
                };
                if let (true, Some(port)) = (local(host), port) {
                    h.insert("type".into(), Toml::String("http".into()));
                    h.insert("port".into(), Toml::Integer(i64::from(port)));
                    h.insert("path".into(), Toml::String(path.to_string()));
                    h.insert(
                        "exec_command".into(),
                        strings_toml(words.iter().map(|w| w.to_string()).collect()),
                    );
                    return;
                }
            }
        }
        Some("redis-cli") => {
            let mut port = 6379u16;
            let mut host_ok = true;
            let mut ping = false;
            let mut i = 1;
            while i < words.len() {
                match words[i] {
                    "-h" => {
                        host_ok = words.get(i + 1).is_some_and(|h| local(h));
                        i += 1;
                    }
                    "-p" => {
                        port = words.get(i + 1).and_then(|p| p.parse().ok()).unwrap_or(0);
                        i += 1;
                    }
                    w if w.eq_ignore_ascii_case("ping") => ping = true,
                    _ => host_ok = false,
                }
                i += 1;
            }
            if ping && host_ok && port != 0 {
                h.insert("type".into(), Toml::String("redis".into()));
                h.insert("port".into(), Toml::Integer(i64::from(port)));
                h.insert(
                    "exec_command".into(),
                    strings_toml(words.iter().map(|w| w.to_string()).collect()),
                );
                return;
            }
        }
        _ => {}
    }
    h.insert("type".into(), Toml::String("exec".into()));
    h.insert(
        "command".into(),
        strings_toml(words.iter().map(|w| w.to_string()).collect()),
    );
}

fn strings_toml(items: Vec<String>) -> Toml {
    Toml::Array(items.into_iter().map(Toml::String).collect())
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn boolean(key: &str, v: &Yaml) -> Result<bool, ConfigError> {
    match v {
        Yaml::Bool(b) => Ok(*b),
        Yaml::String(s) if s == "true" => Ok(true),
        Yaml::String(s) if s == "false" => Ok(false),
        _ => Err(invalid(key, "must be true or false")),
    }
}

/// Names in a `depends_on` list or mapping.
fn dependency_names(v: &Yaml) -> Vec<String> {
    match v {
        Yaml::Sequence(items) => items.iter().filter_map(scalar).collect(),
        Yaml::Mapping(m) => m.keys().filter_map(scalar).collect(),
        _ => Vec::new(),
    }
}

fn top_level_volumes(v: &Yaml) -> Vec<String> {
    let Yaml::Mapping(m) = v else {
        return Vec::new();
    };
    // `driver: local` is what every volume gets anyway.
    let plain = |s: &yaml_serde::Mapping| {
        s.iter().all(|(k, v)| {
            scalar(k).as_deref() == Some("driver") && scalar(v).as_deref() == Some("local")
        })
    };
    m.iter()
        .filter(|(_, spec)| matches!(spec, Yaml::Mapping(s) if !plain(s)))
        .map(|(name, _)| {
            format!(
                "volumes.{}: drivers, options and external volumes have no equivalent; the volume is made as PROJECT_NAME",
                scalar(name).unwrap_or_default()
            )
        })
        .collect()
}

/// A Go duration as Compose writes them ("1m30s", "500ms", "2h") in the form this config
/// reads ("90s", "500ms").
fn compose_duration(key: &str, text: &str) -> Result<String, ConfigError> {
    let bad = || {
        invalid(
            key,
            format!("{text:?} is not a duration such as \"30s\" or \"1m30s\""),
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    // A bare number is seconds in Compose's integer form.
    let mut total_ms = 0f64;
    if let Ok(n) = rest.parse::<f64>() {
        if !(n.is_finite() && n >= 0.0) {
            return Err(bad());
        }
        total_ms = n * 1000.0;
        rest = "";
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(split);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let n: f64 = number.parse().map_err(|_| bad())?;
        total_ms += n * match unit {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        rest = next;
    }
    let ms = total_ms.round() as u64;
    Ok(if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    })
}

/// Replaces `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
/// `${VAR:+alt}`, `${VAR+alt}` and `$VAR`; `$$` is a `$`. A variable with no value and no
/// default is an error, naming the variable and the key.
pub fn interpolate(
    key: &str,
    text: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            // The matching brace: defaults may hold ${...} of their own.
            let mut depth = 1;
            let mut end = None;
            for (j, c) in r.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end
                .ok_or_else(|| invalid(key, format!("{text:?}: \"${{\" has no closing \"}}\"")))?;
            out.push_str(&substitute(key, &r[..end], vars)?);
            rest = &r[end + 1..];
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 || after.starts_with(|c: char| c.is_ascii_digit()) {
                out.push('$');
                rest = after;
            } else {
                out.push_str(&substitute(key, &after[..len], vars)?);
                rest = &after[len..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn substitute(
    key: &str,
    expr: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, ConfigError> {
    let len = expr
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(expr.len());
    let (name, op) = expr.split_at(len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(invalid(
            key,
            format!("\"${{{expr}}}\" does not name a variable"),
        ));
    }
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let missing = |message: &str| {
        invalid(
            key,
            if message.is_empty() {
                format!("${{{name}}} has no value: set {name} in the environment or in .env beside the compose file, or give a default: ${{{name}:-default}}")
            } else {
                format!("${{{name}}}: {message}")
            },
        )
    };
    let nested = |t: &str| interpolate(key, t, vars);
    if op.is_empty() {
        return value.cloned().ok_or_else(|| missing(""));
    }
    if let Some(d) = op.strip_prefix(":-") {
        return if set_nonempty {
            Ok(value.cloned().unwrap_or_default())
        } else {
            nested(d)
        };
    }
    if let Some(m) = op.strip_prefix(":?") {
        return if set_nonempty {
            Ok(value.cloned().unwrap_or_default())
        } else {
            Err(missing(m))
        };
    }
    if let Some(a) = op.strip_prefix(":+") {
        return if set_nonempty {
            nested(a)
        } else {
            Ok(String::new())
        };
    }
    if let Some(d) = op.strip_prefix('-') {
        return match value {
            Some(v) => Ok(v.clone()),
            None => nested(d),
        };
    }
    if let Some(m) = op.strip_prefix('?') {
        return value.cloned().ok_or_else(|| missing(m));
    }
    if let Some(a) = op.strip_prefix('+') {
        return if value.is_some() {
            nested(a)
        } else {
            Ok(String::new())
        };
    }
    Err(invalid(
        key,
        format!("\"${{{expr}}}\" is not an interpolation Compose knows"),
    ))
}

/// KEY=VALUE lines of an env file (`#` comments, `export`, single and double quotes).
fn read_env_file(
    path: &Path,
    required: bool,
    key: &str,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(BTreeMap::new())
        }
        Err(e) => return Err(invalid(key, format!("cannot read {}: {e}", path.display()))),
    };
    let mut vars = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(invalid(
                key,
                format!(
                    "{} line {}: {line:?} is not KEY=VALUE",
                    path.display(),
                    n + 1
                ),
            ));
        };
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
            inner.to_string()
        } else if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            inner.replace("\\n", "\n").replace("\\\"", "\"")
        } else {
            v.split(" #").next().unwrap_or_default().trim().to_string()
        };
        vars.insert(k.trim().to_string(), value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interpolation_in_every_form() {
        let v = vars(&[("SET", "x"), ("EMPTY", "")]);
        let cases = [
            ("${SET}", "x"),
            ("$SET/y", "x/y"),
            ("${UNSET:-d}", "d"),
            ("${EMPTY:-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${UNSET-d}", "d"),
            ("${SET:+alt}", "alt"),
            ("${UNSET:+alt}", ""),
            ("${EMPTY+alt}", "alt"),
            ("${UNSET:-${SET}}", "x"),
            ("$$HOME and $${X}", "$HOME and ${X}"),
            ("price: 5$", "price: 5$"),
        ];
        for (text, want) in cases {
            assert_eq!(interpolate("k", text, &v).unwrap(), want, "{text}");
        }
        let e = interpolate("services.a.image", "img:${TAG}", &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("services.a.image: ${TAG} has no value"),
            "{e}"
        );
        let e = interpolate("k", "${EMPTY:?say why}", &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("say why"), "{e}");
        assert!(interpolate("k", "${UNCLOSED", &v).is_err());
    }

    #[test]
    fn go_durations_in_the_config_form() {
        for (compose, ours) in [
            ("30s", "30s"),
            ("1m30s", "90s"),
            ("1h", "3600s"),
            ("500ms", "500ms"),
            ("1.5s", "1500ms"),
            ("10", "10s"),
        ] {
            assert_eq!(compose_duration("k", compose).unwrap(), ours, "{compose}");
        }
        for bad in ["", "5 minutes", "1d", "s", "-5", "NaN"] {
            assert!(compose_duration("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_names() {
        for name in [
            "POSTGRES_PASSWORD",
            "REDIS_AUTH",
            "SECRET_KEY",
            "api_token",
            "SALT",
        ] {
            assert!(looks_secret(name), "{name}");
        }
        for name in [
            "POSTGRES_USER",
            "NEXTAUTH_URL",
            "KEYCLOAK_URL",
            "PASSPORT_ID",
        ] {
            assert!(!looks_secret(name), "{name}");
        }
    }

    fn import_one(service: &str) -> (Table, Vec<String>) {
        let text = format!("services:\n  web:\n{service}");
        let options = ImportOptions {
            compose_dir: "/srv/app".into(),
            output_dir: "/srv/app".into(),
            ..ImportOptions::default()
        };
        let imported = import("compose.yaml", &text, &options).unwrap();
        let all: Table = toml::from_str(&imported.text).unwrap();
        let web = all["services"]["web"].as_table().unwrap().clone();
        (web, imported.not_carried)
    }

    #[test]
    fn ports_in_the_short_and_long_forms() {
        let (web, _) = import_one(
            "    image: x\n    ports:\n      - 80\n      - \"8080:80\"\n      - 127.0.0.1:53:53/udp\n      - \"9000-9001:9000-9001\"\n      - target: 443\n        published: \"8443\"\n        host_ip: 0.0.0.0\n",
        );
        let ports: Vec<&str> = web["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        // A port alone is published on a host port the Engine picks, as in Compose.
        assert_eq!(
            ports,
            [
                "0:80",
                "8080:80",
                "127.0.0.1:53:53/udp",
                "9000:9000",
                "9001:9001",
                "0.0.0.0:8443:443"
            ]
        );
    }

    #[test]
    fn health_commands_become_probes_where_the_host_can_reach_them() {
        let (web, _) = import_one(
            "    image: x\n    ports: [\"8000:8000\"]\n    healthcheck:\n      test: curl -fsS http://localhost:8000/healthz || exit 1\n",
        );
        assert_eq!(web["healthcheck"]["type"].as_str(), Some("http"));
        assert_eq!(web["healthcheck"]["path"].as_str(), Some("/healthz"));
        let (web, _) = import_one(
            "    image: x\n    healthcheck:\n      test: [\"CMD-SHELL\", \"curl -f http://localhost:8000/ || exit 1\"]\n",
        );
        assert_eq!(web["healthcheck"]["type"].as_str(), Some("exec"));
        assert_eq!(
            web["healthcheck"]["command"][2].as_str(),
            Some("curl -f http://localhost:8000/ || exit 1")
        );
        let (web, _) = import_one(
            "    image: x\n    ports: [\"6379:6379\"]\n    healthcheck:\n      test: [\"CMD\", \"redis-cli\", \"ping\"]\n",
        );
        assert_eq!(web["healthcheck"]["type"].as_str(), Some("redis"));
        let (web, _) = import_one("    image: x\n    healthcheck:\n      test: [\"NONE\"]\n");
        assert_eq!(web["healthcheck"]["type"].as_str(), Some("none"));
    }

    #[test]
    fn hardening_resources_and_what_is_not_carried() {
        let (web, notes) = import_one(
            "    image: x\n    user: \"1000:1000\"\n    working_dir: /app\n    read_only: true\n    tmpfs: /run\n    cap_drop: [ALL]\n    cap_add: [NET_BIND_SERVICE]\n    security_opt: [\"no-new-privileges:true\", \"seccomp:unconfined\"]\n    init: true\n    container_name: web1\n    stop_grace_period: 1m\n    deploy:\n      resources:\n        limits: {cpus: \"0.5\", memory: 512M}\n        reservations:\n          memory: 128M\n          devices:\n            - driver: nvidia\n              count: 2\n              capabilities: [gpu]\n      restart_policy:\n        condition: on-failure\n        max_attempts: 3\n",
        );
        assert_eq!(web["user"].as_str(), Some("1000:1000"));
        assert_eq!(web["read_only"].as_bool(), Some(true));
        assert_eq!(web["no_new_privileges"].as_bool(), Some(true));
        assert_eq!(web["init"].as_bool(), Some(true));
        assert_eq!(web["tmpfs"][0].as_str(), Some("/run"));
        assert_eq!(web["stop_timeout"].as_str(), Some("60s"));
        assert_eq!(web["restart"].as_str(), Some("on-failure:3"));
        let r = web["resources"].as_table().unwrap();
        assert_eq!(r["cpus"].as_str(), Some("0.5"));
        assert_eq!(r["memory"].as_str(), Some("512M"));
        assert_eq!(r["memory_reservation"].as_str(), Some("128M"));
        assert_eq!(r["gpus"].as_str(), Some("2"));
        let joined = notes.join("\n");
        assert!(joined.contains("services.web.container_name"), "{joined}");
        assert!(joined.contains("seccomp:unconfined"), "{joined}");
    }

    #[test]
    fn a_command_continued_over_lines_splits_as_a_shell_would() {
        let split = |t: &str| shlex::split(&continued(t)).unwrap();
        let want = ["python", "-m", "x", "--workspace", "/w"];
        assert_eq!(split("python -m x \\\n  --workspace /w"), want);
        assert_eq!(split("python -m x \\ --workspace /w"), want);
        assert_eq!(split("echo a\\ b"), ["echo", "a b"]);
    }
}
