//! The shared task store: PostgreSQL, which several orchestrators use at once.
//!
//! Each orchestrator (a node, named by a random id that is also its connections'
//! `application_name`) claims with `FOR UPDATE SKIP LOCKED` and holds what it claims under a lease
//! it renews; a node that stops renewing loses its tasks to the others. Every change of a task's
//! state is announced by a trigger with `NOTIFY`, so nodes wake on each other's submits and follow
//! each other's results instead of polling. Submits and completions, the two writes of every task,
//! are gathered into one statement and one commit per batch, so concurrent callers share commits.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use crate::config::StoreLocation;
use crate::tasks::model::{NewTask, TaskError, TaskRecord, TaskState};
use crate::tasks::store::{
    counted_loss, lost_runner_sets, named_counts, now_ms, retry_backoff, Change, ListFilter,
    Outcome, Recovered, Store, FREE_LOSSES,
};
use crate::util::lock;

/// Connections each orchestrator keeps to the database.
const POOL_SIZE: usize = 12;
/// Most submits or completions in one statement.
const MAX_BATCH: usize = 2048;
/// How long opening waits for the server, and any write waits for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one migration per version, applied in order; the version reached is kept in
/// `dspy_agent_schema`. A migration is never edited once released: changes come as a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the tasks, with the lease of the orchestrator that runs each.
    "CREATE TABLE dspy_agent_tasks (
        seq BIGSERIAL PRIMARY KEY,
        task_id TEXT NOT NULL UNIQUE,
        task_type TEXT NOT NULL,
        payload BYTEA NOT NULL,
        metadata TEXT NOT NULL,
        priority INTEGER NOT NULL,
        timeout_ms BIGINT,
        max_retries INTEGER NOT NULL,
        content_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        result BYTEA,
        error TEXT,
        created_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        not_before BIGINT NOT NULL DEFAULT 0,
        lost INTEGER NOT NULL DEFAULT 0,
        owner TEXT,
        lease_until BIGINT
    ) WITH (
        -- Every task is rewritten at each step: vacuumed after 1% of the rows changed rather
        -- than 20%, and unthrottled, the table stays its size and the ready index lean (a
        -- soak of a million tasks held its rate only so).
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.01,
        autovacuum_vacuum_cost_delay = 0
    );
    CREATE INDEX dspy_agent_tasks_ready ON dspy_agent_tasks (task_type, priority DESC, seq)
        WHERE state = 'PENDING';
    CREATE INDEX dspy_agent_tasks_leases ON dspy_agent_tasks (lease_until)
        WHERE state = 'RUNNING';
    CREATE INDEX dspy_agent_tasks_finished ON dspy_agent_tasks (finished_at)
        WHERE finished_at IS NOT NULL;",
    // 2: orchestrators announce the types they serve; every change of a task's state is
    // notified (as "<node>\n<state>\t<type>\t<id>\n...": ids and types hold no control
    // characters).
    "CREATE TABLE dspy_agent_nodes (
        node TEXT PRIMARY KEY,
        task_types TEXT[] NOT NULL,
        alive_until BIGINT NOT NULL
    );
    -- One notification per statement and up to ~7 kB of changes (NOTIFY takes 8 kB), not one
    -- per row: a batch of 2,000 submits is a handful of messages for every listener.
    CREATE FUNCTION dspy_agent_tasks_notify(changes TEXT[]) RETURNS void LANGUAGE sql AS $$
        SELECT pg_notify('dspy_agent_tasks_' || current_schema(),
                         current_setting('application_name') || E'\n'
                         || string_agg(line, E'\n'))
        FROM (SELECT line, sum(length(line) + 1) OVER (ORDER BY n) / 7000 AS chunk
              FROM unnest(changes) WITH ORDINALITY AS c(line, n)) lines
        GROUP BY chunk
    $$;
    CREATE FUNCTION dspy_agent_tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM dspy_agent_tasks_notify(ARRAY(
            SELECT state || E'\t' || task_type || E'\t' || task_id FROM changed));
        RETURN NULL;
    END $$;
    CREATE FUNCTION dspy_agent_tasks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- Rows whose state changed (a renewed lease changes none): a hashed set difference,
        -- as a join of the two transition tables would be planned as a nested loop.
        PERFORM dspy_agent_tasks_notify(ARRAY(
            SELECT c.state || E'\t' || c.task_type || E'\t' || c.task_id
            FROM (SELECT seq, state, task_type, task_id FROM changed
                  EXCEPT SELECT seq, state, task_type, task_id FROM before) c));
        RETURN NULL;
    END $$;
    CREATE TRIGGER dspy_agent_tasks_inserted AFTER INSERT ON dspy_agent_tasks
        REFERENCING NEW TABLE AS changed
        FOR EACH STATEMENT EXECUTE FUNCTION dspy_agent_tasks_inserted();
    CREATE TRIGGER dspy_agent_tasks_updated AFTER UPDATE ON dspy_agent_tasks
        REFERENCING OLD TABLE AS before NEW TABLE AS changed
        FOR EACH STATEMENT EXECUTE FUNCTION dspy_agent_tasks_updated();",
    // 3: a statement that changed no task (a claim that found none) costs its trigger one
    // check, and the notifying function keeps its plans (a SQL function is planned anew at
    // every call).
    "CREATE OR REPLACE FUNCTION dspy_agent_tasks_notify(changes TEXT[]) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('dspy_agent_tasks_' || current_schema(),
                          current_setting('application_name') || E'\n'
                          || string_agg(line, E'\n'))
        FROM (SELECT line, sum(length(line) + 1) OVER (ORDER BY n) / 7000 AS chunk
              FROM unnest(changes) WITH ORDINALITY AS c(line, n)) lines
        GROUP BY chunk;
    END $$;
    CREATE OR REPLACE FUNCTION dspy_agent_tasks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT FROM changed) THEN
            RETURN NULL;
        END IF;
        PERFORM dspy_agent_tasks_notify(ARRAY(
            SELECT c.state || E'\t' || c.task_type || E'\t' || c.task_id
            FROM (SELECT seq, state, task_type, task_id FROM changed
                  EXCEPT SELECT seq, state, task_type, task_id FROM before) c));
        RETURN NULL;
    END $$;",
];

/// The database's clock, in ms since the epoch: leases are timed by one clock, whichever
/// machines the orchestrators run on.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const COLUMNS: &str = "task_id, task_type, payload, metadata, priority, timeout_ms, max_retries, \
                       state, attempt, result, error, created_at, started_at, finished_at";
const STATUS_COLUMNS: &str = "task_id, task_type, '\\x'::bytea, metadata, priority, timeout_ms, \
                              max_retries, state, attempt, result, error, created_at, started_at, \
                              finished_at";

/// Columns of `UPDATE ... RETURNING`, qualified where the update joins another relation.
fn returning(table: &str) -> String {
    STATUS_COLUMNS
        .split(", ")
        .map(|c| {
            if c.starts_with('\'') {
                c.to_string()
            } else {
                format!("{table}.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

type Reply<T> = oneshot::Sender<Result<T, TaskError>>;

/// A task to store, and whether it may start at once.
struct Submit {
    task: NewTask,
    hash: String,
    run_now: bool,
}

/// A completed attempt.
struct Completion {
    task_id: String,
    attempt: u32,
    result: Vec<u8>,
}

pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    /// This orchestrator's id: who holds a claimed task.
    node: String,
    lease_ms: i64,
    /// The URL without its password, for messages.
    location: String,
    counts: Mutex<BTreeMap<TaskState, i64>>,
    changes: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
    submits: mpsc::UnboundedSender<(Submit, Reply<(TaskRecord, bool)>)>,
    completions: mpsc::UnboundedSender<(Completion, Reply<Option<TaskRecord>>)>,
}

fn record(row: &Row) -> TaskRecord {
    record_at(row, 0)
}

/// Parses a `postgresql://` URL (or key=value string); the message says what is wrong.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("{e}; write postgresql://USER:PASSWORD@HOST:PORT/DATABASE"))?;
    if config.get_hosts().is_empty() {
        return Err("names no host; write postgresql://USER:PASSWORD@HOST:PORT/DATABASE".into());
    }
    Ok(config)
}

impl Inner {
    fn error(&self, e: impl std::fmt::Display) -> TaskError {
        TaskError::Store {
            path: self.location.clone(),
            message: e.to_string(),
        }
    }

    /// A database error as the user can act on it.
    fn db_error(&self, e: tokio_postgres::Error) -> TaskError {
        let message = match e.code() {
            Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => format!(
                "the server refused the user or password ({}); check the user and password in tasks.store",
                e.as_db_error().map(|d| d.message()).unwrap_or("")
            ),
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => format!(
                "{}; create the database first (createdb), or name one that exists in tasks.store",
                e.as_db_error().map(|d| d.message()).unwrap_or("")
            ),
            _ => match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => format!("{e} (is the server running and reachable?)"),
            },
        };
        self.error(message)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, TaskError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => self.db_error(e),
            other => self.error(format!("no connection to the database: {other}")),
        })
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date and starts following other orchestrators'
    /// changes. Fails within seconds, naming the cause, when the server does not answer, refuses
    /// the credentials or holds a schema from a newer version.
    pub async fn open(url: &str, lease: Duration) -> Result<PostgresStore, TaskError> {
        let mut config = parse_url(url).map_err(|message| TaskError::Store {
            path: "tasks.store".into(),
            message,
        })?;
        let location = StoreLocation::Postgres(url.to_string()).to_string();
        let mut node = [0u8; 8];
        getrandom::fill(&mut node).map_err(|e| TaskError::Store {
            path: location.clone(),
            message: format!("no randomness for the orchestrator's id: {e}"),
        })?;
        let node: String = node.iter().map(|b| format!("{b:02x}")).collect();
        config
            .application_name(format!("dspy-agent-{node}"))
            .connect_timeout(CONNECT_TIMEOUT);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT * 2))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| TaskError::Store {
                path: location.clone(),
                message: e.to_string(),
            })?;
        let (submits, submitted) = mpsc::unbounded_channel();
        let (completions, completed) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pool,
            config,
            node,
            lease_ms: lease.as_millis() as i64,
            location,
            counts: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(None),
            submits,
            completions,
        });
        migrate(&inner, usize::MAX).await?;
        let (changes, followed) = mpsc::unbounded_channel();
        // Listening before anything is claimed: no change after open is missed.
        let listening = listen(&inner).await?;
        *lock(&inner.changes) = Some(followed);
        tokio::spawn(follow(Arc::downgrade(&inner), listening, changes));
        tokio::spawn(batches(Arc::downgrade(&inner), submitted, submit_batch));
        tokio::spawn(batches(Arc::downgrade(&inner), completed, complete_batch));
        tokio::spawn(count_now_and_then(Arc::downgrade(&inner)));
        refresh_counts(&inner).await?;
        Ok(PostgresStore { inner })
    }
}

/// Applies the migrations after the database's version, up to `upto`, under a lock so that
/// orchestrators starting together migrate once.
async fn migrate(inner: &Inner, upto: usize) -> Result<(), TaskError> {
    let mut client = inner.client().await?;
    let txn = client.transaction().await.map_err(|e| inner.db_error(e))?;
    txn.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.dspy_agent_schema'));
         CREATE TABLE IF NOT EXISTS dspy_agent_schema (version INTEGER NOT NULL);",
    )
    .await
    .map_err(|e| inner.db_error(e))?;
    let version: Option<i32> = txn
        .query_opt("SELECT max(version) FROM dspy_agent_schema", &[])
        .await
        .map_err(|e| inner.db_error(e))?
        .and_then(|r| r.get(0));
    let version = version.unwrap_or(0) as usize;
    if version > MIGRATIONS.len() {
        return Err(inner.error(format!(
            "the database's task schema is version {version}, newer than this version of \
             dspy-agent-infra knows ({}); upgrade dspy-agent-infra on this machine, or point \
             tasks.store at another database",
            MIGRATIONS.len()
        )));
    }
    for (n, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(version)
        .take(upto.saturating_sub(version))
    {
        txn.batch_execute(migration).await.map_err(|e| {
            inner.error(format!(
                "migrating the task schema to version {}: {e}",
                n + 1
            ))
        })?;
        txn.execute(
            "INSERT INTO dspy_agent_schema (version) VALUES ($1)",
            &[&(n as i32 + 1)],
        )
        .await
        .map_err(|e| inner.db_error(e))?;
    }
    txn.commit().await.map_err(|e| inner.db_error(e))
}

/// A connection that listens for the changes of this schema's tasks; what it hears goes to the
/// returned channel until the connection ends.
async fn listen(
    inner: &Inner,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), TaskError> {
    let (client, mut connection) = inner
        .config
        .connect(NoTls)
        .await
        .map_err(|e| inner.db_error(e))?;
    let (heard, hearing) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if heard.send(n.payload().to_string()).is_err() {
                    return;
                }
            }
        }
    });
    let schema: String = client
        .query_one("SELECT current_schema()", &[])
        .await
        .map_err(|e| inner.db_error(e))?
        .get(0);
    client
        .batch_execute(&format!("LISTEN \"dspy_agent_tasks_{schema}\""))
        .await
        .map_err(|e| inner.db_error(e))?;
    Ok((client, hearing))
}

/// Passes other nodes' changes on to the queue; listens again (and asks for a resync) when the
/// connection is lost. Ends with the store.
async fn follow(
    store: Weak<Inner>,
    listening: (tokio_postgres::Client, mpsc::UnboundedReceiver<String>),
    changes: mpsc::UnboundedSender<Change>,
) {
    let mut listening = Some(listening);
    loop {
        if let Some((_client, mut hearing)) = listening.take() {
            let me = match store.upgrade() {
                Some(inner) => format!("dspy-agent-{}", inner.node),
                None => return,
            };
            while let Some(payload) = hearing.recv().await {
                let mut lines = payload.split('\n');
                if lines.next() != Some(me.as_str()) {
                    for line in lines {
                        let mut parts = line.splitn(3, '\t');
                        let (Some(state), Some(task_type), Some(task_id)) =
                            (parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        let Some(state) = TaskState::parse(state) else {
                            continue;
                        };
                        let change = Change::Task {
                            task_id: task_id.to_string(),
                            task_type: task_type.to_string(),
                            state,
                        };
                        if changes.send(change).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        match listen(&inner).await {
            Ok(l) => {
                listening = Some(l);
                if changes.send(Change::Resync).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listening for other orchestrators' changes again failed; retrying")
            }
        }
    }
}

/// Serves queued requests of one kind, each batch in one statement run by `run`. One batch is
/// in flight at a time, so requests made meanwhile gather into the next.
async fn batches<Req, Resp, F, Fut>(
    store: Weak<Inner>,
    mut queued: mpsc::UnboundedReceiver<(Req, Reply<Resp>)>,
    run: F,
) where
    F: Fn(Arc<Inner>, Vec<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Result<Resp, TaskError>>, TaskError>>,
{
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else {
            return;
        };
        let (requests, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
        match run(inner, requests).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn submit_batch(
    inner: Arc<Inner>,
    batch: Vec<Submit>,
) -> Result<Vec<Result<(TaskRecord, bool), TaskError>>, TaskError> {
    let now = now_ms();
    let mut client = inner.client().await?;
    let txn = client.transaction().await.map_err(|e| inner.db_error(e))?;
    let column = |f: &dyn Fn(&Submit) -> String| batch.iter().map(f).collect::<Vec<String>>();
    let ids = column(&|s| s.task.task_id.clone());
    let types = column(&|s| s.task.task_type.clone());
    let metadata =
        column(&|s| serde_json::to_string(&s.task.metadata).unwrap_or_else(|_| "{}".into()));
    let hashes = column(&|s| s.hash.clone());
    let payloads: Vec<&[u8]> = batch.iter().map(|s| &s.task.payload[..]).collect();
    let priorities: Vec<i32> = batch.iter().map(|s| s.task.priority).collect();
    let timeouts: Vec<Option<i64>> = batch
        .iter()
        .map(|s| s.task.timeout.map(|t| t.as_millis() as i64))
        .collect();
    let retries: Vec<i32> = batch.iter().map(|s| s.task.max_retries as i32).collect();
    let run_now: Vec<bool> = batch.iter().map(|s| s.run_now).collect();
    // Whether a ready task waits ahead is asked once per type of the batch, walking the ready
    // index in its order to the first (bitmap scans, which read every match, are off for this
    // transaction): asked per row as a bitmap scan of every PENDING task, a batch of 1,000
    // behind a backlog of 100,000 took 24 s. The statement keeps its cached plan: planned
    // anew, the planner copied the batch's payloads, given as constants, several times over.
    // The batch, payloads included, stays in memory (the insert's trigger keeps the new rows)
    // rather than going through temporary files.
    txn.batch_execute("SET LOCAL enable_bitmapscan = off; SET LOCAL work_mem = '64MB'")
        .await
        .map_err(|e| inner.db_error(e))?;
    let statement = txn
        .prepare_cached(&format!(
            "WITH f AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], \
             $5::int[], $6::bigint[], $7::int[], $8::text[], $9::bool[]) WITH ORDINALITY \
             AS f(task_id, task_type, payload, metadata, priority, timeout_ms, max_retries, \
             content_hash, run_now, ord)), \
             busy AS MATERIALIZED (SELECT ty.task_type \
             FROM (SELECT DISTINCT task_type FROM unnest($2::text[], $9::bool[]) \
             AS n(task_type, run_now) WHERE run_now) ty, \
             LATERAL (SELECT 1 FROM dspy_agent_tasks t WHERE t.state = 'PENDING' \
             AND t.task_type = ty.task_type AND t.not_before <= $10 \
             ORDER BY t.priority DESC, t.seq LIMIT 1) ready), \
             g AS (SELECT f.*, f.run_now AND NOT EXISTS \
             (SELECT 1 FROM busy b WHERE b.task_type = f.task_type) AS go FROM f) \
             INSERT INTO dspy_agent_tasks (task_id, task_type, payload, metadata, priority, \
             timeout_ms, max_retries, content_hash, state, attempt, created_at, started_at, \
             owner, lease_until) \
             SELECT task_id, task_type, payload, metadata, priority, timeout_ms, max_retries, \
             content_hash, CASE WHEN go THEN 'RUNNING' ELSE 'PENDING' END, \
             CASE WHEN go THEN 1 ELSE 0 END, $10, CASE WHEN go THEN $10 END, \
             CASE WHEN go THEN $11 END, CASE WHEN go THEN {DB_NOW} + $12 END \
             FROM g ORDER BY ord ON CONFLICT (task_id) DO NOTHING RETURNING task_id, state"
        ))
        .await
        .map_err(|e| inner.db_error(e))?;
    let inserted: HashMap<String, String> = txn
        .query(
            &statement,
            &[
                &ids,
                &types,
                &payloads,
                &metadata,
                &priorities,
                &timeouts,
                &retries,
                &hashes,
                &run_now,
                &now,
                &inner.node,
                &inner.lease_ms,
            ],
        )
        .await
        .map_err(|e| inner.db_error(e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Ids already stored (before, or earlier in this batch): the same content is that task,
    // other content a conflict.
    let mut answered: HashMap<String, bool> = HashMap::new();
    let taken: Vec<String> = ids
        .iter()
        .filter(|id| !inserted.contains_key(*id))
        .cloned()
        .collect();
    let mut existing: HashMap<String, (String, TaskRecord)> = HashMap::new();
    if !taken.is_empty() || batch.len() != inserted.len() {
        let all: Vec<String> = ids.clone();
        for row in txn
            .query(
                &format!(
                    "SELECT content_hash, {STATUS_COLUMNS} FROM dspy_agent_tasks \
                     WHERE task_id = ANY($1)"
                ),
                &[&all],
            )
            .await
            .map_err(|e| inner.db_error(e))?
        {
            let hash: String = row.get(0);
            let rec = record_at(&row, 1);
            existing.insert(rec.task.task_id.clone(), (hash, rec));
        }
    }
    txn.commit().await.map_err(|e| inner.db_error(e))?;
    let mut out = Vec::with_capacity(batch.len());
    let mut made: BTreeMap<TaskState, i64> = BTreeMap::new();
    for s in batch {
        let id = s.task.task_id.clone();
        let fresh = inserted.get(&id).filter(|_| !answered.contains_key(&id));
        if let Some(state) = fresh {
            answered.insert(id, true);
            let state = TaskState::parse(state).unwrap_or(TaskState::Pending);
            *made.entry(state).or_default() += 1;
            let running = state == TaskState::Running;
            out.push(Ok((
                TaskRecord {
                    task: s.task,
                    state,
                    attempt: u32::from(running),
                    result: None,
                    error: None,
                    created_at_ms: now,
                    started_at_ms: running.then_some(now),
                    finished_at_ms: None,
                },
                true,
            )));
            continue;
        }
        out.push(match existing.get(&id) {
            Some((stored, _)) if !s.task.same_content(&s.hash, stored) => {
                Err(TaskError::Conflict { task_id: id })
            }
            Some((_, rec)) => Ok((rec.clone(), false)),
            None => Err(TaskError::NotFound { task_id: id }),
        });
    }
    let mut counts = lock(&inner.counts);
    for (state, n) in made {
        *counts.entry(state).or_default() += n;
    }
    Ok(out)
}

/// `record` for a row whose task columns start at `at`.
fn record_at(row: &Row, at: usize) -> TaskRecord {
    let metadata: String = row.get(at + 3);
    let state: String = row.get(at + 7);
    TaskRecord {
        task: NewTask {
            task_id: row.get(at),
            task_type: row.get(at + 1),
            payload: row.get(at + 2),
            metadata: serde_json::from_str(&metadata).unwrap_or_default(),
            priority: row.get(at + 4),
            timeout: row
                .get::<_, Option<i64>>(at + 5)
                .map(|ms| Duration::from_millis(ms as u64)),
            max_retries: row.get::<_, i32>(at + 6) as u32,
        },
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        attempt: row.get::<_, i32>(at + 8) as u32,
        result: row.get(at + 9),
        error: row.get(at + 10),
        created_at_ms: row.get(at + 11),
        started_at_ms: row.get(at + 12),
        finished_at_ms: row.get(at + 13),
    }
}

async fn complete_batch(
    inner: Arc<Inner>,
    batch: Vec<Completion>,
) -> Result<Vec<Result<Option<TaskRecord>, TaskError>>, TaskError> {
    let ids: Vec<&str> = batch.iter().map(|c| c.task_id.as_str()).collect();
    let attempts: Vec<i32> = batch.iter().map(|c| c.attempt as i32).collect();
    let results: Vec<&[u8]> = batch.iter().map(|c| &c.result[..]).collect();
    let mut client = inner.client().await?;
    let txn = client.transaction().await.map_err(|e| inner.db_error(e))?;
    // Joined by a hash: with statistics taken while few tasks ran, the planner expects one
    // RUNNING row and joins the batch to it by a nested loop, which for a batch of 2,048 behind
    // a large table took most of a second.
    txn.batch_execute("SET LOCAL enable_nestloop = off")
        .await
        .map_err(|e| inner.db_error(e))?;
    let statement = txn
        .prepare_cached(&format!(
            "UPDATE dspy_agent_tasks t SET state = 'COMPLETED', result = f.result, error = NULL, \
             finished_at = $4, owner = NULL, lease_until = NULL \
             FROM unnest($1::text[], $2::int[], $3::bytea[]) AS f(task_id, attempt, result) \
             WHERE t.task_id = ANY($1) AND t.task_id = f.task_id AND t.state = 'RUNNING' \
             AND t.attempt = f.attempt \
             AND t.owner = $5 RETURNING {}",
            returning("t")
        ))
        .await
        .map_err(|e| inner.db_error(e))?;
    let rows = txn
        .query(
            &statement,
            &[&ids, &attempts, &results, &now_ms(), &inner.node],
        )
        .await
        .map_err(|e| inner.db_error(e))?;
    txn.commit().await.map_err(|e| inner.db_error(e))?;
    let mut done: HashMap<String, TaskRecord> = rows
        .iter()
        .map(|r| {
            let rec = record(r);
            (rec.task.task_id.clone(), rec)
        })
        .collect();
    {
        let mut counts = lock(&inner.counts);
        *counts.entry(TaskState::Running).or_default() -= done.len() as i64;
        *counts.entry(TaskState::Completed).or_default() += done.len() as i64;
    }
    let stale: Vec<String> = batch
        .iter()
        .filter(|c| !done.contains_key(&c.task_id))
        .map(|c| c.task_id.clone())
        .collect();
    let known: std::collections::HashSet<String> = if stale.is_empty() {
        Default::default()
    } else {
        client
            .query(
                "SELECT task_id FROM dspy_agent_tasks WHERE task_id = ANY($1)",
                &[&stale],
            )
            .await
            .map_err(|e| inner.db_error(e))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    Ok(batch
        .into_iter()
        .map(|c| match done.remove(&c.task_id) {
            Some(rec) => Ok(Some(rec)),
            None if known.contains(&c.task_id) => Ok(None),
            None => Err(TaskError::NotFound { task_id: c.task_id }),
        })
        .collect())
}

async fn refresh_counts(inner: &Inner) -> Result<(), TaskError> {
    let client = inner.client().await?;
    let rows = client
        .query(
            "SELECT state, count(*) FROM dspy_agent_tasks GROUP BY state",
            &[],
        )
        .await
        .map_err(|e| inner.db_error(e))?;
    let counts = rows
        .iter()
        .filter_map(|r| Some((TaskState::parse(r.get(0))?, r.get::<_, i64>(1))))
        .collect();
    *lock(&inner.counts) = counts;
    Ok(())
}

/// Counts afresh every few seconds: other orchestrators change the counts too.
async fn count_now_and_then(store: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        if let Err(e) = refresh_counts(&inner).await {
            tracing::debug!(error = %e, "counting tasks failed");
        }
    }
}

/// SQL for the not-before time of retry `attempt` (a column), as `retry_backoff` computes it.
fn backoff_sql(now: &str) -> String {
    format!("{now} + LEAST(30000, 100 * power(2, LEAST(GREATEST(attempt - 1, 0), 20)))::bigint")
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn submit(&self, task: NewTask, run_now: bool) -> Result<(TaskRecord, bool), TaskError> {
        task.validate()?;
        let hash = task.content_hash();
        let (tx, rx) = oneshot::channel();
        self.inner
            .submits
            .send((
                Submit {
                    task,
                    hash,
                    run_now,
                },
                tx,
            ))
            .map_err(|_| self.inner.error("the store is closed"))?;
        rx.await
            .map_err(|_| self.inner.error("the store is closed"))?
    }

    async fn claim(&self, task_type: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "UPDATE dspy_agent_tasks SET state = 'RUNNING', attempt = attempt + 1, \
                 started_at = $1, owner = $4, lease_until = {DB_NOW} + $5 \
                 WHERE seq IN (SELECT seq FROM dspy_agent_tasks WHERE state = 'PENDING' \
                 AND task_type = $2 AND not_before <= $1 ORDER BY priority DESC, seq LIMIT $3 \
                 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}, seq"
            ))
            .await
            .map_err(|e| inner.db_error(e))?;
        let rows = client
            .query(
                &statement,
                &[
                    &now_ms(),
                    &task_type,
                    &(limit as i64),
                    &inner.node,
                    &inner.lease_ms,
                ],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        let mut claimed: Vec<(i64, TaskRecord)> =
            rows.iter().map(|r| (r.get(14), record(r))).collect();
        // RETURNING gives no order: restore priority, then submission order.
        claimed.sort_by_key(|(seq, r)| (std::cmp::Reverse(r.task.priority), *seq));
        let mut counts = lock(&inner.counts);
        *counts.entry(TaskState::Pending).or_default() -= claimed.len() as i64;
        *counts.entry(TaskState::Running).or_default() += claimed.len() as i64;
        Ok(claimed.into_iter().map(|(_, r)| r).collect())
    }

    async fn next_ready_ms(&self, task_types: Vec<String>) -> Result<Option<i64>, TaskError> {
        let client = self.inner.client().await?;
        let row = client
            .query_one(
                "SELECT min(not_before) FROM dspy_agent_tasks WHERE state = 'PENDING' \
                 AND task_type = ANY($1)",
                &[&task_types],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?;
        Ok(row.get(0))
    }

    async fn finish(
        &self,
        task_id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<Option<TaskRecord>, TaskError> {
        let inner = &self.inner;
        let now = now_ms();
        let attempt_i = attempt as i32;
        // Guarded by state, attempt and holder, so a stale report changes nothing.
        let guard = "task_id = $1 AND state = 'RUNNING' AND attempt = $2 AND owner = $3";
        let released = "owner = NULL, lease_until = NULL";
        let client = inner.client().await?;
        let rows = match outcome {
            Outcome::Completed(result) => {
                let (tx, rx) = oneshot::channel();
                drop(client);
                inner
                    .completions
                    .send((
                        Completion {
                            task_id: task_id.to_string(),
                            attempt,
                            result,
                        },
                        tx,
                    ))
                    .map_err(|_| inner.error("the store is closed"))?;
                return rx.await.map_err(|_| inner.error("the store is closed"))?;
            }
            Outcome::Requeue(reason) => {
                client
                    .query(
                        &format!(
                            "UPDATE dspy_agent_tasks SET state = 'PENDING', attempt = attempt - 1, \
                             error = $4, not_before = $5, {released} WHERE {guard} \
                             RETURNING {STATUS_COLUMNS}"
                        ),
                        &[&task_id, &attempt_i, &inner.node, &reason, &now],
                    )
                    .await
            }
            Outcome::Lost(reason) => {
                let counted = counted_loss(&reason, "worker");
                let not_before = now + retry_backoff(attempt).as_millis() as i64;
                client
                    .query(
                        &format!(
                            "UPDATE dspy_agent_tasks SET {}, \
                             {released} WHERE {guard} RETURNING {STATUS_COLUMNS}",
                            lost_runner_sets("$6", "$4", "$7", "$5", "$8")
                        ),
                        &[
                            &task_id,
                            &attempt_i,
                            &inner.node,
                            &reason,
                            &now,
                            &(FREE_LOSSES as i32),
                            &counted,
                            &not_before,
                        ],
                    )
                    .await
            }
            Outcome::Failed(error) => {
                let not_before = now + retry_backoff(attempt).as_millis() as i64;
                client
                    .query(
                        &format!(
                            "UPDATE dspy_agent_tasks SET error = $4, \
                             state = CASE WHEN attempt <= max_retries THEN 'PENDING' ELSE 'FAILED' END, \
                             not_before = CASE WHEN attempt <= max_retries THEN $5 ELSE not_before END, \
                             finished_at = CASE WHEN attempt <= max_retries THEN finished_at ELSE $6 END, \
                             {released} WHERE {guard} RETURNING {STATUS_COLUMNS}"
                        ),
                        &[&task_id, &attempt_i, &inner.node, &error, &not_before, &now],
                    )
                    .await
            }
        }
        .map_err(|e| inner.db_error(e))?;
        match rows.first() {
            Some(row) => {
                let rec = record(row);
                let mut counts = lock(&inner.counts);
                *counts.entry(TaskState::Running).or_default() -= 1;
                *counts.entry(rec.state).or_default() += 1;
                Ok(Some(rec))
            }
            None if self.get(task_id).await?.is_some() => Ok(None),
            None => Err(TaskError::NotFound {
                task_id: task_id.to_string(),
            }),
        }
    }

    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH before AS (SELECT seq, state FROM dspy_agent_tasks WHERE task_id = $1 \
                     AND state IN ('PENDING', 'RUNNING') FOR UPDATE) \
                     UPDATE dspy_agent_tasks t SET state = 'CANCELLED', finished_at = $2, \
                     owner = NULL, lease_until = NULL FROM before WHERE t.seq = before.seq \
                     RETURNING before.state, {}",
                    returning("t")
                ),
                &[&task_id, &now_ms()],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        if let Some(row) = rows.first() {
            let rec = record_at(row, 1);
            if let Some(before) = TaskState::parse(row.get(0)) {
                let mut counts = lock(&inner.counts);
                *counts.entry(before).or_default() -= 1;
                *counts.entry(TaskState::Cancelled).or_default() += 1;
            }
            return Ok(rec);
        }
        self.get(task_id).await?.ok_or_else(|| TaskError::NotFound {
            task_id: task_id.to_string(),
        })
    }

    async fn prune(&self, before_ms: i64, batch: usize) -> Result<usize, TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let rows = client
            .query(
                "DELETE FROM dspy_agent_tasks WHERE seq IN (SELECT seq FROM dspy_agent_tasks \
                 WHERE finished_at IS NOT NULL AND finished_at < $1 \
                 AND state IN ('COMPLETED', 'FAILED', 'CANCELLED') \
                 ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING state",
                &[&before_ms, &(batch as i64)],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        let mut counts = lock(&inner.counts);
        for row in &rows {
            if let Some(state) = TaskState::parse(row.get(0)) {
                *counts.entry(state).or_default() -= 1;
            }
        }
        Ok(rows.len())
    }

    async fn recover(&self) -> Result<Recovered, TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let reason = "interrupted: the orchestrator running it stopped renewing its lease";
        let counted = counted_loss(reason, "orchestrator");
        let rows = client
            .query(
                &format!(
                    "UPDATE dspy_agent_tasks SET {}, owner = NULL, lease_until = NULL \
                     WHERE seq IN (SELECT seq FROM dspy_agent_tasks WHERE state = 'RUNNING' \
                     AND lease_until < {DB_NOW} LIMIT 1000 FOR UPDATE SKIP LOCKED) \
                     RETURNING {STATUS_COLUMNS}",
                    lost_runner_sets("$1", "$2", "$3", "$4", &backoff_sql("$4"))
                ),
                &[&(FREE_LOSSES as i32), &reason, &counted, &now_ms()],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        let records: Vec<TaskRecord> = rows.iter().map(record).collect();
        let failed = records
            .iter()
            .filter(|r| r.state == TaskState::Failed)
            .count();
        Ok(Recovered {
            requeued: records.len() - failed,
            failed,
            records,
        })
    }

    async fn renew(&self, held: Vec<String>) -> Result<(), TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE dspy_agent_tasks SET lease_until = {DB_NOW} + $2 \
                     WHERE owner = $1 AND state = 'RUNNING' AND task_id = ANY($3)"
                ),
                &[&inner.node, &inner.lease_ms, &held],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        client
            .execute(
                &format!("UPDATE dspy_agent_nodes SET alive_until = {DB_NOW} + $2 WHERE node = $1"),
                &[&inner.node, &inner.lease_ms],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        Ok(())
    }

    async fn release(&self) -> Result<usize, TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        let released = client
            .execute(
                "UPDATE dspy_agent_tasks SET state = 'PENDING', attempt = attempt - 1, \
                 not_before = 0, owner = NULL, lease_until = NULL, \
                 error = 'interrupted: the orchestrator running it stopped' \
                 WHERE owner = $1 AND state = 'RUNNING'",
                &[&inner.node],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        Ok(released as usize)
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError> {
        let client = self.inner.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {STATUS_COLUMNS} FROM dspy_agent_tasks WHERE task_id = $1"
            ))
            .await
            .map_err(|e| self.inner.db_error(e))?;
        Ok(client
            .query_opt(&statement, &[&task_id])
            .await
            .map_err(|e| self.inner.db_error(e))?
            .as_ref()
            .map(record))
    }

    async fn get_many(&self, task_ids: Vec<String>) -> Result<Vec<TaskRecord>, TaskError> {
        let client = self.inner.client().await?;
        Ok(client
            .query(
                &format!("SELECT {STATUS_COLUMNS} FROM dspy_agent_tasks WHERE task_id = ANY($1)"),
                &[&task_ids],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?
            .iter()
            .map(record)
            .collect())
    }

    async fn get_with_payload(&self, task_id: &str) -> Result<Option<TaskRecord>, TaskError> {
        let client = self.inner.client().await?;
        Ok(client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM dspy_agent_tasks WHERE task_id = $1"),
                &[&task_id],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?
            .as_ref()
            .map(record))
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, TaskError> {
        let client = self.inner.client().await?;
        let after_seq: i64 = match &filter.after {
            Some(id) => client
                .query_opt("SELECT seq FROM dspy_agent_tasks WHERE task_id = $1", &[id])
                .await
                .map_err(|e| self.inner.db_error(e))?
                .map(|r| r.get(0))
                .unwrap_or(0),
            None => 0,
        };
        let (page, order) = filter.page("$1");
        let state = filter.state.map(|s| s.as_str());
        Ok(client
            .query(
                &format!(
                    "SELECT {STATUS_COLUMNS} FROM dspy_agent_tasks WHERE {page} \
                     AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR task_type = $3) \
                     ORDER BY seq {order} LIMIT $4"
                ),
                &[
                    &after_seq,
                    &state,
                    &filter.task_type,
                    &(filter.limit.max(1) as i64),
                ],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?
            .iter()
            .map(record)
            .collect())
    }

    async fn depth(&self) -> Result<Vec<(String, TaskState, i64)>, TaskError> {
        let client = self.inner.client().await?;
        Ok(client
            .query(
                "SELECT task_type, state, count(*) FROM dspy_agent_tasks \
                 WHERE state IN ('PENDING', 'RUNNING') GROUP BY state, task_type",
                &[],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?
            .iter()
            .filter_map(|r| Some((r.get(0), TaskState::parse(r.get(1))?, r.get(2))))
            .collect())
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        named_counts(&lock(&self.inner.counts))
    }

    fn shared(&self) -> bool {
        true
    }

    fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        lock(&self.inner.changes).take()
    }

    async fn announce(&self, task_types: Vec<String>) -> Result<(), TaskError> {
        let inner = &self.inner;
        let client = inner.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO dspy_agent_nodes (node, task_types, alive_until) \
                     VALUES ($1, $2, {DB_NOW} + $3) ON CONFLICT (node) DO UPDATE \
                     SET task_types = EXCLUDED.task_types, alive_until = EXCLUDED.alive_until"
                ),
                &[&inner.node, &task_types, &inner.lease_ms],
            )
            .await
            .map_err(|e| inner.db_error(e))?;
        Ok(())
    }

    async fn served_elsewhere(&self, task_type: &str) -> Result<bool, TaskError> {
        let client = self.inner.client().await?;
        Ok(client
            .query_opt(
                &format!(
                    "SELECT 1 FROM dspy_agent_nodes WHERE $1 = ANY(task_types) \
                     AND alive_until > {DB_NOW} AND node <> $2 LIMIT 1"
                ),
                &[&task_type, &self.inner.node],
            )
            .await
            .map_err(|e| self.inner.db_error(e))?
            .is_some())
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Tells the others at once that this orchestrator serves nothing any more; its held
        // tasks wait for their leases to end (their handlers may still be finishing).
        let inner = Arc::clone(&self.inner);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(client) = inner.client().await {
                    let _ = client
                        .execute(
                            "DELETE FROM dspy_agent_nodes WHERE node = $1",
                            &[&inner.node],
                        )
                        .await;
                }
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The test server's URL (scripts/postgres.sh starts one; scripts/test.sh sets it).
    pub fn test_url() -> String {
        std::env::var("DSPY_AGENT_TEST_POSTGRES").expect(
            "DSPY_AGENT_TEST_POSTGRES names the test PostgreSQL server: run the tests with \
             scripts/test.sh, or start one with `bash scripts/postgres.sh start DIR` and export it",
        )
    }

    /// A schema of the test's own in the test database: the URL that uses it.
    pub async fn fresh_schema() -> String {
        let url = test_url();
        let config = parse_url(&url).unwrap();
        let (client, connection) = config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        let mut name = [0u8; 6];
        getrandom::fill(&mut name).unwrap();
        let schema: String = format!(
            "t_{}",
            name.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-csearch_path%3D{schema}")
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

    #[tokio::test]
    async fn an_older_schema_is_upgraded_and_keeps_its_tasks() {
        let url = fresh_schema().await;
        let store = PostgresStore::open(&url, Duration::from_secs(30))
            .await
            .unwrap();
        // Back to version 1, as a release that knew only it left the database.
        let client = store.inner.client().await.unwrap();
        client
            .batch_execute(
                "DROP TABLE dspy_agent_nodes; \
                 DROP TRIGGER dspy_agent_tasks_inserted ON dspy_agent_tasks; \
                 DROP TRIGGER dspy_agent_tasks_updated ON dspy_agent_tasks; \
                 DROP FUNCTION dspy_agent_tasks_inserted(); DROP FUNCTION dspy_agent_tasks_updated(); \
                 DROP FUNCTION dspy_agent_tasks_notify(TEXT[]); \
                 DELETE FROM dspy_agent_schema WHERE version > 1;",
            )
            .await
            .unwrap();
        drop(client);
        store.submit(task("kept"), false).await.unwrap();
        drop(store);
        let store = PostgresStore::open(&url, Duration::from_secs(30))
            .await
            .unwrap();
        let client = store.inner.client().await.unwrap();
        let version: i32 = client
            .query_one("SELECT max(version) FROM dspy_agent_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version as usize, MIGRATIONS.len());
        assert_eq!(store.claim("test", 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused_with_the_fix() {
        let url = fresh_schema().await;
        let store = PostgresStore::open(&url, Duration::from_secs(30))
            .await
            .unwrap();
        store
            .inner
            .client()
            .await
            .unwrap()
            .batch_execute("INSERT INTO dspy_agent_schema (version) VALUES (999)")
            .await
            .unwrap();
        let Err(e) = PostgresStore::open(&url, Duration::from_secs(30)).await else {
            panic!("a schema from a newer version was accepted");
        };
        let text = e.to_string();
        assert!(
            text.contains("version 999") && text.contains("upgrade"),
            "{text}"
        );
        let password = parse_url(&url).unwrap().get_password().unwrap().to_vec();
        assert!(
            !text.contains(&*String::from_utf8_lossy(&password)),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stale_holder_cannot_overwrite_the_new_one() {
        let url = fresh_schema().await;
        let lease = Duration::from_millis(300);
        let a = PostgresStore::open(&url, lease).await.unwrap();
        let b = PostgresStore::open(&url, lease).await.unwrap();
        a.submit(task("t"), false).await.unwrap();
        let held = a.claim("test", 1).await.unwrap();
        assert_eq!(held[0].attempt, 1);
        // `a` stops renewing: once its lease is over, `b` takes the task back and runs it.
        assert!(b.recover().await.unwrap().records.is_empty());
        tokio::time::sleep(lease * 2).await;
        let recovered = b.recover().await.unwrap();
        assert_eq!(recovered.requeued, 1);
        let again = b.claim("test", 1).await.unwrap();
        assert_eq!(again[0].attempt, 1, "a lost runner costs no attempt");
        // The first holder's late result is stale; the new holder's counts.
        assert_eq!(
            a.finish("t", 1, Outcome::Completed(b"old".to_vec()))
                .await
                .unwrap(),
            None
        );
        let done = b
            .finish("t", 1, Outcome::Completed(b"new".to_vec()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.result.as_deref(), Some(&b"new"[..]));
    }

    #[tokio::test]
    async fn a_held_task_stays_held_while_its_lease_is_renewed() {
        let url = fresh_schema().await;
        let lease = Duration::from_millis(400);
        let a = PostgresStore::open(&url, lease).await.unwrap();
        let b = PostgresStore::open(&url, lease).await.unwrap();
        a.submit(task("t"), false).await.unwrap();
        a.submit(task("orphan"), false).await.unwrap();
        assert_eq!(a.claim("test", 2).await.unwrap().len(), 2);
        // `a` runs "t" only (the answer to its claim of "orphan" was lost, say): "t" stays
        // held as long as `a` renews, "orphan" goes back to the queue.
        let mut requeued = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep(lease / 3).await;
            a.renew(vec!["t".into()]).await.unwrap();
            requeued.extend(
                b.recover()
                    .await
                    .unwrap()
                    .records
                    .into_iter()
                    .map(|r| r.task.task_id),
            );
        }
        assert_eq!(requeued, ["orphan"]);
    }

    #[tokio::test]
    async fn each_task_is_claimed_by_one_orchestrator() {
        let url = fresh_schema().await;
        let a = Arc::new(
            PostgresStore::open(&url, Duration::from_secs(30))
                .await
                .unwrap(),
        );
        let b = Arc::new(
            PostgresStore::open(&url, Duration::from_secs(30))
                .await
                .unwrap(),
        );
        let submits = (0..500).map(|i| a.submit(task(&format!("t{i}")), false));
        for r in futures_util::future::join_all(submits).await {
            assert!(r.unwrap().1);
        }
        let claim = |s: Arc<PostgresStore>| async move {
            let mut mine = Vec::new();
            loop {
                let got = s.claim("test", 7).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|r| r.task.task_id));
            }
        };
        let (x, y) = tokio::join!(claim(Arc::clone(&a)), claim(Arc::clone(&b)));
        let mut all: Vec<String> = x.into_iter().chain(y).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 500);
    }

    #[tokio::test]
    async fn other_orchestrators_changes_are_heard() {
        let url = fresh_schema().await;
        let a = PostgresStore::open(&url, Duration::from_secs(30))
            .await
            .unwrap();
        let b = PostgresStore::open(&url, Duration::from_secs(30))
            .await
            .unwrap();
        let mut heard = b.take_changes().unwrap();
        a.submit(task("t"), false).await.unwrap();
        let change = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            change,
            Change::Task {
                task_id: "t".into(),
                task_type: "test".into(),
                state: TaskState::Pending
            }
        );
        // Its own changes are not echoed back to it.
        let mut own = a.take_changes().unwrap();
        a.claim("test", 1).await.unwrap();
        a.submit(task("u"), false).await.unwrap();
        b.cancel("u").await.unwrap();
        let change = tokio::time::timeout(Duration::from_secs(10), own.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(change, Change::Task { ref task_id, state: TaskState::Cancelled, .. } if task_id == "u"),
            "{change:?}"
        );
    }
}
