//! `config init | show | validate | path`, and `token`.

use super::*;

pub(super) const CONFIG_TEMPLATE: &str = r#"# dspy-agent.toml: the stack `dspy-agent start` and `AgentInfra.start()` run.
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

# Both gRPC ports require a token, loopback included. By default it is the one the first start
# makes in the state folder, which your own clients find by themselves; `dspy-agent token`
# prints it for the others. To choose it instead (16+ characters; or DSPY_AGENT_TOKEN):
# token = "..."

[tasks]
# "process" survives the process being killed; "power" also a power cut (fsync per commit).
# durability = "process"
# concurrency = 64
# store = "tasks.db"   # relative to the state folder; ":memory:" keeps nothing; or a queue
#                      # several orchestrators share: "postgresql://USER:PASSWORD@HOST:5432/DB"
# lease = "30s"        # PostgreSQL: a stopped orchestrator's tasks go to the others after this
# retention = "7d"     # finished tasks older than this are deleted; "forever" keeps them

# A declared type is accepted before any handler or worker serves it; its tasks wait.
# [tasks.types.rl_training]
# timeout = "30m"
# max_retries = 2

# Each service of the catalog can be changed field by field, and new ones added.
[services.redis]
# image = "redis:7-alpine"
# ports = ["6379:6379"]
# healthcheck = { type = "redis", start_period = "30s" }

# reddb, infermesh and model_server run the agent project's own images (dspy-agent/...):
# build or load them, or point `image` at one you have.
[services.reddb]
# image = "dspy-agent/reddb:latest"
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

pub(super) fn config(options: LoadOptions, command: ConfigCmd) -> Result<i32, Failure> {
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
        ConfigCmd::Show { origin } => {
            print!("{}", crate::config::show::effective(&options, origin)?);
            Ok(EXIT_OK)
        }
    }
}

/// The line of the config file a problem is about, found from the field path in its message
/// (`services.redis.resources.memory: ...`) or the service it names.
pub(super) fn locate(text: &str, problem: &ConfigError) -> Option<usize> {
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

/// `dspy-agent token`: the token the project's ports require, on stdout alone.
pub(super) fn token(options: LoadOptions) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let required = crate::access::required(&config)?;
    match required.token {
        Some(token) => {
            println!("{}", token.expose());
            Ok(EXIT_OK)
        }
        None => Err(fail(format!(
            "the ports of project {:?} require no token: allow_remote_without_token is set, so anyone who can reach them may call them",
            config.project
        ))),
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
}
