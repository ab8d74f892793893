//! What the command line prints: tables, and tasks as text or JSON.

use super::*;
use crate::tasks::model::{TaskRecord, TaskState};

pub(super) fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub(super) fn state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Pending => "pending",
        TaskState::Running => "running",
        TaskState::Completed => "completed",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
    }
}

pub(super) fn task_json(t: &TaskRecord) -> serde_json::Value {
    let payload = t.result.as_deref().unwrap_or_default();
    let result = match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| text.into()),
        Err(_) => serde_json::json!({"bytes": payload.len()}),
    };
    serde_json::json!({
        "task_id": t.task.task_id,
        "task_type": t.task.task_type,
        "status": state_name(t.state),
        "result": result,
        "error": t.error.as_deref().unwrap_or_default(),
        "attempts": t.attempt,
        "created_at_ms": t.created_at_ms,
        "started_at_ms": t.started_at_ms.unwrap_or(0),
        "finished_at_ms": t.finished_at_ms.unwrap_or(0),
    })
}

/// Prints a task; the exit code says whether it completed.
pub(super) fn print_task(t: &TaskRecord, json: bool) -> i32 {
    if json {
        println!("{:#}", task_json(t));
    } else {
        println!(
            "{}: {} ({} attempt{})",
            t.task.task_id,
            state_name(t.state),
            t.attempt,
            if t.attempt == 1 { "" } else { "s" }
        );
        if let Some(result) = t.result.as_deref().filter(|r| !r.is_empty()) {
            println!("{}", String::from_utf8_lossy(result));
        }
        if let Some(error) = &t.error {
            println!("error: {error}");
        }
    }
    if t.state == TaskState::Completed {
        EXIT_OK
    } else {
        EXIT_FAILURE
    }
}
