//! The OrchestratorService: the task queue over gRPC.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::grpc::workers::{Workers, LEASE};
use crate::grpc::{convert, pb};
use crate::tasks::model::{is_traceparent, NewTask, TRACE_KEYS};
use crate::tasks::queue::TaskQueue;
use crate::tasks::store::ListFilter;
use crate::util::Background;

pub struct Orchestrator {
    queue: TaskQueue,
    project: String,
    workers: Arc<Workers>,
    /// Where this process serves the env-manager, once it does.
    env_manager_addr: Arc<OnceLock<String>>,
    /// Owns the tasks that read the workers' streams.
    background: Background,
}

impl Orchestrator {
    pub fn new(
        queue: TaskQueue,
        project: String,
        env_manager_addr: Arc<OnceLock<String>>,
        workers: Arc<Workers>,
        background: Background,
    ) -> Self {
        Orchestrator {
            workers,
            queue,
            project,
            env_manager_addr,
            background,
        }
    }
}

fn registered(generation: u64) -> pb::WorkAssignment {
    pb::WorkAssignment {
        assignment: Some(pb::work_assignment::Assignment::Registered(
            pb::Registered { generation },
        )),
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::TaskInfo, Status>> + Send>>;

#[tonic::async_trait]
impl pb::orchestrator_service_server::OrchestratorService for Orchestrator {
    async fn submit_task(
        &self,
        request: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        // The caller's trace context travels with the task, unless the task names its own.
        let header = |key: &str| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let trace = header(TRACE_KEYS[0])
            .filter(|t| is_traceparent(t))
            .map(|parent| (parent, header(TRACE_KEYS[1])));
        let r = request.into_inner();
        let mut metadata: std::collections::BTreeMap<String, String> =
            r.metadata.into_iter().collect();
        if let Some((parent, state)) = trace {
            if !metadata.contains_key(TRACE_KEYS[0]) {
                metadata.insert(TRACE_KEYS[0].into(), parent);
                if let Some(state) = state {
                    metadata.insert(TRACE_KEYS[1].into(), state);
                }
            }
        }
        let task = NewTask {
            task_id: r.task_id,
            task_type: r.task_type,
            payload: r.payload,
            metadata,
            priority: r.priority,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            max_retries: r.max_retries,
        };
        let (record, created) = self.queue.submit(task).await.map_err(Status::from)?;
        Ok(Response::new(pb::SubmitTaskResponse {
            success: true,
            status: convert::state_to_pb(record.state) as i32,
            task_id: record.task.task_id,
            error: String::new(),
            duplicate: !created,
        }))
    }

    async fn get_task_status(
        &self,
        request: Request<pb::GetTaskStatusRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        let record = self
            .queue
            .get(&request.into_inner().task_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(convert::task_info(&record)))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let (record, cancelled) = self
            .queue
            .cancel(&request.into_inner().task_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::CancelTaskResponse {
            cancelled,
            task: Some(convert::task_info(&record)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is more than 1000"
                )))
            }
        };
        let tasks = self
            .queue
            .list(ListFilter {
                state: convert::state_from_pb(r.status)?,
                task_type: Some(r.task_type).filter(|t| !t.is_empty()),
                limit,
                after: Some(r.page_token).filter(|t| !t.is_empty()),
                newest_first: false,
            })
            .await
            .map_err(Status::from)?;
        let next_page_token = if tasks.len() == limit {
            tasks
                .last()
                .map(|t| t.task.task_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(convert::task_info).collect(),
            next_page_token,
        }))
    }

    type StreamTaskResultsStream = TaskStream;

    async fn stream_task_results(
        &self,
        request: Request<pb::StreamTaskResultsRequest>,
    ) -> Result<Response<Self::StreamTaskResultsStream>, Status> {
        let r = request.into_inner();
        // Subscribe before reading current states, so no change falls between the two.
        let events = BroadcastStream::new(self.queue.subscribe());
        let ids: HashSet<String> = r.task_ids.into_iter().collect();
        let mut current = Vec::new();
        if r.include_current {
            for id in &ids {
                match self.queue.get(id).await {
                    Ok(record) => current.push(Ok(convert::task_info(&record))),
                    Err(e) => return Err(Status::from(e)),
                }
            }
        }
        let live = events.filter_map(move |event| {
            let item = match event {
                Ok(record) if ids.is_empty() || ids.contains(&record.task.task_id) => Some(Ok(convert::task_info(&record))),
                Ok(_) => None,
                // A slow reader missed changes: say so instead of pretending the stream is whole.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => Some(Err(
                    Status::data_loss(format!("this stream fell behind and missed {n} changes; reopen it with include_current")),
                )),
            };
            std::future::ready(item)
        });
        Ok(Response::new(Box::pin(
            tokio_stream::iter(current).chain(live),
        )))
    }

    async fn prune_tasks(
        &self,
        request: Request<pb::PruneTasksRequest>,
    ) -> Result<Response<pb::PruneTasksResponse>, Status> {
        let older_than = Duration::from_millis(request.into_inner().older_than_ms);
        let deleted = self.queue.prune(older_than).await.map_err(Status::from)?;
        Ok(Response::new(pb::PruneTasksResponse {
            deleted: deleted as u64,
        }))
    }

    async fn get_metrics(
        &self,
        _: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::Metrics>, Status> {
        let m = self.queue.metrics().await.map_err(Status::from)?;
        Ok(Response::new(pb::Metrics {
            tasks_by_status: m.by_state.into_iter().collect(),
            submitted: m.submitted,
            completed: m.completed,
            failed: m.failed,
            cancelled: m.cancelled,
            running: m.running,
            uptime_seconds: m.uptime.as_secs_f64(),
            task_types: m.task_types,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            healthy: true,
            version: env!("CARGO_PKG_VERSION").to_string(),
            project: self.project.clone(),
            env_manager_addr: self.env_manager_addr.get().cloned().unwrap_or_default(),
        }))
    }

    type WorkStream = Pin<Box<dyn Stream<Item = Result<pb::WorkAssignment, Status>> + Send>>;

    async fn work(
        &self,
        request: Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(LEASE, inbound.message()).await {
            Ok(Ok(Some(pb::WorkerMessage {
                message: Some(pb::worker_message::Message::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) | Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "a worker's first message must be a WorkerHello",
                ))
            }
        };
        let (types, capacity) = Workers::check_hello(&hello)?;
        let name = if hello.name.is_empty() {
            peer
        } else {
            hello.name
        };
        let (outbox, assignments) = tokio::sync::mpsc::unbounded_channel();
        let workers = Arc::clone(&self.workers);
        let id = workers.join(name, types, capacity, outbox.clone())?;
        let _ = outbox.send(Ok(registered(hello.generation)));
        self.background.spawn_until_stopped(async move {
            let reason = loop {
                let message = tokio::select! {
                    m = tokio::time::timeout(LEASE, inbound.message()) => m,
                    () = outbox.closed() => break "the worker stopped reading".to_string(),
                };
                match message {
                    Ok(Ok(Some(m))) => match m.message {
                        Some(pb::worker_message::Message::Result(r)) => workers.report(id, r),
                        Some(pb::worker_message::Message::Hello(h)) => {
                            let updated = Workers::check_hello(&h)
                                .and_then(|(types, capacity)| workers.update(id, types, capacity));
                            if let Err(e) = updated {
                                let _ = outbox.send(Err(e));
                                break "its hello was refused".to_string();
                            }
                            let _ = outbox.send(Ok(registered(h.generation)));
                        }
                        Some(pb::worker_message::Message::Heartbeat(_)) | None => {}
                    },
                    Ok(Ok(None)) => break "it disconnected".to_string(),
                    Ok(Err(e)) => break format!("its stream broke: {}", e.message()),
                    Err(_) => break format!("no heartbeat for {LEASE:?}"),
                }
            };
            workers.leave(id, &reason);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(assignments),
        )))
    }
}
