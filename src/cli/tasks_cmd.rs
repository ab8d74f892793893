//! `tasks submit | status | list | watch | cancel`, through the orchestrator's task client.

use super::*;
use crate::tasks::model::{NewTask, TaskState};

pub(super) async fn tasks(options: LoadOptions, command: TasksCmd) -> Result<i32, Failure> {
    let config = Config::load(options)?;
    let tasks = orchestrator_client(&config).await?;
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
            let mut metadata = BTreeMap::new();
            for m in &a.metadata {
                let (k, v) = m.split_once('=').ok_or_else(|| {
                    Failure(EXIT_USAGE, format!("error: --meta {m:?}: write KEY=VALUE"))
                })?;
                metadata.insert(k.to_string(), v.to_string());
            }
            let timeout = match a.timeout {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
                Some(t) => {
                    return Err(Failure(
                        EXIT_USAGE,
                        format!("error: --timeout: {t} must be a positive number of seconds"),
                    ))
                }
            };
            let task = NewTask {
                task_id: a.id.unwrap_or_else(new_task_id),
                task_type: a.task_type,
                payload,
                metadata,
                priority: a.priority,
                timeout,
                max_retries: a.retries,
            };
            let wait_timeout = a
                .wait_timeout
                .as_deref()
                .map(|t| crate::config::spec::parse_duration("--wait-timeout", t))
                .transpose()?;
            let task_id = task.task_id.clone();
            let task_type = task.task_type.clone();
            let submitted = tasks
                .submit(task)
                .await
                .map_err(|s| rpc_failure("submit", s))?;
            if submitted.duplicate {
                eprintln!(
                    "note: task {task_id} was already submitted with the same content; this is that task"
                );
            }
            if !a.wait {
                println!("{task_id}");
                return Ok(EXIT_OK);
            }
            // A type nothing serves yet (declared, or served by a worker still to come) waits
            // without a word otherwise.
            let served = tasks
                .metrics()
                .await
                .map(|m| m.task_types.contains(&task_type))
                .unwrap_or(true);
            if !served {
                eprintln!(
                    "pending: nothing serves {task_type:?} yet; the task runs once a handler or worker for it attaches (--wait-timeout gives up waiting)"
                );
            }
            match tasks
                .wait(&task_id, wait_timeout)
                .await
                .map_err(|s| rpc_failure("wait", s))?
            {
                Some(done) => Ok(print_task(&done, false)),
                // Only a wait with a timeout ends without the task.
                None => {
                    let state = tasks
                        .get(&task_id)
                        .await
                        .map(|t| t.state.as_str().to_string())
                        .unwrap_or_else(|_| "unknown".into());
                    Err(fail(format!(
                        "task {task_id} is still {state} after --wait-timeout {}; `dspy-agent tasks watch {task_id}` follows it",
                        a.wait_timeout.unwrap_or_default()
                    )))
                }
            }
        }
        TasksCmd::Status { task_id, json } => {
            let t = tasks
                .get(&task_id)
                .await
                .map_err(|s| rpc_failure("status", s))?;
            print_task(&t, json);
            Ok(EXIT_OK)
        }
        TasksCmd::List {
            state,
            task_type,
            limit,
            json,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(TaskState::parse(&s.to_uppercase()).ok_or_else(|| {
                    Failure(
                        EXIT_USAGE,
                        format!("error: --state: {s:?} is not one of pending, running, completed, failed, cancelled"),
                    )
                })?),
            };
            let (found, _) = tasks
                .list(state, task_type, limit, None)
                .await
                .map_err(|s| rpc_failure("list", s))?;
            if json {
                let items: Vec<serde_json::Value> = found.iter().map(task_json).collect();
                println!("{:#}", serde_json::Value::Array(items));
            } else {
                let rows: Vec<[String; 4]> = found
                    .iter()
                    .map(|t| {
                        [
                            t.task.task_id.clone(),
                            t.task.task_type.clone(),
                            state_name(t.state).to_string(),
                            t.attempt.to_string(),
                        ]
                    })
                    .collect();
                print_table(["TASK", "TYPE", "STATE", "ATTEMPTS"], &rows);
            }
            Ok(EXIT_OK)
        }
        TasksCmd::Watch { task_ids } => {
            let include_current = !task_ids.is_empty();
            let mut changes = tasks
                .watch(task_ids, include_current)
                .await
                .map_err(|s| rpc_failure("watch", s))?;
            while let Some(change) = changes.next().await {
                let t = change.map_err(|e| match e {
                    CallError::Rpc(s) => rpc_failure("watch", s),
                    other => fail(format!("error: watch: {other}")),
                })?;
                println!("{}", task_json(&t));
            }
            Ok(EXIT_OK)
        }
        TasksCmd::Prune { older_than } => {
            let age = parse_duration("--older-than", &older_than)
                .map_err(|e| Failure(EXIT_USAGE, format!("error: {e}")))?;
            let deleted = tasks
                .prune(age)
                .await
                .map_err(|s| rpc_failure("prune", s))?;
            println!(
                "deleted {deleted} finished task{} older than {older_than}",
                if deleted == 1 { "" } else { "s" }
            );
            Ok(EXIT_OK)
        }
        TasksCmd::Cancel { task_id } => {
            let (cancelled, record) = tasks
                .cancel(&task_id)
                .await
                .map_err(|s| rpc_failure("cancel", s))?;
            if cancelled {
                println!("cancelled {task_id}");
            } else {
                println!(
                    "{task_id} had already finished ({})",
                    record.map(|t| state_name(t.state)).unwrap_or("unknown")
                );
            }
            Ok(EXIT_OK)
        }
    }
}

pub(super) fn new_task_id() -> String {
    format!(
        "cli-{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}
