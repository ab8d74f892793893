//! The embedded task store: SQLite in WAL mode, one writer thread with grouped commits.
//!
//! Every write is a closure run by the writer thread inside a shared transaction (each in its own
//! savepoint, so one failing write does not undo the others). The writer takes whatever writes
//! are queued, commits them together and only then answers each caller, so an answered write is
//! on disk while a thousand concurrent writers share one fsync.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, Transaction};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::tasks::model::{NewTask, TaskError, TaskRecord, TaskState};
use crate::tasks::store::{
    counted_loss, lost_runner_sets, named_counts, now_ms, retry_backoff, ListFilter, Outcome,
    Recovered, Store, FREE_LOSSES,
};
use crate::util::lock;

/// Most writes committed together.
const MAX_BATCH: usize = 4096;
/// Pages in the write-ahead log after which a background checkpoint copies them into the
/// database (SQLite's own threshold).
const CHECKPOINT_PAGES: c_int = 1000;
/// Pages after which the writer checkpoints itself between batches: under unbroken writes the
/// background checkpoints never reach the end of the log, which starts over only once one has.
/// By then they have copied most of it, so the writer's pass is short; the log file stays
/// within about 16 MB.
const WRITER_CHECKPOINT_PAGES: c_int = 4 * CHECKPOINT_PAGES;

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The read connection and the one thread that serves queued reads with it: however many
/// callers read at once, reads never take more than that thread.
struct Reader {
    conn: Arc<Mutex<Connection>>,
    jobs: Mutex<mpsc::Sender<ReadJob>>,
}
type Job = Box<dyn FnOnce(&Transaction<'_>) -> (bool, Reply) + Send>;

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<mpsc::Sender<Job>>,
    /// Stored tasks per state, kept up to date by every committed write so that metrics never
    /// scan the table.
    counts: Mutex<BTreeMap<TaskState, i64>>,
    /// A second connection for reads (WAL lets it read beside the writer); `None` for an
    /// in-memory store, whose shared cache would make readers and the writer lock each other out,
    /// so reads go through the writer there.
    reader: Option<Reader>,
    location: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    task_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    metadata TEXT NOT NULL,
    priority INTEGER NOT NULL,
    timeout_ms INTEGER,
    max_retries INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    error TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    not_before INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, task_type, priority DESC, seq);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS task_payloads (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS task_payload_gone AFTER DELETE ON tasks
    BEGIN DELETE FROM task_payloads WHERE seq = OLD.seq; END;
";

/// A payload above `INLINE_PAYLOAD` bytes is kept in a table of its own (`tasks.payload` is then
/// empty): SQLite rewrites a whole row, large blob included, at every update of its state, so a
/// 100 kB payload beside the state was written again at each of a task's steps. A small one stays
/// in the row, where rewriting it costs less than a second insert.
const INLINE_PAYLOAD: usize = 512;

const COLUMNS: &str = "task_id, task_type, \
                       COALESCE((SELECT p.payload FROM task_payloads p WHERE p.seq = tasks.seq), \
                       tasks.payload), metadata, priority, timeout_ms, max_retries, \
                       state, attempt, result, error, created_at, started_at, finished_at";

/// The same columns without the input payload (an empty blob in its place): for status answers,
/// lists and events, which never show it, so a large payload is not read for them.
const STATUS_COLUMNS: &str = "task_id, task_type, X'', metadata, priority, timeout_ms, \
                              max_retries, state, attempt, result, error, created_at, started_at, \
                              finished_at";

fn record(row: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    let metadata: String = row.get(3)?;
    let state: String = row.get(7)?;
    Ok(TaskRecord {
        task: NewTask {
            task_id: row.get(0)?,
            task_type: row.get(1)?,
            payload: row.get(2)?,
            metadata: serde_json::from_str(&metadata).unwrap_or_default(),
            priority: row.get(4)?,
            timeout: row
                .get::<_, Option<i64>>(5)?
                .map(|ms| Duration::from_millis(ms as u64)),
            max_retries: row.get(6)?,
        },
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        attempt: row.get(8)?,
        result: row.get(9)?,
        error: row.get(10)?,
        created_at_ms: row.get(11)?,
        started_at_ms: row.get(12)?,
        finished_at_ms: row.get(13)?,
    })
}

fn get_in(conn: &Connection, task_id: &str) -> rusqlite::Result<Option<TaskRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {STATUS_COLUMNS} FROM tasks WHERE task_id = ?1"
    ))?
    .query_row([task_id], record)
    .optional()
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, or a private in-memory store for `None`.
    pub fn open(path: Option<&Path>, durability: Durability) -> Result<SqliteStore, TaskError> {
        let (location, uri) = match path {
            Some(p) => (p.display().to_string(), None),
            None => {
                // A shared-cache memory database, unique to this store, so reader and writer see
                // the same data.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let uri = format!(
                    "file:dspy-tasks-{}-{n}?mode=memory&cache=shared",
                    std::process::id()
                );
                ("memory".to_string(), Some(uri))
            }
        };
        let store_error = |e: &dyn std::fmt::Display| TaskError::Store {
            path: location.clone(),
            message: e.to_string(),
        };
        let open = || -> rusqlite::Result<Connection> {
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = match (&uri, path) {
                (Some(uri), _) => Connection::open_with_flags(uri, flags)?,
                (None, Some(p)) => Connection::open_with_flags(p, flags)?,
                (None, None) => unreachable!("either a path or a memory uri"),
            };
            conn.busy_timeout(Duration::from_secs(5))?;
            Ok(conn)
        };
        if let Some(parent) = path
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| store_error(&e))?;
        }
        let mut writer_conn = open().map_err(|e| store_error(&e))?;
        let wal_pages = Arc::new(AtomicI32::new(0));
        if path.is_some() {
            // WAL: readers never block the writer. In WAL mode NORMAL keeps every commit across a
            // process crash; FULL adds an fsync per (grouped) commit for power cuts.
            let synchronous = match durability {
                Durability::Process => "NORMAL",
                Durability::Power => "FULL",
            };
            writer_conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|_| writer_conn.pragma_update(None, "synchronous", synchronous))
                .map_err(|e| store_error(&e))?;
            // Checkpoints (copying the log into the database, with an fsync of each) run on a
            // thread of their own instead of inside the writer's commits, where every caller
            // of the batch waited for them. The hook replaces SQLite's automatic checkpoint.
            let checkpoints = open()
                // A connection that has not read the database yet does not know it is in WAL
                // mode, and its checkpoints would do nothing.
                .and_then(|c| {
                    c.pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0))?;
                    Ok(c)
                })
                .map_err(|e| store_error(&e))?;
            let (wake, woken) = mpsc::sync_channel::<()>(1);
            std::thread::Builder::new()
                .name("dspy-task-checkpoints".into())
                .spawn(move || {
                    // Ends when the writer's connection, which holds `wake`, closes.
                    while woken.recv().is_ok() {
                        if let Err(e) =
                            checkpoints.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE)
                        {
                            tracing::debug!(error = %e, "task store: checkpoint put off");
                        }
                    }
                })
                .map_err(|e| store_error(&e))?;
            let pages = Arc::clone(&wal_pages);
            writer_conn
                .wal_hook(Some(move |_: &mut Wal, n: c_int| {
                    pages.store(n, Ordering::Relaxed);
                    if n >= CHECKPOINT_PAGES {
                        // Full: a checkpoint is already asked for.
                        let _ = wake.try_send(());
                    }
                    Ok(())
                }))
                .map_err(|e| store_error(&e))?;
        }
        writer_conn
            .execute_batch(SCHEMA)
            .and_then(|_| upgrade(&writer_conn))
            .map_err(|e| store_error(&e))?;
        let reader = match path {
            Some(_) => {
                let conn = Arc::new(Mutex::new(open().map_err(|e| store_error(&e))?));
                let (jobs, queued) = mpsc::channel::<ReadJob>();
                let served = Arc::clone(&conn);
                std::thread::Builder::new()
                    .name("dspy-task-reads".into())
                    .spawn(move || {
                        while let Ok(job) = queued.recv() {
                            job(&lock(&served));
                        }
                    })
                    .map_err(|e| store_error(&e))?;
                Some(Reader {
                    conn,
                    jobs: Mutex::new(jobs),
                })
            }
            None => None,
        };

        let counts = count_states(&writer_conn).map_err(|e| store_error(&e))?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dspy-task-store".into())
            .spawn(move || writer_loop(writer_conn, rx, &wal_pages))
            .map_err(|e| store_error(&e))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Mutex::new(tx),
                counts: Mutex::new(counts),
                reader,
                location,
            }),
        })
    }

    /// Adds `delta` to the count of tasks in `state`.
    fn count(&self, state: TaskState, delta: i64) {
        *lock(&self.inner.counts).entry(state).or_default() += delta;
    }

    fn store_error(&self, e: impl std::fmt::Display) -> TaskError {
        TaskError::Store {
            path: self.inner.location.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `f` in the writer's next batch; resolves after that batch is committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, TaskError> + Send + 'static,
    ) -> Result<T, TaskError> {
        let (tx, rx) = oneshot::channel::<Result<T, TaskError>>();
        let location = self.inner.location.clone();
        let job: Job = Box::new(move |txn| {
            let result = f(txn).map_err(|e| match e {
                TaskError::Store { path, message } if path.is_empty() => TaskError::Store {
                    path: location.clone(),
                    message,
                },
                other => other,
            });
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(match commit {
                    Ok(()) => result,
                    Err(message) => Err(TaskError::Store {
                        path: location,
                        message,
                    }),
                });
            });
            (ok, reply)
        });
        crate::util::lock(&self.inner.writer)
            .send(job)
            .map_err(|_| self.store_error("the writer thread has stopped"))?;
        rx.await
            .map_err(|_| self.store_error("the writer thread has stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, TaskError> {
        let Some(reader) = &self.inner.reader else {
            return self.write(move |txn| f(txn).map_err(sql)).await;
        };
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        lock(&reader.jobs)
            .send(job)
            .map_err(|_| self.store_error("the reader thread has stopped"))?;
        rx.await
            .map_err(|_| self.store_error("the reader thread has stopped"))?
            .map_err(|e| self.store_error(e))
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    /// Stores a new task. Submitting an id again with the same content returns the stored task
    /// (`false`: nothing new); with different content it is refused.
    ///
    /// With `run_now` (the caller holds a free handler slot), a new task that no ready task of
    /// its type is waiting ahead of is stored as RUNNING, attempt 1, in the same commit: it
    /// skips a second commit and the dispatcher's round trip.
    async fn submit(&self, task: NewTask, run_now: bool) -> Result<(TaskRecord, bool), TaskError> {
        task.validate()?;
        // Hashed by the caller: the one writer thread only writes.
        let hash = task.content_hash();
        let (record, created) = self
            .write(move |txn| {
                let existing: Option<String> = txn
                    .prepare_cached("SELECT content_hash FROM tasks WHERE task_id = ?1")
                    .and_then(|mut stmt| stmt.query_row([&task.task_id], |r| r.get(0)).optional())
                    .map_err(sql)?;
                if let Some(existing) = existing {
                    if !task.same_content(&hash, &existing) {
                        return Err(TaskError::Conflict {
                            task_id: task.task_id,
                        });
                    }
                    let record = get_in(txn, &task.task_id).map_err(sql)?.ok_or_else(|| {
                        TaskError::NotFound {
                            task_id: task.task_id.clone(),
                        }
                    })?;
                    return Ok((record, false));
                }
                let now = now_ms();
                let run_now = run_now
                    && !txn
                        .prepare_cached(
                            "SELECT 1 FROM tasks WHERE state = 'PENDING' AND task_type = ?1 \
                         AND not_before <= ?2 LIMIT 1",
                        )
                        .and_then(|mut stmt| stmt.exists(params![task.task_type, now]))
                        .map_err(sql)?;
                let (state, attempt, started_at) = if run_now {
                    (TaskState::Running, 1, Some(now))
                } else {
                    (TaskState::Pending, 0, None)
                };
                txn.prepare_cached(
                "INSERT INTO tasks (task_id, task_type, payload, metadata, priority, timeout_ms, \
                 max_retries, content_hash, state, attempt, created_at, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut stmt| {
                let apart = task.payload.len() > INLINE_PAYLOAD;
                stmt.execute(params![
                    task.task_id,
                    task.task_type,
                    if apart { &[][..] } else { &task.payload[..] },
                    serde_json::to_string(&task.metadata).unwrap_or_else(|_| "{}".into()),
                    task.priority,
                    task.timeout.map(|t| t.as_millis() as i64),
                    task.max_retries,
                    hash,
                    state.as_str(),
                    attempt,
                    now,
                    started_at,
                ])
            })
            .map_err(sql)?;
                if task.payload.len() > INLINE_PAYLOAD {
                    txn.prepare_cached(
                        "INSERT INTO task_payloads (seq, payload) VALUES (last_insert_rowid(), ?1)",
                    )
                    .and_then(|mut stmt| stmt.execute(params![task.payload]))
                    .map_err(sql)?;
                }
                Ok((
                    TaskRecord {
                        task,
                        state,
                        attempt,
                        result: None,
                        error: None,
                        created_at_ms: now,
                        started_at_ms: started_at,
                        finished_at_ms: None,
                    },
                    true,
                ))
            })
            .await?;
        if created {
            self.count(record.state, 1);
        }
        Ok((record, created))
    }

    /// Moves up to `limit` ready PENDING tasks of `task_type` to RUNNING, highest priority
    /// first, and returns them with their new attempt number.
    async fn claim(&self, task_type: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError> {
        let task_type = task_type.to_string();
        let claimed = self.write(move |txn| {
            let now = now_ms();
            let mut stmt = txn
                .prepare_cached(&format!(
                    "UPDATE tasks SET state = 'RUNNING', attempt = attempt + 1, started_at = ?1 \
                     WHERE seq IN (SELECT seq FROM tasks WHERE state = 'PENDING' AND task_type = ?2 \
                     AND not_before <= ?1 ORDER BY priority DESC, seq LIMIT ?3) RETURNING {COLUMNS}, seq"
                ))
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![now, task_type, limit as i64], |r| Ok((r.get::<_, i64>(14)?, record(r)?)))
                .map_err(sql)?;
            let mut claimed = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql)?;
            // RETURNING gives no order: restore priority, then submission order.
            claimed.sort_by_key(|(seq, r)| (std::cmp::Reverse(r.task.priority), *seq));
            let claimed: Vec<TaskRecord> = claimed.into_iter().map(|(_, r)| r).collect();
            Ok(claimed)
        })
        .await?;
        self.count(TaskState::Pending, -(claimed.len() as i64));
        self.count(TaskState::Running, claimed.len() as i64);
        Ok(claimed)
    }

    /// Earliest time (ms since the epoch) a PENDING task of one of `task_types` becomes ready,
    /// if any is waiting.
    async fn next_ready_ms(&self, task_types: Vec<String>) -> Result<Option<i64>, TaskError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT MIN(not_before) FROM tasks WHERE state = 'PENDING' AND task_type = ?1",
            )?;
            let mut earliest: Option<i64> = None;
            for task_type in &task_types {
                let at: Option<i64> = stmt.query_row([task_type], |r| r.get(0))?;
                earliest = earliest.into_iter().chain(at).min();
            }
            Ok(earliest)
        })
        .await
    }

    /// Records how attempt `attempt` ended. Returns `None` when the result is stale (the task was
    /// cancelled, or a newer attempt owns it) and was therefore ignored. A failure with retries
    /// left puts the task back as PENDING after a backoff.
    async fn finish(
        &self,
        task_id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<Option<TaskRecord>, TaskError> {
        let task_id = task_id.to_string();
        let updated = self.write(move |txn| {
            let now = now_ms();
            // Guarded by state and attempt, so a stale report changes nothing.
            let updated = match outcome {
                Outcome::Completed(result) => txn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET state = 'COMPLETED', result = ?3, error = NULL, finished_at = ?4 \
                         WHERE task_id = ?1 AND state = 'RUNNING' AND attempt = ?2 RETURNING {STATUS_COLUMNS}"
                    ))
                    .and_then(|mut stmt| stmt.query_row(params![task_id, attempt, result, now], record).optional()),
                Outcome::Requeue(reason) => txn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET state = 'PENDING', attempt = attempt - 1, error = ?3, \
                         not_before = ?4 WHERE task_id = ?1 AND state = 'RUNNING' AND attempt = ?2 \
                         RETURNING {STATUS_COLUMNS}"
                    ))
                    .and_then(|mut stmt| stmt.query_row(params![task_id, attempt, reason, now], record).optional()),
                Outcome::Lost(reason) => {
                    let counted = counted_loss(&reason, "worker");
                    let not_before = now + retry_backoff(attempt).as_millis() as i64;
                    txn.prepare_cached(&format!(
                        "UPDATE tasks SET {} \
                         WHERE task_id = ?1 AND state = 'RUNNING' AND attempt = ?2 RETURNING {STATUS_COLUMNS}",
                        lost_runner_sets("?5", "?3", "?6", "?4", "?7")
                    ))
                    .and_then(|mut stmt| {
                        stmt.query_row(
                            params![task_id, attempt, reason, now, FREE_LOSSES, counted, not_before],
                            record,
                        )
                        .optional()
                    })
                }
                Outcome::Failed(error) => {
                    let not_before = now + retry_backoff(attempt).as_millis() as i64;
                    txn.prepare_cached(&format!(
                        "UPDATE tasks SET error = ?3, \
                         state = CASE WHEN attempt <= max_retries THEN 'PENDING' ELSE 'FAILED' END, \
                         not_before = CASE WHEN attempt <= max_retries THEN ?4 ELSE not_before END, \
                         finished_at = CASE WHEN attempt <= max_retries THEN finished_at ELSE ?5 END \
                         WHERE task_id = ?1 AND state = 'RUNNING' AND attempt = ?2 RETURNING {STATUS_COLUMNS}"
                    ))
                    .and_then(|mut stmt| {
                        stmt.query_row(params![task_id, attempt, error, not_before, now], record)
                            .optional()
                    })
                }
            }
            .map_err(sql)?;
            if updated.is_none() && get_in(txn, &task_id).map_err(sql)?.is_none() {
                return Err(TaskError::NotFound { task_id });
            }
            Ok(updated)
        })
        .await?;
        if let Some(record) = &updated {
            self.count(TaskState::Running, -1);
            self.count(record.state, 1);
        }
        Ok(updated)
    }

    /// Cancels a PENDING or RUNNING task; a finished task is returned unchanged.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, TaskError> {
        let task_id = task_id.to_string();
        let (before, record) = self.write(move |txn| {
            let before = get_in(txn, &task_id)
                .map_err(sql)?
                .ok_or_else(|| TaskError::NotFound { task_id: task_id.clone() })?
                .state;
            txn.execute(
                "UPDATE tasks SET state = 'CANCELLED', finished_at = ?2 WHERE task_id = ?1 AND state IN ('PENDING', 'RUNNING')",
                params![task_id, now_ms()],
            )
            .map_err(sql)?;
            let record = get_in(txn, &task_id).map_err(sql)?.ok_or(TaskError::NotFound { task_id })?;
            Ok((before, record))
        })
        .await?;
        if before != record.state {
            self.count(before, -1);
            self.count(record.state, 1);
        }
        Ok(record)
    }

    /// Deletes up to `batch` finished tasks (completed, failed, cancelled) that finished before
    /// `before_ms`, oldest first; returns how many. Small batches keep the writer free for the
    /// queue between them.
    async fn prune(&self, before_ms: i64, batch: usize) -> Result<usize, TaskError> {
        let deleted: Vec<TaskState> = self
            .write(move |txn| {
                let mut stmt = txn
                    .prepare_cached(
                        // The finished index, named: on `state` alone the planner would take
                        // every finished task and sort them, at each batch.
                        "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks \
                         INDEXED BY tasks_finished \
                         WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                         AND state IN ('COMPLETED', 'FAILED', 'CANCELLED') \
                         ORDER BY finished_at LIMIT ?2) RETURNING state",
                    )
                    .map_err(sql)?;
                let rows = stmt
                    .query_map(params![before_ms, batch as i64], |r| r.get::<_, String>(0))
                    .map_err(sql)?;
                let mut states = Vec::new();
                for row in rows {
                    states.extend(TaskState::parse(&row.map_err(sql)?));
                }
                Ok(states)
            })
            .await?;
        for state in &deleted {
            self.count(*state, -1);
        }
        Ok(deleted.len())
    }

    /// After a restart: tasks left RUNNING by a process that died go back to PENDING while they
    /// have retries left, and become FAILED otherwise. Their old attempt can no longer report.
    async fn recover(&self) -> Result<Recovered, TaskError> {
        let recovered = self.write(|txn| {
            let now = now_ms();
            let failed = txn
                .execute(
                    "UPDATE tasks SET state = 'FAILED', finished_at = ?1, \
                     error = 'interrupted: the process running it stopped, and its retries are used up' \
                     WHERE state = 'RUNNING' AND attempt > max_retries",
                    [now],
                )
                .map_err(sql)?;
            let requeued = txn
                .execute(
                    "UPDATE tasks SET state = 'PENDING', error = 'interrupted: the process running it stopped' \
                     WHERE state = 'RUNNING'",
                    [],
                )
                .map_err(sql)?;
            Ok((Recovered { requeued, failed, records: Vec::new() }, count_states(txn).map_err(sql)?))
        })
        .await?;
        *lock(&self.inner.counts) = recovered.1;
        Ok(recovered.0)
    }

    /// The task's state, without its input payload.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError> {
        // A lookup by key takes microseconds: done in place when the reader is free, it spares
        // the hop to the reader thread and back, which costs more than the lookup.
        if let Some(Ok(conn)) = self.inner.reader.as_ref().map(|r| r.conn.try_lock()) {
            return get_in(&conn, task_id).map_err(|e| self.store_error(e));
        }
        let task_id = task_id.to_string();
        self.read(move |conn| get_in(conn, &task_id)).await
    }

    /// A task with its input payload (`get` leaves the payload out).
    async fn get_with_payload(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError> {
        let task_id = task_id.to_string();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE task_id = ?1"))?
                .query_row([&task_id], record)
                .optional()
        })
        .await
    }

    /// Tasks in submission order, without their input payloads.
    async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, TaskError> {
        self.read(move |conn| {
            let after_seq: i64 = match &filter.after {
                Some(id) => conn
                    .query_row("SELECT seq FROM tasks WHERE task_id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .optional()?
                    .unwrap_or(0),
                None => 0,
            };
            let (page, order) = filter.page("?1");
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {STATUS_COLUMNS} FROM tasks WHERE {page} AND (?2 IS NULL OR state = ?2) \
                 AND (?3 IS NULL OR task_type = ?3) ORDER BY seq {order} LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![
                    after_seq,
                    filter.state.map(|s| s.as_str()),
                    filter.task_type,
                    filter.limit.max(1) as i64
                ],
                record,
            )?;
            rows.collect()
        })
        .await
    }

    /// Tasks waiting or running, by type and state: (type, state, count).
    async fn depth(&self) -> Result<Vec<(String, TaskState, i64)>, TaskError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT task_type, state, COUNT(*) FROM tasks \
                 WHERE state IN ('PENDING', 'RUNNING') GROUP BY state, task_type",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (task_type, state, n) = row?;
                if let Some(state) = TaskState::parse(&state) {
                    out.push((task_type, state, n));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Task counts by state, as of the last committed write.
    fn counts(&self) -> BTreeMap<String, u64> {
        named_counts(&lock(&self.inner.counts))
    }
}

/// Brings a store written by an earlier version up to the current schema.
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let has_lost = conn
        .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'lost'")?
        .exists([])?;
    if !has_lost {
        conn.execute_batch("ALTER TABLE tasks ADD COLUMN lost INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Stored tasks per state, counted afresh.
fn count_states(conn: &Connection) -> rusqlite::Result<BTreeMap<TaskState, i64>> {
    let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut counts = BTreeMap::new();
    for row in rows {
        let (state, n) = row?;
        if let Some(state) = TaskState::parse(&state) {
            counts.insert(state, n);
        }
    }
    Ok(counts)
}

fn sql(e: rusqlite::Error) -> TaskError {
    TaskError::Store {
        path: String::new(),
        message: e.to_string(),
    }
}

/// Runs a statement kept prepared: the writer runs its savepoint statements for every write.
fn run_cached(conn: &Connection, statement: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(statement)?.execute([])
}

/// `wal_pages`: the pages in the write-ahead log after the last commit.
fn writer_loop(mut conn: Connection, jobs: mpsc::Receiver<Job>, wal_pages: &AtomicI32) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let txn = match conn.transaction() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "task store: cannot begin a transaction");
                continue;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            if let Err(e) = run_cached(&txn, "SAVEPOINT job") {
                tracing::error!(error = %e, "task store: savepoint failed");
            }
            let (ok, reply) = job(&txn);
            let end = if ok {
                run_cached(&txn, "RELEASE job")
            } else {
                run_cached(&txn, "ROLLBACK TO job").and_then(|_| run_cached(&txn, "RELEASE job"))
            };
            if let Err(e) = end {
                tracing::error!(error = %e, "task store: savepoint end failed");
            }
            replies.push(reply);
        }
        let committed = txn.commit().map_err(|e| e.to_string());
        if let Err(e) = &committed {
            tracing::error!(error = %e, "task store: commit failed; the batch is lost and its callers are told");
        }
        for reply in replies {
            reply(committed.clone());
        }
        if wal_pages.load(Ordering::Relaxed) >= WRITER_CHECKPOINT_PAGES {
            match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
                Ok((pages, _)) => wal_pages.store(pages, Ordering::Relaxed),
                Err(e) => tracing::debug!(error = %e, "task store: checkpoint put off"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, retries: u32) -> NewTask {
        NewTask {
            task_id: id.into(),
            task_type: "test".into(),
            payload: b"{}".to_vec(),
            metadata: BTreeMap::from([("user".to_string(), "alice".to_string())]),
            priority: 0,
            timeout: None,
            max_retries: retries,
        }
    }

    #[tokio::test]
    async fn submit_is_idempotent_and_refuses_changed_content() {
        let store = SqliteStore::open(None, Durability::default()).unwrap();
        let (first, created) = store.submit(task("a", 0), false).await.unwrap();
        assert!(created && first.state == TaskState::Pending);
        let (again, created) = store.submit(task("a", 0), false).await.unwrap();
        assert!(!created);
        assert_eq!(again.created_at_ms, first.created_at_ms);
        let mut changed = task("a", 0);
        changed.payload = b"{\"other\":1}".to_vec();
        assert_eq!(
            store.submit(changed, false).await.unwrap_err(),
            TaskError::Conflict {
                task_id: "a".into()
            }
        );
        assert_eq!(
            store.get("a").await.unwrap().unwrap().task.metadata["user"],
            "alice"
        );
    }

    #[tokio::test]
    async fn priority_order_retries_and_stale_results() {
        let store = SqliteStore::open(None, Durability::default()).unwrap();
        store.submit(task("low", 1), false).await.unwrap();
        let mut high = task("high", 0);
        high.priority = 5;
        store.submit(high, false).await.unwrap();
        let claimed = store.claim("test", 1).await.unwrap();
        assert_eq!(claimed[0].task.task_id, "high");
        assert_eq!(claimed[0].attempt, 1);

        assert!(store.claim("other", 10).await.unwrap().is_empty());
        let low = store.claim("test", 10).await.unwrap();
        assert_eq!(low.len(), 1);
        let retried = store
            .finish("low", 1, Outcome::Failed("boom".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retried.state, TaskState::Pending);
        // A second report of the same attempt is stale.
        assert!(store
            .finish("low", 1, Outcome::Completed(b"late".to_vec()))
            .await
            .unwrap()
            .is_none());
        tokio::time::sleep(retry_backoff(1)).await;
        let second = store.claim("test", 10).await.unwrap();
        assert_eq!(second[0].attempt, 2);
        let failed = store
            .finish("low", 2, Outcome::Failed("boom again".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (failed.state, failed.error.as_deref()),
            (TaskState::Failed, Some("boom again"))
        );

        let done = store
            .finish("high", 1, Outcome::Completed(b"ok".to_vec()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (done.state, done.result.as_deref()),
            (TaskState::Completed, Some(&b"ok"[..]))
        );
    }

    #[tokio::test]
    async fn a_submit_runs_at_once_only_with_nothing_ready_ahead() {
        let store = SqliteStore::open(None, Durability::default()).unwrap();
        let (first, _) = store.submit(task("first", 0), true).await.unwrap();
        assert_eq!((first.state, first.attempt), (TaskState::Running, 1));
        assert!(first.started_at_ms.is_some());
        store.submit(task("queued", 0), false).await.unwrap();
        // A ready task of the same type waits ahead: the new one queues behind it.
        let (second, _) = store.submit(task("second", 0), true).await.unwrap();
        assert_eq!((second.state, second.attempt), (TaskState::Pending, 0));
        let claimed = store.claim("test", 10).await.unwrap();
        let ids: Vec<&str> = claimed.iter().map(|r| r.task.task_id.as_str()).collect();
        assert_eq!(ids, ["queued", "second"]);
        // The attempt started at submit reports like a claimed one.
        store
            .finish("first", 1, Outcome::Completed(b"ok".to_vec()))
            .await
            .unwrap()
            .unwrap();
        store.cancel("second").await.unwrap();
        let counts = store.counts();
        assert_eq!(
            (counts["COMPLETED"], counts["RUNNING"], counts["CANCELLED"]),
            (1, 1, 1)
        );
        assert!(!counts.contains_key("PENDING"));
    }

    #[tokio::test]
    async fn counts_survive_a_reopen_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        {
            let store = SqliteStore::open(Some(&path), Durability::default()).unwrap();
            store.submit(task("a", 0), true).await.unwrap();
            store.submit(task("b", 1), false).await.unwrap();
            store.submit(task("c", 0), false).await.unwrap();
            store.cancel("c").await.unwrap();
        }
        let store = SqliteStore::open(Some(&path), Durability::default()).unwrap();
        let counts = store.counts();
        assert_eq!(
            (counts["RUNNING"], counts["PENDING"], counts["CANCELLED"]),
            (1, 1, 1)
        );
        store.recover().await.unwrap();
        let counts = store.counts();
        assert_eq!((counts["FAILED"], counts["PENDING"]), (1, 1));
        assert!(!counts.contains_key("RUNNING"));
    }

    #[tokio::test]
    async fn payloads_live_apart_and_go_with_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let store = SqliteStore::open(Some(&path), Durability::default()).unwrap();
        // A row written before payloads had a table of their own.
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO tasks (task_id, task_type, payload, metadata, priority, max_retries, \
                 content_hash, state, created_at) VALUES ('old', 'test', X'0102', '{}', 0, 0, 'h', \
                 'PENDING', 0)",
                [],
            )
            .unwrap();
        let mut big = task("big", 0);
        big.payload = vec![7; 100_000];
        store.submit(big, false).await.unwrap();
        let claimed = store.claim("test", 10).await.unwrap();
        let payloads: BTreeMap<String, usize> = claimed
            .iter()
            .map(|r| (r.task.task_id.clone(), r.task.payload.len()))
            .collect();
        assert_eq!(
            payloads,
            BTreeMap::from([("big".into(), 100_000), ("old".into(), 2)])
        );
        let full = store.get_with_payload("big").await.unwrap().unwrap();
        assert_eq!(full.task.payload, vec![7; 100_000]);
        store
            .finish("big", 1, Outcome::Completed(Vec::new()))
            .await
            .unwrap();
        assert_eq!(store.prune(now_ms() + 1, 10).await.unwrap(), 1);
        // A small payload stays in its row.
        store.submit(task("small", 0), false).await.unwrap();
        let left: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM task_payloads", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn the_log_is_checkpointed_while_the_store_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let store = SqliteStore::open(Some(&path), Durability::default()).unwrap();
        // About 2,500 pages of log, in commits of their own: past the checkpoint threshold
        // twice, below the writer's own.
        for i in 0..100 {
            let mut big = task(&format!("big-{i}"), 0);
            big.payload = vec![i as u8; 100_000];
            store.submit(big, false).await.unwrap();
        }
        let database = || std::fs::metadata(&path).unwrap().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while database() < 4_000_000 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            database() >= 4_000_000,
            "the database file holds {} bytes: the log was not copied into it",
            database()
        );
        let full = store.get_with_payload("big-99").await.unwrap().unwrap();
        assert_eq!(full.task.payload, vec![99; 100_000]);
    }

    #[tokio::test]
    async fn a_task_that_keeps_losing_its_runner_ends_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        // A store written before losses were counted.
        Connection::open(&path)
            .unwrap()
            .execute_batch(&SCHEMA.replace(",\n    lost INTEGER NOT NULL DEFAULT 0", ""))
            .unwrap();
        let store = SqliteStore::open(Some(&path), Durability::default()).unwrap();
        store.submit(task("poison", 1), false).await.unwrap();
        let lose = |id: &'static str| {
            let store = store.clone();
            async move {
                let claimed = store.claim("test", 10).await.unwrap();
                let attempt = claimed
                    .iter()
                    .find(|r| r.task.task_id == id)
                    .unwrap()
                    .attempt;
                store
                    .finish(id, attempt, Outcome::Lost("worker w went away".into()))
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        for _ in 0..FREE_LOSSES {
            let back = lose("poison").await;
            assert_eq!((back.state, back.attempt), (TaskState::Pending, 0));
        }
        // Past the free losses each one is a failed attempt, with its retries and backoff.
        let retried = lose("poison").await;
        assert_eq!((retried.state, retried.attempt), (TaskState::Pending, 1));
        assert!(retried
            .error
            .unwrap()
            .contains("counts as a failed attempt"));
        tokio::time::sleep(retry_backoff(1)).await;
        let failed = lose("poison").await;
        assert_eq!((failed.state, failed.attempt), (TaskState::Failed, 2));
        assert!(failed.finished_at_ms.is_some());

        // A task that was never handed to anyone costs nothing, however often that happens.
        store.submit(task("unlucky", 0), false).await.unwrap();
        for _ in 0..FREE_LOSSES + 2 {
            let claimed = store.claim("test", 10).await.unwrap();
            let r = claimed
                .iter()
                .find(|r| r.task.task_id == "unlucky")
                .unwrap();
            let back = store
                .finish("unlucky", r.attempt, Outcome::Requeue("no worker".into()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((back.state, back.attempt), (TaskState::Pending, 0));
        }
    }

    #[tokio::test]
    async fn cancel_pending_and_running() {
        let store = SqliteStore::open(None, Durability::default()).unwrap();
        store.submit(task("p", 0), false).await.unwrap();
        assert_eq!(store.cancel("p").await.unwrap().state, TaskState::Cancelled);
        store.submit(task("r", 0), false).await.unwrap();
        store.claim("test", 10).await.unwrap();
        assert_eq!(store.cancel("r").await.unwrap().state, TaskState::Cancelled);
        // The cancelled attempt's late result does not overwrite the cancellation.
        assert!(store
            .finish("r", 1, Outcome::Completed(vec![]))
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            store.cancel("nope").await,
            Err(TaskError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn running_tasks_come_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tasks.db");
        {
            let store = SqliteStore::open(Some(&path), Durability::Power).unwrap();
            store.submit(task("retry-left", 1), false).await.unwrap();
            store.submit(task("no-retries", 0), false).await.unwrap();
            store.submit(task("done", 0), false).await.unwrap();
            store.claim("test", 10).await.unwrap();
            store
                .finish("done", 1, Outcome::Completed(b"kept".to_vec()))
                .await
                .unwrap();
        }
        let store = SqliteStore::open(Some(&path), Durability::Power).unwrap();
        assert_eq!(
            store.recover().await.unwrap(),
            Recovered {
                requeued: 1,
                failed: 1,
                records: Vec::new()
            }
        );
        let get = |id: &'static str| {
            let store = store.clone();
            async move { store.get(id).await.unwrap().unwrap() }
        };
        assert_eq!(get("retry-left").await.state, TaskState::Pending);
        assert_eq!(get("no-retries").await.state, TaskState::Failed);
        assert_eq!(get("done").await.result.as_deref(), Some(&b"kept"[..]));
        // The dead process's attempt 1 can no longer report.
        assert!(store
            .finish("retry-left", 1, Outcome::Completed(vec![]))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn concurrent_submits_share_commits_and_list_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(Some(&dir.path().join("tasks.db")), Durability::default()).unwrap();
        let mut handles = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                store.submit(task(&format!("t{i:03}"), 0), false).await
            }));
        }
        for h in handles {
            assert!(h.await.unwrap().unwrap().1);
        }
        let first = store
            .list(ListFilter {
                limit: 200,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(first.len(), 200);
        let rest = store
            .list(ListFilter {
                limit: 1000,
                after: Some(first.last().unwrap().task.task_id.clone()),
                state: Some(TaskState::Pending),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(rest.len(), 300);
        let newest = store
            .list(ListFilter {
                limit: 2,
                newest_first: true,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let older = store
            .list(ListFilter {
                limit: 1,
                newest_first: true,
                after: Some(newest[1].task.task_id.clone()),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let last = rest.last().unwrap().task.task_id.clone();
        assert_eq!(newest[0].task.task_id, last);
        assert_eq!(newest[1].task.task_id, rest[rest.len() - 2].task.task_id);
        assert_eq!(older[0].task.task_id, rest[rest.len() - 3].task.task_id);
        assert_eq!(store.counts()["PENDING"], 500);
    }
}
