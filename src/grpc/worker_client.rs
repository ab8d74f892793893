//! The worker side of the orchestrator's `Work` stream: serves task types with local handlers
//! for an orchestrator in another process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::grpc::auth::AuthChannel;
use crate::grpc::workers::LEASE;
use crate::grpc::{convert, pb};
use crate::tasks::handlers::{Handler, HandlerError};
use crate::util::{lock, Background};

type Handlers = Arc<Mutex<BTreeMap<String, Arc<dyn Handler>>>>;
type Running = Arc<Mutex<HashMap<(String, u32), CancellationToken>>>;

pub struct WorkerClient {
    handlers: Handlers,
    outbox: mpsc::UnboundedSender<pb::WorkerMessage>,
    name: String,
    capacity: u32,
    /// Owns the stream's reader and every handler run; stopping it ends the stream.
    background: Background,
    /// The latest hello sent, and the latest the orchestrator confirmed (`u64::MAX` once the
    /// stream is gone, so that nobody waits for a confirmation that cannot come).
    sent: AtomicU64,
    confirmed: watch::Sender<u64>,
}

impl WorkerClient {
    /// Opens the stream; tasks arrive once `serve` has named a type.
    pub async fn connect(
        channel: AuthChannel,
        name: String,
        capacity: u32,
    ) -> Result<WorkerClient, tonic::Status> {
        let (outbox, requests) = mpsc::unbounded_channel();
        let client = WorkerClient {
            handlers: Arc::new(Mutex::new(BTreeMap::new())),
            outbox,
            name,
            capacity,
            background: Background::default(),
            sent: AtomicU64::new(0),
            confirmed: watch::Sender::new(0),
        };
        client.hello();
        let mut grpc = pb::orchestrator_service_client::OrchestratorServiceClient::new(channel)
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
        // The request stream ends when the worker stops, even while handler runs still hold
        // a sender: that is how the orchestrator learns to requeue their tasks.
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(requests)
            .take_until(client.background.token().cancelled_owned());
        let inbound = grpc.work(requests).await?.into_inner();
        client.background.spawn(serve_loop(
            inbound,
            Arc::clone(&client.handlers),
            client.outbox.clone(),
            client.background.clone(),
            client.confirmed.clone(),
        ));
        Ok(client)
    }

    fn hello(&self) {
        let task_types = lock(&self.handlers).keys().cloned().collect();
        let generation = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.outbox.send(pb::WorkerMessage {
            message: Some(pb::worker_message::Message::Hello(pb::WorkerHello {
                task_types,
                concurrency: self.capacity,
                name: self.name.clone(),
                generation,
            })),
        });
    }

    /// Waits until the orchestrator serves every type handed to `serve` so far.
    pub async fn ready(&self) {
        let sent = self.sent.load(Ordering::SeqCst);
        let _ = self
            .confirmed
            .subscribe()
            .wait_for(|confirmed| *confirmed >= sent)
            .await;
    }

    /// Serves `task_type` with `handler` from now on.
    pub fn serve(&self, task_type: &str, handler: Arc<dyn Handler>) {
        lock(&self.handlers).insert(task_type.to_string(), handler);
        self.hello();
    }

    /// Ends the stream (the orchestrator puts unfinished tasks back in its queue) and waits
    /// until the reader and every handler run have ended.
    pub async fn close(&self) {
        self.background.stop().await;
    }
}

impl Drop for WorkerClient {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

async fn serve_loop(
    mut inbound: tonic::Streaming<pb::WorkAssignment>,
    handlers: Handlers,
    outbox: mpsc::UnboundedSender<pb::WorkerMessage>,
    background: Background,
    confirmed: watch::Sender<u64>,
) {
    let stop = background.token();
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    let mut heartbeat = tokio::time::interval(LEASE / 3);
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            _ = heartbeat.tick() => {
                let _ = outbox.send(pb::WorkerMessage {
                    message: Some(pb::worker_message::Message::Heartbeat(pb::Heartbeat {})),
                });
                continue;
            }
            m = inbound.message() => m,
        };
        let assignment = match message {
            Ok(Some(a)) => a.assignment,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e.message(), "the orchestrator ended the worker stream");
                break;
            }
        };
        match assignment {
            Some(pb::work_assignment::Assignment::Task(lease)) => {
                let key = (lease.task_id.clone(), lease.attempt);
                let handler = lock(&handlers).get(&lease.task_type).cloned();
                let token = background.token();
                lock(&running).insert(key.clone(), token.clone());
                let outbox = outbox.clone();
                let running = Arc::clone(&running);
                let task = convert::leased_task(lease);
                background.spawn(async move {
                    let result = match handler {
                        Some(h) => {
                            tokio::select! {
                                () = token.cancelled() => None,
                                r = h.run(task) => Some(r),
                            }
                        }
                        None => Some(Err(HandlerError::Failed(
                            "this worker does not serve the task's type".into(),
                        ))),
                    };
                    lock(&running).remove(&key);
                    let Some(result) = result else { return };
                    let (success, result_payload, error) = match result {
                        Ok(bytes) => (true, bytes, String::new()),
                        Err(
                            HandlerError::Failed(e)
                            | HandlerError::Lost(e)
                            | HandlerError::Unserved(e),
                        ) => (false, Vec::new(), e),
                    };
                    let _ = outbox.send(pb::WorkerMessage {
                        message: Some(pb::worker_message::Message::Result(pb::WorkResult {
                            task_id: key.0,
                            attempt: key.1,
                            success,
                            result_payload,
                            error,
                        })),
                    });
                });
            }
            Some(pb::work_assignment::Assignment::Registered(r)) => {
                confirmed.send_if_modified(|c| {
                    let newer = r.generation > *c;
                    if newer {
                        *c = r.generation;
                    }
                    newer
                });
            }
            Some(pb::work_assignment::Assignment::Cancel(c)) => {
                if let Some(token) = lock(&running).remove(&(c.task_id, c.attempt)) {
                    token.cancel();
                }
            }
            None => {}
        }
    }
    confirmed.send_replace(u64::MAX);
    // Gone or told to stop: whatever still runs has no one to report to.
    for (_, token) in lock(&running).drain() {
        token.cancel();
    }
}
