//! Tasks as clients submit them and as the store keeps them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Longest task id or type accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("task {task_id:?} already exists with different content; submit it under a new id")]
    Conflict { task_id: String },
    #[error("no handler serves task type {task_type:?} and it is not declared; served: {served}; declared: {declared}. Register a handler (@infra.task_handler({task_type:?}), or a worker), or declare the type under [tasks.types.{task_type}] in dspy-agent.toml so that its tasks wait for one")]
    UnknownType {
        task_type: String,
        served: String,
        declared: String,
    },
    #[error("no task {task_id:?}")]
    NotFound { task_id: String },
    #[error("task store at {path}: {message}")]
    Store { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Running => "RUNNING",
            TaskState::Completed => "COMPLETED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        Some(match s {
            "PENDING" => TaskState::Pending,
            "RUNNING" => TaskState::Running,
            "COMPLETED" => TaskState::Completed,
            "FAILED" => TaskState::Failed,
            "CANCELLED" => TaskState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metadata keys of the W3C trace context (https://www.w3.org/TR/trace-context/): a submit over
/// gRPC with a `traceparent` header carries it into the task, for its handler to continue.
pub const TRACE_KEYS: [&str; 2] = ["traceparent", "tracestate"];

/// Whether `value` is a W3C `traceparent`: version, a 32-digit trace id and a 16-digit parent
/// id (neither all zeros) and flags, in lower-case hex.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if hex(version, 2) && *version != "ff" && hex(trace, 32) && hex(parent, 16) && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0') && parent.bytes().any(|b| b != b'0'))
}

/// A task as a client submits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub task_id: String,
    pub task_type: String,
    pub payload: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub priority: i32,
    pub timeout: Option<Duration>,
    pub max_retries: u32,
}

impl NewTask {
    /// Checks the fields a client controls; the message names the field.
    pub fn validate(&self) -> Result<(), TaskError> {
        validate_id("task_id", &self.task_id)?;
        validate_id("task_type", &self.task_type)?;
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(TaskError::Invalid {
                field: "timeout",
                message: "must be more than 0 (leave it out for no timeout)".into(),
            });
        }
        if self.max_retries > 100 {
            return Err(TaskError::Invalid {
                field: "max_retries",
                message: format!("{} is more than the limit of 100", self.max_retries),
            });
        }
        for key in self.metadata.keys() {
            if key.is_empty() {
                return Err(TaskError::Invalid {
                    field: "metadata",
                    message: "keys must not be empty".into(),
                });
            }
        }
        Ok(())
    }

    /// Identifies the content, so that a repeated submit is recognised as the same task: a
    /// BLAKE3 hash (a third of SHA-256's time on a large payload), marked `b3:`. The trace
    /// context is left out: it describes the call that submitted, and a retried submit comes
    /// from another call.
    pub fn content_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        self.hash_into(|part| {
            h.update(part);
        });
        format!("{CONTENT_HASH_MARK}{}", h.finalize().to_hex())
    }

    /// Whether `stored`, a task's stored content hash, is this content's, given `hash`, its
    /// `content_hash`. Tasks stored by earlier versions carry an unmarked SHA-256 hash.
    pub fn same_content(&self, hash: &str, stored: &str) -> bool {
        if stored.starts_with(CONTENT_HASH_MARK) {
            return stored == hash;
        }
        let mut h = Sha256::new();
        self.hash_into(|part| h.update(part));
        let legacy: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        stored == legacy
    }

    /// Feeds every field of the content to `update`, each length-prefixed so that no two
    /// contents give the same bytes.
    fn hash_into(&self, mut update: impl FnMut(&[u8])) {
        let mut field = |part: &[u8]| {
            update(&(part.len() as u64).to_le_bytes());
            update(part);
        };
        field(self.task_type.as_bytes());
        field(&self.payload);
        for (k, v) in self
            .metadata
            .iter()
            .filter(|(k, _)| !TRACE_KEYS.contains(&k.as_str()))
        {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        update(&self.priority.to_le_bytes());
        update(
            &self
                .timeout
                .map(|t| t.as_millis() as u64)
                .unwrap_or(0)
                .to_le_bytes(),
        );
        update(&self.max_retries.to_le_bytes());
    }
}

/// Marks a BLAKE3 content hash; an unmarked one is SHA-256, as earlier versions stored.
const CONTENT_HASH_MARK: &str = "b3:";

/// Checks a task type name as `NewTask::validate` does, for a handler about to serve it.
pub fn validate_task_type(task_type: &str) -> Result<(), TaskError> {
    validate_id("task_type", task_type)
}

fn validate_id(field: &'static str, id: &str) -> Result<(), TaskError> {
    let problem = if id.is_empty() {
        Some("must not be empty".to_string())
    } else if id.len() > MAX_ID_BYTES {
        Some(format!(
            "is {} bytes long; the limit is {MAX_ID_BYTES}",
            id.len()
        ))
    } else if id.chars().any(char::is_control) {
        Some("must not contain control characters".to_string())
    } else {
        None
    };
    match problem {
        Some(message) => Err(TaskError::Invalid { field, message }),
        None => Ok(()),
    }
}

/// A task as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub task: NewTask,
    pub state: TaskState,
    /// Attempts started so far; a result is accepted only from the latest one.
    pub attempt: u32,
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

impl TaskRecord {
    /// A copy without the input payload: what state-change events and status answers carry.
    pub fn status_copy(&self) -> TaskRecord {
        TaskRecord {
            task: NewTask {
                task_id: self.task.task_id.clone(),
                task_type: self.task.task_type.clone(),
                payload: Vec::new(),
                metadata: self.task.metadata.clone(),
                priority: self.task.priority,
                timeout: self.task.timeout,
                max_retries: self.task.max_retries,
            },
            state: self.state,
            attempt: self.attempt,
            result: self.result.clone(),
            error: self.error.clone(),
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_is_checked_and_not_content() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "nonsense",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
        let task = |parent: &str| NewTask {
            task_id: "t".into(),
            task_type: "x".into(),
            payload: b"p".to_vec(),
            metadata: [("traceparent".to_string(), parent.to_string())].into(),
            priority: 0,
            timeout: None,
            max_retries: 0,
        };
        assert_eq!(task("a").content_hash(), task("b").content_hash());
    }

    fn task(id: &str) -> NewTask {
        NewTask {
            task_id: id.into(),
            task_type: "test".into(),
            payload: b"{}".to_vec(),
            metadata: BTreeMap::new(),
            priority: 0,
            timeout: None,
            max_retries: 0,
        }
    }

    #[test]
    fn hashes_stored_by_earlier_versions_still_match() {
        let t = task("a");
        let hash = t.content_hash();
        assert!(hash.starts_with("b3:"), "{hash}");
        assert!(t.same_content(&hash, &hash));
        // SHA-256 of the same fields, as versions before BLAKE3 stored it.
        let legacy = "1daedcb1720197cf0d47458347fe1fd54f34167f222cd519ddd34a8f64fc94a9";
        assert!(t.same_content(&hash, legacy));
        let mut other = t.clone();
        other.payload = b"{\"x\":1}".to_vec();
        assert!(!other.same_content(&other.content_hash(), legacy));
        assert!(!other.same_content(&other.content_hash(), &hash));
    }

    #[test]
    fn ids_are_checked() {
        assert!(task("ok-1").validate().is_ok());
        for bad in ["", "a\nb", &"x".repeat(MAX_ID_BYTES + 1)] {
            assert!(
                matches!(
                    task(bad).validate(),
                    Err(TaskError::Invalid {
                        field: "task_id",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let mut t = task("a");
        t.timeout = Some(Duration::ZERO);
        assert!(t.validate().is_err());
    }

    #[test]
    fn content_hash_sees_every_field() {
        let base = task("a");
        let mut other = base.clone();
        other.task_id = "b".into();
        assert_eq!(
            base.content_hash(),
            other.content_hash(),
            "the id is not content"
        );
        other.payload = b"{\"x\":1}".to_vec();
        assert_ne!(base.content_hash(), other.content_hash());
        let mut other = base.clone();
        other.priority = 1;
        assert_ne!(base.content_hash(), other.content_hash());
    }
}
