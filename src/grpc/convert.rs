//! Every conversion between protobuf messages and the core's own types, in both directions.

use std::time::Duration;

use tonic::Status;

use crate::engine::{Replica, RunState};
use crate::grpc::{env_pb as epb, pb as opb};
use crate::services::supervisor::{Phase, ServiceState};
use crate::tasks::model::{NewTask, TaskRecord, TaskState};
use crate::tasks::store::now_ms;

pub fn state_to_pb(s: TaskState) -> opb::TaskState {
    match s {
        TaskState::Pending => opb::TaskState::Pending,
        TaskState::Running => opb::TaskState::Running,
        TaskState::Completed => opb::TaskState::Completed,
        TaskState::Failed => opb::TaskState::Failed,
        TaskState::Cancelled => opb::TaskState::Cancelled,
    }
}

pub fn state_from_pb(value: i32) -> Result<Option<TaskState>, Status> {
    match opb::TaskState::try_from(value) {
        Ok(opb::TaskState::Unspecified) => Ok(None),
        Ok(opb::TaskState::Pending) => Ok(Some(TaskState::Pending)),
        Ok(opb::TaskState::Running) => Ok(Some(TaskState::Running)),
        Ok(opb::TaskState::Completed) => Ok(Some(TaskState::Completed)),
        Ok(opb::TaskState::Failed) => Ok(Some(TaskState::Failed)),
        Ok(opb::TaskState::Cancelled) => Ok(Some(TaskState::Cancelled)),
        Err(_) => Err(Status::invalid_argument(format!(
            "status: {value} is not a TaskState"
        ))),
    }
}

/// A task record as the orchestrator reports it.
pub fn task_info(r: &TaskRecord) -> opb::TaskInfo {
    opb::TaskInfo {
        status: state_to_pb(r.state) as i32,
        task_id: r.task.task_id.clone(),
        task_type: r.task.task_type.clone(),
        result_payload: r.result.clone().unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
        attempts: r.attempt,
        created_at_ms: r.created_at_ms,
        started_at_ms: r.started_at_ms.unwrap_or(0),
        finished_at_ms: r.finished_at_ms.unwrap_or(0),
        metadata: r
            .task
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        priority: r.task.priority,
    }
}

/// A task as another process's orchestrator reports it: its input payload, timeout and retry
/// limit are not part of the report.
pub fn task_record(i: opb::TaskInfo) -> TaskRecord {
    let state = match opb::TaskState::try_from(i.status) {
        Ok(opb::TaskState::Running) => TaskState::Running,
        Ok(opb::TaskState::Completed) => TaskState::Completed,
        Ok(opb::TaskState::Failed) => TaskState::Failed,
        Ok(opb::TaskState::Cancelled) => TaskState::Cancelled,
        Ok(opb::TaskState::Pending | opb::TaskState::Unspecified) | Err(_) => TaskState::Pending,
    };
    let when = |ms: i64| (ms > 0).then_some(ms);
    TaskRecord {
        task: NewTask {
            task_id: i.task_id,
            task_type: i.task_type,
            payload: Vec::new(),
            metadata: i.metadata.into_iter().collect(),
            priority: i.priority,
            timeout: None,
            max_retries: 0,
        },
        state,
        attempt: i.attempts,
        result: (!i.result_payload.is_empty() || state == TaskState::Completed)
            .then_some(i.result_payload),
        error: Some(i.error).filter(|e| !e.is_empty()),
        created_at_ms: i.created_at_ms,
        started_at_ms: when(i.started_at_ms),
        finished_at_ms: when(i.finished_at_ms),
    }
}

/// A task as the orchestrator leases it to a worker.
pub fn leased_task(lease: opb::TaskLease) -> TaskRecord {
    TaskRecord {
        task: NewTask {
            task_id: lease.task_id,
            task_type: lease.task_type,
            payload: lease.payload,
            metadata: lease.metadata.into_iter().collect(),
            priority: lease.priority,
            timeout: (lease.timeout_ms > 0).then(|| Duration::from_millis(lease.timeout_ms)),
            max_retries: 0,
        },
        state: TaskState::Running,
        attempt: lease.attempt,
        result: None,
        error: None,
        created_at_ms: lease.created_at_ms,
        started_at_ms: Some(now_ms()),
        finished_at_ms: None,
    }
}

/// A task to submit, as the orchestrator takes it.
pub fn submit_request(task: NewTask) -> opb::SubmitTaskRequest {
    opb::SubmitTaskRequest {
        task_id: task.task_id,
        task_type: task.task_type,
        payload: task.payload,
        metadata: task.metadata.into_iter().collect(),
        priority: task.priority,
        timeout_ms: task
            .timeout
            .map(|t| t.as_millis().max(1) as u64)
            .unwrap_or(0),
        max_retries: task.max_retries,
    }
}

pub fn phase_to_pb(p: Phase) -> epb::ServicePhase {
    match p {
        Phase::Pending => epb::ServicePhase::Pending,
        Phase::Pulling => epb::ServicePhase::Pulling,
        Phase::Creating => epb::ServicePhase::Creating,
        Phase::Waiting => epb::ServicePhase::Waiting,
        Phase::Starting => epb::ServicePhase::Starting,
        Phase::Healthy => epb::ServicePhase::Healthy,
        Phase::Completed => epb::ServicePhase::Completed,
        Phase::Failed => epb::ServicePhase::Failed,
        Phase::Stopping => epb::ServicePhase::Stopping,
        Phase::Stopped => epb::ServicePhase::Stopped,
    }
}

pub fn phase_from_pb(p: i32) -> Phase {
    match epb::ServicePhase::try_from(p) {
        Ok(epb::ServicePhase::Pulling) => Phase::Pulling,
        Ok(epb::ServicePhase::Creating) => Phase::Creating,
        Ok(epb::ServicePhase::Waiting) => Phase::Waiting,
        Ok(epb::ServicePhase::Starting) => Phase::Starting,
        Ok(epb::ServicePhase::Healthy) => Phase::Healthy,
        Ok(epb::ServicePhase::Completed) => Phase::Completed,
        Ok(epb::ServicePhase::Failed) => Phase::Failed,
        Ok(epb::ServicePhase::Stopping) => Phase::Stopping,
        Ok(epb::ServicePhase::Stopped) => Phase::Stopped,
        Ok(epb::ServicePhase::Pending | epb::ServicePhase::Unspecified) | Err(_) => Phase::Pending,
    }
}

/// A service as another process's env-manager reports it.
pub fn service_state(s: epb::ServiceStatus) -> ServiceState {
    ServiceState {
        phase: phase_from_pb(s.phase),
        container_id: Some(s.container_id).filter(|c| !c.is_empty()),
        ports: s
            .ports
            .into_iter()
            .filter_map(|p| {
                Some((
                    u16::try_from(p.container_port).ok()?,
                    (p.host_ip, u16::try_from(p.host_port).ok()?),
                ))
            })
            .collect(),
        reused: true,
        scheme: s
            .url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_string())
            .unwrap_or_else(|| "http".into()),
        engine_state: Some(s.state)
            .filter(|state| !state.is_empty())
            .map(|state| RunState::parse(&state)),
        started_at_ms: Some(s.started_at_ms).filter(|ms| *ms > 0),
        restart_count: s.restart_count,
        name: s.name,
        image: s.image,
        message: s.message,
        stand_in: s.stand_in,
        replicas: s
            .replicas
            .into_iter()
            .map(|r| Replica {
                slot: r.slot,
                task_id: r.task_id,
                node: r.node,
                node_addr: r.node_addr,
                state: r.state,
                started_at_ms: Some(r.started_at_ms).filter(|ms| *ms > 0),
                ports: r
                    .ports
                    .into_iter()
                    .filter_map(|p| {
                        Some((
                            (u16::try_from(p.container_port).ok()?, "tcp".to_string()),
                            (p.host_ip, u16::try_from(p.host_port).ok()?),
                        ))
                    })
                    .collect(),
                error: Some(r.error).filter(|e| !e.is_empty()),
            })
            .collect(),
    }
}

pub fn is_healthy(p: Phase) -> bool {
    matches!(p, Phase::Healthy | Phase::Completed)
}

/// A service as the env-manager reports it.
pub fn service_status(s: ServiceState) -> epb::ServiceStatus {
    epb::ServiceStatus {
        url: s.url().unwrap_or_default(),
        phase: phase_to_pb(s.phase) as i32,
        state: s.engine_state.map(|r| r.as_str()).unwrap_or("").to_string(),
        healthy: s.healthy(),
        container_id: s.container_id.unwrap_or_default(),
        ports: s
            .ports
            .iter()
            .map(|(c, (ip, h))| epb::PortMapping {
                container_port: u32::from(*c),
                host_ip: ip.clone(),
                host_port: u32::from(*h),
            })
            .collect(),
        started_at_ms: match s.engine_state {
            Some(RunState::Running | RunState::Paused) => s.started_at_ms.unwrap_or(0),
            _ => 0,
        },
        restart_count: s.restart_count,
        message: s.message,
        name: s.name,
        image: s.image,
        usage: None,
        stand_in: s.stand_in,
        replicas: s
            .replicas
            .into_iter()
            .map(|r| epb::Replica {
                slot: r.slot,
                task_id: r.task_id,
                node: r.node,
                node_addr: r.node_addr,
                started_at_ms: r.started_at_ms.unwrap_or(0),
                state: r.state,
                ports: r
                    .ports
                    .iter()
                    .map(|((c, _), (ip, h))| epb::PortMapping {
                        container_port: u32::from(*c),
                        host_ip: ip.clone(),
                        host_port: u32::from(*h),
                    })
                    .collect(),
                error: r.error.unwrap_or_default(),
            })
            .collect(),
    }
}
