//! What runs a task: the built-in handlers (`ping`, `test`, `echo`, `exec`, `container`, `http`)
//! and the trait Python handlers implement in the bindings.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::engine::{labels, SharedEngine};
use crate::health;
use crate::tasks::model::TaskRecord;

/// Why an attempt ended without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// The handler failed: the attempt counts, and retries apply.
    Failed(String),
    /// Whoever ran it went away (a remote worker died): the task goes back to the queue. The
    /// first few losses of a task do not use up a retry; after that each one does, so a task
    /// that kills every worker it reaches ends as FAILED instead of going round forever.
    Lost(String),
    /// It never reached anyone who could run it (no worker serves the type any more, the
    /// orchestrator is stopping): back to the queue, at no cost.
    Unserved(String),
}

/// A handler's answer: the result payload, or why there is none.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, HandlerError>> + Send>>;

/// Boxes a handler's work whose error text fails the attempt.
pub fn boxed(
    work: impl Future<Output = Result<Vec<u8>, String>> + Send + 'static,
) -> HandlerFuture {
    Box::pin(async move { work.await.map_err(HandlerError::Failed) })
}

/// Runs tasks of one type. Dropping the returned future cancels the work.
pub trait Handler: Send + Sync + 'static {
    fn run(&self, task: TaskRecord) -> HandlerFuture;
}

/// Where the stack's services are, for handlers that reach into them.
pub trait ServiceDirectory: Send + Sync + 'static {
    fn container_id(&self, service: &str) -> Option<String>;
    /// Host address of a published TCP port (the service's first one when `port` is `None`).
    fn address(&self, service: &str, port: Option<u16>) -> Option<SocketAddr>;
    fn services(&self) -> Vec<String>;
}

fn parse<'a, T: Deserialize<'a>>(
    task_type: &str,
    payload: &'a [u8],
    shape: &str,
) -> Result<T, String> {
    serde_json::from_slice(payload)
        .map_err(|e| format!("a {task_type} task's payload must be JSON like {shape}: {e}"))
}

fn unknown_service(directory: &dyn ServiceDirectory, service: &str) -> String {
    let known = directory.services();
    format!(
        "no running service {service:?}; this stack runs: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

/// `ping` → `pong`, `test` → `ok`, `echo` → the payload: they complete at once.
pub struct Builtin(pub &'static str);

impl Handler for Builtin {
    fn run(&self, task: TaskRecord) -> HandlerFuture {
        let result = match self.0 {
            "ping" => b"pong".to_vec(),
            "test" => b"ok".to_vec(),
            _ => task.task.payload,
        };
        boxed(async move { Ok(result) })
    }
}

/// The result of a command that ran to its end: `{"exit_code", "stdout", "stderr"}` when it
/// exited 0; otherwise the attempt fails with the code and the last lines of both streams
/// ("(no output)" when it printed nothing).
fn command_result(
    what: &str,
    exit_code: i64,
    stdout: &str,
    stderr: &str,
) -> Result<Vec<u8>, String> {
    if exit_code != 0 {
        let tail = |output: &str| {
            let lines: Vec<&str> = output.trim_end().lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        };
        let shown: Vec<String> = [("stdout", stdout), ("stderr", stderr)]
            .into_iter()
            .filter(|(_, output)| !output.trim().is_empty())
            .map(|(name, output)| format!("--- {name} ---\n{}", tail(output)))
            .collect();
        let output = if shown.is_empty() {
            "(no output)".to_string()
        } else {
            format!("\n{}", shown.join("\n"))
        };
        return Err(format!("{what} exited with code {exit_code}: {output}"));
    }
    Ok(serde_json::to_vec(&serde_json::json!({
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
    }))
    .unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecPayload {
    service: String,
    command: Vec<String>,
}

/// `exec`: `{"service": "redis", "command": ["redis-server", "--version"]}` runs the command in
/// the service's container; the result is `{"exit_code", "stdout", "stderr"}`; a non-zero exit
/// fails the attempt.
pub struct Exec {
    pub engine: SharedEngine,
    pub directory: Arc<dyn ServiceDirectory>,
}

impl Handler for Exec {
    fn run(&self, task: TaskRecord) -> HandlerFuture {
        let engine = Arc::clone(&self.engine);
        let directory = Arc::clone(&self.directory);
        boxed(async move {
            let p: ExecPayload = parse(
                "exec",
                &task.task.payload,
                r#"{"service": "redis", "command": ["..."]}"#,
            )?;
            if p.command.is_empty() {
                return Err("an exec task needs a non-empty command".into());
            }
            let id = directory
                .container_id(&p.service)
                .ok_or_else(|| unknown_service(directory.as_ref(), &p.service))?;
            let out = engine
                .exec(&id, &p.command)
                .await
                .map_err(|e| e.to_string())?;
            command_result("the command", out.exit_code, &out.stdout, &out.stderr)
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerPayload {
    image: String,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
}

/// `container`: `{"image": "...", "command": [...], "env": {...}, "input": <JSON>}` runs a
/// one-off container (with `TASK_ID` and `TASK_INPUT` set) and removes it afterwards. The result
/// is `{"exit_code", "stdout", "stderr"}`; a non-zero exit fails the attempt.
pub struct Container {
    pub engine: SharedEngine,
    pub project: String,
}

impl Handler for Container {
    fn run(&self, task: TaskRecord) -> HandlerFuture {
        let engine = Arc::clone(&self.engine);
        let project = self.project.clone();
        boxed(async move {
            let p: ContainerPayload = parse(
                "container",
                &task.task.payload,
                r#"{"image": "busybox", "command": ["echo", "hi"]}"#,
            )?;
            let mut env: Vec<String> = p.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            env.push(format!("TASK_ID={}", task.task.task_id));
            if let Some(input) = &p.input {
                env.push(format!("TASK_INPUT={input}"));
            }
            let labels = HashMap::from([
                (labels::PROJECT.to_string(), project),
                (
                    labels::SERVICE.to_string(),
                    format!("task-{}", task.task.task_type),
                ),
                (
                    labels::OWNER_PID.to_string(),
                    std::process::id().to_string(),
                ),
            ]);
            let out = engine
                .run_once(&p.image, p.command, env, labels)
                .await
                .map_err(|e| e.to_string())?;
            command_result("container", out.exit_code, &out.stdout, &out.stderr)
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpPayload {
    service: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

fn default_path() -> String {
    "/".into()
}

/// `http`: `{"service": "infermesh", "path": "/v1/infer", "body": {...}}` POSTs the body (as
/// JSON; a string body is sent as is) to the service; the result is the response body. A status
/// outside 2xx fails the attempt.
pub struct Http {
    pub directory: Arc<dyn ServiceDirectory>,
    pub timeout: Duration,
}

impl Handler for Http {
    fn run(&self, task: TaskRecord) -> HandlerFuture {
        let directory = Arc::clone(&self.directory);
        let timeout = self.timeout;
        boxed(async move {
            let p: HttpPayload = parse(
                "http",
                &task.task.payload,
                r#"{"service": "infermesh", "path": "/infer", "body": {}}"#,
            )?;
            if !p.path.starts_with('/') {
                return Err(format!("path {:?} must start with '/'", p.path));
            }
            let addr = directory
                .address(&p.service, p.port)
                .ok_or_else(|| unknown_service(directory.as_ref(), &p.service))?;
            let body = match p.body {
                None => Bytes::new(),
                Some(serde_json::Value::String(s)) => Bytes::from(s),
                Some(v) => Bytes::from(v.to_string()),
            };
            let (status, response) =
                health::request(addr, hyper::Method::POST, &p.path, body, timeout).await?;
            if (200..300).contains(&status) {
                Ok(response.to_vec())
            } else {
                Err(format!(
                    "POST {} on {} answered {status}: {}",
                    p.path,
                    p.service,
                    String::from_utf8_lossy(&response[..response.len().min(500)])
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_shows_both_streams_or_says_it_printed_nothing() {
        let both = command_result("the command", 3, "made 2 files\n", "disk full\n").unwrap_err();
        assert_eq!(
            both,
            "the command exited with code 3: \n--- stdout ---\nmade 2 files\n--- stderr ---\ndisk full"
        );
        let quiet = command_result("container", 1, "", " \n").unwrap_err();
        assert_eq!(quiet, "container exited with code 1: (no output)");
        let long: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = command_result("the command", 2, &long, "").unwrap_err();
        assert!(
            tail.contains("line 21\n") && !tail.contains("line 20\n"),
            "{tail}"
        );
        assert!(command_result("the command", 0, "ok", "").is_ok());
    }
}
