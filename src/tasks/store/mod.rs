//! What the queue needs from durable storage, and its two implementations: SQLite, embedded and
//! private to one process (the default), and PostgreSQL, which several orchestrators share.

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::{Durability, StoreLocation};
use crate::tasks::model::{NewTask, TaskError, TaskRecord, TaskState};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Losses of a task's runner forgiven before a loss counts as a failed attempt.
pub const FREE_LOSSES: u32 = 3;

/// How an attempt ended, as reported to `finish`.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(Vec<u8>),
    Failed(String),
    /// The attempt never reached a handler: back to PENDING at once, at no cost.
    Requeue(String),
    /// Whoever ran the attempt went away: back to PENDING at once. The first `FREE_LOSSES` losses
    /// of a task do not count against its retries; later ones count as failed attempts.
    Lost(String),
}

/// What `recover` did with tasks whose runner is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub requeued: usize,
    pub failed: usize,
    /// The tasks as they are now, for the queue to announce.
    pub records: Vec<TaskRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<TaskState>,
    pub task_type: Option<String>,
    pub limit: usize,
    /// Return tasks created after this one (by insertion order): the page token.
    pub after: Option<String>,
    /// The most recent first (and `after` then pages towards older ones).
    pub newest_first: bool,
}

impl ListFilter {
    /// The condition that pages past the `seq` bound to `param` (0: from the start), and the
    /// order: submission order, or the most recent first.
    fn page(&self, param: &str) -> (String, &'static str) {
        if self.newest_first {
            (format!("({param} = 0 OR seq < {param})"), "DESC")
        } else {
            (format!("seq > {param}"), "ASC")
        }
    }
}

/// Counts by state as `counts` answers them: the states that have tasks, by name.
fn named_counts(counts: &BTreeMap<TaskState, i64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| (state.as_str().to_string(), *n as u64))
        .collect()
}

/// A change another orchestrator made to a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Task {
        task_id: String,
        task_type: String,
        state: TaskState,
    },
    /// Changes may have been missed (the listening connection was lost): look again.
    Resync,
}

/// The durable storage of the queue. Every method is one atomic step; `finish` is fenced by the
/// attempt (and, on a shared store, by which orchestrator holds the task), so a stale report
/// never overwrites a newer one.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new task. Submitting an id again with the same content returns the stored task
    /// (`false`: nothing new); with different content it is refused.
    ///
    /// With `run_now` (the caller holds a free handler slot), a new task that no ready task of
    /// its type is waiting ahead of is stored as RUNNING, attempt 1, held by this process.
    async fn submit(&self, task: NewTask, run_now: bool) -> Result<(TaskRecord, bool), TaskError>;

    /// Moves up to `limit` ready PENDING tasks of `task_type` to RUNNING, held by this process,
    /// highest priority first, and returns them with their new attempt number.
    async fn claim(&self, task_type: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError>;

    /// Earliest time (ms since the epoch) a PENDING task of one of `task_types` becomes ready.
    async fn next_ready_ms(&self, task_types: Vec<String>) -> Result<Option<i64>, TaskError>;

    /// Records how attempt `attempt` ended. `None`: the report is stale (the task was cancelled,
    /// a newer attempt owns it, or another orchestrator took it over) and changed nothing. A
    /// failure with retries left puts the task back as PENDING after a backoff.
    async fn finish(
        &self,
        task_id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<Option<TaskRecord>, TaskError>;

    /// Cancels a PENDING or RUNNING task; a finished task is returned unchanged.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, TaskError>;

    /// Deletes up to `batch` finished tasks that finished before `before_ms`, oldest first;
    /// returns how many.
    async fn prune(&self, before_ms: i64, batch: usize) -> Result<usize, TaskError>;

    /// Tasks whose runner is gone go back to PENDING while they have retries left, FAILED
    /// otherwise. A private store calls every RUNNING task's runner gone (it runs at start); a
    /// shared one only those whose holder stopped renewing its lease.
    async fn recover(&self) -> Result<Recovered, TaskError>;

    /// Extends the lease on the tasks of `held` this process holds: those its handlers are
    /// running. A task it holds but does not run (a claim whose answer was lost with its
    /// connection) is left to expire, and so to run elsewhere. Shared stores only: a private
    /// store has nobody to lose its tasks to.
    async fn renew(&self, _held: Vec<String>) -> Result<(), TaskError> {
        Ok(())
    }

    /// Puts the tasks this process holds back in the queue at no cost (it is stopping, and its
    /// handlers were cancelled), so that other orchestrators run them at once instead of after
    /// the lease; returns how many. A private store keeps them for its next process to recover.
    async fn release(&self) -> Result<usize, TaskError> {
        Ok(0)
    }

    /// The task's state, without its input payload.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError>;

    /// Several tasks' states, without their payloads; unknown ids are left out.
    async fn get_many(&self, task_ids: Vec<String>) -> Result<Vec<TaskRecord>, TaskError> {
        let mut out = Vec::with_capacity(task_ids.len());
        for id in task_ids {
            out.extend(self.get(&id).await?);
        }
        Ok(out)
    }

    /// A task with its input payload.
    async fn get_with_payload(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError>;

    /// Tasks in submission order, without their input payloads.
    async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, TaskError>;

    /// Tasks waiting or running, by type and state: (type, state, count).
    async fn depth(&self) -> Result<Vec<(String, TaskState, i64)>, TaskError>;

    /// Task counts by state, as recently known.
    fn counts(&self) -> BTreeMap<String, u64>;

    /// Whether other orchestrators share this store (and leases, changes and served types
    /// matter).
    fn shared(&self) -> bool {
        false
    }

    /// The changes other orchestrators make, once; `None` for a private store.
    fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        None
    }

    /// Tells the other orchestrators which task types this one serves (replacing what it said
    /// before), so that they accept them.
    async fn announce(&self, _task_types: Vec<String>) -> Result<(), TaskError> {
        Ok(())
    }

    /// Whether some live orchestrator on this store serves `task_type`.
    async fn served_elsewhere(&self, _task_type: &str) -> Result<bool, TaskError> {
        Ok(false)
    }
}

pub type TaskStore = Arc<dyn Store>;

/// Opens the store at `location`; `lease` is how long a shared store's task stays held by an
/// orchestrator that stopped renewing it.
pub async fn open(
    location: &StoreLocation,
    durability: Durability,
    lease: Duration,
) -> Result<TaskStore, TaskError> {
    Ok(match location {
        StoreLocation::Memory => Arc::new(SqliteStore::open(None, durability)?),
        StoreLocation::File(path) => {
            let path = path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(Some(&path), durability))
                    .await
                    .map_err(|e| TaskError::Store {
                        path: String::new(),
                        message: e.to_string(),
                    })??,
            )
        }
        StoreLocation::Postgres(url) => Arc::new(PostgresStore::open(url, lease).await?),
    })
}

/// A private in-memory store (tests).
#[cfg(test)]
pub fn memory() -> TaskStore {
    Arc::new(SqliteStore::open(None, Durability::default()).expect("an in-memory store opens"))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `SET` expressions of the lost-runner rule, in SQL both stores run: the first
/// `FREE_LOSSES` losses send the task back to PENDING at once without costing an attempt; later
/// ones count as a failed attempt (retried at `retry_at`, or FAILED). Every expression sees the
/// row as it was, so `lost` is the count before this loss. The arguments are the statement's
/// placeholders (or expressions) for the free-loss count, the error of a free loss, the error
/// of a counted one, the time now (ms) and the retry time.
pub fn lost_runner_sets(
    free: &str,
    reason: &str,
    counted: &str,
    now: &str,
    retry_at: &str,
) -> String {
    format!(
        "lost = lost + 1, \
         error = CASE WHEN lost < {free} THEN {reason} ELSE {counted} END, \
         attempt = CASE WHEN lost < {free} THEN attempt - 1 ELSE attempt END, \
         state = CASE WHEN lost < {free} OR attempt <= max_retries THEN 'PENDING' \
         ELSE 'FAILED' END, \
         not_before = CASE WHEN lost < {free} THEN {now} \
         WHEN attempt <= max_retries THEN {retry_at} ELSE not_before END, \
         finished_at = CASE WHEN lost < {free} OR attempt <= max_retries THEN finished_at \
         ELSE {now} END"
    )
}

/// The error of a loss that counts against the task's retries; `runner` names what went away.
pub fn counted_loss(reason: &str, runner: &str) -> String {
    format!(
        "{reason}; its runner was lost more than {FREE_LOSSES} times, so this loss counts as a \
         failed attempt (does the task bring its {runner} down?)"
    )
}

/// Delay before retry `attempt` (1-based): 100 ms doubling, at most 30 s.
pub fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.saturating_sub(1).min(20)))
        .min(Duration::from_secs(30))
}
