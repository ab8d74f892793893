//! The EnvManagerService: the service stack over gRPC.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::spec::PullPolicy;
use crate::config::Config;
use crate::engine::{RunState, SharedEngine};
use crate::grpc::convert;
use crate::grpc::env_pb as pb;
use crate::services::logs::LineSplitter;
use crate::services::supervisor::{Phase, ServiceEvent, Supervisor};
use crate::tasks::store::now_ms;
use crate::util::Background;

/// The name under which the env-manager serves its own log.
pub const OWN_LOG_SERVICE: &str = "env-manager";

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct EnvManager {
    config: Arc<Config>,
    supervisor: Option<Arc<Supervisor>>,
    engine: Option<SharedEngine>,
    own_log: Option<PathBuf>,
    /// Owns the tasks behind its streams and the starts it runs.
    background: Background,
}

impl EnvManager {
    pub fn new(
        config: Arc<Config>,
        supervisor: Option<Arc<Supervisor>>,
        engine: Option<SharedEngine>,
        own_log: Option<PathBuf>,
        background: Background,
    ) -> Self {
        EnvManager {
            config,
            supervisor,
            engine,
            own_log,
            background,
        }
    }

    /// The supervisor, with `names` checked against the config (all when empty).
    fn chosen(&self, names: &[String]) -> Result<(&Arc<Supervisor>, BTreeSet<String>), Status> {
        match &self.supervisor {
            Some(s) => {
                for n in names {
                    if n.is_empty() {
                        return Err(Status::invalid_argument("services: a name is empty"));
                    }
                }
                let chosen = s.closure(names).map_err(Status::from)?;
                Ok((s, chosen))
            }
            None => Err(Status::not_found(match names.first() {
                Some(n) => format!(
                    "unknown service {n:?}: project {:?} runs no services",
                    self.config.project
                ),
                None => format!("project {:?} runs no services", self.config.project),
            })),
        }
    }

    fn one(&self, name: &str) -> Result<&Arc<Supervisor>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("service: must name a service"));
        }
        self.chosen(&[name.to_string()]).map(|(s, _)| s)
    }

    fn container_of(&self, name: &str) -> Result<String, Status> {
        let sup = self.one(name)?;
        sup.snapshot()
            .into_iter()
            .find(|s| s.name == name)
            .and_then(|s| s.container_id)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "service {name:?} has no container (it is stopped); start it first"
                ))
            })
    }

    fn engine(&self) -> Result<&SharedEngine, Status> {
        self.engine.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "project {:?} runs no services, so no Docker Engine is in use",
                self.config.project
            ))
        })
    }
}

fn update(e: &ServiceEvent) -> pb::ServiceStatusUpdate {
    pb::ServiceStatusUpdate {
        service: e.service.clone(),
        phase: convert::phase_to_pb(e.phase) as i32,
        message: e.message.clone(),
        timestamp_ms: now_ms(),
    }
}

fn health_update(service: &str, phase: Phase, message: &str) -> pb::HealthUpdate {
    pb::HealthUpdate {
        service: service.to_string(),
        phase: convert::phase_to_pb(phase) as i32,
        healthy: convert::is_healthy(phase),
        message: message.to_string(),
        timestamp_ms: now_ms(),
    }
}

fn log_line(service: &str, stderr: bool, line: String) -> pb::LogLine {
    pb::LogLine {
        service: service.to_string(),
        stream: if stderr {
            pb::LogStream::Stderr
        } else {
            pb::LogStream::Stdout
        } as i32,
        line,
    }
}

/// The last `tail` lines of `path` (all when 0), then, when `follow`, what is appended to it.
fn follow_file(
    background: &Background,
    path: PathBuf,
    tail: usize,
    follow: bool,
) -> Out<pb::LogLine> {
    let (tx, rx) = mpsc::channel(256);
    background.spawn_until_stopped(async move {
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::not_found(format!(
                        "cannot read the env-manager log {}: {e}",
                        path.display()
                    ))))
                    .await;
                return;
            }
        };
        let mut offset = text.len() as u64;
        let mut split = LineSplitter::default();
        let mut lines = Vec::new();
        split.push(false, &text, &mut lines);
        let skip = if tail == 0 {
            0
        } else {
            lines.len().saturating_sub(tail)
        };
        for (_, line) in lines.drain(..).skip(skip) {
            if tx
                .send(Ok(log_line(OWN_LOG_SERVICE, false, line)))
                .await
                .is_err()
            {
                return;
            }
        }
        if !follow {
            split.finish(&mut lines);
            for (_, line) in lines {
                let _ = tx.send(Ok(log_line(OWN_LOG_SERVICE, false, line))).await;
            }
            return;
        }
        // A log file has no change notification without platform APIs; a short poll is cheap.
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let Ok(data) = tokio::fs::read(&path).await else {
                return;
            };
            let len = data.len() as u64;
            if len < offset {
                offset = 0;
            }
            split.push(false, &data[offset as usize..], &mut lines);
            offset = len;
            for (_, line) in lines.drain(..) {
                if tx
                    .send(Ok(log_line(OWN_LOG_SERVICE, false, line)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn read_meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// GPUs as `nvidia-smi` reports them; none when it is absent.
fn nvidia_gpus() -> Vec<pb::Gpu> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total,memory.used,utilization.gpu",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(output) = output else {
        return Vec::new();
    };
    parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout))
}

fn parse_nvidia_smi(text: &str) -> Vec<pb::Gpu> {
    const MIB: u64 = 1024 * 1024;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 5 {
                return None;
            }
            Some(pb::Gpu {
                index: f[0].parse().ok()?,
                name: f[1].to_string(),
                memory_total_bytes: f[2].parse::<u64>().ok()? * MIB,
                memory_used_bytes: f[3].parse::<u64>().ok()? * MIB,
                utilization_percent: f[4].parse().unwrap_or(0),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl pb::env_manager_service_server::EnvManagerService for EnvManager {
    type StartServicesStream = Out<pb::ServiceStatusUpdate>;

    async fn start_services(
        &self,
        request: Request<pb::StartServicesRequest>,
    ) -> Result<Response<Self::StartServicesStream>, Status> {
        let names = request.into_inner().services;
        if self.supervisor.is_none() && names.is_empty() {
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        }
        let (sup, chosen) = self.chosen(&names)?;
        let mut events = sup.subscribe();
        // The start runs on its own, so a client that goes away does not stop it half-way.
        let starter = Arc::clone(sup);
        let cancel = self.background.token();
        let mut start = self
            .background
            .spawn(async move { starter.start_services(&names, cancel).await });
        let (tx, rx) = mpsc::channel(256);
        self.background.spawn_until_stopped(async move {
            let forward = |e: &ServiceEvent| chosen.contains(&e.service).then(|| update(e));
            let result = loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(e) => {
                            if let Some(u) = forward(&e) {
                                if tx.send(Ok(u)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break (&mut start).await,
                    },
                    joined = &mut start => break joined,
                }
            };
            while let Ok(e) = events.try_recv() {
                if let Some(u) = forward(&e) {
                    let _ = tx.send(Ok(u)).await;
                }
            }
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("the start stopped: {e}"))))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stop_services(
        &self,
        request: Request<pb::StopServicesRequest>,
    ) -> Result<Response<pb::StopServicesResponse>, Status> {
        let r = request.into_inner();
        if self.supervisor.is_none() && r.services.is_empty() {
            return Ok(Response::new(pb::StopServicesResponse::default()));
        }
        let (sup, _) = self.chosen(&r.services)?;
        let named: BTreeSet<&String> = r.services.iter().collect();
        // Dependents first, as the stop goes (the snapshot is in start order).
        let stopped: Vec<String> = sup
            .snapshot()
            .into_iter()
            .rev()
            .filter(|s| s.container_id.is_some() && (named.is_empty() || named.contains(&s.name)))
            .map(|s| s.name)
            .collect();
        let timeout =
            (r.timeout_seconds > 0).then(|| Duration::from_secs(r.timeout_seconds.into()));
        sup.stop_services(&r.services, timeout).await;
        Ok(Response::new(pb::StopServicesResponse { stopped }))
    }

    async fn restart_service(
        &self,
        request: Request<pb::RestartServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = request.into_inner().service;
        let sup = self.one(&name)?;
        sup.restart(&name).await.map_err(Status::from)?;
        let state = sup
            .snapshot()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Status::not_found(format!("unknown service {name:?}")))?;
        Ok(Response::new(convert::service_status(state)))
    }

    async fn get_services_status(
        &self,
        request: Request<pb::GetServicesStatusRequest>,
    ) -> Result<Response<pb::ServicesStatusResponse>, Status> {
        let include_stats = request.into_inner().include_stats;
        let mut response = pb::ServicesStatusResponse {
            project: self.config.project.clone(),
            engine_reachable: true,
            ..Default::default()
        };
        let Some(sup) = &self.supervisor else {
            return Ok(Response::new(response));
        };
        let states = match sup.refresh().await {
            Ok(states) => states,
            Err(e) => {
                response.engine_reachable = false;
                response.engine_error = e.to_string();
                sup.snapshot()
            }
        };
        let mut services: Vec<pb::ServiceStatus> = Vec::with_capacity(states.len());
        let mut stats = tokio::task::JoinSet::new();
        for (i, s) in states.into_iter().enumerate() {
            if let (true, true, Some(id), Some(engine)) = (
                include_stats,
                response.engine_reachable,
                s.container_id.clone(),
                self.engine.clone(),
            ) {
                if s.engine_state == Some(RunState::Running) {
                    stats.spawn(async move { (i, engine.stats(&id).await) });
                }
            }
            services.push(convert::service_status(s));
        }
        while let Some(joined) = stats.join_next().await {
            if let Ok((i, Ok(u))) = joined {
                services[i].usage = Some(pb::ResourceUsage {
                    cpu_percent: u.cpu_percent,
                    memory_bytes: u.memory_bytes,
                    memory_limit_bytes: u.memory_limit_bytes,
                    network_rx_bytes: u.network_rx_bytes,
                    network_tx_bytes: u.network_tx_bytes,
                });
            }
        }
        response.services = services;
        Ok(Response::new(response))
    }

    type StreamHealthStream = Out<pb::HealthUpdate>;

    async fn stream_health(
        &self,
        request: Request<pb::StreamHealthRequest>,
    ) -> Result<Response<Self::StreamHealthStream>, Status> {
        let names = request.into_inner().services;
        let Some(sup) = &self.supervisor else {
            if let Some(n) = names.first() {
                return Err(Status::not_found(format!(
                    "unknown service {n:?}: project {:?} runs no services",
                    self.config.project
                )));
            }
            return Ok(Response::new(Box::pin(tokio_stream::pending())));
        };
        for n in &names {
            sup.closure(std::slice::from_ref(n)).map_err(Status::from)?;
        }
        let wanted: BTreeSet<String> = names.into_iter().collect();
        let keep = move |name: &str| wanted.is_empty() || wanted.contains(name);
        // Subscribe before the snapshot so that no change falls between the two.
        let events = tokio_stream::wrappers::BroadcastStream::new(sup.subscribe());
        let current: Vec<Result<pb::HealthUpdate, Status>> = sup
            .snapshot()
            .into_iter()
            .filter(|s| keep(&s.name))
            .map(|s| Ok(health_update(&s.name, s.phase, &s.message)))
            .collect();
        let live = events.filter_map(move |event| {
            let item = match event {
                // Pull progress lines are not health changes.
                Ok(e) if e.phase == Phase::Pulling && !e.message.starts_with("ensuring") => None,
                Ok(e) if keep(&e.service) => {
                    Some(Ok(health_update(&e.service, e.phase, &e.message)))
                }
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::data_loss(format!(
                        "this stream fell behind and missed {n} changes; reopen it"
                    ))))
                }
            };
            std::future::ready(item)
        });
        Ok(Response::new(Box::pin(
            tokio_stream::iter(current).chain(live),
        )))
    }

    type StreamLogsStream = Out<pb::LogLine>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = request.into_inner();
        if r.since_seconds < 0 {
            return Err(Status::invalid_argument(format!(
                "since_seconds: {} is before 1970",
                r.since_seconds
            )));
        }
        if r.service == OWN_LOG_SERVICE {
            let path = self.own_log.clone().ok_or_else(|| {
                Status::failed_precondition(
                    "this env-manager runs inside an agent's process and keeps no log file of its own; its log goes to Python's logging",
                )
            })?;
            return Ok(Response::new(follow_file(
                &self.background,
                path,
                r.tail as usize,
                r.follow,
            )));
        }
        let mut lines = self.one(&r.service)?.log_lines(
            &r.service,
            r.follow,
            r.tail as usize,
            r.since_seconds,
        )?;
        let service = r.service;
        let (tx, rx) = mpsc::channel(256);
        self.background.spawn_until_stopped(async move {
            loop {
                let line = tokio::select! {
                    _ = tx.closed() => return,
                    l = lines.next() => l,
                };
                let sent = match line {
                    Some(Ok((stderr, line))) => tx.send(Ok(log_line(&service, stderr, line))).await,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                    None => return,
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn execute_task(
        &self,
        request: Request<pb::ExecuteTaskRequest>,
    ) -> Result<Response<pb::ExecuteTaskResponse>, Status> {
        let r = request.into_inner();
        if r.command.is_empty() || r.command[0].is_empty() {
            return Err(Status::invalid_argument(
                "command: give the program and its arguments, for example [\"redis-cli\", \"ping\"]",
            ));
        }
        let id = self.container_of(&r.service)?;
        let engine = self.engine()?;
        let run = engine.exec(&id, &r.command);
        let output = if r.timeout_seconds > 0 {
            let limit = Duration::from_secs(r.timeout_seconds.into());
            tokio::time::timeout(limit, run).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "{:?} in {} did not finish within {limit:?}",
                    r.command, r.service
                ))
            })?
        } else {
            run.await
        }
        .map_err(Status::from)?;
        Ok(Response::new(pb::ExecuteTaskResponse {
            exit_code: output.exit_code,
            stdout: output.stdout,
            stderr: output.stderr,
        }))
    }

    type PullImagesStream = Out<pb::PullProgress>;

    async fn pull_images(
        &self,
        request: Request<pb::PullImagesRequest>,
    ) -> Result<Response<Self::PullImagesStream>, Status> {
        let r = request.into_inner();
        if self.supervisor.is_none() && r.services.is_empty() {
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        }
        self.chosen(&r.services)?;
        let engine = Arc::clone(self.engine()?);
        let named: BTreeSet<&String> = r.services.iter().collect();
        let targets: Vec<(String, String)> = self
            .config
            .services
            .iter()
            .filter(|s| named.is_empty() || named.contains(&s.name))
            .map(|s| (s.name.clone(), s.image.clone()))
            .collect();
        let policy = if r.force {
            PullPolicy::Always
        } else {
            PullPolicy::Missing
        };
        let (tx, rx) = mpsc::unbounded_channel();
        for (service, image) in targets {
            let engine = Arc::clone(&engine);
            let tx = tx.clone();
            self.background.spawn_until_stopped(async move {
                let progress = |status: String| {
                    let _ = tx.send(Ok(pb::PullProgress {
                        service: service.clone(),
                        image: image.clone(),
                        status,
                        done: false,
                        error: String::new(),
                    }));
                };
                let result = engine.ensure_image(&image, policy, &progress).await;
                let _ = tx.send(Ok(pb::PullProgress {
                    service: service.clone(),
                    image: image.clone(),
                    status: if result.is_ok() { "ready" } else { "failed" }.to_string(),
                    done: true,
                    error: result.err().map(|e| e.to_string()).unwrap_or_default(),
                }));
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn get_resource_availability(
        &self,
        _request: Request<pb::GetResourceAvailabilityRequest>,
    ) -> Result<Response<pb::ResourceAvailability>, Status> {
        let (memory_total_bytes, memory_available_bytes) = read_meminfo();
        let gpus = tokio::task::spawn_blocking(nvidia_gpus)
            .await
            .unwrap_or_default();
        let mut out = pb::ResourceAvailability {
            cpu_cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_total_bytes,
            memory_available_bytes,
            gpus,
            ..Default::default()
        };
        if let Some(engine) = &self.engine {
            if let Ok(info) = engine.engine_info().await {
                out.engine_cpus = info.cpus;
                out.engine_memory_bytes = info.memory_bytes;
                out.engine_version = info.version;
            }
        }
        Ok(Response::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_per_stream_and_partial_lines_wait() {
        let mut split = LineSplitter::default();
        let mut out = Vec::new();
        split.push(false, b"one\ntw", &mut out);
        split.push(true, b"err\r\n", &mut out);
        split.push(false, b"o\nthree", &mut out);
        split.finish(&mut out);
        assert_eq!(
            out,
            vec![
                (false, "one".to_string()),
                (true, "err".to_string()),
                (false, "two".to_string()),
                (false, "three".to_string()),
            ]
        );
    }

    #[test]
    fn nvidia_smi_rows_become_gpus() {
        let gpus = parse_nvidia_smi("0, NVIDIA A100, 40960, 1024, 37\nbad line\n");
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "NVIDIA A100");
        assert_eq!(gpus[0].memory_total_bytes, 40960 * 1024 * 1024);
        assert_eq!(gpus[0].utilization_percent, 37);
    }
}
