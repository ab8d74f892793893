//! gRPC: the generated code, the server (with the standard health service and reflection) and
//! the error mapping to status codes.

pub mod auth;
pub mod codec;
pub mod convert;
pub mod env_manager;
mod observe;
pub mod orchestrator;
mod status;
pub mod worker_client;
pub mod workers;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use auth::Guard;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::config::Tls;

use crate::tasks::queue::{TaskQueue, MAX_PAYLOAD_BYTES};
use crate::util::Background;

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("orchestrator.v1");

    /// The encoded descriptors of proto/ (both packages), served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}

pub mod env_pb {
    #![allow(clippy::all)]
    tonic::include_proto!("env_manager.v1");
}

/// Room for a maximal payload plus the rest of the message.
pub const MAX_MESSAGE_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot serve the {what} gRPC port on {addr}: {message}. Set {env_var} (or {config_key} in dspy-agent.toml) to another address; port 0 picks any free port (a second stack on this machine needs all three ports of its own: ORCHESTRATOR_GRPC_ADDR, ENV_MANAGER_GRPC_ADDR and DSPY_AGENT_HTTP_ADDR)")]
    Bind {
        what: &'static str,
        addr: String,
        message: String,
        env_var: &'static str,
        config_key: &'static str,
    },
}

/// How long a stopping server waits for open calls before it cuts them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A running gRPC server; dropping it does not stop it, `shutdown` does.
pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Stops accepting and lets running calls end; streams that are still open after
    /// `SHUTDOWN_GRACE` (a `logs -f`, a watch) are cut.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

/// What both servers share: who may call, over what, and the stack's background tasks, where
/// the servers and the tasks behind their streams run.
#[derive(Clone)]
pub struct Serving {
    pub guard: Guard,
    pub tls: Option<Tls>,
    pub background: Background,
    /// Where every call is counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Serves the orchestrator on `addr` ("HOST:PORT"; port 0 = any free port).
pub async fn serve_orchestrator(
    addr: &str,
    queue: TaskQueue,
    project: String,
    env_manager_addr: Arc<OnceLock<String>>,
    workers: Arc<workers::Workers>,
    serving: Serving,
) -> Result<Server, GrpcError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::orchestrator_service_server::OrchestratorServiceServer<orchestrator::Orchestrator>>()
        .await;
    let service = pb::orchestrator_service_server::OrchestratorServiceServer::new(
        orchestrator::Orchestrator::new(
            queue,
            project,
            env_manager_addr,
            workers,
            serving.background.clone(),
        ),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(InterceptedService::new(service, serving.guard.clone()));
    serve(
        addr,
        "ORCHESTRATOR_GRPC_ADDR",
        "orchestrator_addr",
        "orchestrator",
        routes,
        serving,
    )
    .await
}

/// Serves the environment manager on `addr` ("HOST:PORT"; port 0 = any free port).
pub async fn serve_env_manager(
    addr: &str,
    manager: env_manager::EnvManager,
    serving: Serving,
) -> Result<Server, GrpcError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<env_pb::env_manager_service_server::EnvManagerServiceServer<env_manager::EnvManager>>()
        .await;
    let service = env_pb::env_manager_service_server::EnvManagerServiceServer::new(manager);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(InterceptedService::new(service, serving.guard.clone()));
    serve(
        addr,
        "ENV_MANAGER_GRPC_ADDR",
        "env_manager_addr",
        "env-manager",
        routes,
        serving,
    )
    .await
}

/// Binds `addr` and serves `routes` plus reflection over every proto of the package (behind
/// the same token as the services; only the standard health service is open).
async fn serve(
    addr: &str,
    env_var: &'static str,
    config_key: &'static str,
    what: &'static str,
    routes: tonic::service::Routes,
    serving: Serving,
) -> Result<Server, GrpcError> {
    let Serving {
        guard,
        tls,
        background,
        metrics,
    } = serving;
    let bind_error = |message: String| GrpcError::Bind {
        what,
        addr: addr.to_string(),
        message,
        env_var,
        config_key,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(e.to_string()))?;
    let local = listener
        .local_addr()
        .map_err(|e| bind_error(e.to_string()))?;
    // Both versions of reflection: v1, and v1alpha, which grpcio-reflection's client, grpcurl
    // before 1.8.8 and most GUI clients still speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| bind_error(format!("reflection: {e}")))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| bind_error(format!("reflection: {e}")))?;
    let routes = routes
        .add_service(InterceptedService::new(v1, guard.clone()))
        .add_service(InterceptedService::new(v1alpha, guard));

    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        let identity = Identity::from_pem(&t.cert_pem, t.key_pem.expose());
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| bind_error(format!("TLS: {e}")))?;
    }
    let mut builder = builder.layer(observe::Observe::new(metrics));
    let stop = background.token();
    let signal = stop.clone();
    let task = background.spawn(async move {
        let result = builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                signal.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the {what} gRPC server stopped");
        }
    });
    tracing::info!(addr = %local, "{what} gRPC listening");
    Ok(Server {
        addr: local,
        stop,
        task,
    })
}
