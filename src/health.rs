//! Host-side network probes (TCP connect, HTTP status, Redis PING) and the backoff that paces
//! them. Probes that need the Engine (exec, the image's HEALTHCHECK) live with the supervisor.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Delays between probes: the first probe runs at once, then a few milliseconds, growing by half
/// each time up to `cap`. A service that is up in 40 ms is seen in about 40 ms, not at the Engine's
/// 30 s HEALTHCHECK interval.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(5).min(cap),
            cap,
        }
    }

    pub fn starting_at(first: Duration, cap: Duration) -> Self {
        Backoff {
            next: first.min(cap),
            cap,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 3 / 2).min(self.cap);
        delay
    }
}

/// The address to probe for a published port: wildcard bindings are reached on loopback.
pub fn probe_addr(host_ip: &str, host_port: u16) -> SocketAddr {
    let ip = match host_ip {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        other => other,
    };
    let ip = ip.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, host_port)
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(format!("{what} gave no answer within {timeout:?}")),
    }
}

/// A TCP connect to a published port. The Engine's port proxy accepts connections even while
/// nothing listens in the container and then drops them, so an accepted connection only counts
/// when the peer neither closes it nor resets it within a short grace period (or sends data).
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    const GRACE: Duration = Duration::from_millis(100);
    within(timeout + GRACE, &format!("TCP connect to {addr}"), async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(GRACE, stream.read(&mut byte)).await {
            Err(_) | Ok(Ok(1..)) => Ok(()),
            Ok(Ok(_)) => Err(format!(
                "TCP connect to {addr}: closed at once (nothing listens behind the port yet)"
            )),
            Ok(Err(e)) => Err(format!("TCP connect to {addr}: {e}")),
        }
    })
    .await
}

/// One HTTP/1.1 request; returns the status and the body.
pub async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let url = format!("http://{addr}{path}");
    within(timeout, &format!("{method} {url}"), async {
        let fail = |e: &dyn std::fmt::Display| format!("{method} {url}: {e}");
        let stream = TcpStream::connect(addr).await.map_err(|e| fail(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
        let mut builder = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        if !body.is_empty() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(body)).map_err(|e| fail(&e))?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(&e))?
                .to_bytes();
            Ok((status, body))
        };
        // The connection is driven beside the exchange, in this task; it ends with it.
        tokio::pin!(conn);
        tokio::pin!(exchange);
        tokio::select! {
            result = &mut exchange => result,
            driven = &mut conn => match driven {
                Err(e) => Err(fail(&e)),
                // Closed after the response: the exchange finishes on what it has.
                Ok(()) => exchange.await,
            },
        }
    })
    .await
}

pub async fn http(
    addr: SocketAddr,
    path: &str,
    expected: u16,
    timeout: Duration,
) -> Result<(), String> {
    let (status, _) = request(addr, hyper::Method::GET, path, Bytes::new(), timeout).await?;
    if status == expected {
        Ok(())
    } else {
        Err(format!(
            "GET http://{addr}{path} answered {status}, expected {expected}"
        ))
    }
}

pub async fn redis(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    within(timeout, &format!("Redis PING to {addr}"), async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("Redis PING to {addr}: {e}"))?;
        stream
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .await
            .map_err(|e| format!("Redis PING to {addr}: {e}"))?;
        let mut reply = Vec::with_capacity(64);
        let mut buf = [0u8; 64];
        while !reply.windows(2).any(|w| w == b"\r\n") && reply.len() < 512 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("Redis PING to {addr}: {e}"))?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&reply);
        let line = line.lines().next().unwrap_or("").trim();
        // NOAUTH: the server is up and serving, it just wants a password.
        if line == "+PONG" || line.starts_with("-NOAUTH") {
            Ok(())
        } else if line.is_empty() {
            Err(format!(
                "Redis PING to {addr}: connection closed without an answer"
            ))
        } else {
            Err(format!("Redis PING to {addr} answered {line:?}"))
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn backoff_starts_small_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(250));
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(5));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), Duration::from_millis(250));
    }

    async fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(reply).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn probes_against_real_sockets() {
        let addr = serve_once(b"+PONG\r\n").await;
        redis(addr, Duration::from_secs(2)).await.unwrap();
        let addr = serve_once(b"-LOADING dataset\r\n").await;
        assert!(redis(addr, Duration::from_secs(2))
            .await
            .unwrap_err()
            .contains("LOADING"));

        let addr = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        http(addr, "/health", 200, Duration::from_secs(2))
            .await
            .unwrap();
        let addr =
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert!(http(addr, "/health", 200, Duration::from_secs(2))
            .await
            .unwrap_err()
            .contains("503"));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let free = listener.local_addr().unwrap();
        drop(listener);
        assert!(tcp(free, Duration::from_secs(2)).await.is_err());
    }
}
