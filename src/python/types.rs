//! The task objects Python sees: task states, submit answers, and tasks as handlers get them.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::tasks::model::TaskRecord;

fn ms_to_seconds(ms: i64) -> Option<f64> {
    (ms > 0).then(|| ms as f64 / 1000.0)
}

/// A task's state as Python sees it: `status` is a `TaskStatus` member.
#[pyclass(frozen, get_all, module = "dspy_agent_infra._native")]
#[derive(Clone)]
pub struct TaskInfo {
    task_id: String,
    task_type: String,
    status_name: String,
    result_payload: Vec<u8>,
    error: String,
    attempts: u32,
    created_at: Option<f64>,
    started_at: Option<f64>,
    finished_at: Option<f64>,
    metadata: BTreeMap<String, String>,
    priority: i32,
}

impl From<&TaskRecord> for TaskInfo {
    fn from(r: &TaskRecord) -> Self {
        TaskInfo {
            task_id: r.task.task_id.clone(),
            task_type: r.task.task_type.clone(),
            status_name: r.state.as_str().to_string(),
            result_payload: r.result.clone().unwrap_or_default(),
            error: r.error.clone().unwrap_or_default(),
            attempts: r.attempt,
            created_at: ms_to_seconds(r.created_at_ms),
            started_at: r.started_at_ms.and_then(ms_to_seconds),
            finished_at: r.finished_at_ms.and_then(ms_to_seconds),
            metadata: r.task.metadata.clone(),
            priority: r.task.priority,
        }
    }
}

#[pymethods]
impl TaskInfo {
    /// The state as a `TaskStatus` member.
    #[getter]
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let enum_class = py
            .import("dspy_agent_infra._tasks")?
            .getattr("TaskStatus")?;
        Ok(enum_class.getattr(self.status_name.as_str())?.unbind())
    }

    fn __repr__(&self) -> String {
        format!(
            "TaskInfo(task_id={:?}, task_type={:?}, status={}, attempts={}, error={:?})",
            self.task_id, self.task_type, self.status_name, self.attempts, self.error
        )
    }
}

/// The answer to a submit.
#[pyclass(frozen, get_all, module = "dspy_agent_infra._native")]
pub struct SubmitResponse {
    pub(super) success: bool,
    pub(super) task_id: String,
    pub(super) error: String,
    /// The id was already queued with the same content; nothing new was queued.
    pub(super) duplicate: bool,
}

#[pymethods]
impl SubmitResponse {
    fn __repr__(&self) -> String {
        format!(
            "SubmitResponse(success={}, task_id={:?}, duplicate={})",
            if self.success { "True" } else { "False" },
            self.task_id,
            if self.duplicate { "True" } else { "False" }
        )
    }
}

/// A task as a Python handler receives it.
#[pyclass(frozen, get_all, module = "dspy_agent_infra._native")]
pub struct Task {
    task_id: String,
    task_type: String,
    payload: Vec<u8>,
    metadata: BTreeMap<String, String>,
    priority: i32,
    attempt: u32,
}

#[pymethods]
impl Task {
    /// The payload decoded as JSON.
    fn json(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let text = String::from_utf8_lossy(&self.payload).into_owned();
        Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
    }

    fn __repr__(&self) -> String {
        format!(
            "Task(task_id={:?}, task_type={:?}, attempt={})",
            self.task_id, self.task_type, self.attempt
        )
    }
}

/// Turns what a handler returned into the result payload: bytes as they are, str as UTF-8,
/// None as empty, anything else as JSON.
pub fn encode_result(value: &Bound<'_, PyAny>) -> Result<Vec<u8>, String> {
    if value.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if value.is_instance_of::<PyString>() {
        return value
            .extract::<String>()
            .map(String::into_bytes)
            .map_err(|e| e.to_string());
    }
    let py = value.py();
    let encoded = py
        .import("json")
        .and_then(|json| json.call_method1("dumps", (value,)))
        .and_then(|s| s.extract::<String>());
    match encoded {
        Ok(s) => Ok(s.into_bytes()),
        Err(e) => Err(format!(
            "the handler returned a {} that cannot be encoded (return bytes, str or a JSON-able value): {e}",
            value.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )),
    }
}

pub fn py_task(record: TaskRecord) -> Task {
    Task {
        task_id: record.task.task_id,
        task_type: record.task.task_type,
        payload: record.task.payload,
        metadata: record.task.metadata,
        priority: record.task.priority,
        attempt: record.attempt,
    }
}

impl From<crate::stack::Submitted> for SubmitResponse {
    fn from(s: crate::stack::Submitted) -> Self {
        SubmitResponse {
            success: true,
            task_id: s.task_id,
            error: String::new(),
            duplicate: s.duplicate,
        }
    }
}
