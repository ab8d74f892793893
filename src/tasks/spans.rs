//! OpenTelemetry spans of tasks, exported over OTLP (gRPC) when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; without it nothing is made or exported.
//!
//! One trace covers a task across processes: the submit span continues the caller's W3C
//! `traceparent` (a gRPC header, or the task's metadata), the run span of each attempt is its
//! child, and the handler or remote worker receives the run span's `traceparent` in the task's
//! metadata to continue it.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::tasks::model::{NewTask, TRACE_KEYS};

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static EXPORTING: OnceLock<Option<Exporting>> = OnceLock::new();

fn exporting() -> Option<&'static Exporting> {
    EXPORTING.get().and_then(Option::as_ref)
}

fn configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Starts exporting when the environment asks for it; once per process, from inside the
/// runtime (the exporter's channel lives there). A failure is logged, and nothing is exported.
pub fn init() {
    EXPORTING.get_or_init(|| {
        if !configured() {
            return None;
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "OTEL_EXPORTER_OTLP_ENDPOINT is set, but no OTLP exporter could be made; no spans are exported");
                return None;
            }
        };
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "dspy-agent".into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let tracer = provider.tracer("dspy-agent-infra");
        tracing::info!("exporting task spans over OTLP");
        Some(Exporting { provider, tracer })
    });
}

/// Sends the spans still buffered (a stack stopping); waits on a blocking thread.
pub async fn flush() {
    if let Some(e) = exporting() {
        let provider = e.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

fn parent_of(task: &NewTask) -> Context {
    let carrier: HashMap<String, String> = TRACE_KEYS
        .iter()
        .filter_map(|k| Some((k.to_string(), task.metadata.get(*k)?.clone())))
        .collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// Writes `cx`'s span into the task's metadata as its `traceparent` (and `tracestate`).
fn carry(cx: &Context, task: &mut NewTask) {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    for key in TRACE_KEYS {
        match carrier.remove(key) {
            Some(v) if !v.is_empty() => {
                task.metadata.insert(key.to_string(), v);
            }
            _ => {
                task.metadata.remove(key);
            }
        }
    }
}

fn attributes(task: &NewTask) -> Vec<KeyValue> {
    vec![
        KeyValue::new("task.id", task.task_id.clone()),
        KeyValue::new("task.type", task.task_type.clone()),
    ]
}

/// The submit span: a child of the caller's trace when the task carries one, else a new trace;
/// the task then carries this span on to its runs.
pub fn on_submit(task: &mut NewTask) {
    let Some(e) = exporting() else { return };
    let parent = parent_of(task);
    let span = e
        .tracer
        .span_builder(format!("submit {}", task.task_type))
        .with_kind(SpanKind::Server)
        .with_attributes(attributes(task))
        .start_with_context(&e.tracer, &parent);
    let cx = parent.with_span(span);
    carry(&cx, task);
    cx.span().end();
}

/// The span of one attempt, ended with its outcome.
pub struct RunSpan(Context);

/// Starts the span of an attempt as a child of the task's trace, and hands the handler (or
/// remote worker) this span as the task's `traceparent`.
pub fn on_run(task: &mut NewTask, attempt: u32) -> Option<RunSpan> {
    let e = exporting()?;
    let parent = parent_of(task);
    let mut attrs = attributes(task);
    attrs.push(KeyValue::new("task.attempt", i64::from(attempt)));
    let span = e
        .tracer
        .span_builder(format!("run {}", task.task_type))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attrs)
        .start_with_context(&e.tracer, &parent);
    let cx = parent.with_span(span);
    carry(&cx, task);
    Some(RunSpan(cx))
}

impl RunSpan {
    /// Ends the span: `error` when the attempt failed, none when it completed.
    pub fn end(self, error: Option<&str>) {
        let span = self.0.span();
        if let Some(error) = error {
            span.set_status(Status::error(error.to_string()));
        }
        span.end();
    }
}
