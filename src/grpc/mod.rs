//! gRPC: the generated code, the server (with the standard health service and reflection) and
//! the error mapping to status codes.

pub mod orchestrator;

use std::net::SocketAddr;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::tasks::model::TaskError;
use crate::tasks::queue::{TaskQueue, MAX_PAYLOAD_BYTES};

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("orchestrator.v1");

    /// The encoded descriptors of proto/, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}

/// Room for a maximal payload plus the rest of the message.
pub const MAX_MESSAGE_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot serve gRPC on {addr}: {message}. Set ORCHESTRATOR_GRPC_ADDR (or orchestrator_addr in dspy-agent.toml) to another address; port 0 picks any free port")]
    Bind { addr: String, message: String },
}

pub fn status(e: TaskError) -> tonic::Status {
    let message = e.to_string();
    match e {
        TaskError::Invalid { .. } => tonic::Status::invalid_argument(message),
        TaskError::Conflict { .. } => tonic::Status::already_exists(message),
        TaskError::UnknownType { .. } => tonic::Status::failed_precondition(message),
        TaskError::NotFound { .. } => tonic::Status::not_found(message),
        TaskError::Store { .. } => tonic::Status::internal(message),
    }
}

/// A running gRPC server; dropping it does not stop it, `shutdown` does.
pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Stops accepting, lets running calls end, and waits for the server to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Serves the orchestrator on `addr` ("HOST:PORT"; port 0 = any free port).
pub async fn serve_orchestrator(
    addr: &str,
    queue: TaskQueue,
    project: String,
) -> Result<Server, GrpcError> {
    let bind_error = |message: String| GrpcError::Bind {
        addr: addr.to_string(),
        message,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(e.to_string()))?;
    let local = listener
        .local_addr()
        .map_err(|e| bind_error(e.to_string()))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::orchestrator_service_server::OrchestratorServiceServer<orchestrator::Orchestrator>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| bind_error(format!("reflection: {e}")))?;
    let service = pb::orchestrator_service_server::OrchestratorServiceServer::new(
        orchestrator::Orchestrator::new(queue, project),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let stop = CancellationToken::new();
    let signal = stop.clone();
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                signal.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the orchestrator gRPC server stopped");
        }
    });
    tracing::info!(addr = %local, "orchestrator gRPC listening");
    Ok(Server {
        addr: local,
        stop,
        task,
    })
}
