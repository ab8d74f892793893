//! Task types served by workers in other processes, over the orchestrator's `Work` stream.
//!
//! Each task type a worker serves is registered with the queue under a `RemoteHandler`, which
//! leases a claimed task to the least busy worker of that type and waits for its report. A
//! worker that goes away (its stream ends or its heartbeats stop) loses its leases: their tasks
//! go back to the queue without using up a retry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tonic::Status;

use crate::grpc::pb;
use crate::tasks::handlers::{Handler, HandlerError, HandlerFuture};
use crate::tasks::model::TaskRecord;
use crate::tasks::queue::TaskQueue;

/// A worker keeps its leases while it is heard from at least this often.
pub const LEASE: Duration = Duration::from_secs(10);

/// Most tasks one worker may run at once.
const MAX_WORKER_CONCURRENCY: u32 = 10_000;

pub type Outbox = mpsc::UnboundedSender<Result<pb::WorkAssignment, Status>>;

type Lease = oneshot::Sender<Result<Vec<u8>, HandlerError>>;

struct Worker {
    name: String,
    types: BTreeSet<String>,
    capacity: usize,
    outbox: Outbox,
    leases: HashMap<(String, u32), Lease>,
}

#[derive(Default)]
struct State {
    workers: HashMap<u64, Worker>,
    /// Types registered with the queue by this registry, with their total worker capacity.
    served: BTreeMap<String, usize>,
}

/// A connected worker, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerSummary {
    pub name: String,
    pub task_types: Vec<String>,
    pub capacity: usize,
    pub running: usize,
}

pub struct Workers {
    queue: TaskQueue,
    state: Mutex<State>,
    /// Signalled when a worker joins, leaves or finishes a task.
    changed: Notify,
    next_id: AtomicU64,
}

impl Workers {
    pub fn new(queue: TaskQueue) -> Arc<Workers> {
        Arc::new(Workers {
            queue,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::util::lock(&self.state)
    }

    /// The workers connected now: name, the types they serve, how many tasks each takes at
    /// once and how many it runs.
    pub fn list(&self) -> Vec<WorkerSummary> {
        let mut found: Vec<WorkerSummary> = self
            .lock()
            .workers
            .values()
            .map(|w| WorkerSummary {
                name: w.name.clone(),
                task_types: w.types.iter().cloned().collect(),
                capacity: w.capacity,
                running: w.leases.len(),
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found
    }

    /// Checks a hello's fields.
    pub fn check_hello(hello: &pb::WorkerHello) -> Result<(BTreeSet<String>, usize), Status> {
        let mut types = BTreeSet::new();
        for t in &hello.task_types {
            crate::tasks::model::validate_task_type(t)
                .map_err(|e| Status::invalid_argument(format!("hello.{e}")))?;
            types.insert(t.clone());
        }
        if hello.concurrency > MAX_WORKER_CONCURRENCY {
            return Err(Status::invalid_argument(format!(
                "hello.concurrency: {} is more than {MAX_WORKER_CONCURRENCY}",
                hello.concurrency
            )));
        }
        Ok((types, hello.concurrency.max(1) as usize))
    }

    /// Adds a worker; refuses a type that a handler inside this process serves.
    pub fn join(
        self: &Arc<Self>,
        name: String,
        types: BTreeSet<String>,
        capacity: usize,
        outbox: Outbox,
    ) -> Result<u64, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        self.check_types(&state, &types)?;
        tracing::info!(worker = %name, types = ?types, capacity, "worker joined");
        state.workers.insert(
            id,
            Worker {
                name,
                types,
                capacity,
                outbox,
                leases: HashMap::new(),
            },
        );
        self.sync_queue(&mut state);
        drop(state);
        self.changed.notify_waiters();
        Ok(id)
    }

    /// A later hello: the worker now serves `types` with `capacity`.
    pub fn update(
        self: &Arc<Self>,
        id: u64,
        types: BTreeSet<String>,
        capacity: usize,
    ) -> Result<(), Status> {
        let mut state = self.lock();
        self.check_types(&state, &types)?;
        if let Some(w) = state.workers.get_mut(&id) {
            w.types = types;
            w.capacity = capacity;
        }
        self.sync_queue(&mut state);
        drop(state);
        self.changed.notify_waiters();
        Ok(())
    }

    fn check_types(&self, state: &State, types: &BTreeSet<String>) -> Result<(), Status> {
        let local: BTreeSet<String> = self.queue.task_types().into_iter().collect();
        match types
            .iter()
            .find(|t| local.contains(*t) && !state.served.contains_key(*t))
        {
            Some(t) => Err(Status::failed_precondition(format!(
                "task type {t:?} is served by a handler inside the orchestrator's process; a worker cannot serve it too"
            ))),
            None => Ok(()),
        }
    }

    /// Registers each served type with the queue, sized to its workers' total capacity, and
    /// unregisters types no worker serves any more (their queued tasks wait for one).
    fn sync_queue(self: &Arc<Self>, state: &mut State) {
        let mut totals: BTreeMap<String, usize> = BTreeMap::new();
        let mut connected: BTreeMap<&str, i64> = BTreeMap::new();
        for w in state.workers.values() {
            for t in &w.types {
                *totals.entry(t.clone()).or_default() += w.capacity;
                *connected.entry(t).or_default() += 1;
            }
        }
        let gauge = &self.queue.instruments().workers;
        gauge.reset();
        for (t, n) in connected {
            gauge.with_label_values(&[t]).set(n);
        }
        for t in state.served.keys() {
            if !totals.contains_key(t) {
                self.queue.unregister(t);
            }
        }
        for (t, total) in &totals {
            if state.served.get(t) != Some(total) {
                // Weak: the queue holds the handler, and this registry holds the queue.
                let handler = RemoteHandler {
                    workers: Arc::downgrade(self),
                };
                self.queue.register(t, Arc::new(handler), Some(*total));
            }
        }
        state.served = totals;
    }

    /// The worker's report of one task.
    pub fn report(&self, id: u64, r: pb::WorkResult) {
        let lease = self
            .lock()
            .workers
            .get_mut(&id)
            .and_then(|w| w.leases.remove(&(r.task_id.clone(), r.attempt)));
        match lease {
            Some(tx) => {
                let _ = tx.send(if r.success {
                    Ok(r.result_payload)
                } else {
                    Err(HandlerError::Failed(r.error))
                });
                self.changed.notify_waiters();
            }
            // Cancelled meanwhile, or a report for a lease it never had: nothing to record.
            None => {
                tracing::debug!(task_id = %r.task_id, attempt = r.attempt, "report without a lease ignored")
            }
        }
    }

    /// Removes a worker; its tasks go back to the queue.
    pub fn leave(self: &Arc<Self>, id: u64, reason: &str) {
        let mut state = self.lock();
        let Some(worker) = state.workers.remove(&id) else {
            return;
        };
        let lost = worker.leases.len();
        for (_, tx) in worker.leases {
            let _ = tx.send(Err(HandlerError::Lost(format!(
                "worker {} went away ({reason})",
                worker.name
            ))));
        }
        self.sync_queue(&mut state);
        drop(state);
        tracing::info!(worker = %worker.name, reason, lost, "worker left");
        self.changed.notify_waiters();
    }

    /// Leases `task` to the least busy worker of its type, waiting for free capacity.
    async fn lease(&self, task: TaskRecord) -> Result<Vec<u8>, HandlerError> {
        let task_type = task.task.task_type.clone();
        let key = (task.task.task_id.clone(), task.attempt);
        let (worker_id, rx) = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                let serving: Vec<(&u64, &Worker)> = state
                    .workers
                    .iter()
                    .filter(|(_, w)| w.types.contains(&task_type))
                    .collect();
                if serving.is_empty() {
                    return Err(HandlerError::Unserved(format!(
                        "no worker serves {task_type:?} any more"
                    )));
                }
                let free = serving
                    .into_iter()
                    .filter(|(_, w)| w.leases.len() < w.capacity)
                    .min_by_key(|(_, w)| w.leases.len())
                    .map(|(id, _)| *id);
                if let Some(id) = free {
                    let worker = state.workers.get_mut(&id).expect("chosen from the map");
                    let lease = pb::TaskLease {
                        task_id: task.task.task_id.clone(),
                        task_type: task_type.clone(),
                        payload: task.task.payload.clone(),
                        metadata: task.task.metadata.clone().into_iter().collect(),
                        attempt: task.attempt,
                        timeout_ms: task.task.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                        priority: task.task.priority,
                        created_at_ms: task.created_at_ms,
                        lease_ms: LEASE.as_millis() as u64,
                    };
                    let assignment = pb::WorkAssignment {
                        assignment: Some(pb::work_assignment::Assignment::Task(lease)),
                    };
                    if worker.outbox.send(Ok(assignment)).is_ok() {
                        let (tx, rx) = oneshot::channel();
                        worker.leases.insert(key.clone(), tx);
                        break (id, rx);
                    }
                }
            }
            notified.await;
        };
        let mut guard = CancelOnDrop {
            workers: self,
            worker_id,
            key: Some(key),
        };
        let result = rx.await.unwrap_or_else(|_| {
            Err(HandlerError::Lost(
                "the worker went away before it reported".into(),
            ))
        });
        guard.key = None;
        result
    }
}

/// Tells the worker to stop a task the queue no longer waits for (cancelled, timed out).
struct CancelOnDrop<'a> {
    workers: &'a Workers,
    worker_id: u64,
    key: Option<(String, u32)>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let Some((task_id, attempt)) = self.key.take() else {
            return;
        };
        let mut state = self.workers.lock();
        if let Some(w) = state.workers.get_mut(&self.worker_id) {
            if w.leases.remove(&(task_id.clone(), attempt)).is_some() {
                let cancel = pb::WorkAssignment {
                    assignment: Some(pb::work_assignment::Assignment::Cancel(pb::CancelLease {
                        task_id,
                        attempt,
                    })),
                };
                let _ = w.outbox.send(Ok(cancel));
            }
        }
        drop(state);
        self.workers.changed.notify_waiters();
    }
}

struct RemoteHandler {
    workers: Weak<Workers>,
}

impl Handler for RemoteHandler {
    fn run(&self, task: TaskRecord) -> HandlerFuture {
        let workers = self.workers.upgrade();
        Box::pin(async move {
            match workers {
                Some(w) => w.lease(task).await,
                None => Err(HandlerError::Unserved(
                    "the orchestrator is stopping".into(),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::grpc::worker_client::WorkerClient;
    use crate::tasks::handlers::boxed;
    use crate::tasks::model::{NewTask, TaskState};

    /// Answers "done by NAME", or never answers when the payload says "hang".
    struct Named(&'static str);

    impl Handler for Named {
        fn run(&self, task: TaskRecord) -> HandlerFuture {
            let name = self.0;
            boxed(async move {
                if task.task.payload == b"hang" {
                    std::future::pending::<()>().await;
                }
                Ok(format!("done by {name}").into_bytes())
            })
        }
    }

    fn task(id: &str, payload: &str) -> NewTask {
        NewTask {
            task_id: id.into(),
            task_type: "remote".into(),
            payload: payload.as_bytes().to_vec(),
            metadata: BTreeMap::new(),
            priority: 0,
            timeout: None,
            max_retries: 0,
        }
    }

    async fn wait_for(queue: &TaskQueue, id: &str, state: TaskState) -> TaskRecord {
        for _ in 0..500 {
            let r = queue.get(id).await.unwrap();
            if r.state == state {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{id} never reached {state:?}");
    }

    #[tokio::test]
    async fn a_lost_worker_puts_its_task_back_for_another() {
        let background = crate::util::Background::default();
        let queue = TaskQueue::start(
            crate::tasks::store::memory(),
            Duration::from_secs(30),
            8,
            background.clone(),
            Default::default(),
        )
        .await
        .unwrap();
        queue.register("local", Arc::new(Named("local")), None);
        let server = crate::grpc::serve_orchestrator(
            "127.0.0.1:0",
            queue.clone(),
            "p".into(),
            Arc::new(OnceLock::new()),
            Workers::new(queue.clone()),
            crate::grpc::Serving {
                guard: crate::grpc::auth::Guard::default(),
                tls: None,
                background: background.clone(),
                metrics: Arc::clone(queue.instruments()),
            },
        )
        .await
        .unwrap();
        let channel = || async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
            crate::grpc::auth::Bearer::default().channel(channel)
        };

        let first = WorkerClient::connect(channel().await, "first".into(), 1)
            .await
            .unwrap();
        // A type served inside the orchestrator's process cannot be taken over: the hello is
        // refused and the local handler keeps serving.
        first.serve("local", Arc::new(Named("first")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut local = task("l", "");
        local.task_type = "local".into();
        queue.submit(local).await.unwrap();
        let done = wait_for(&queue, "l", TaskState::Completed).await;
        assert_eq!(done.result.as_deref(), Some(&b"done by local"[..]));
        assert!(queue.submit(task("x", "")).await.is_err(), "not served yet");
        let first = WorkerClient::connect(channel().await, "first".into(), 1)
            .await
            .unwrap();
        first.serve("remote", Arc::new(Named("first")));
        first.ready().await;
        assert!(queue.task_types().contains(&"remote".to_string()));
        queue.submit(task("a", "")).await.unwrap();
        let done = wait_for(&queue, "a", TaskState::Completed).await;
        assert_eq!(done.result.as_deref(), Some(&b"done by first"[..]));

        queue.submit(task("b", "hang")).await.unwrap();
        let running = wait_for(&queue, "b", TaskState::Running).await;
        assert_eq!(running.attempt, 1);
        first.close().await;
        let back = wait_for(&queue, "b", TaskState::Pending).await;
        assert_eq!(back.attempt, 0, "a lost lease does not use up a retry");
        assert!(back.error.unwrap().contains("worker first went away"));
        // With no worker left the type is not served: new submits are refused, queued ones wait.
        while queue.task_types().contains(&"remote".to_string()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let second = WorkerClient::connect(channel().await, "second".into(), 1)
            .await
            .unwrap();
        second.serve("remote", Arc::new(Named("second")));
        let (r, cancelled) = loop {
            // The queued task is leased to the new worker, which hangs on it too: cancel it.
            let r = queue.get("b").await.unwrap();
            if r.state == TaskState::Running {
                break queue.cancel("b").await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(cancelled && r.state == TaskState::Cancelled && r.attempt == 1);
        queue.submit(task("c", "")).await.unwrap();
        let done = wait_for(&queue, "c", TaskState::Completed).await;
        assert_eq!(done.result.as_deref(), Some(&b"done by second"[..]));
        background.cancel();
        server.shutdown().await;
        background.stop().await;
        assert_eq!(background.running(), 0);
    }
}
