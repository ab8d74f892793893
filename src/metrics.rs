//! The stack's Prometheus metrics, one registry per stack (several stacks may share a process).
//! Events are counted where they happen (the queue, the worker registry); levels (queue depth,
//! workers, services) are read when scraped.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Run and wait times from a millisecond to an hour.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

pub struct Metrics {
    registry: Registry,
    pub tasks_submitted: IntCounterVec,
    pub tasks_started: IntCounterVec,
    pub tasks_completed: IntCounterVec,
    pub tasks_failed: IntCounterVec,
    pub tasks_retried: IntCounterVec,
    pub tasks_cancelled: IntCounterVec,
    pub task_run_seconds: HistogramVec,
    pub task_wait_seconds: HistogramVec,
    pub lease_expiries: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub workers: IntGaugeVec,
    pub service_up: IntGaugeVec,
    pub service_healthy: IntGaugeVec,
    pub service_restarts: IntCounterVec,
    pub engine_up: IntGauge,
    pub grpc_requests: IntCounterVec,
    pub grpc_seconds: HistogramVec,
    pub probe_seconds: HistogramVec,
    pub service_cpu: GaugeVec,
    pub service_memory: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn seconds(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
        labels,
    )
    .expect("a valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("dspy_agent".into()), None).expect("a valid prefix");
        let t = &["task_type"];
        let build = gauge(
            &r,
            "build_info",
            "The running version of dspy-agent-infra (always 1).",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let engine_up = IntGauge::new(
            "engine_up",
            "Whether the container engine answered the last scrape (1) or not (0).",
        )
        .expect("a valid metric");
        r.register(Box::new(engine_up.clone()))
            .expect("registered once");
        Metrics {
            tasks_submitted: counter(&r, "tasks_submitted_total", "Tasks queued.", t),
            tasks_started: counter(&r, "tasks_started_total", "Task attempts started.", t),
            tasks_completed: counter(&r, "tasks_completed_total", "Tasks completed.", t),
            tasks_failed: counter(
                &r,
                "tasks_failed_total",
                "Tasks failed for good (retries used up).",
                t,
            ),
            tasks_retried: counter(
                &r,
                "tasks_retried_total",
                "Failed attempts put back in the queue for a retry.",
                t,
            ),
            tasks_cancelled: counter(&r, "tasks_cancelled_total", "Tasks cancelled.", t),
            task_run_seconds: seconds(
                &r,
                "task_run_seconds",
                "How long a finished attempt ran, by task type.",
                t,
            ),
            task_wait_seconds: seconds(
                &r,
                "task_queue_wait_seconds",
                "How long a task waited in the queue before its first attempt, by task type.",
                t,
            ),
            lease_expiries: counter(
                &r,
                "task_lease_expiries_total",
                "Tasks a remote worker held when it went away; they go back to the queue.",
                t,
            ),
            queue_depth: gauge(
                &r,
                "queue_depth",
                "Tasks waiting (pending) or running, by type and state.",
                &["task_type", "state"],
            ),
            workers: gauge(
                &r,
                "workers_connected",
                "Remote workers connected, by the task type they serve.",
                t,
            ),
            service_up: gauge(
                &r,
                "service_up",
                "Whether the service's container runs (1) or not (0).",
                &["service"],
            ),
            service_healthy: gauge(
                &r,
                "service_healthy",
                "Whether the service passed its health check (1) or not (0).",
                &["service"],
            ),
            service_restarts: counter(
                &r,
                "service_restarts_total",
                "Restarts of the service's container, by its policy or by hand.",
                &["service"],
            ),
            engine_up,
            grpc_requests: counter(
                &r,
                "grpc_requests_total",
                "gRPC calls by method and status code.",
                &["method", "code"],
            ),
            grpc_seconds: seconds(
                &r,
                "grpc_request_seconds",
                "How long gRPC calls took, by method (for a stream, its whole life).",
                &["method"],
            ),
            probe_seconds: seconds(
                &r,
                "service_probe_seconds",
                "How long health probes took, by service and outcome.",
                &["service", "outcome"],
            ),
            service_cpu: {
                let g = GaugeVec::new(
                    Opts::new(
                        "service_cpu_percent",
                        "CPU the service's container used, in percent of one core, sampled every 10 s.",
                    ),
                    &["service"],
                )
                .expect("a valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            service_memory: gauge(
                &r,
                "service_memory_bytes",
                "Memory the service's container uses (page cache excluded), sampled every 10 s.",
                &["service"],
            ),
            registry: r,
        }
    }

    /// Everything, in the Prometheus text format.
    /// Shows every per-type family of `task_type` at zero from now on: a scrape (and a
    /// `rate()` or `increase()` over it) then sees the type before its first event.
    pub fn know_task_type(&self, task_type: &str) {
        let labels = [task_type];
        for counter in [
            &self.tasks_submitted,
            &self.tasks_started,
            &self.tasks_completed,
            &self.tasks_failed,
            &self.tasks_retried,
            &self.tasks_cancelled,
            &self.lease_expiries,
        ] {
            counter.with_label_values(&labels);
        }
        self.task_run_seconds.with_label_values(&labels);
        self.task_wait_seconds.with_label_values(&labels);
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding writes to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_type_is_shown_at_zero_before_its_first_event() {
        let m = Metrics::new();
        m.know_task_type("train");
        let text = m.render();
        for family in [
            "submitted_total",
            "started_total",
            "completed_total",
            "failed_total",
            "retried_total",
            "cancelled_total",
        ] {
            let line = format!("dspy_agent_tasks_{family}{{task_type=\"train\"}} 0");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("dspy_agent_task_run_seconds_count{task_type=\"train\"} 0"));
    }

    #[test]
    fn every_family_has_help_and_type_and_the_prefix() {
        let m = Metrics::new();
        m.tasks_submitted.with_label_values(&["ping"]).inc();
        m.task_run_seconds
            .with_label_values(&["ping"])
            .observe(0.02);
        let text = m.render();
        assert!(text.contains("# TYPE dspy_agent_tasks_submitted_total counter"));
        assert!(text.contains("dspy_agent_tasks_submitted_total{task_type=\"ping\"} 1"));
        assert!(text.contains("# HELP dspy_agent_task_run_seconds "));
        assert!(
            text.contains("dspy_agent_task_run_seconds_bucket{task_type=\"ping\",le=\"0.05\"} 1")
        );
        assert!(text.contains(&format!(
            "dspy_agent_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
