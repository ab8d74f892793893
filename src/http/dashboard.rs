//! The dashboard at `/`: one page (assets built into the binary) that shows the services, the
//! tasks and the workers, live over server-sent events (one update a second at most), with
//! restart, cancel and retry. Entry takes the token when one is set, once: signing in makes a
//! dashboard session (`sessions`), which the page's script keeps in sessionStorage and sends as
//! the `X-Dspy-Agent-Session` header; the browser never holds the token, and no cookie is set.
//! Scripts may send `Authorization: Bearer TOKEN` instead.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use prometheus::core::Collector;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::sessions::Sessions;
use super::Sources;
use crate::tasks::model::{NewTask, TaskRecord, TaskState};
use crate::tasks::store::{now_ms, ListFilter};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The header that carries a dashboard session.
const SESSION_HEADER: &str = "x-dspy-agent-session";
/// Throughput is sampled this often, and this many samples are kept (six minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const SAMPLES: usize = 72;
/// Live updates go out at most this often.
const PUSH_EVERY: Duration = Duration::from_secs(1);
/// Most task changes sent in one update; the list reloads when more happened.
const MAX_CHANGES: usize = 100;
const RESULT_PREVIEW: usize = 2000;

#[derive(Clone)]
pub struct Dashboard {
    sources: Sources,
    /// (ms since the epoch, tasks finished so far): the throughput chart.
    history: Arc<Mutex<VecDeque<(i64, u64)>>>,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
}

/// The dashboard's routes; its sampler runs until `stop`.
pub fn routes(sources: Sources, stop: CancellationToken) -> Router {
    let dashboard = Dashboard {
        sources,
        history: Arc::default(),
        sessions: Arc::default(),
        stop,
    };
    sample_throughput(&dashboard);
    // Sessions end with the stack.
    let (sessions, stopped) = (Arc::clone(&dashboard.sessions), dashboard.stop.clone());
    tokio::spawn(async move {
        stopped.cancelled().await;
        sessions.close_all();
    });
    Router::new()
        .route("/", get(index))
        .route("/api/session", post(sign_in).delete(sign_out))
        .route("/api/tickets", post(ticket))
        .route("/assets/app.js", get(|| asset(SCRIPT, "text/javascript")))
        .route("/assets/style.css", get(|| asset(STYLE, "text/css")))
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/tasks", get(tasks))
        .route("/api/tasks/{id}", get(task))
        .route("/api/tasks/{id}/cancel", post(cancel))
        .route("/api/tasks/{id}/retry", post(retry))
        .route("/api/services/{name}/restart", post(restart))
        .route("/api/services/{name}/logs", get(logs))
        .route("/api/services/{name}/logs/stream", get(log_stream))
        .with_state(dashboard)
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Whether a request may read or act: it carries the token (`Authorization: Bearer`) or a live
/// session, or the stack asks for no token.
fn allowed(d: &Dashboard, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if d.sources.guard.allows(bearer) {
        return true;
    }
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|id| d.sessions.valid(id))
}

/// A stream's entry: what `allowed` takes, or a ticket in the query (an `EventSource` cannot
/// send a header).
fn stream_allowed(d: &Dashboard, headers: &HeaderMap, ticket: Option<&str>) -> bool {
    allowed(d, headers) || ticket.is_some_and(|t| d.sessions.redeem(t))
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "sign in at / with the stack's token (`dspy-agent token` prints it), or send `Authorization: Bearer TOKEN`"})),
    )
        .into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page: it signs in by itself, so it holds nothing before that.
async fn index(State(d): State<Dashboard>) -> Response {
    Html(INDEX.replace("{{project}}", &escape(&d.sources.project))).into_response()
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
}

/// Takes the token once and answers a session of the dashboard's own.
async fn sign_in(State(d): State<Dashboard>, body: axum::body::Bytes) -> Response {
    let Ok(form) = serde_json::from_slice::<SignIn>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "send {\"token\": \"...\"} as JSON"})),
        )
            .into_response();
    };
    let token = form.token.trim();
    if !d.sources.guard.allows(Some(&format!("Bearer {token}"))) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "That token is not this stack's. `dspy-agent token` prints it."})),
        )
            .into_response();
    }
    match d.sessions.open() {
        Ok(id) => Json(json!({
            "session": id,
            "expires_in_s": super::sessions::SESSION_LIFETIME.as_secs(),
        }))
        .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": format!("no randomness for a session: {e}")})),
        )
            .into_response(),
    }
}

/// Ends the session the request carries.
async fn sign_out(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        d.sessions.close(id);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A one-use ticket for a stream, for the session the request carries.
async fn ticket(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let session = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok());
    match session.map(|id| d.sessions.ticket(id)) {
        Some(Ok(Some(ticket))) => Json(json!({
            "ticket": ticket,
            "expires_in_s": super::sessions::TICKET_LIFETIME.as_secs(),
        }))
        .into_response(),
        Some(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": format!("no randomness for a ticket: {e}")})),
        )
            .into_response(),
        _ => refused(),
    }
}

async fn state(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    Json(snapshot(&d).await).into_response()
}

/// Everything the page shows at once: services, task counts, workers, throughput, run times.
async fn snapshot(d: &Dashboard) -> Value {
    let m = d.sources.queue.instruments();
    let cpu = by_label(&m.service_cpu.collect());
    let memory = by_label(&m.service_memory.collect());
    let now = now_ms();
    let services: Vec<Value> = d
        .sources
        .supervisor
        .as_ref()
        .map(|s| s.snapshot())
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "image": s.image,
                "phase": s.phase.as_str(),
                "healthy": s.healthy(),
                "state": s.engine_state.map(|e| e.as_str()).unwrap_or(""),
                "message": s.message,
                "url": s.url(),
                "ports": s.ports.iter().map(|(c, (ip, h))| format!("{ip}:{h}->{c}")).collect::<Vec<_>>(),
                "restarts": s.restart_count,
                "uptime_s": s.started_at_ms.filter(|_| s.healthy()).map(|t| (now - t) / 1000),
                "cpu_percent": cpu.get(&s.name),
                "memory_bytes": memory.get(&s.name),
                "stand_in": s.stand_in,
                "replicas": s.replicas.iter().map(|r| json!({
                    "slot": r.slot, "node": r.node, "state": r.state, "error": r.error,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let counts = d.sources.queue.metrics().await.ok();
    let mut by_state: BTreeMap<String, u64> =
        ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
    if let Some(c) = &counts {
        by_state.extend(c.by_state.clone());
    }
    let history: Vec<(i64, u64)> = crate::util::lock(&d.history).iter().copied().collect();
    let throughput: Vec<Value> = history
        .windows(2)
        .map(|w| {
            let seconds = ((w[1].0 - w[0].0) as f64 / 1000.0).max(0.001);
            json!({"at_ms": w[1].0, "per_second": (w[1].1.saturating_sub(w[0].1)) as f64 / seconds})
        })
        .collect();
    json!({
        "project": d.sources.project,
        "services": services,
        "tasks": by_state,
        "task_types": counts.map(|c| c.task_types).unwrap_or_default(),
        "workers": d.sources.workers.list(),
        "throughput": throughput,
        "run_seconds": quantiles(&m.task_run_seconds.collect()),
    })
}

/// Gauge values by their first label (the service).
fn by_label(families: &[prometheus::proto::MetricFamily]) -> HashMap<String, f64> {
    families
        .iter()
        .flat_map(|f| f.get_metric())
        .filter_map(|m| {
            let name = m.get_label().first()?.value().to_string();
            Some((name, m.get_gauge().get_value()))
        })
        .collect()
}

/// p50, p95 and p99 of a histogram by its first label (the task type), interpolated within
/// the buckets as Prometheus' `histogram_quantile` does.
fn quantiles(families: &[prometheus::proto::MetricFamily]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for m in families.iter().flat_map(|f| f.get_metric()) {
        let Some(label) = m.get_label().first() else {
            continue;
        };
        let h = m.get_histogram();
        let total = h.get_sample_count();
        if total == 0 {
            continue;
        }
        let buckets: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        let at = |q: f64| {
            let rank = q * total as f64;
            let mut lower = (0.0, 0u64);
            for &(bound, count) in &buckets {
                if count as f64 >= rank {
                    let span = (count - lower.1) as f64;
                    let within = if span > 0.0 {
                        (rank - lower.1 as f64) / span
                    } else {
                        1.0
                    };
                    return lower.0 + (bound - lower.0) * within;
                }
                lower = (bound, count);
            }
            lower.0
        };
        out.insert(
            label.value().to_string(),
            json!({"count": total, "p50": at(0.5), "p95": at(0.95), "p99": at(0.99)}),
        );
    }
    out
}

fn sample_throughput(d: &Dashboard) {
    let (queue, history, stop) = (d.sources.queue.clone(), d.history.clone(), d.stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = queue.instruments();
            let finished = total(&m.tasks_completed.collect()) + total(&m.tasks_failed.collect());
            let mut h = crate::util::lock(&history);
            h.push_back((now_ms(), finished));
            while h.len() > SAMPLES {
                h.pop_front();
            }
        }
    });
}

fn total(families: &[prometheus::proto::MetricFamily]) -> u64 {
    families
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn task_json(t: &TaskRecord) -> Value {
    json!({
        "task_id": t.task.task_id,
        "task_type": t.task.task_type,
        "state": t.state.as_str(),
        "attempt": t.attempt,
        "priority": t.task.priority,
        "max_retries": t.task.max_retries,
        "timeout_ms": t.task.timeout.map(|d| d.as_millis() as u64),
        "metadata": t.task.metadata,
        "error": t.error,
        "created_at_ms": t.created_at_ms,
        "started_at_ms": t.started_at_ms,
        "finished_at_ms": t.finished_at_ms,
    })
}

#[derive(Deserialize)]
struct TaskQuery {
    state: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn tasks(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<TaskQuery>,
) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match TaskState::parse(&s.to_ascii_uppercase()) {
            Some(state) => Some(state),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("state={s:?} is not a task state: PENDING, RUNNING, COMPLETED, FAILED or CANCELLED\n"),
                )
                    .into_response()
            }
        },
    };
    let filter = ListFilter {
        state,
        task_type: q.task_type.filter(|t| !t.is_empty()),
        limit: q.limit.unwrap_or(50).clamp(1, 500),
        after: q.after.filter(|a| !a.is_empty()),
        newest_first: true,
    };
    match d.sources.queue.list(filter).await {
        Ok(found) => Json(found.iter().map(task_json).collect::<Vec<_>>()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn task(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    match d.sources.queue.get_with_payload(&id).await {
        Ok(t) => {
            let mut v = task_json(&t);
            v["payload_bytes"] = json!(t.task.payload.len());
            v["result_preview"] = json!(t.result.as_deref().map(preview));
            v["result_bytes"] = json!(t.result.as_ref().map(Vec::len));
            Json(v).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(RESULT_PREVIEW)]).into_owned();
    if bytes.len() > RESULT_PREVIEW {
        format!("{text}…")
    } else {
        text
    }
}

async fn cancel(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    match d.sources.queue.cancel(&id).await {
        Ok((t, _)) => Json(task_json(&t)).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

/// Runs a finished task again as a new task (the same type, payload and settings), whose id
/// says what it retries.
async fn retry(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    let old = match d.sources.queue.get_with_payload(&id).await {
        Ok(t) => t,
        Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    };
    if !matches!(old.state, TaskState::Failed | TaskState::Cancelled) {
        return (
            StatusCode::CONFLICT,
            format!(
                "task {id} is {}: only a failed or cancelled task is retried\n",
                old.state.as_str()
            ),
        )
            .into_response();
    }
    let mut metadata = old.task.metadata.clone();
    metadata.insert("retry_of".into(), id.clone());
    let again = NewTask {
        task_id: format!("{id}-retry-{}", now_ms()),
        metadata,
        ..old.task
    };
    match d.sources.queue.submit(again).await {
        Ok((t, _)) => Json(task_json(&t)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn restart(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    let Some(supervisor) = d.sources.supervisor.clone() else {
        return (StatusCode::NOT_FOUND, "this stack runs no services\n").into_response();
    };
    // The restart goes on while the page follows it live.
    if let Err(e) = supervisor.closure(std::slice::from_ref(&name)) {
        return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response();
    }
    tokio::spawn(async move {
        if let Err(e) = supervisor.restart(&name).await {
            tracing::warn!(service = %name, error = %e, "restart from the dashboard failed");
        }
    });
    (StatusCode::ACCEPTED, "restarting\n").into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    tail: Option<usize>,
}

async fn logs(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    let Some(supervisor) = &d.sources.supervisor else {
        return (StatusCode::NOT_FOUND, "this stack runs no services\n").into_response();
    };
    match supervisor.logs(&name, q.tail.unwrap_or(50).min(2000)).await {
        Ok(text) => text.into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    ticket: Option<String>,
}

/// One service's output as it comes, each line an event.
async fn log_stream(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<StreamQuery>,
) -> Response {
    if !stream_allowed(&d, &headers, q.ticket.as_deref()) {
        return refused();
    }
    let Some(supervisor) = &d.sources.supervisor else {
        return (StatusCode::NOT_FOUND, "this stack runs no services\n").into_response();
    };
    let lines = match supervisor.log_lines(&name, true, 50, 0) {
        Ok(lines) => lines,
        Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    };
    let stop = d.stop.clone();
    let stream = lines
        .take_until(async move { stop.cancelled().await })
        .map(|line| {
            Ok::<_, Infallible>(match line {
                Ok((_, text)) => Event::default().event("log").data(text),
                Err(e) => Event::default().event("error").data(e.to_string()),
            })
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Live updates: a `state` event (the snapshot) at once and then whenever something changed,
/// and a `tasks` event with the tasks that changed, each at most once a second.
async fn events(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    if !stream_allowed(&d, &headers, q.ticket.as_deref()) {
        return refused();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let mut task_events = d.sources.queue.subscribe();
    let mut service_events = d.sources.supervisor.as_ref().map(|s| s.subscribe());
    tokio::spawn(async move {
        let mut changed: HashMap<String, Value> = HashMap::new();
        let mut dirty = true;
        let mut tick = tokio::time::interval(PUSH_EVERY);
        let mut quiet = 0;
        loop {
            tokio::select! {
                () = d.stop.cancelled() => return,
                () = tx.closed() => return,
                t = task_events.recv() => match t {
                    Ok(t) => {
                        dirty = true;
                        if changed.len() < MAX_CHANGES || changed.contains_key(&t.task.task_id) {
                            changed.insert(t.task.task_id.clone(), task_json(&t));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => dirty = true,
                    Err(_) => return,
                },
                _ = async {
                    match service_events.as_mut() {
                        Some(s) => s.recv().await.map(drop).map_err(drop),
                        None => std::future::pending().await,
                    }
                } => dirty = true,
                _ = tick.tick() => {
                    quiet += 1;
                    // Uptime and throughput move on their own: a fresh state every 5 s anyway.
                    if !(dirty || quiet >= 5) {
                        continue;
                    }
                    quiet = 0;
                    dirty = false;
                    let state = Event::default().event("state").data(snapshot(&d).await.to_string());
                    if tx.send(state).await.is_err() {
                        return;
                    }
                    if !changed.is_empty() {
                        let batch: Vec<Value> = changed.drain().map(|(_, v)| v).collect();
                        let event = Event::default().event("tasks").data(Value::from(batch).to_string());
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![0.1, 1.0, 10.0]),
            &["task_type"],
        )
        .unwrap();
        // 90 quick ones below 0.1 s, 10 slow ones between 1 and 10 s.
        for _ in 0..90 {
            h.with_label_values(&["a"]).observe(0.05);
        }
        for _ in 0..10 {
            h.with_label_values(&["a"]).observe(5.0);
        }
        let q = quantiles(&h.collect());
        let a = &q["a"];
        assert_eq!(a["count"], 100);
        let p50 = a["p50"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= 0.1, "{p50}");
        let p95 = a["p95"].as_f64().unwrap();
        assert!((5.0..=6.0).contains(&p95), "{p95}");
        assert!(a["p99"].as_f64().unwrap() > p95);
    }

    #[test]
    fn text_is_escaped_for_the_page() {
        assert_eq!(escape("<b>\"x\"</b>"), "&lt;b&gt;&quot;x&quot;&lt;/b&gt;");
    }
}
