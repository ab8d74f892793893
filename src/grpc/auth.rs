//! Token authentication of both gRPC ports: the server checks `authorization: Bearer TOKEN` on
//! every call except the standard health service; clients send it.

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::Tls;
use tonic::{Request, Status};

/// A channel whose calls carry the token, when there is one.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// An endpoint for `addr` ("HOST:PORT"; a wildcard address is dialled on loopback), over TLS
/// trusting `tls.ca_pem` when given.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, String> {
    endpoint_trusting(
        addr,
        tls.map(|t| (t.ca_pem.as_slice(), t.server_name.as_str())),
    )
}

/// An endpoint for `addr`, over TLS when given what to trust: (CA PEM, expected server name).
pub fn endpoint_trusting(addr: &str, tls: Option<(&[u8], &str)>) -> Result<Endpoint, String> {
    let addr = addr
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    match tls {
        None => Ok(endpoint),
        Some((ca, server_name)) => endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(server_name),
            )
            .map_err(|e| format!("TLS: {e}")),
    }
}

/// The server side: lets a call through when it carries the expected token (or none is set).
#[derive(Clone, Default)]
pub struct Guard {
    /// SHA-256 of the token: comparing digests takes the same time whatever the guess, its
    /// length included.
    expected: Option<[u8; 32]>,
    /// Where the token lives, for a refused caller.
    source: std::sync::Arc<str>,
}

impl Guard {
    /// Requires `token` when given; `source` tells a refused caller where to find it.
    pub fn new(token: Option<&str>, source: &str) -> Guard {
        Guard {
            expected: token.map(digest),
            source: source.into(),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal in constant time (`subtle`, which keeps the compiler from shortcutting the comparison).
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]).into()
}

impl Guard {
    /// Whether a call with this `authorization` value may pass.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        match &self.expected {
            None => true,
            Some(expected) => authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|token| same(&digest(token), expected)),
        }
    }
}

impl Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if self.allows(given) {
            return Ok(request);
        }
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(_) => Err(Status::unauthenticated(format!(
                "the token does not match this port's, which is in {}",
                self.source
            ))),
            None => Err(Status::unauthenticated(format!(
                "this port requires a token, sent as the metadata `authorization: Bearer TOKEN`; it is in {}. The dspy-agent command, OrchestratorClient and attached agents of the same user find it there by themselves; elsewhere set DSPY_AGENT_TOKEN",
                self.source
            ))),
        }
    }
}

/// The client side: adds the token to every call.
#[derive(Clone, Default)]
pub struct Bearer {
    header: Option<MetadataValue<Ascii>>,
}

impl Bearer {
    /// `None` when there is no token; an error when it cannot be sent as a header.
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        let header = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token must be printable ASCII".to_string())?,
            ),
        };
        Ok(Bearer { header })
    }

    pub fn channel(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(guard: &mut Guard, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        guard.call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn only_the_right_token_passes() {
        let mut open = Guard::new(None, "");
        assert_eq!(call(&mut open, None), Ok(()));
        let mut guard = Guard::new(Some("s3cret-token-0123456789"), "the test");
        assert_eq!(
            call(&mut guard, Some("Bearer s3cret-token-0123456789")),
            Ok(())
        );
        for wrong in [
            None,
            Some("Bearer s3cret-token-012345678"),
            Some("Bearer "),
            Some("s3cret-token-0123456789"),
            Some("Basic s3cret-token-0123456789"),
        ] {
            assert_eq!(
                call(&mut guard, wrong),
                Err(tonic::Code::Unauthenticated),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn the_client_sends_what_the_server_expects() {
        let mut bearer = Bearer::new(Some("s3cret-token-0123456789")).unwrap();
        let request = bearer.call(Request::new(())).unwrap();
        let mut guard = Guard::new(Some("s3cret-token-0123456789"), "the test");
        assert!(guard.call(request).is_ok());
        assert!(Bearer::new(Some("bad\ntoken")).is_err());
    }
}
