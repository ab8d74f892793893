//! A load client for the orchestrator's SubmitTask, with no interpreter in the way: how many
//! submits per second the server takes from one concurrent client process.
//!
//! Usage: cargo run --release --example grpc_load -- ADDR TASKS [IN_FLIGHT] [CONNECTIONS]
//! Submits TASKS `noop` tasks with IN_FLIGHT calls outstanding (default 128) over CONNECTIONS
//! HTTP/2 connections (default 2) and prints the rate; exits non-zero if any call failed. The
//! token is `$DSPY_AGENT_TOKEN`, else that of this user's stack serving ADDR, as for any client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dspy_agent_infra::access;
use dspy_agent_infra::config::Secret;
use dspy_agent_infra::grpc::auth::Bearer;
use dspy_agent_infra::grpc::pb;
use dspy_agent_infra::grpc::pb::orchestrator_service_client::OrchestratorServiceClient;
use tokio::sync::Semaphore;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> T {
    match args.get(i) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("argument {i}: {v:?} is not valid")),
        None => default
            .unwrap_or_else(|| panic!("usage: grpc_load ADDR TASKS [IN_FLIGHT] [CONNECTIONS]")),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: String = arg(&args, 1, None);
    let tasks: usize = arg(&args, 2, None);
    let in_flight: usize = arg(&args, 3, Some(128));
    let connections: usize = arg(&args, 4, Some(2));
    let prefix = format!("load-{}", std::process::id());

    let configured = std::env::var("DSPY_AGENT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    let route = access::route(configured.as_ref(), &addr)
        .unwrap_or_else(|e| panic!("cannot read the token: {e}"));
    let bearer = Bearer::new(route.token.as_ref().map(|t| t.expose())).expect("a printable token");
    let addr = route.addr;
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a host:port address")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        clients.push(OrchestratorServiceClient::new(bearer.channel(channel)));
    }
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    let failed = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut calls = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("never closed");
        let mut client = clients[i % clients.len()].clone();
        let failed = Arc::clone(&failed);
        let task_id = format!("{prefix}-{i}");
        calls.push(tokio::spawn(async move {
            let request = pb::SubmitTaskRequest {
                task_id,
                task_type: "noop".into(),
                ..Default::default()
            };
            if let Err(e) = client.submit_task(request).await {
                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("SubmitTask failed: {e}");
                }
            }
            drop(permit);
        }));
    }
    for call in calls {
        call.await.expect("a call task never panics");
    }
    let rate = tasks as f64 / began.elapsed().as_secs_f64();
    println!("{rate:.0}");
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("{failed} of {tasks} calls failed");
        std::process::exit(1);
    }
}
