//! A stack owns every task it spawns: after `shutdown` none is left running, whatever was going
//! on (a handler in the middle of a task, a remote worker's stream, both gRPC servers).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dspy_agent_infra::config::{Config, ConfigLayer, LoadOptions};
use dspy_agent_infra::grpc::auth::Bearer;
use dspy_agent_infra::grpc::worker_client::WorkerClient;
use dspy_agent_infra::infra::Infra;
use dspy_agent_infra::tasks::handlers::{Handler, HandlerFuture};
use dspy_agent_infra::tasks::model::{NewTask, TaskRecord, TaskState};

/// Never finishes on its own.
struct Hang;

impl Handler for Hang {
    fn run(&self, _task: TaskRecord) -> HandlerFuture {
        Box::pin(std::future::pending())
    }
}

fn task(id: &str, task_type: &str) -> NewTask {
    NewTask {
        task_id: id.into(),
        task_type: task_type.into(),
        payload: Vec::new(),
        metadata: BTreeMap::new(),
        priority: 0,
        timeout: None,
        max_retries: 0,
    }
}

async fn until_running(infra: &Infra, id: &str) {
    for _ in 0..500 {
        if infra.queue().get(id).await.unwrap().state == TaskState::Running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_no_task_of_the_stack_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let layer: ConfigLayer = toml::from_str(
        r#"
        orchestrator_addr = "127.0.0.1:0"
        env_manager_addr = "127.0.0.1:0"
        [services.redis]
        enabled = false
        [services.reddb]
        enabled = false
        [services.infermesh]
        enabled = false
        "#,
    )
    .unwrap();
    let config = Config::load(LoadOptions {
        cwd: dir.path().to_path_buf(),
        overlay: Some(layer),
        state_dir: Some(dir.path().join("state")),
        ..LoadOptions::default()
    })
    .unwrap();
    assert!(config.services.is_empty());
    let infra = Infra::open(config, None, None).await.unwrap();

    // A handler in this process, in the middle of a task.
    infra.register_handler("hang", Arc::new(Hang));
    infra.queue().submit(task("local", "hang")).await.unwrap();
    until_running(&infra, "local").await;

    // A worker in "another process", in the middle of a task of its own.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", infra.orchestrator_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let token = infra.token().map(|t| t.expose().to_string());
    let bearer = Bearer::new(token.as_deref()).unwrap();
    let worker = WorkerClient::connect(bearer.channel(channel), "w".into(), 1)
        .await
        .unwrap();
    worker.serve("remote", Arc::new(Hang));
    worker.ready().await;
    infra
        .queue()
        .submit(task("remote", "remote"))
        .await
        .unwrap();
    until_running(&infra, "remote").await;

    // Two servers, the dispatcher, the local run, and the worker stream's reader at least.
    let before = infra.background_tasks();
    assert!(before >= 5, "only {before} background tasks while busy");

    infra.shutdown(false).await;
    assert_eq!(infra.background_tasks(), 0);
    worker.close().await;
}
