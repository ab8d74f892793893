//! What a browser may do with the HTTP port, checked before any route runs.
//!
//! - `Host` must name the address the port serves (or `localhost` for a loopback port, or any
//!   IP address or this machine's name for a wildcard one): a page of another site whose name
//!   was made to resolve to 127.0.0.1 (DNS rebinding) then reaches nothing, with or without a
//!   token.
//! - A request's `Origin`, when it has one, must be the port's own: no other page may read or
//!   act here. A browser sends `Origin` with every POST; a state-changing request without it
//!   must carry the token itself (a script, not a page).
//! - Every answer says what a browser may do with it: only the page's own scripts and styles,
//!   never inside a frame, no sniffing, no referrer, and nothing cached but the assets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The addresses a request may name in its `Host`, and the port's scheme.
#[derive(Clone)]
pub struct Served {
    bound: SocketAddr,
    machine: Option<String>,
    tls: bool,
}

impl Served {
    pub fn new(bound: SocketAddr, tls: bool) -> Served {
        Served {
            bound,
            machine: machine_name(),
            tls,
        }
    }

    /// Whether a `Host` value (`NAME[:PORT]`) names this port.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<axum::http::uri::Authority>() else {
            return false;
        };
        let default_port = if self.tls { 443 } else { 80 };
        if authority.port_u16().unwrap_or(default_port) != self.bound.port() {
            return false;
        }
        let name = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip = self.bound.ip();
        match name.parse::<IpAddr>() {
            Ok(named) => ip.is_unspecified() || named == ip,
            Err(_) => {
                let name = name.to_ascii_lowercase();
                (name == "localhost" && (ip.is_loopback() || ip.is_unspecified()))
                    || (!ip.is_loopback() && self.machine.as_deref() == Some(name.as_str()))
            }
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// This machine's name, lower case, as `gethostname` gives it.
fn machine_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .map(str::to_ascii_lowercase)
}

fn forbidden(why: String) -> Response {
    (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
}

/// The middleware: refuses a foreign `Host` or `Origin`, and sets the headers on every answer.
pub async fn guard(State(served): State<Arc<Served>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !served.host_allowed(host) {
        return with_headers(forbidden(format!(
            "this port serves {}; a request naming {host:?} as its host is refused (open the address the stack printed)",
            served.bound
        )));
    }
    let unsafe_method = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let own = format!("{}://{host}", served.scheme());
    match headers.get(header::ORIGIN).map(|v| v.to_str().unwrap_or("")) {
        Some(origin) if origin.eq_ignore_ascii_case(&own) => {}
        Some(origin) => {
            return with_headers(forbidden(format!(
                "a page of {origin:?} may not use this port: only this dashboard's own page ({own}) may"
            )))
        }
        None if unsafe_method && !headers.contains_key(header::AUTHORIZATION) => {
            return with_headers(forbidden(
                "a request that changes something needs the Origin header a browser sends, or `Authorization: Bearer TOKEN`".to_string(),
            ))
        }
        None => {}
    }
    let is_asset = request.uri().path().starts_with("/assets/");
    let mut response = with_headers(next.run(request).await);
    if !is_asset {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn with_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(addr: &str) -> Served {
        Served {
            bound: addr.parse().unwrap(),
            machine: Some("gpu-box".into()),
            tls: false,
        }
    }

    #[test]
    fn a_loopback_port_answers_its_address_and_localhost() {
        let s = served("127.0.0.1:9464");
        assert!(s.host_allowed("127.0.0.1:9464"));
        assert!(s.host_allowed("LOCALHOST:9464"));
        for refused in [
            "127.0.0.1:9465",
            "127.0.0.2:9464",
            "[::1]:9464",
            "evil.example:9464",
            "gpu-box:9464",
            "127.0.0.1",
            "",
            "127.0.0.1:9464/x",
        ] {
            assert!(!s.host_allowed(refused), "{refused} allowed");
        }
        assert!(served("[::1]:80").host_allowed("[::1]"));
    }

    #[test]
    fn a_wildcard_port_answers_addresses_and_the_machine_name_only() {
        let s = served("0.0.0.0:9464");
        for allowed in [
            "10.1.2.3:9464",
            "[fe80::1]:9464",
            "localhost:9464",
            "gpu-box:9464",
        ] {
            assert!(s.host_allowed(allowed), "{allowed} refused");
        }
        assert!(!s.host_allowed("rebound.example:9464"));
        assert!(!s.host_allowed("10.1.2.3:80"));
    }
}
