//! Supervision against the in-memory engine: planning and reuse, dependency conditions, rollback
//! of a failed start, healing, the crash-loop guard and following the Engine through an outage.
//! Time is paused, so backoffs and start periods pass at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::LoadOptions;
use crate::engine::fake::FakeEngine;
use crate::engine::Engine;

const PROJECT: &str = "unit";

/// A service of the test stack with an exec probe (the fake answers it) and short intervals.
fn service(name: &str, extra: &str) -> String {
    service_within(name, "2s", extra)
}

fn service_within(name: &str, start_period: &str, extra: &str) -> String {
    format!(
        "[services.{name}]\nimage = \"{name}:1\"\nhealthcheck = {{ type = \"exec\", command = [\"ready\"], interval = \"10ms\", start_period = \"{start_period}\" }}\n{extra}\n"
    )
}

fn config(toml: &str, services: &[&str]) -> Arc<Config> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dspy-agent.toml"),
        format!("project = \"{PROJECT}\"\n{toml}"),
    )
    .unwrap();
    let options = LoadOptions {
        cwd: dir.path().to_path_buf(),
        services: Some(services.iter().map(|s| s.to_string()).collect()),
        state_dir: Some(dir.path().join("state")),
        ..LoadOptions::default()
    };
    Arc::new(Config::load(options).unwrap())
}

fn supervisor(engine: &Arc<FakeEngine>, config: Arc<Config>) -> Arc<Supervisor> {
    let shared: SharedEngine = Arc::clone(engine) as SharedEngine;
    let redactor = Redactor::for_stack(&config, None);
    Arc::new(Supervisor::new(
        shared,
        config,
        "session-1".into(),
        "127.0.0.1:50052".into(),
        Background::default(),
        redactor,
    ))
}

fn stack(toml: &str, services: &[&str]) -> (Arc<FakeEngine>, Arc<Supervisor>) {
    let engine = Arc::new(FakeEngine::default());
    let sup = supervisor(&engine, config(toml, services));
    (engine, sup)
}

/// Starts the whole stack; a start that would wait forever fails the test instead (paused time
/// runs the deadline out as soon as nothing else can happen).
async fn start(sup: &Arc<Supervisor>) -> Result<(), StackError> {
    tokio::time::timeout(
        Duration::from_secs(3600),
        sup.start(CancellationToken::new()),
    )
    .await
    .expect("the start never ended")
}

/// Starts the stack and follows the engine's events, as the core does after a start.
async fn running_and_followed(sup: &Arc<Supervisor>) {
    start(sup).await.unwrap();
    sup.follow_engine();
    // Let the follower subscribe before the test makes something happen.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn phase(sup: &Supervisor, name: &str) -> Phase {
    state(sup, name).phase
}

fn state(sup: &Supervisor, name: &str) -> ServiceState {
    sup.snapshot()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// Waits (in paused time) until `done` holds, or fails with the stack's state.
async fn until(sup: &Supervisor, what: &str, done: impl Fn(&Supervisor) -> bool) {
    for _ in 0..6000 {
        if done(sup) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} never happened: {:#?}", sup.snapshot());
}

fn position(log: &[String], entry: &str) -> usize {
    log.iter()
        .position(|e| e == entry)
        .unwrap_or_else(|| panic!("{entry:?} not in {log:?}"))
}

fn log(engine: &FakeEngine) -> Vec<String> {
    engine.state().log.clone()
}

/// A pid that names no process any more.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn labels_of(
    config: &Config,
    name: &str,
    session: &str,
    pid: u32,
    keep: bool,
) -> BTreeMap<String, String> {
    let spec = config.services.iter().find(|s| s.name == name).unwrap();
    BTreeMap::from([
        (labels::PROJECT.to_string(), PROJECT.to_string()),
        (labels::SERVICE.to_string(), name.to_string()),
        (labels::CONFIG_HASH.to_string(), config_hash(spec)),
        (labels::SESSION.to_string(), session.to_string()),
        (labels::OWNER_PID.to_string(), pid.to_string()),
        (labels::OWNER_ADDR.to_string(), "127.0.0.1:1".to_string()),
        (labels::KEEP.to_string(), keep.to_string()),
    ])
}

fn two_tier() -> String {
    service("db", "") + &service("api", "depends_on = [\"db\"]")
}

#[tokio::test(start_paused = true)]
async fn a_dependent_starts_only_once_its_dependency_is_healthy() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    engine.state().faults.unready_probes.insert("db".into(), 3);
    start(&sup).await.unwrap();
    let log = log(&engine);
    // Both containers exist before either dependent waits; api starts after db's 4th probe.
    assert!(position(&log, "create api") < position(&log, "start api"));
    let last_db_probe = log.iter().rposition(|e| e == "exec db").unwrap();
    assert_eq!(log.iter().filter(|e| *e == "exec db").count(), 4, "{log:?}");
    assert!(last_db_probe < position(&log, "start api"), "{log:?}");
    assert_eq!(phase(&sup, "db"), Phase::Healthy);
    assert_eq!(phase(&sup, "api"), Phase::Healthy);
    assert!(engine.calls("network+").len() == 1);
}

#[tokio::test(start_paused = true)]
async fn a_second_start_reuses_what_runs_unchanged() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    start(&sup).await.unwrap();
    let ids = (engine.container_of("db"), engine.container_of("api"));
    start(&sup).await.unwrap();
    assert_eq!(engine.calls("create").len(), 2, "{:?}", log(&engine));
    assert_eq!((engine.container_of("db"), engine.container_of("api")), ids);
    assert!(state(&sup, "db").reused && state(&sup, "api").reused);
}

#[tokio::test(start_paused = true)]
async fn a_changed_dependency_is_recreated_with_its_dependents() {
    let engine = Arc::new(FakeEngine::default());
    let cfg = config(&two_tier(), &["api"]);
    // Kept from an earlier run: db with another config, api unchanged.
    let mut stale = labels_of(&cfg, "db", "old", dead_pid(), true);
    stale.insert(labels::CONFIG_HASH.into(), "changed".into());
    engine.add_container("unit-db", stale, RunState::Running);
    engine.add_container(
        "unit-api",
        labels_of(&cfg, "api", "old", dead_pid(), true),
        RunState::Running,
    );
    let sup = supervisor(&engine, cfg);
    start(&sup).await.unwrap();
    let log = log(&engine);
    assert_eq!(engine.calls("remove").len(), 2, "{log:?}");
    assert_eq!(engine.calls("create").len(), 2, "{log:?}");
    assert!(!state(&sup, "db").reused && !state(&sup, "api").reused);
}

#[tokio::test(start_paused = true)]
async fn a_kept_container_with_the_same_config_is_reused_across_runs() {
    let engine = Arc::new(FakeEngine::default());
    let cfg = config(&two_tier(), &["api"]);
    engine.add_container(
        "unit-db",
        labels_of(&cfg, "db", "old", dead_pid(), true),
        RunState::Running,
    );
    let sup = supervisor(&engine, cfg);
    start(&sup).await.unwrap();
    assert_eq!(engine.calls("create"), ["create api"]);
    assert!(state(&sup, "db").reused);
    assert_eq!(phase(&sup, "api"), Phase::Healthy);
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_removes_what_it_created_and_keeps_what_it_reused() {
    let engine = Arc::new(FakeEngine::default());
    let toml = service("cache", "") + &two_tier();
    let cfg = config(&toml, &["api", "cache"]);
    engine.add_container(
        "unit-cache",
        labels_of(&cfg, "cache", "old", dead_pid(), true),
        RunState::Running,
    );
    engine.state().faults.fail_create.insert("api".into());
    let sup = supervisor(&engine, cfg);
    let err = start(&sup).await.unwrap_err();
    match &err {
        StackError::ServiceStart {
            service, reason, ..
        } => {
            assert_eq!(service, "api");
            assert!(reason.contains("the fake engine refuses"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(engine.container_of("db"), None, "{:?}", log(&engine));
    assert!(
        engine.container_of("cache").is_some(),
        "a reused container stays"
    );
    assert_eq!(phase(&sup, "api"), Phase::Failed);
    assert!(state(&sup, "api").message.contains("refuses"));
}

#[tokio::test(start_paused = true)]
async fn a_container_that_exits_before_it_is_healthy_fails_with_its_code_and_logs() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    engine.state().faults.exit_on_start.insert("db".into(), 3);
    let err = start(&sup).await.unwrap_err();
    match err {
        StackError::ServiceStart {
            service,
            reason,
            logs,
        } => {
            assert_eq!(service, "db");
            assert!(reason.contains("exited with code 3"), "{reason}");
            assert!(logs.contains("db says goodbye"), "{logs}");
        }
        other => panic!("{other}"),
    }
    // api never started, and nothing is left behind.
    assert!(engine.calls("start api").is_empty());
    assert!(engine.state().containers.is_empty());
    assert_eq!(engine.calls("network-").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_service_never_healthy_fails_after_its_start_period_with_the_last_probe() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    engine
        .state()
        .faults
        .unready_probes
        .insert("db".into(), u32::MAX);
    let err = start(&sup).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("not healthy within its start period of 2s"),
        "{text}"
    );
    assert!(text.contains("db is not ready"), "{text}");
    assert!(engine.state().containers.is_empty());
}

/// A job `migrate` that exits with `code` at once, and `api` that needs it completed.
fn job_then_api(code: i64) -> (Arc<FakeEngine>, Arc<Supervisor>) {
    let toml = service("migrate", "") + &service("api", "depends_on = { migrate = \"completed\" }");
    let (engine, sup) = stack(&toml, &["api"]);
    engine
        .state()
        .faults
        .exit_on_start
        .insert("migrate".into(), code);
    (engine, sup)
}

#[tokio::test(start_paused = true)]
async fn a_completed_condition_waits_for_the_job_to_exit_zero() {
    let (engine, sup) = job_then_api(0);
    start(&sup).await.unwrap();
    assert_eq!(phase(&sup, "migrate"), Phase::Completed);
    assert_eq!(phase(&sup, "api"), Phase::Healthy);
    let log = log(&engine);
    assert!(position(&log, "start migrate") < position(&log, "start api"));
}

#[tokio::test(start_paused = true)]
async fn a_job_that_exits_non_zero_fails_and_its_dependents_never_start() {
    let (engine, sup) = job_then_api(2);
    let err = start(&sup).await.unwrap_err();
    assert!(
        err.to_string().contains("exited with code 2 instead of 0"),
        "{err}"
    );
    assert!(engine.calls("start api").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_start_removes_every_container_it_created() {
    let (engine, sup) = stack(
        &(service_within("db", "1h", "") + &service("api", "depends_on = [\"db\"]")),
        &["api"],
    );
    engine
        .state()
        .faults
        .unready_probes
        .insert("db".into(), u32::MAX);
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let sup = Arc::clone(&sup);
        let cancel = cancel.clone();
        async move { sup.start(cancel).await }
    });
    until(&sup, "db probing", |s| phase(s, "db") == Phase::Starting).await;
    cancel.cancel();
    assert!(matches!(run.await.unwrap(), Err(StackError::Cancelled)));
    assert!(engine.state().containers.is_empty(), "{:?}", log(&engine));
}

#[tokio::test(start_paused = true)]
async fn a_taken_host_port_is_refused_before_anything_is_created() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (engine, sup) = stack(
        &service("db", &format!("ports = [\"127.0.0.1:{port}:80\"]")),
        &["db"],
    );
    let err = start(&sup).await.unwrap_err();
    assert!(
        matches!(err, StackError::PortInUse { port: p, .. } if p == port),
        "{err}"
    );
    assert!(engine.calls("create").is_empty());
    assert_eq!(phase(&sup, "db"), Phase::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_fails_the_service_that_needs_it() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    engine.state().faults.missing_images.insert("api:1".into());
    let err = start(&sup).await.unwrap_err();
    match err {
        StackError::ServiceStart {
            service, reason, ..
        } => {
            assert_eq!(service, "api");
            assert!(reason.contains("\"api:1\" is not available"), "{reason}");
            // The fix is named: the setting that chooses the image.
            assert!(reason.contains("`services.api.image`"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_live_owners_containers_are_neither_reused_nor_removed() {
    let engine = Arc::new(FakeEngine::default());
    let cfg = config(&two_tier(), &["api"]);
    // This test process is alive, so it counts as the other stack's owner.
    engine.add_container(
        "unit-db",
        labels_of(&cfg, "db", "other", std::process::id(), false),
        RunState::Running,
    );
    let sup = supervisor(&engine, cfg);
    let err = start(&sup).await.unwrap_err();
    match err {
        StackError::InUse(crate::owner::OwnerError::InUse { owner, .. }) => {
            assert_eq!(owner.pid, std::process::id());
            assert_eq!(owner.addr, "127.0.0.1:1");
        }
        other => panic!("{other}"),
    }
    assert!(engine.container_of("db").is_some());
    assert!(engine.calls("create").is_empty());
}

#[tokio::test(start_paused = true)]
async fn containers_of_a_dead_owner_are_removed_as_orphans() {
    let engine = Arc::new(FakeEngine::default());
    let cfg = config(&two_tier(), &["api"]);
    engine.add_container(
        "unit-db",
        labels_of(&cfg, "db", "old", dead_pid(), false),
        RunState::Running,
    );
    let old = engine.container_of("db").unwrap().0;
    let sup = supervisor(&engine, cfg);
    start(&sup).await.unwrap();
    assert_ne!(engine.container_of("db").unwrap().0, old);
    assert!(!state(&sup, "db").reused);
}

#[tokio::test(start_paused = true)]
async fn stop_goes_dependents_first_and_removes_the_network() {
    let toml = two_tier() + &service("web", "depends_on = [\"api\"]");
    let (engine, sup) = stack(&toml, &["web"]);
    start(&sup).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3600), sup.stop_services(&[], None))
        .await
        .expect("the stop never ended");
    let log = log(&engine);
    assert!(
        position(&log, "stop web") < position(&log, "stop api"),
        "{log:?}"
    );
    assert!(
        position(&log, "stop api") < position(&log, "stop db"),
        "{log:?}"
    );
    assert!(engine.state().containers.is_empty());
    assert_eq!(engine.calls("network-").len(), 1);
    for name in ["db", "api", "web"] {
        assert_eq!(phase(&sup, name), Phase::Stopped);
    }
}

#[tokio::test(start_paused = true)]
async fn a_crashed_service_is_restarted_by_its_policy_and_probed_healthy_again() {
    let toml = service("db", "restart = \"always\"") + &service("api", "depends_on = [\"db\"]");
    let (engine, sup) = stack(&toml, &["api"]);
    let mut events = sup.subscribe();
    running_and_followed(&sup).await;
    engine.crash("db", 1);
    until(&sup, "db marked failed", |s| {
        phase(s, "db") == Phase::Failed
    })
    .await;
    until(&sup, "db healthy again", |s| {
        phase(s, "db") == Phase::Healthy
    })
    .await;
    assert_eq!(state(&sup, "db").restart_count, 1);
    assert_eq!(engine.calls("start db").len(), 2);
    // Its dependent heard of it.
    let mut told = false;
    while let Ok(e) = events.try_recv() {
        told |= e.service == "api" && e.message == "its dependency db went down";
    }
    assert!(told);
}

#[tokio::test(start_paused = true)]
async fn without_a_restart_policy_a_crash_is_final() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    running_and_followed(&sup).await;
    engine.crash("db", 137);
    until(&sup, "db marked failed", |s| {
        phase(s, "db") == Phase::Failed
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(phase(&sup, "db"), Phase::Failed);
    assert_eq!(state(&sup, "db").message, "container exited with code 137");
    assert_eq!(engine.calls("start db").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_is_stopped_and_reported_with_its_count() {
    let (engine, sup) = stack(&service("db", "restart = \"always\""), &["db"]);
    running_and_followed(&sup).await;
    engine.state().faults.exit_on_start.insert("db".into(), 1);
    engine.crash("db", 1);
    until(&sup, "the crash loop stopped", |s| {
        state(s, "db").message.starts_with("crash loop")
    })
    .await;
    let db = state(&sup, "db");
    assert_eq!(db.phase, Phase::Failed);
    assert!(
        db.message
            .contains(&format!("restarted {} times", CRASH_LIMIT + 1)),
        "{}",
        db.message
    );
    // Halted: no more starts, however long we wait.
    let starts = engine.calls("start db").len();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(engine.calls("start db").len(), starts);
    // A restart by hand clears the halt.
    engine.state().faults.exit_on_start.clear();
    sup.restart("db").await.unwrap();
    assert_eq!(phase(&sup, "db"), Phase::Healthy);
}

#[tokio::test(start_paused = true)]
async fn a_container_removed_by_someone_else_is_created_again() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    running_and_followed(&sup).await;
    let old = engine.container_of("db").unwrap().0;
    engine.destroy("db");
    until(&sup, "db created again", |s| {
        state(s, "db")
            .container_id
            .as_deref()
            .is_some_and(|id| id != old)
            && phase(s, "db") == Phase::Healthy
    })
    .await;
    assert_eq!(engine.calls("create db").len(), 2);
    assert_eq!(state(&sup, "db").restart_count, 1);
}

#[tokio::test(start_paused = true)]
async fn a_death_during_an_engine_outage_is_healed_once_the_engine_is_back() {
    let (engine, sup) = stack(&service("db", "restart = \"always\""), &["db"]);
    running_and_followed(&sup).await;
    engine.set_available(false);
    // Dies while nobody hears it.
    engine.crash("db", 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&sup, "db"),
        Phase::Healthy,
        "nothing could be seen yet"
    );
    engine.set_available(true);
    until(&sup, "db healthy after the outage", |s| {
        phase(s, "db") == Phase::Healthy && state(s, "db").restart_count == 1
    })
    .await;
    assert_eq!(engine.calls("start db").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn restart_of_a_service_without_a_container_brings_it_up() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    start(&sup).await.unwrap();
    sup.stop_services(&["api".to_string()], None).await;
    assert_eq!(engine.container_of("api"), None);
    sup.restart("api").await.unwrap();
    assert_eq!(phase(&sup, "api"), Phase::Healthy);
    assert_eq!(engine.calls("create api").len(), 2);
    assert!(matches!(
        sup.restart("ghost").await,
        Err(StackError::UnknownService { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn after_stop_no_task_of_the_supervisor_is_left() {
    let (engine, sup) = stack(&service("db", "restart = \"always\""), &["db"]);
    running_and_followed(&sup).await;
    // A restart after its backoff is pending, and the follower runs.
    engine.crash("db", 1);
    until(&sup, "db marked failed", |s| {
        phase(s, "db") == Phase::Failed
    })
    .await;
    assert!(
        sup.background.running() >= 2,
        "{}",
        sup.background.running()
    );
    sup.stop_services(&[], None).await;
    tokio::time::timeout(Duration::from_secs(3600), sup.background.stop())
        .await
        .expect("a background task did not end");
    assert_eq!(sup.background.running(), 0);
    // Nothing restarted it after the stop.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(engine.state().containers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_network_made_ahead_of_the_start_is_used_once() {
    let (engine, sup) = stack(&two_tier(), &["api"]);
    let made = Arc::clone(&engine);
    sup.network_underway(tokio::spawn(async move {
        made.ensure_network("unit_default", PROJECT).await
    }));
    start(&sup).await.unwrap();
    assert_eq!(engine.calls("network+"), ["network+ unit_default"]);
    // Stopped and started again, the start makes the network itself.
    sup.stop_services(&[], None).await;
    start(&sup).await.unwrap();
    assert_eq!(engine.calls("network+").len(), 2);
    assert_eq!(phase(&sup, "api"), Phase::Healthy);
}
