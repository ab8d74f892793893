//! The dashboard at `/`: one page (assets built into the binary) that shows the services, the
//! tasks and the workers, live over server-sent events (one update a second at most), with
//! restart, cancel and retry. Entry takes the token when one is set: a login form keeps it in a
//! cookie for this address (HttpOnly, SameSite=Strict). Actions also need a header that only
//! the page's own script sends, so another site cannot make a signed-in browser post them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures_util::StreamExt;
use prometheus::core::Collector;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Sources;
use crate::tasks::model::{NewTask, TaskRecord, TaskState};
use crate::tasks::store::{now_ms, ListFilter};

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

const COOKIE: &str = "dspy_agent_token";
/// Sent by the page's own script with every action.
const ACTION_HEADER: &str = "x-dspy-agent";
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
    stop: CancellationToken,
}

/// The dashboard's routes; its sampler runs until `stop`.
pub fn routes(sources: Sources, stop: CancellationToken) -> Router {
    let dashboard = Dashboard {
        sources,
        history: Arc::default(),
        stop,
    };
    sample_throughput(&dashboard);
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/logout", post(logout))
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

/// The token a request carries: its bearer header, else the login cookie.
fn allowed(d: &Dashboard, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if d.sources.guard.allows(bearer) {
        return true;
    }
    cookie(headers).is_some_and(|t| d.sources.guard.allows(Some(&format!("Bearer {t}"))))
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .and_then(|(_, v)| unhex(v))
}

/// The token travels in the cookie as hex: a token may hold `;` or `,`, which a cookie cannot.
fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a token is required: sign in at / or send `Authorization: Bearer TOKEN` (`dspy-agent token` prints it)\n",
    )
        .into_response()
}

fn login_page(d: &Dashboard, message: &str) -> Response {
    let page = LOGIN
        .replace("{{project}}", &escape(&d.sources.project))
        .replace("{{message}}", &escape(message));
    (StatusCode::UNAUTHORIZED, Html(page)).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn index(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if !allowed(&d, &headers) {
        return login_page(&d, "");
    }
    Html(INDEX.replace("{{project}}", &escape(&d.sources.project))).into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(d): State<Dashboard>, Form(form): Form<Login>) -> Response {
    let token = form.token.trim();
    if !d.sources.guard.allows(Some(&format!("Bearer {token}"))) {
        return login_page(
            &d,
            "That token is not this stack's. `dspy-agent token` prints it.",
        );
    }
    let secure = if d.sources.tls { "; Secure" } else { "" };
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
                hex(token)
            ),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

async fn logout() -> Response {
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

/// Why an action is refused, if it is: it needs the token and the page's own header.
fn action_refusal(d: &Dashboard, headers: &HeaderMap) -> Option<Response> {
    if !allowed(d, headers) {
        return Some(refused());
    }
    if headers.get(ACTION_HEADER).is_none() {
        return Some(
            (
                StatusCode::FORBIDDEN,
                format!(
                    "actions need the {ACTION_HEADER} header, which the dashboard's page sends\n"
                ),
            )
                .into_response(),
        );
    }
    None
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
    if let Some(r) = action_refusal(&d, &headers) {
        return r;
    }
    match d.sources.queue.cancel(&id).await {
        Ok((t, _)) => Json(task_json(&t)).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

/// Runs a finished task again as a new task (the same type, payload and settings), whose id
/// says what it retries.
async fn retry(State(d): State<Dashboard>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = action_refusal(&d, &headers) {
        return r;
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
    if let Some(r) = action_refusal(&d, &headers) {
        return r;
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

/// One service's output as it comes, each chunk an event.
async fn log_stream(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !allowed(&d, &headers) {
        return refused();
    }
    let (Some(supervisor), Some(engine)) = (&d.sources.supervisor, &d.sources.engine) else {
        return (StatusCode::NOT_FOUND, "this stack runs no services\n").into_response();
    };
    let id = supervisor
        .snapshot()
        .into_iter()
        .find(|s| s.name == name)
        .and_then(|s| s.container_id);
    let Some(id) = id else {
        return (
            StatusCode::NOT_FOUND,
            format!("{name} is not a running service of this stack\n"),
        )
            .into_response();
    };
    let stop = d.stop.clone();
    let stream = engine
        .log_stream(&id, true, 50, 0)
        .take_until(async move { stop.cancelled().await })
        .map(|chunk| {
            Ok::<_, Infallible>(match chunk {
                Ok((_, bytes)) => Event::default()
                    .event("log")
                    .data(String::from_utf8_lossy(&bytes).trim_end()),
                Err(e) => Event::default().event("error").data(e.to_string()),
            })
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Live updates: a `state` event (the snapshot) at once and then whenever something changed,
/// and a `tasks` event with the tasks that changed, each at most once a second.
async fn events(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if !allowed(&d, &headers) {
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
    fn the_login_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("a=1; dspy_agent_token={}; b=2", hex("a;b,c"))
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&headers).as_deref(), Some("a;b,c"));
        assert_eq!(escape("<b>\"x\"</b>"), "&lt;b&gt;&quot;x&quot;&lt;/b&gt;");
    }
}
