//! Counts every gRPC call of a port by method and status code, and times it: a tower layer in
//! front of the routes. The code is read where gRPC puts it, in the response headers (a call
//! refused at once) or in the trailers; a call whose client went away first counts as CANCELLED.
//! The time is the call's whole life, until its last frame (for a stream, the stream's). Only
//! methods the ports serve are named; any other path counts as "unknown", so that callers cannot
//! grow the metrics without bound.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use tower::{Layer, Service};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Observe {
    metrics: Arc<Metrics>,
}

impl Observe {
    pub fn new(metrics: Arc<Metrics>) -> Observe {
        Observe { metrics }
    }
}

impl<S> Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> Service<Request<B>> for Observed<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: Body,
{
    type Response = Response<Timed<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if served().contains(path) {
            path.to_string()
        } else {
            "unknown".to_string()
        };
        let metrics = Arc::clone(&self.metrics);
        let began = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let record = Record {
                metrics,
                method,
                began,
                // A call answered with headers only carries its code there.
                in_headers: code_in(response.headers()),
                done: false,
            };
            Ok(response.map(|body| Timed { body, record }))
        })
    }
}

/// Every method path both ports serve: theirs (from the descriptors they were built from),
/// health and reflection.
fn served() -> &'static HashSet<String> {
    static SERVED: OnceLock<HashSet<String>> = OnceLock::new();
    SERVED.get_or_init(|| {
        use prost::Message;
        let mut paths: HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let set = prost_types::FileDescriptorSet::decode(super::pb::FILE_DESCRIPTOR_SET)
            .expect("the descriptors built into this binary decode");
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for method in service.method {
                    paths.insert(format!(
                        "/{package}.{name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
        paths
    })
}

/// Records one call once: when its code is known, or when its body is dropped unfinished.
struct Record {
    metrics: Arc<Metrics>,
    method: String,
    began: Instant,
    in_headers: Option<&'static str>,
    done: bool,
}

impl Record {
    fn finish(&mut self, code: &str) {
        if self.done {
            return;
        }
        self.done = true;
        self.metrics
            .grpc_requests
            .with_label_values(&[self.method.as_str(), code])
            .inc();
        self.metrics
            .grpc_seconds
            .with_label_values(&[self.method.as_str()])
            .observe(self.began.elapsed().as_secs_f64());
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(self.in_headers.unwrap_or("CANCELLED"));
    }
}

/// The name of the `grpc-status` in `headers`, if there is one.
fn code_in(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    let number: i32 = value.parse().ok()?;
    Some(match tonic::Code::from_i32(number) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    })
}

pin_project_lite::pin_project! {
    /// A response body that records its call when its trailers pass.
    pub struct Timed<B> {
        #[pin]
        body: B,
        record: Record,
    }
}

impl<B: Body> Body for Timed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_in) {
                    this.record.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.finish("INTERNAL"),
            // Ended without trailers: the code was in the headers, if anywhere.
            Poll::Ready(None) => {
                let code = this.record.in_headers.unwrap_or("UNKNOWN");
                this.record.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_methods_are_known_and_nothing_else() {
        for path in [
            "/orchestrator.v1.OrchestratorService/SubmitTask",
            "/env_manager.v1.EnvManagerService/StreamLogs",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(served().contains(path), "{path}");
        }
        assert!(!served().contains("/orchestrator.v1.OrchestratorService/Nope"));
    }
}
