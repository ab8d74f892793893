//! The queue: submits into the store, dispatches ready tasks to their handlers with per-type
//! concurrency limits and timeouts, cancels, and broadcasts every state change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TaskType;
use crate::metrics::Metrics;
use crate::tasks::handlers::{Handler, HandlerError};
use crate::tasks::model::{NewTask, TaskError, TaskRecord, TaskState};
use crate::tasks::store::{now_ms, Change, ListFilter, Outcome, TaskStore};
use crate::util::{lock, Background};

/// Largest payload accepted, in bytes (the gRPC message limit is set a little above it).
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

struct Registered {
    handler: Arc<dyn Handler>,
    slots: Arc<Semaphore>,
}

/// Figures for `GetMetrics`.
#[derive(Debug, Clone)]
pub struct QueueMetrics {
    pub by_state: BTreeMap<String, u64>,
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub running: u64,
    pub uptime: Duration,
    pub task_types: Vec<String>,
}

struct Inner {
    store: TaskStore,
    handlers: RwLock<BTreeMap<String, Registered>>,
    /// Types accepted before anything serves them, with defaults for their tasks.
    declared: RwLock<BTreeMap<String, TaskType>>,
    events: broadcast::Sender<Arc<TaskRecord>>,
    /// Callers of `wait`, by task id: told once, when the task reaches a final state.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Arc<TaskRecord>>>>>,
    wake: Notify,
    running: Mutex<HashMap<String, CancellationToken>>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// Cancelled when the stack stops: dispatching ends and running handlers are cancelled;
    /// their tasks stay RUNNING in the store and are recovered (retried) by the next process that
    /// opens it.
    shutdown: CancellationToken,
    /// Owns the dispatcher and every handler run.
    background: Background,
    /// Everything that can move a task to RUNNING here: the dispatcher, handler runs and
    /// submits that start their task. On a shared store, tasks are handed back at stop only
    /// once all of these have ended, so that none claimed meanwhile stays held until its lease
    /// runs out.
    claimers: TaskTracker,
    default_concurrency: usize,
    /// Types another orchestrator on the shared store serves, and when that was last seen.
    served_elsewhere: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone)]
pub struct TaskQueue {
    inner: Arc<Inner>,
}

/// Drops the registrations of waiters that stopped waiting (timed out, answered, gone).
struct ForgetWaiter<'a> {
    queue: &'a TaskQueue,
    task_id: &'a str,
}

impl Drop for ForgetWaiter<'_> {
    fn drop(&mut self) {
        let mut waiters = lock(&self.queue.inner.waiters);
        if let Some(list) = waiters.get_mut(self.task_id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(self.task_id);
            }
        }
    }
}

impl TaskQueue {
    /// Recovers what a previous process left running and starts dispatching; the dispatcher and
    /// the handlers run in `background`. On a shared store it also renews this orchestrator's
    /// leases (every third of `lease`), takes back the tasks of orchestrators that stopped, and
    /// follows the others' changes.
    pub async fn start(
        store: TaskStore,
        lease: Duration,
        default_concurrency: usize,
        background: Background,
        metrics: Arc<Metrics>,
    ) -> Result<TaskQueue, TaskError> {
        let recovered = store.recover().await?;
        if recovered.requeued + recovered.failed > 0 {
            tracing::warn!(
                requeued = recovered.requeued,
                failed = recovered.failed,
                "tasks left running by a process that stopped were recovered"
            );
        }
        let changes = store.take_changes();
        let (events, _) = broadcast::channel(65_536);
        let queue = TaskQueue {
            inner: Arc::new(Inner {
                store,
                handlers: RwLock::new(BTreeMap::new()),
                declared: RwLock::new(BTreeMap::new()),
                events,
                waiters: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                running: Mutex::new(HashMap::new()),
                metrics,
                started: Instant::now(),
                shutdown: background.token(),
                background,
                claimers: TaskTracker::new(),
                default_concurrency: default_concurrency.max(1),
                served_elsewhere: Mutex::new(HashMap::new()),
            }),
        };
        let dispatcher = queue.clone();
        queue
            .inner
            .background
            .spawn(queue.inner.claimers.track_future(dispatcher.dispatch()));
        if queue.inner.store.shared() {
            let keeper = queue.clone();
            queue
                .inner
                .background
                .spawn(async move { keeper.keep_leases(lease).await });
        }
        if let Some(changes) = changes {
            let follower = queue.clone();
            queue
                .inner
                .background
                .spawn(async move { follower.follow(changes).await });
        }
        Ok(queue)
    }

    /// Serves `task_type` with `handler`, at most `concurrency` at a time; replaces an earlier
    /// handler of that type.
    pub fn register(&self, task_type: &str, handler: Arc<dyn Handler>, concurrency: Option<usize>) {
        let slots = Arc::new(Semaphore::new(
            concurrency.unwrap_or(self.inner.default_concurrency).max(1),
        ));
        crate::util::write(&self.inner.handlers)
            .insert(task_type.to_string(), Registered { handler, slots });
        self.inner.metrics.know_task_type(task_type);
        self.inner.wake.notify_one();
    }

    /// Tells the other orchestrators of a shared store which types this one serves, when that
    /// changed since it last told them (run by the dispatcher, which registering wakes).
    async fn announce(&self, announced: &mut Option<Vec<String>>) {
        let types = self.task_types();
        if !self.inner.store.shared() || announced.as_ref() == Some(&types) {
            return;
        }
        match self.inner.store.announce(types.clone()).await {
            Ok(()) => *announced = Some(types),
            Err(e) => {
                tracing::warn!(error = %e, "telling the other orchestrators which task types this one serves failed")
            }
        }
    }

    /// Whether an orchestrator sharing the store serves `task_type` (remembered for a second).
    async fn served_elsewhere(&self, task_type: &str) -> Result<bool, TaskError> {
        const REMEMBERED: Duration = Duration::from_secs(1);
        if !self.inner.store.shared() {
            return Ok(false);
        }
        if lock(&self.inner.served_elsewhere)
            .get(task_type)
            .is_some_and(|seen| seen.elapsed() < REMEMBERED)
        {
            return Ok(true);
        }
        let served = self.inner.store.served_elsewhere(task_type).await?;
        if served {
            lock(&self.inner.served_elsewhere).insert(task_type.to_string(), Instant::now());
        }
        Ok(served)
    }

    /// Renews this orchestrator's leases and takes back the tasks of orchestrators whose
    /// leases ran out, every third of `lease`.
    async fn keep_leases(self, lease: Duration) {
        let every = lease / 3;
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => {
                    // Stopping cancelled the handlers: their tasks go to the other orchestrators
                    // now rather than when the leases end.
                    self.inner.claimers.close();
                    self.inner.claimers.wait().await;
                    match self.inner.store.release().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(released = n, "tasks this orchestrator was running went back to the shared queue"),
                        Err(e) => tracing::warn!(error = %e, "handing this orchestrator's tasks back failed; they return when their leases end"),
                    }
                    return;
                }
                () = tokio::time::sleep(every) => {}
            }
            let held = lock(&self.inner.running).keys().cloned().collect();
            if let Err(e) = self.inner.store.renew(held).await {
                tracing::warn!(error = %e, "renewing this orchestrator's task leases failed");
            }
            match self.inner.store.recover().await {
                Ok(recovered) => {
                    if recovered.requeued + recovered.failed > 0 {
                        tracing::warn!(
                            requeued = recovered.requeued,
                            failed = recovered.failed,
                            "tasks of an orchestrator that stopped renewing its leases were taken back"
                        );
                        self.inner.wake.notify_one();
                    }
                    for record in &recovered.records {
                        self.emit(record);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "taking back expired task leases failed"),
            }
        }
    }

    /// Acts on the changes other orchestrators make to the shared store: wakes the dispatcher
    /// for tasks it can run, stops handlers of tasks cancelled elsewhere, and tells waiters and
    /// watchers here.
    async fn follow(self, mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>) {
        loop {
            let first = tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                change = changes.recv() => match change {
                    Some(c) => c,
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match changes.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let watched = self.inner.events.receiver_count() > 0;
            let mut wanted = Vec::new();
            let mut wake = false;
            for change in batch {
                match change {
                    Change::Resync => {
                        wake = true;
                        wanted.extend(lock(&self.inner.waiters).keys().cloned());
                    }
                    Change::Task {
                        task_id,
                        task_type,
                        state,
                    } => {
                        if state == TaskState::Pending
                            && crate::util::read(&self.inner.handlers).contains_key(&task_type)
                        {
                            wake = true;
                        }
                        if state == TaskState::Cancelled {
                            if let Some(token) = lock(&self.inner.running).remove(&task_id) {
                                token.cancel();
                            }
                        }
                        if watched || lock(&self.inner.waiters).contains_key(&task_id) {
                            wanted.push(task_id);
                        }
                    }
                }
            }
            if wake {
                self.inner.wake.notify_one();
            }
            if wanted.is_empty() {
                continue;
            }
            wanted.sort();
            wanted.dedup();
            match self.inner.store.get_many(wanted).await {
                Ok(records) => {
                    for record in &records {
                        self.emit(record);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading tasks another orchestrator changed failed")
                }
            }
        }
    }

    /// Deletes finished tasks older than `older_than`, a small batch at a time so that the queue's
    /// own writes pass between batches; returns how many.
    pub async fn prune(&self, older_than: Duration) -> Result<usize, TaskError> {
        const BATCH: usize = 500;
        let before =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        let mut deleted = 0;
        loop {
            let n = self.inner.store.prune(before, BATCH).await?;
            deleted += n;
            if n < BATCH {
                return Ok(deleted);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Keeps finished tasks for `retention`: prunes now, then every minute (every quarter of a
    /// shorter retention, at least every second), until the queue stops.
    pub fn keep_finished_for(&self, retention: Duration) {
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let this = self.clone();
        let stop = self.inner.shutdown.clone();
        self.inner.background.spawn(async move {
            loop {
                match this.prune(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "finished tasks past their retention removed"),
                    Err(e) => tracing::warn!(error = %e, "removing finished tasks past their retention failed"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Accepts tasks of each of `types` from now on, served or not: until a handler or worker
    /// serves a type, its tasks wait. Their defaults apply where a submit leaves a field out.
    pub fn declare(&self, types: &BTreeMap<String, TaskType>) -> Result<(), TaskError> {
        for name in types.keys() {
            crate::tasks::model::validate_task_type(name)?;
        }
        for name in types.keys() {
            self.inner.metrics.know_task_type(name);
        }
        crate::util::write(&self.inner.declared).extend(types.clone());
        Ok(())
    }

    /// Stops serving `task_type`: new submits of it are refused unless it is declared, queued
    /// ones wait for a handler to come back.
    pub fn unregister(&self, task_type: &str) {
        crate::util::write(&self.inner.handlers).remove(task_type);
        self.inner.wake.notify_one();
    }

    pub fn task_types(&self) -> Vec<String> {
        crate::util::read(&self.inner.handlers)
            .keys()
            .cloned()
            .collect()
    }

    /// Every state change from now on; events never carry the input payload.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskRecord>> {
        self.inner.events.subscribe()
    }

    fn emit(&self, record: &TaskRecord) {
        let record = Arc::new(record.status_copy());
        if record.state.is_final() {
            let waiting = lock(&self.inner.waiters).remove(&record.task.task_id);
            for waiter in waiting.into_iter().flatten() {
                let _ = waiter.send(Arc::clone(&record));
            }
        }
        let _ = self.inner.events.send(record);
    }

    /// Queues a task; returns it (without its payload when it started at once) and whether it is
    /// new (`false`: an identical resubmission). A task whose type has a free slot and no ready
    /// task ahead of it starts at once.
    pub async fn submit(&self, task: NewTask) -> Result<(TaskRecord, bool), TaskError> {
        let mut task = task;
        task.validate()?;
        crate::tasks::spans::on_submit(&mut task);
        let declared = crate::util::read(&self.inner.declared)
            .get(&task.task_type)
            .cloned();
        if let Some(defaults) = &declared {
            task.timeout = task.timeout.or(defaults.timeout);
            if task.max_retries == 0 {
                task.max_retries = defaults.max_retries.unwrap_or(0);
            }
        }
        let served = crate::util::read(&self.inner.handlers)
            .get(&task.task_type)
            .map(|r| (Arc::clone(&r.handler), Arc::clone(&r.slots)));
        if served.is_none() && declared.is_none() && !self.served_elsewhere(&task.task_type).await?
        {
            let list = |names: Vec<String>| {
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            };
            return Err(TaskError::UnknownType {
                task_type: task.task_type,
                served: list(self.task_types()),
                declared: list(
                    crate::util::read(&self.inner.declared)
                        .keys()
                        .cloned()
                        .collect(),
                ),
            });
        }
        if task.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(TaskError::Invalid {
                field: "payload",
                message: format!(
                    "is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
                    task.payload.len()
                ),
            });
        }
        // A declared type nobody serves yet: its tasks wait, PENDING. Once the queue stops,
        // nothing starts here.
        let permit = served
            .as_ref()
            .filter(|_| !self.inner.shutdown.is_cancelled())
            .and_then(|(_, slots)| Arc::clone(slots).try_acquire_owned().ok());
        let _starting = permit.as_ref().map(|_| self.inner.claimers.token());
        let (record, created) = self.inner.store.submit(task, permit.is_some()).await?;
        if !created {
            return Ok((record, false));
        }
        self.inner
            .metrics
            .tasks_submitted
            .with_label_values(&[&record.task.task_type])
            .inc();
        match (permit, served) {
            (Some(permit), Some((handler, _))) if record.state == TaskState::Running => {
                let status = record.status_copy();
                // Watchers see the same PENDING, RUNNING sequence as for a dispatched task.
                self.emit(&TaskRecord {
                    state: TaskState::Pending,
                    attempt: 0,
                    started_at_ms: None,
                    ..status.clone()
                });
                let this = self.clone();
                // The handler takes the payload; the caller's answer does without it.
                self.inner.background.spawn(
                    self.inner
                        .claimers
                        .track_future(async move { this.run(record, handler, permit).await }),
                );
                Ok((status, true))
            }
            _ => {
                self.emit(&record);
                self.inner.wake.notify_one();
                Ok((record, true))
            }
        }
    }

    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, TaskError> {
        self.inner
            .store
            .get(task_id)
            .await?
            .ok_or_else(|| TaskError::NotFound {
                task_id: task_id.to_string(),
            })
    }

    /// A task with its input payload, to run it again.
    pub async fn get_with_payload(&self, task_id: &str) -> Result<TaskRecord, TaskError> {
        self.inner
            .store
            .get_with_payload(task_id)
            .await?
            .ok_or_else(|| TaskError::NotFound {
                task_id: task_id.to_string(),
            })
    }

    pub async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, TaskError> {
        self.inner.store.list(filter).await
    }

    /// Cancels a PENDING task at once and a RUNNING one by cancelling its handler. Returns the
    /// task and whether this call cancelled it (`false`: it had already finished).
    pub async fn cancel(&self, task_id: &str) -> Result<(TaskRecord, bool), TaskError> {
        let before = self.get(task_id).await?;
        if before.state.is_final() {
            return Ok((before, false));
        }
        let record = self.inner.store.cancel(task_id).await?;
        let cancelled = record.state == TaskState::Cancelled && !before.state.is_final();
        if cancelled {
            if let Some(token) = lock(&self.inner.running).remove(task_id) {
                token.cancel();
            }
            self.inner
                .metrics
                .tasks_cancelled
                .with_label_values(&[&record.task.task_type])
                .inc();
            self.emit(&record);
        }
        Ok((record, cancelled))
    }

    /// Waits until the task reaches a final state (COMPLETED, FAILED or CANCELLED).
    pub async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskRecord>, TaskError> {
        // Registered before the current state is read, so no change falls between the two.
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(task_id.to_string())
            .or_default()
            .push(tx);
        let _forget = ForgetWaiter {
            queue: self,
            task_id,
        };
        let wait = async {
            let current = self.get(task_id).await?;
            if current.state.is_final() {
                return Ok(current);
            }
            match rx.await {
                Ok(record) => Ok(record.status_copy()),
                // The queue is gone: report what the store says.
                Err(_) => self.get(task_id).await,
            }
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, wait).await.ok().transpose(),
            None => wait.await.map(Some),
        }
    }

    /// Tasks waiting or running, by type and state: (type, state, count).
    pub async fn depth(&self) -> Result<Vec<(String, TaskState, i64)>, TaskError> {
        self.inner.store.depth().await
    }

    /// The stack's Prometheus metrics, which the queue and what serves it count into.
    pub fn instruments(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub async fn metrics(&self) -> Result<QueueMetrics, TaskError> {
        let by_state = self.inner.store.counts();
        let m = &self.inner.metrics;
        Ok(QueueMetrics {
            running: lock(&self.inner.running).len() as u64,
            by_state,
            submitted: total(&m.tasks_submitted),
            completed: total(&m.tasks_completed),
            failed: total(&m.tasks_failed),
            cancelled: total(&m.tasks_cancelled),
            uptime: self.inner.started.elapsed(),
            task_types: self.task_types(),
        })
    }

    async fn dispatch(self) {
        // Safety net for retries whose backoff ends while nothing else wakes the dispatcher.
        const IDLE_CHECK: Duration = Duration::from_millis(500);
        let mut announced = None;
        while !self.inner.shutdown.is_cancelled() {
            self.announce(&mut announced).await;
            let free: Vec<(String, Arc<dyn Handler>, Arc<Semaphore>)> =
                crate::util::read(&self.inner.handlers)
                    .iter()
                    .filter(|(_, r)| r.slots.available_permits() > 0)
                    .map(|(t, r)| (t.clone(), Arc::clone(&r.handler), Arc::clone(&r.slots)))
                    .collect();
            // Slots first, then claims: a submit may take a slot meanwhile, and a claimed task
            // must never be left without one.
            let mut claimed_any = false;
            let free: Vec<_> = free
                .into_iter()
                .map(|(task_type, handler, slots)| {
                    let permits: Vec<OwnedSemaphorePermit> =
                        std::iter::from_fn(|| Arc::clone(&slots).try_acquire_owned().ok())
                            .take(1024)
                            .collect();
                    (task_type, handler, permits)
                })
                .filter(|(_, _, permits)| !permits.is_empty())
                .collect();
            let claims = free
                .iter()
                .map(|(task_type, _, permits)| self.inner.store.claim(task_type, permits.len()));
            let results = futures_util::future::join_all(claims).await;
            let mut idle_types = Vec::new();
            for ((task_type, handler, mut permits), result) in free.into_iter().zip(results) {
                idle_types.push(task_type);
                match result {
                    Ok(tasks) => {
                        for (task, permit) in tasks.into_iter().zip(permits.drain(..)) {
                            claimed_any = true;
                            let this = self.clone();
                            let handler = Arc::clone(&handler);
                            self.inner
                                .background
                                .spawn(self.inner.claimers.track_future(async move {
                                    this.run(task, handler, permit).await
                                }));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "claiming tasks failed"),
                }
            }
            if claimed_any {
                continue;
            }
            // Only types with a free slot matter: a slot freed later wakes the dispatcher.
            let next_ready = if idle_types.is_empty() {
                None
            } else {
                self.inner
                    .store
                    .next_ready_ms(idle_types)
                    .await
                    .ok()
                    .flatten()
            };
            let sleep = match next_ready {
                Some(at) => Duration::from_millis((at - now_ms()).clamp(1, 500) as u64),
                None => IDLE_CHECK,
            };
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn run(
        &self,
        mut task: TaskRecord,
        handler: Arc<dyn Handler>,
        permit: OwnedSemaphorePermit,
    ) {
        let task_id = task.task.task_id.clone();
        let attempt = task.attempt;
        let span = crate::tasks::spans::on_run(&mut task.task, attempt);
        let token = self.inner.shutdown.child_token();
        lock(&self.inner.running).insert(task_id.clone(), token.clone());
        let task_type = task.task.task_type.clone();
        let m = &self.inner.metrics;
        m.tasks_started.with_label_values(&[&task_type]).inc();
        if let (1, Some(started)) = (attempt, task.started_at_ms) {
            m.task_wait_seconds
                .with_label_values(&[&task_type])
                .observe((started - task.created_at_ms).max(0) as f64 / 1000.0);
        }
        let began = Instant::now();
        self.emit(&task);
        let timeout = task.task.timeout;
        let work = handler.run(task);
        let outcome = tokio::select! {
            _ = token.cancelled() => None,
            result = async {
                match timeout {
                    Some(t) => tokio::time::timeout(t, work)
                        .await
                        .unwrap_or_else(|_| Err(HandlerError::Failed(format!("timed out after {t:?}")))),
                    None => work.await,
                }
            } => Some(result),
        };
        lock(&self.inner.running).remove(&task_id);
        drop(permit);
        self.inner.wake.notify_one();
        let Some(result) = outcome else {
            if let Some(span) = span {
                span.end(Some("cancelled"));
            }
            return;
        };
        if let Some(span) = span {
            match &result {
                Ok(_) => span.end(None),
                Err(
                    HandlerError::Failed(e) | HandlerError::Lost(e) | HandlerError::Unserved(e),
                ) => span.end(Some(e)),
            }
        }
        let ran = began.elapsed().as_secs_f64();
        let outcome = match result {
            Ok(bytes) => Outcome::Completed(bytes),
            Err(HandlerError::Failed(error)) => Outcome::Failed(error),
            Err(HandlerError::Lost(reason)) => {
                m.lease_expiries.with_label_values(&[&task_type]).inc();
                tracing::warn!(
                    task_id,
                    attempt,
                    "{reason}; the task goes back to the queue"
                );
                Outcome::Lost(reason)
            }
            Err(HandlerError::Unserved(reason)) => Outcome::Requeue(reason),
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        // A store that cannot be reached (a database restarting) is asked again until it
        // answers: the result is kept, and the fence makes a repeat harmless.
        let mut pause = Duration::from_millis(100);
        let recorded = loop {
            match self
                .inner
                .store
                .finish(&task_id, attempt, outcome.clone())
                .await
            {
                Err(e @ TaskError::Store { .. }) if !self.inner.shutdown.is_cancelled() => {
                    tracing::warn!(task_id, error = %e, "recording a task's result failed; trying again");
                    tokio::select! {
                        () = self.inner.shutdown.cancelled() => {}
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => break other,
            }
        };
        match recorded {
            Ok(Some(record)) => {
                let counted = match record.state {
                    TaskState::Completed => Some(&m.tasks_completed),
                    TaskState::Failed => Some(&m.tasks_failed),
                    // A failed attempt with retries left.
                    TaskState::Pending if failed => Some(&m.tasks_retried),
                    _ => None,
                };
                if let Some(counter) = counted {
                    counter.with_label_values(&[&task_type]).inc();
                    m.task_run_seconds
                        .with_label_values(&[&task_type])
                        .observe(ran);
                }
                self.emit(&record);
            }
            Ok(None) => tracing::debug!(task_id, attempt, "stale result ignored"),
            Err(e) => tracing::error!(task_id, error = %e, "recording a task's result failed"),
        }
    }
}

/// A counter's sum over all its labels.
fn total(counter: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::handlers::{Builtin, HandlerFuture};

    /// Sleeps for the payload's number of milliseconds, or fails when the payload says "fail".
    struct Sleeper;

    impl Handler for Sleeper {
        fn run(&self, task: TaskRecord) -> HandlerFuture {
            crate::tasks::handlers::boxed(async move {
                let text = String::from_utf8_lossy(&task.task.payload).to_string();
                if text == "fail" {
                    return Err("asked to fail".into());
                }
                let ms: u64 = text.parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(format!("slept {ms}").into_bytes())
            })
        }
    }

    fn task(id: &str, task_type: &str, payload: &str) -> NewTask {
        NewTask {
            task_id: id.into(),
            task_type: task_type.into(),
            payload: payload.as_bytes().to_vec(),
            metadata: BTreeMap::new(),
            priority: 0,
            timeout: None,
            max_retries: 0,
        }
    }

    async fn queue() -> TaskQueue {
        let q = TaskQueue::start(
            crate::tasks::store::memory(),
            Duration::from_secs(30),
            4,
            Background::default(),
            Arc::default(),
        )
        .await
        .unwrap();
        q.register("ping", Arc::new(Builtin("ping")), None);
        q.register("sleep", Arc::new(Sleeper), Some(2));
        q
    }

    #[tokio::test]
    async fn runs_builtin_and_refuses_unknown_types() {
        let q = queue().await;
        q.submit(task("p", "ping", "")).await.unwrap();
        let done = q
            .wait("p", Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (done.state, done.result.as_deref()),
            (TaskState::Completed, Some(&b"pong"[..]))
        );
        let err = q.submit(task("x", "nosuch", "")).await.unwrap_err();
        assert!(err.to_string().contains("nosuch") && err.to_string().contains("ping"));
    }

    #[tokio::test]
    async fn prune_removes_only_finished_tasks_past_the_age() {
        let q = queue().await;
        for i in 0..1200 {
            q.submit(task(&format!("p{i}"), "ping", "")).await.unwrap();
        }
        for i in 0..1200 {
            q.wait(&format!("p{i}"), Some(Duration::from_secs(10)))
                .await
                .unwrap()
                .unwrap();
        }
        q.declare(&BTreeMap::from([(
            "later".to_string(),
            TaskType::default(),
        )]))
        .unwrap();
        q.submit(task("waiting", "later", "")).await.unwrap();
        // Nothing is old enough yet.
        assert_eq!(q.prune(Duration::from_secs(3600)).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every finished one is (in batches); the pending one stays.
        assert_eq!(q.prune(Duration::from_millis(10)).await.unwrap(), 1200);
        assert!(matches!(q.get("p0").await, Err(TaskError::NotFound { .. })));
        assert_eq!(q.get("waiting").await.unwrap().state, TaskState::Pending);
        assert_eq!(q.inner.store.counts().get("COMPLETED"), None);
        assert_eq!(q.inner.store.counts().get("PENDING"), Some(&1));
    }

    #[tokio::test]
    async fn a_declared_type_waits_for_its_handler_with_its_defaults() {
        let q = queue().await;
        let types = BTreeMap::from([(
            "later".to_string(),
            TaskType {
                timeout: Some(Duration::from_millis(50)),
                max_retries: Some(2),
            },
        )]);
        q.declare(&types).unwrap();
        let (queued, created) = q.submit(task("a", "later", "")).await.unwrap();
        assert!(created && queued.state == TaskState::Pending);
        assert_eq!(queued.task.timeout, Some(Duration::from_millis(50)));
        assert_eq!(queued.task.max_retries, 2);
        // Nothing serves it: it waits.
        assert_eq!(
            q.wait("a", Some(Duration::from_millis(200))).await.unwrap(),
            None
        );
        assert_eq!(q.get("a").await.unwrap().state, TaskState::Pending);
        // An undeclared, unserved type names both lists.
        let err = q.submit(task("b", "nosuch", "")).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("served: ping, sleep") && text.contains("declared: later"),
            "{text}"
        );
        // A handler arrives: the waiting task runs.
        q.register("later", Arc::new(Builtin("echo")), None);
        let done = q
            .wait("a", Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, TaskState::Completed);
    }

    #[tokio::test]
    async fn timeout_retry_and_cancel() {
        let q = queue().await;
        let mut slow = task("slow", "sleep", "10000");
        slow.timeout = Some(Duration::from_millis(50));
        q.submit(slow).await.unwrap();
        let r = q
            .wait("slow", Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.state, TaskState::Failed);
        assert!(r.error.unwrap().contains("timed out"));

        let mut flaky = task("flaky", "sleep", "fail");
        flaky.max_retries = 1;
        q.submit(flaky).await.unwrap();
        let r = q
            .wait("flaky", Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.state, r.attempt), (TaskState::Failed, 2));

        q.submit(task("long", "sleep", "10000")).await.unwrap();
        let mut events = q.subscribe();
        while !matches!(events.recv().await, Ok(r) if r.task.task_id == "long" && r.state == TaskState::Running)
        {
        }
        let (r, cancelled) = q.cancel("long").await.unwrap();
        assert!(cancelled && r.state == TaskState::Cancelled);
        let (_, again) = q.cancel("long").await.unwrap();
        assert!(!again);
        assert_eq!(q.metrics().await.unwrap().running, 0);
    }

    #[tokio::test]
    async fn many_waiters_are_all_told_and_none_is_left_registered() {
        let q = queue().await;
        let mut gate = task("gate", "sleep", "200");
        gate.timeout = Some(Duration::from_secs(5));
        q.submit(gate).await.unwrap();
        let waits: Vec<_> = (0..200)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.wait("gate", Some(Duration::from_secs(5))).await })
            })
            .collect();
        // One that gives up first, and one for a task that does not exist.
        assert!(q
            .wait("gate", Some(Duration::from_millis(10)))
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            q.wait("nosuch", None).await,
            Err(TaskError::NotFound { .. })
        ));
        for w in waits {
            let done = w.await.unwrap().unwrap().unwrap();
            assert_eq!(done.state, TaskState::Completed);
            assert_eq!(done.result.as_deref(), Some(&b"slept 200"[..]));
        }
        assert!(lock(&q.inner.waiters).is_empty());
    }

    #[tokio::test]
    async fn concurrency_limit_per_type() {
        let q = queue().await;
        let mut events = q.subscribe();
        for i in 0..6 {
            q.submit(task(&format!("s{i}"), "sleep", "100"))
                .await
                .unwrap();
        }
        let mut running = 0i32;
        let mut peak = 0;
        let mut done = 0;
        while done < 6 {
            let r = events.recv().await.unwrap();
            match r.state {
                TaskState::Running => running += 1,
                TaskState::Completed => {
                    running -= 1;
                    done += 1;
                }
                _ => {}
            }
            peak = peak.max(running);
        }
        assert_eq!(peak, 2);
    }
}
