//! An in-memory engine for unit tests of supervision: containers are records, events are sent
//! as the Docker Engine sends them, and faults are switched on per service. Every call is
//! written to a log that tests read to check order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{
    labels, ApiErrorKind, ContainerEvent, ContainerInfo, ContainerPlan, Engine, EngineError,
    EngineInfo, ExecOutput, RunState, Usage,
};
use crate::config::spec::PullPolicy;

pub const HOST: &str = "unix:///fake/engine.sock";

/// Faults a test switches on, by service name.
#[derive(Default)]
pub struct Faults {
    /// Creating its container fails.
    pub fail_create: BTreeSet<String>,
    /// Its container exits with this code as soon as it starts.
    pub exit_on_start: BTreeMap<String, i64>,
    /// Its exec probe fails this many more times before it passes (`u32::MAX`: never passes).
    pub unready_probes: BTreeMap<String, u32>,
    /// Images that are not present and cannot be pulled.
    pub missing_images: BTreeSet<String>,
    /// Every call fails as if the Engine were gone; event streams end.
    pub unavailable: bool,
}

pub struct FakeContainer {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub state: RunState,
    pub exit_code: Option<i64>,
    pub started: u32,
    pub ports: BTreeMap<(u16, String), (String, u16)>,
}

impl FakeContainer {
    pub fn service(&self) -> &str {
        self.labels
            .get(labels::SERVICE)
            .map(String::as_str)
            .unwrap_or("")
    }

    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            id: self.id.clone(),
            labels: self.labels.clone(),
            state: self.state,
            exit_code: self.exit_code,
            engine_health: None,
            started_at: (self.state == RunState::Running)
                .then(|| format!("start {}", self.started)),
            ports: self.ports.clone(),
            restart_count: 0,
            replicas: Vec::new(),
            problem: None,
        }
    }
}

#[derive(Default)]
pub struct State {
    pub containers: BTreeMap<String, FakeContainer>,
    pub networks: BTreeSet<String>,
    pub faults: Faults,
    /// `create NAME`, `start NAME`, `stop NAME`, `remove NAME`, `exec NAME`, `network+ N`, ...
    pub log: Vec<String>,
    next_id: u64,
    next_port: u16,
}

/// What event streams carry: an event of a project, or the news that the Engine went away.
#[derive(Clone)]
enum Feed {
    Event(String, ContainerEvent),
    Gone,
}

pub struct FakeEngine {
    state: Mutex<State>,
    events: broadcast::Sender<Feed>,
}

impl Default for FakeEngine {
    fn default() -> Self {
        FakeEngine {
            state: Mutex::new(State {
                next_port: 40000,
                ..State::default()
            }),
            events: broadcast::channel(1024).0,
        }
    }
}

impl FakeEngine {
    pub fn state(&self) -> MutexGuard<'_, State> {
        crate::util::lock(&self.state)
    }

    /// The log entries that start with `prefix` (`"start "`, say), in order.
    pub fn calls(&self, prefix: &str) -> Vec<String> {
        self.state()
            .log
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The container of `service`, if it has one.
    pub fn container_of(&self, service: &str) -> Option<(String, RunState)> {
        self.state()
            .containers
            .values()
            .find(|c| c.service() == service)
            .map(|c| (c.id.clone(), c.state))
    }

    /// Puts a container in place as an earlier run would have left it.
    pub fn add_container(&self, name: &str, labels: BTreeMap<String, String>, state: RunState) {
        let mut st = self.state();
        st.next_id += 1;
        let id = format!("c{}", st.next_id);
        st.containers.insert(
            id.clone(),
            FakeContainer {
                id,
                name: name.to_string(),
                labels,
                state,
                exit_code: None,
                started: 1,
                ports: BTreeMap::new(),
            },
        );
    }

    /// The Engine goes away (every call fails, event streams end) or comes back.
    pub fn set_available(&self, available: bool) {
        self.state().faults.unavailable = !available;
        if !available {
            let _ = self.events.send(Feed::Gone);
        }
    }

    /// The service's process exits with `code`, as a crash would.
    pub fn crash(&self, service: &str, code: i64) {
        let mut st = self.state();
        let Some(c) = st
            .containers
            .values_mut()
            .find(|c| c.service() == service && c.state == RunState::Running)
        else {
            panic!("{service} has no running container");
        };
        c.state = RunState::Exited;
        c.exit_code = Some(code);
        let (id, labels) = (c.id.clone(), c.labels.clone());
        self.emit(&id, &labels, "die", Some(code));
    }

    /// Someone removes the service's container behind the core's back.
    pub fn destroy(&self, service: &str) {
        let mut st = self.state();
        let id = st
            .containers
            .values()
            .find(|c| c.service() == service)
            .map(|c| c.id.clone())
            .unwrap_or_else(|| panic!("{service} has no container"));
        let c = st.containers.remove(&id).expect("found above");
        self.emit(&id, &c.labels, "destroy", None);
    }

    fn emit(&self, id: &str, labels: &BTreeMap<String, String>, action: &str, code: Option<i64>) {
        let project = labels.get(labels::PROJECT).cloned().unwrap_or_default();
        let _ = self.events.send(Feed::Event(
            project,
            ContainerEvent {
                id: id.to_string(),
                action: action.to_string(),
                exit_code: code,
            },
        ));
    }

    fn check(&self) -> Result<MutexGuard<'_, State>, EngineError> {
        let st = self.state();
        if st.faults.unavailable {
            return Err(EngineError::Unavailable {
                host: HOST.into(),
                message: "the fake engine is switched off".into(),
            });
        }
        Ok(st)
    }

    fn not_found(id: &str) -> EngineError {
        EngineError::Api {
            context: format!("inspect container {id}"),
            message: format!("No such container: {id}"),
            kind: ApiErrorKind::NotFound,
        }
    }

    fn start_locked(&self, st: &mut State, id: &str) -> Result<(), EngineError> {
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| Self::not_found(id))?;
        if c.state == RunState::Running {
            return Ok(());
        }
        c.state = RunState::Running;
        c.exit_code = None;
        c.started += 1;
        let service = c.service().to_string();
        let (cid, labels) = (c.id.clone(), c.labels.clone());
        st.log.push(format!("start {service}"));
        self.emit(&cid, &labels, "start", None);
        if let Some(code) = st.faults.exit_on_start.get(&service).copied() {
            let c = st.containers.get_mut(id).expect("started above");
            c.state = RunState::Exited;
            c.exit_code = Some(code);
            self.emit(&cid, &labels, "die", Some(code));
        }
        Ok(())
    }
}

#[async_trait]
impl Engine for FakeEngine {
    fn host(&self) -> &str {
        HOST
    }

    async fn has_gpu_runtime(&self) -> bool {
        false
    }

    async fn ensure_image(
        &self,
        image: &str,
        _policy: PullPolicy,
        _progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(), EngineError> {
        let st = self.check()?;
        if st.faults.missing_images.contains(image) {
            return Err(EngineError::Image {
                image: image.to_string(),
                message: "it is not present locally and pulling it failed".into(),
            });
        }
        Ok(())
    }

    async fn ensure_network(&self, name: &str, _project: &str) -> Result<(), EngineError> {
        let mut st = self.check()?;
        if st.networks.insert(name.to_string()) {
            st.log.push(format!("network+ {name}"));
        }
        Ok(())
    }

    async fn remove_network(&self, name: &str) {
        let mut st = self.state();
        let in_use = !st.containers.is_empty();
        if !in_use && st.networks.remove(name) {
            st.log.push(format!("network- {name}"));
        }
    }

    async fn list_by_label(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, EngineError> {
        let st = self.check()?;
        Ok(st
            .containers
            .values()
            .filter(|c| c.labels.get(label).map(String::as_str) == Some(value))
            .map(FakeContainer::info)
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, EngineError> {
        let st = self.check()?;
        st.containers
            .get(id)
            .map(FakeContainer::info)
            .ok_or_else(|| Self::not_found(id))
    }

    async fn create_container(&self, plan: &ContainerPlan<'_>) -> Result<String, EngineError> {
        let mut st = self.check()?;
        let service = plan.spec.name.clone();
        st.log.push(format!("create {service}"));
        if st.faults.fail_create.contains(&service) {
            return Err(EngineError::Api {
                context: format!("create container {:?}", plan.name),
                message: "the fake engine refuses".into(),
                kind: ApiErrorKind::Other,
            });
        }
        if let Some(old) = st
            .containers
            .values()
            .find(|c| c.name == plan.name)
            .map(|c| c.id.clone())
        {
            st.containers.remove(&old);
        }
        st.next_id += 1;
        let id = format!("c{}", st.next_id);
        let mut ports = BTreeMap::new();
        for p in &plan.spec.ports {
            let host_port = if p.host_port == 0 {
                st.next_port += 1;
                st.next_port
            } else {
                p.host_port
            };
            ports.insert(
                (p.container_port, p.protocol.to_string()),
                (p.host_ip.clone(), host_port),
            );
        }
        let mut all_labels = plan.spec.labels.clone();
        all_labels.extend(plan.labels.clone());
        st.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                name: plan.name.to_string(),
                labels: all_labels,
                state: RunState::Created,
                exit_code: None,
                started: 0,
                ports,
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        let mut st = self.check()?;
        self.start_locked(&mut st, id)
    }

    async fn restart(&self, id: &str, _timeout: Duration) -> Result<(), EngineError> {
        let mut st = self.check()?;
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| Self::not_found(id))?;
        let was_running = c.state == RunState::Running;
        c.state = RunState::Exited;
        c.exit_code = Some(0);
        let (cid, labels) = (c.id.clone(), c.labels.clone());
        if was_running {
            self.emit(&cid, &labels, "die", Some(0));
        }
        self.start_locked(&mut st, id)
    }

    async fn stop(&self, id: &str, _timeout: Duration) {
        let Ok(mut st) = self.check() else { return };
        let Some(c) = st.containers.get_mut(id) else {
            return;
        };
        let service = c.service().to_string();
        if c.state == RunState::Running {
            c.state = RunState::Exited;
            c.exit_code = Some(143);
            let (cid, labels) = (c.id.clone(), c.labels.clone());
            self.emit(&cid, &labels, "die", Some(143));
        }
        st.log.push(format!("stop {service}"));
    }

    async fn remove_stopped(&self, id: &str) -> Result<(), EngineError> {
        let mut st = self.check()?;
        if let Some(c) = st.containers.remove(id) {
            st.log.push(format!("remove {}", c.service()));
            self.emit(id, &c.labels, "destroy", None);
        }
        Ok(())
    }

    async fn logs(&self, id: &str, _tail: usize) -> Result<String, EngineError> {
        let st = self.check()?;
        let c = st.containers.get(id).ok_or_else(|| Self::not_found(id))?;
        Ok(format!("{} says goodbye\n", c.service()))
    }

    fn log_stream(
        &self,
        id: &str,
        _follow: bool,
        _tail: usize,
        _since: i64,
    ) -> BoxStream<'static, Result<(bool, bytes::Bytes), EngineError>> {
        let line = bytes::Bytes::from(format!("{id} log\n"));
        futures_util::stream::iter([Ok((false, line))]).boxed()
    }

    async fn stats(&self, _id: &str) -> Result<Usage, EngineError> {
        drop(self.check()?);
        Ok(Usage::default())
    }

    fn container_events(
        &self,
        project: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, EngineError>> {
        if self.state().faults.unavailable {
            return futures_util::stream::empty().boxed();
        }
        let project = project.to_string();
        BroadcastStream::new(self.events.subscribe())
            .take_while(|e| std::future::ready(!matches!(e, Ok(Feed::Gone))))
            .filter_map(move |e| {
                let project = project.clone();
                async move {
                    match e {
                        Ok(Feed::Event(p, event)) if p == project => Some(Ok(event)),
                        _ => None,
                    }
                }
            })
            .boxed()
    }

    async fn engine_info(&self) -> Result<EngineInfo, EngineError> {
        drop(self.check()?);
        Ok(EngineInfo {
            version: "fake".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
        })
    }

    async fn run_once(
        &self,
        image: &str,
        _command: Option<Vec<String>>,
        _env: Vec<String>,
        _labels: HashMap<String, String>,
    ) -> Result<ExecOutput, EngineError> {
        let mut st = self.check()?;
        st.log.push(format!("run {image}"));
        Ok(ExecOutput {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    async fn exec(&self, id: &str, command: &[String]) -> Result<ExecOutput, EngineError> {
        let mut st = self.check()?;
        let c = st.containers.get(id).ok_or_else(|| Self::not_found(id))?;
        if c.state != RunState::Running {
            return Err(EngineError::Api {
                context: format!("exec in container {id}"),
                message: format!("container {id} is not running"),
                kind: ApiErrorKind::Conflict,
            });
        }
        let service = c.service().to_string();
        st.log.push(format!("exec {service}"));
        let unready = st.faults.unready_probes.get(&service).copied().unwrap_or(0);
        if unready > 0 {
            if unready != u32::MAX {
                st.faults
                    .unready_probes
                    .insert(service.clone(), unready - 1);
            }
            return Ok(ExecOutput {
                exit_code: 1,
                stdout: String::new(),
                stderr: format!("{service} is not ready ({})", command.join(" ")),
            });
        }
        Ok(ExecOutput {
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
        })
    }
}
