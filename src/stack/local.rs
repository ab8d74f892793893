//! The stack this process runs.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{CallError, Stack, Submitted, TaskChanges};
use crate::infra::Infra;
use crate::services::supervisor::ServiceState;
use crate::tasks::handlers::Handler;
use crate::tasks::model::{NewTask, TaskRecord};
use crate::tasks::queue::TaskQueue;

#[async_trait]
impl Stack for Infra {
    fn attached(&self) -> bool {
        false
    }

    fn orchestrator_addr(&self) -> String {
        Infra::orchestrator_addr(self).to_string()
    }

    fn env_manager_addr(&self) -> String {
        Infra::env_manager_addr(self).to_string()
    }

    fn http_addr(&self) -> Option<String> {
        Some(Infra::http_addr(self).to_string())
    }

    fn token(&self) -> Option<crate::config::Secret> {
        Infra::token(self).cloned()
    }

    fn services(&self) -> Vec<ServiceState> {
        Infra::services(self)
    }

    async fn status(&self) -> Result<Vec<ServiceState>, CallError> {
        Ok(Infra::status(self).await?)
    }

    async fn logs(&self, service: &str, tail: usize) -> Result<String, CallError> {
        Ok(Infra::logs(self, service, tail).await?)
    }

    async fn restart(&self, service: &str) -> Result<ServiceState, CallError> {
        Ok(Infra::restart(self, service).await?)
    }

    fn register_handler(&self, task_type: &str, handler: Arc<dyn Handler>) {
        Infra::register_handler(self, task_type, handler);
    }

    async fn submit(&self, task: NewTask) -> Result<Submitted, CallError> {
        let (record, created) = self.queue().submit(task).await?;
        Ok(Submitted {
            task_id: record.task.task_id,
            duplicate: !created,
        })
    }

    async fn get(&self, task_id: &str) -> Result<TaskRecord, CallError> {
        Ok(self.queue().get(task_id).await?)
    }

    async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskRecord>, CallError> {
        Ok(self.queue().wait(task_id, timeout).await?)
    }

    async fn cancel(&self, task_id: &str) -> Result<(bool, Option<TaskRecord>), CallError> {
        let (record, cancelled) = self.queue().cancel(task_id).await?;
        Ok((cancelled, Some(record)))
    }

    async fn watch(
        &self,
        task_ids: Vec<String>,
        include_current: bool,
    ) -> Result<TaskChanges, CallError> {
        let queue = self.queue().clone();
        // Subscribed before the current states are read, so no change falls between them.
        let events = queue.subscribe();
        let mut pending = VecDeque::new();
        if include_current {
            for id in &task_ids {
                pending.push_back(queue.get(id).await?);
            }
        }
        let watch = Watch {
            queue,
            events,
            ids: task_ids.into_iter().collect(),
            pending,
        };
        Ok(futures_util::stream::unfold(watch, |mut w| async move {
            let next = w.next().await?;
            Some((next, w))
        })
        .boxed())
    }

    async fn stop(&self, keep_running: bool) {
        self.shutdown(keep_running).await;
    }
}

/// A watch on the queue's state changes.
struct Watch {
    queue: TaskQueue,
    events: broadcast::Receiver<Arc<TaskRecord>>,
    ids: HashSet<String>,
    pending: VecDeque<TaskRecord>,
}

impl Watch {
    /// The next change of a watched task; `None` once the queue has stopped.
    async fn next(&mut self) -> Option<Result<TaskRecord, CallError>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(Ok(r));
            }
            match self.events.recv().await {
                Ok(r) if self.ids.is_empty() || self.ids.contains(&r.task.task_id) => {
                    return Some(Ok(r.as_ref().clone()))
                }
                Ok(_) => {}
                // Missed changes: the watched tasks' current states stand in for them.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for id in &self.ids {
                        match self.queue.get(id).await {
                            Ok(r) => self.pending.push_back(r),
                            Err(e) => return Some(Err(e.into())),
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
