//! The HTTP port beside the gRPC ones: `/metrics` in the Prometheus text format, `/healthz`, and
//! the dashboard at `/` (`dashboard`).
//! `/metrics` asks for the same token as the gRPC ports (`Authorization: Bearer TOKEN`, what a
//! Prometheus scrape sends with `authorization: { credentials: ... }`); `/healthz` is open, as
//! the gRPC health service is. With `[tls]` it speaks HTTPS with the same certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{rustls, TlsAcceptor};

use crate::config::Tls;
use crate::engine::{RunState, SharedEngine};
use crate::grpc::auth::Guard;
use crate::services::supervisor::Supervisor;
use crate::tasks::queue::TaskQueue;
use crate::util::Background;

mod browser;
mod dashboard;
mod sessions;

/// How long a scrape waits for the Engine to say it is there.
const ENGINE_CHECK: Duration = Duration::from_secs(1);
/// How often the containers' CPU and memory are sampled, and how long one sample may take.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const STATS: Duration = Duration::from_secs(5);
/// How long a client has to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What the HTTP port reads from.
#[derive(Clone)]
pub struct Sources {
    pub queue: TaskQueue,
    pub supervisor: Option<Arc<Supervisor>>,
    pub engine: Option<SharedEngine>,
    pub guard: Guard,
    pub workers: Arc<crate::grpc::workers::Workers>,
    pub project: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {addr:?}: {message}. Set DSPY_AGENT_HTTP_ADDR (http_addr in dspy-agent.toml) to a free address, or port 0 for any free port (a second stack on this machine needs all three ports of its own: ORCHESTRATOR_GRPC_ADDR, ENV_MANAGER_GRPC_ADDR and DSPY_AGENT_HTTP_ADDR)")]
pub struct BindError {
    pub addr: String,
    pub message: String,
}

/// Binds `addr` and serves until `background` stops, over TLS when given; the address bound.
pub async fn serve(
    addr: &str,
    sources: Sources,
    tls: Option<&Tls>,
    background: &Background,
) -> Result<SocketAddr, BindError> {
    let error = |message: String| BindError {
        addr: addr.to_string(),
        message,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| error(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| error(e.to_string()))?;
    sample_usage(&sources, background);
    let served = Arc::new(browser::Served::new(bound, tls.is_some()));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sources.clone())
        .merge(dashboard::routes(sources, background.token()))
        .layer(axum::middleware::from_fn_with_state(served, browser::guard));
    match tls {
        None => run(listener, app, background),
        Some(tls) => {
            let acceptor = TlsAcceptor::from(Arc::new(
                server_config(tls).map_err(|e| error(format!("TLS: {e}")))?,
            ));
            let handshakes = handshakes(listener, acceptor, background);
            let listener = TlsListener {
                handshakes,
                local: bound,
            };
            run(listener, app, background);
        }
    }
    Ok(bound)
}

/// Serves `app` on `listener` until `background` stops.
fn run<L>(listener: L, app: Router, background: &Background)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let stop = background.token();
    background.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the HTTP port stopped");
        }
    });
}

/// Samples the CPU and memory of the services' containers into the metrics: every second until
/// every service runs (two minutes at most), then every 10 s (an Engine's stats take a second to measure CPU, too
/// slow for a scrape to wait on).
fn sample_usage(sources: &Sources, background: &Background) {
    let (Some(supervisor), Some(engine)) = (sources.supervisor.clone(), sources.engine.clone())
    else {
        return;
    };
    let metrics = Arc::clone(sources.queue.instruments());
    background.spawn_until_stopped(async move {
        let began = tokio::time::Instant::now();
        loop {
            let running: Vec<(String, String)> = supervisor
                .snapshot()
                .into_iter()
                .filter(|s| s.engine_state == Some(RunState::Running))
                .filter_map(|s| Some((s.name, s.container_id?)))
                .collect();
            let samples = futures_util::future::join_all(running.iter().map(|(name, id)| {
                let engine = &engine;
                async move { (name, tokio::time::timeout(STATS, engine.stats(id)).await) }
            }))
            .await;
            metrics.service_cpu.reset();
            metrics.service_memory.reset();
            let mut sampled = 0;
            for (name, sample) in samples {
                if let Ok(Ok(usage)) = sample {
                    sampled += 1;
                    metrics
                        .service_cpu
                        .with_label_values(&[name.as_str()])
                        .set(usage.cpu_percent);
                    metrics
                        .service_memory
                        .with_label_values(&[name.as_str()])
                        .set(i64::try_from(usage.memory_bytes).unwrap_or(i64::MAX));
                }
            }
            // Quickly while the stack comes up (for two minutes at most), then at the usual pace.
            let coming_up = began.elapsed() < Duration::from_secs(120);
            let pause = if coming_up && sampled < supervisor.names().len() {
                Duration::from_secs(1)
            } else {
                SAMPLE_EVERY
            };
            tokio::time::sleep(pause).await;
        }
    });
}

/// A rustls server configuration from the PEM files of `[tls]`.
fn server_config(tls: &Tls) -> Result<rustls::ServerConfig, String> {
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.expose().as_bytes())
        .map_err(|e| format!("tls.key: {e}"))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())
}

type Handshaken = (TlsStream<TcpStream>, SocketAddr);

/// Accepts connections and runs each TLS handshake on its own (a client that never finishes
/// one holds up nobody), handing over those that complete in time.
fn handshakes(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    background: &Background,
) -> mpsc::Receiver<Handshaken> {
    let (tx, rx) = mpsc::channel(64);
    let tasks = background.clone();
    let stop = background.token();
    background.spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTPS accept failed");
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tasks.spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

struct TlsListener {
    handshakes: mpsc::Receiver<Handshaken>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> Handshaken {
        match self.handshakes.recv().await {
            Some(connection) => connection,
            // The accepting task ended with the stack: nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn metrics(State(s): State<Sources>, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !s.guard.allows(authorization) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a token is required: send `Authorization: Bearer TOKEN` (`dspy-agent token` prints it)\n",
        )
            .into_response();
    }
    refresh(&s).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.queue.instruments().render(),
    )
        .into_response()
}

/// Sets the levels a scrape reads: queue depth, the services, the Engine.
async fn refresh(s: &Sources) {
    let m = s.queue.instruments();
    match s.queue.depth().await {
        Ok(depth) => {
            m.queue_depth.reset();
            for (task_type, state, n) in depth {
                m.queue_depth
                    .with_label_values(&[
                        task_type.as_str(),
                        state.as_str().to_ascii_lowercase().as_str(),
                    ])
                    .set(n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot count the queue for /metrics"),
    }
    if let Some(engine) = &s.engine {
        let up = matches!(
            tokio::time::timeout(ENGINE_CHECK, engine.engine_info()).await,
            Ok(Ok(_))
        );
        m.engine_up.set(i64::from(up));
    }
    if let Some(supervisor) = &s.supervisor {
        for service in supervisor.snapshot() {
            let name = service.name.as_str();
            let running = matches!(
                service.engine_state,
                Some(RunState::Running | RunState::Paused)
            );
            m.service_up
                .with_label_values(&[name])
                .set(i64::from(running));
            m.service_healthy
                .with_label_values(&[name])
                .set(i64::from(service.healthy()));
            let counted = m.service_restarts.with_label_values(&[name]);
            let seen = u64::from(service.restart_count);
            if seen > counted.get() {
                counted.inc_by(seen - counted.get());
            }
        }
    }
}
