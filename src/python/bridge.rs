//! The bridge between the core and the event loop that entered the stack.
//!
//! Crossing from a Rust thread into asyncio costs a wake-up of the loop per crossing. Instead of
//! one crossing per task (and one per submit), the core queues messages here and a single pump
//! task on the loop (`AgentInfra._pump`) takes them in batches: handler runs to start, handler
//! runs to cancel, and submits that finished. Handlers report back with a plain call on the loop
//! thread (`Core.complete`), which needs no wake-up at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tokio::sync::{mpsc, oneshot};

use crate::tasks::handlers::{Handler, HandlerFuture};
use crate::tasks::model::{TaskError, TaskRecord};

use super::lock;
use super::tasks::{py_task, SubmitResponse, TaskInfo};

/// Most messages handed to the pump at once.
const MAX_BATCH: usize = 4096;

/// The result payload, or the error text that fails the attempt.
pub type HandlerResult = Result<Vec<u8>, String>;

pub enum Message {
    /// Start the handler of `record.task.task_type`; report with `complete(token, ...)`.
    Run { token: u64, record: TaskRecord },
    /// The core stopped waiting for run `token` (timeout, cancel, shutdown): cancel it.
    Cancel { token: u64 },
    /// The call behind `token` (a submit, a wait) has its answer.
    Reply {
        token: u64,
        result: Result<Reply, CallError>,
    },
}

/// Why a submit or a wait failed: in this process's queue, or at a remote orchestrator.
pub enum CallError {
    Task(TaskError),
    Rpc(tonic::Status),
}

impl From<TaskError> for CallError {
    fn from(e: TaskError) -> Self {
        CallError::Task(e)
    }
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError::Rpc(s)
    }
}

pub enum Reply {
    Submitted(SubmitResponse),
    /// The waited-for task reached a final state; `None` when the wait timed out.
    Finished(Option<TaskInfo>),
}

pub struct Bridge {
    tx: mpsc::UnboundedSender<Message>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    next_token: AtomicU64,
    running: Mutex<HashMap<u64, oneshot::Sender<HandlerResult>>>,
}

impl Bridge {
    pub fn new() -> Arc<Bridge> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Bridge {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            next_token: AtomicU64::new(1),
            running: Mutex::new(HashMap::new()),
        })
    }

    pub fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    pub fn send(&self, message: Message) {
        // The receiver lives as long as the bridge.
        let _ = self.tx.send(message);
    }

    /// Waits for at least one message, then takes what else is queued.
    pub async fn next_batch(&self) -> Vec<Message> {
        let mut rx = self.rx.lock().await;
        let mut batch = Vec::new();
        match rx.recv().await {
            Some(m) => batch.push(m),
            None => return batch,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        batch
    }

    /// A handler finished run `token`; a run the core stopped waiting for is ignored.
    pub fn complete(&self, token: u64, result: HandlerResult) {
        if let Some(tx) = lock(&self.running).remove(&token) {
            let _ = tx.send(result);
        }
    }
}

/// Serves a task type with a coroutine function, run by the pump on the stack's event loop.
pub struct BridgedHandler {
    pub bridge: Arc<Bridge>,
}

/// Tells the pump to cancel a run the core no longer waits for.
struct CancelOnDrop {
    bridge: Arc<Bridge>,
    token: Option<u64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            lock(&self.bridge.running).remove(&token);
            self.bridge.send(Message::Cancel { token });
        }
    }
}

impl Handler for BridgedHandler {
    fn run(&self, record: TaskRecord) -> HandlerFuture {
        let bridge = Arc::clone(&self.bridge);
        crate::tasks::handlers::boxed(async move {
            let token = bridge.token();
            let (tx, rx) = oneshot::channel();
            lock(&bridge.running).insert(token, tx);
            bridge.send(Message::Run { token, record });
            let mut guard = CancelOnDrop {
                bridge: Arc::clone(&bridge),
                token: Some(token),
            };
            let result = rx
                .await
                .unwrap_or_else(|_| Err("the event loop running the handler stopped".into()));
            guard.token = None;
            result
        })
    }
}

/// One message as the pump sees it: `("run", token, Task)`, `("cancel", token, None)`, or
/// `("reply", token, SubmitResponse | TaskInfo | None | exception)`.
pub fn to_python(py: Python<'_>, message: Message) -> PyResult<(&'static str, u64, Py<PyAny>)> {
    Ok(match message {
        Message::Run { token, record } => ("run", token, Py::new(py, py_task(&record))?.into_any()),
        Message::Cancel { token } => ("cancel", token, py.None()),
        Message::Reply { token, result } => {
            let value = match result {
                Ok(Reply::Submitted(response)) => Py::new(py, response)?.into_any(),
                Ok(Reply::Finished(Some(info))) => Py::new(py, info)?.into_any(),
                Ok(Reply::Finished(None)) => py.None(),
                Err(CallError::Task(e)) => super::tasks::task_error(e).into_value(py).into_any(),
                Err(CallError::Rpc(s)) => super::tasks::status_error(s).into_value(py).into_any(),
            };
            ("reply", token, value)
        }
    })
}
