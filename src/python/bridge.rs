//! The bridge between the core and the event loop that uses it.
//!
//! Crossing from a Rust thread into asyncio is the expensive part of a call: the usual way takes
//! the GIL on a helper thread and schedules a callback on the loop, per call. Instead, the core
//! queues messages here and writes one byte to a socket the event loop watches
//! (`loop.add_reader`), only when the queue was empty; the loop's reader callback then takes the
//! whole batch with a plain call on its own thread: handler runs to start, handler runs to cancel,
//! and answers to calls. Handlers report back with a plain call on the loop thread
//! (`Core.complete`), which needs no wake-up at all.

use std::collections::HashMap;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use tokio::sync::oneshot;

pub use crate::stack::CallError;
use crate::tasks::handlers::{Handler, HandlerFuture};
use crate::tasks::model::TaskRecord;

use super::errors;
use super::lock;
use super::types::py_task;

/// The result payload, or the error text that fails the attempt.
pub type HandlerResult = Result<Vec<u8>, String>;

/// An answer, turned into its Python object on the loop thread.
type Value = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

pub enum Message {
    /// Start the handler of `record.task.task_type`; report with `complete(token, ...)`.
    Run { token: u64, record: TaskRecord },
    /// The core stopped waiting for run `token` (timeout, cancel, shutdown): cancel it.
    Cancel { token: u64 },
    /// The call behind `token` has its answer.
    Reply {
        token: u64,
        result: Result<Value, CallError>,
    },
}

pub struct Bridge {
    queue: Mutex<Vec<Message>>,
    /// A byte is on its way to the loop: later messages need not send another.
    signalled: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    next_token: AtomicU64,
    running: Mutex<HashMap<u64, oneshot::Sender<HandlerResult>>>,
}

impl Bridge {
    pub fn new() -> std::io::Result<Arc<Bridge>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Arc::new(Bridge {
            queue: Mutex::new(Vec::new()),
            signalled: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            next_token: AtomicU64::new(1),
            running: Mutex::new(HashMap::new()),
        }))
    }

    pub fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    pub fn send(&self, message: Message) {
        lock(&self.queue).push(message);
        if !self.signalled.swap(true, Ordering::SeqCst) {
            // A full socket buffer already holds a wake-up; nothing else can fail here.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// Runs `call` on the core's runtime; its answer comes back under the returned token.
    pub fn spawn<T, F>(self: &Arc<Self>, call: F) -> u64
    where
        F: Future<Output = Result<T, CallError>> + Send + 'static,
        T: for<'py> IntoPyObject<'py> + Send + 'static,
    {
        let token = self.token();
        let bridge = Arc::clone(self);
        crate::runtime::get().spawn(async move {
            let result = call
                .await
                .map(|value| Box::new(move |py: Python<'_>| value.into_py_any(py)) as Value);
            bridge.send(Message::Reply { token, result });
        });
        token
    }

    /// The descriptor the event loop watches for readability.
    pub fn wake_fd(&self) -> i32 {
        self.wake_rx.as_raw_fd()
    }

    /// Everything queued so far. The wake-up bytes are read before the flag is cleared: a sender
    /// that finds the flag set can then count on a byte still to be read.
    pub fn take(&self) -> Vec<Message> {
        let mut sink = [0u8; 64];
        loop {
            match (&self.wake_rx).read(&mut sink) {
                Ok(n) if n > 0 => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        self.signalled.store(false, Ordering::SeqCst);
        std::mem::take(&mut *lock(&self.queue))
    }

    /// A handler finished run `token`; a run the core stopped waiting for is ignored.
    pub fn complete(&self, token: u64, result: HandlerResult) {
        if let Some(tx) = lock(&self.running).remove(&token) {
            let _ = tx.send(result);
        }
    }
}

/// Serves a task type with a coroutine function, run on the stack's event loop.
pub struct BridgedHandler {
    pub bridge: Arc<Bridge>,
}

/// Tells the loop to cancel a run the core no longer waits for.
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

/// One message as the loop sees it: its kind (`r` run, `c` cancel, `a` answer), its token, and
/// a `Task` to run, None, or the answer (a value or an exception).
fn to_python(py: Python<'_>, message: Message) -> PyResult<(char, u64, Py<PyAny>)> {
    Ok(match message {
        Message::Run { token, record } => ('r', token, Py::new(py, py_task(record))?.into_any()),
        Message::Cancel { token } => ('c', token, py.None()),
        Message::Reply { token, result } => {
            let value = match result {
                // A failed conversion answers its own call, never the rest of the batch.
                Ok(value) => value(py).unwrap_or_else(|e| e.into_value(py).into_any()),
                Err(e) => call_error(e).into_value(py).into_any(),
            };
            ('a', token, value)
        }
    })
}

/// The exception of a failed call, built on the loop thread.
fn call_error(e: CallError) -> PyErr {
    match e {
        CallError::Task(e) => errors::task_error(e),
        CallError::Rpc(s) => errors::status_error(s),
        CallError::Infra(e) => errors::to_py_err(e),
        CallError::Attach(e) => errors::attach_error(e),
        CallError::Service { service, status } => errors::service_error(&service, status),
        CallError::Failed(message) => pyo3::exceptions::PyRuntimeError::new_err(message),
    }
}

/// A batch as the loop takes it.
pub type Batch = (String, Vec<u64>, Vec<Py<PyAny>>);

/// Everything the bridge has queued, as three columns (kinds, tokens, items) rather than a tuple
/// per message: a batch of thousands then allocates three objects, not thousands.
pub fn take_messages(py: Python<'_>, bridge: &Bridge) -> PyResult<Batch> {
    let messages = bridge.take();
    let mut batch: Batch = (
        String::with_capacity(messages.len()),
        Vec::with_capacity(messages.len()),
        Vec::with_capacity(messages.len()),
    );
    for message in messages {
        let (kind, token, item) = to_python(py, message)?;
        batch.0.push(kind);
        batch.1.push(token);
        batch.2.push(item);
    }
    Ok(batch)
}
