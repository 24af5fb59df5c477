//! Forwarding to the real metadata service (`--upstream`).
//!
//! Method, target, header values and body go upstream as admitted (`admission`), less the
//! hop-by-hop headers (RFC 9110 §7.6.1); header names in the case hyper gives them (lower).
//! Nothing is added: metadata services refuse token traffic that carries `X-Forwarded-For`,
//! so no XFF, `Forwarded` or `Via`. Both bodies are buffered whole within the budget (as
//! nginx's `proxy_buffering`), so the upstream only ever sees a `Content-Length` body, and a
//! response that fails midway is a 502, not a truncated 200.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri,
    body::Body as _,
    header::{self, HeaderName, HeaderValue},
    http::request::Parts,
};

use super::{
    admission::connection_options,
    budget::{BodyError, Budget},
    cache::CredentialCache,
    connection::plain_bytes,
    upstream::{Dial, Upstream},
};
use crate::{
    caller::Peer, config::UpstreamSettings, ebpf::Exemptions, mock::cloudstack::PASSWORD_HEADER,
    router::Router,
};

/// The CloudStack router's password server.
const PASSWORD_PORT: u16 = 8080;

/// Largest upstream response body passed on: beyond it, a 502.
pub const MAX_RESPONSE_BODY: usize = 16 << 20;
/// A GCE `wait_for_change` long poll is given its `timeout_sec` (this without one, at most
/// [`MAX_LONG_POLL`]) plus [`LONG_POLL_MARGIN`], instead of the upstream timeout.
pub const DEFAULT_LONG_POLL: Duration = Duration::from_secs(300);
pub const MAX_LONG_POLL: Duration = Duration::from_secs(3600);
pub const LONG_POLL_MARGIN: Duration = Duration::from_secs(10);

pub struct Forwarder {
    upstream: Upstream,
    /// CloudStack's password server (port 8080 of the router), for requests that carry
    /// `DomU_Request`.
    password_server: Option<Box<Upstream>>,
    settings: UpstreamSettings,
    shared: Arc<Shared>,
}

/// What every worker's forwarder shares.
#[derive(Default)]
pub struct Shared {
    pub cache: CredentialCache,
    /// The CloudStack router followed, with `upstream = "cloudstack"`.
    pub router: Option<Arc<Router>>,
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{}", chain(.0))]
    Connect(std::io::Error),
    #[error("{}", chain(.0))]
    Upstream(hyper::Error),
    #[error("its response's body: {0}")]
    Body(#[from] BodyError),
    #[error("it sent transfer coding {0:?}; only chunked is supported")]
    Coding(String),
}

impl Forwarder {
    /// `exemptions` is `None` only where no programs are loaded (unit tests, the fuzzer).
    pub fn new(
        settings: UpstreamSettings,
        exemptions: Option<Arc<Exemptions>>,
        shared: Arc<Shared>,
    ) -> Self {
        let timeout = settings.connect_timeout;
        let (dial, password_dial) = match (settings.url.authority(), &shared.router) {
            (Some(authority), _) => (Dial::Authority(authority.clone()), None),
            (None, router) => {
                let router = router.clone().unwrap_or_default();
                (
                    Dial::Router(Arc::clone(&router), 80),
                    Some(Dial::Router(router, PASSWORD_PORT)),
                )
            }
        };
        let upstream = Upstream::new(dial, exemptions.clone(), timeout);
        let password_server =
            password_dial.map(|dial| Box::new(Upstream::new(dial, exemptions, timeout)));
        Forwarder {
            upstream,
            password_server,
            settings,
            shared,
        }
    }

    pub fn max_request_body(&self) -> usize {
        self.settings.max_request_body
    }

    /// A client that goes away drops this future, and with it the upstream request. `peer`
    /// names the caller in the log line of a failure (never to the upstream: the real
    /// service gets no added header). Credentials and tokens come from the cache (`cache`).
    pub async fn forward(
        &self,
        req: Request<Bytes>,
        peer: &Peer,
        budget: &Budget,
    ) -> Response<Full<Bytes>> {
        let fetch = |req| self.send(req, peer, budget);
        if let Some(served) = self.shared.cache.respond(&req, fetch).await {
            return served.resp.map(Full::new);
        }
        match self.send(req, peer, budget).await {
            Ok(resp) | Err(resp) => resp.map(Full::new),
        }
    }

    /// The upstream's answer, or (`Err`) the proxy's gateway error when there is none.
    async fn send(
        &self,
        req: Request<Bytes>,
        peer: &Peer,
        budget: &Budget,
    ) -> Result<Response<Bytes>, Response<Bytes>> {
        let (parts, body) = req.into_parts();
        let limit = self.deadline(&parts.uri);
        let exchange = self.exchange(&parts, body, budget);
        let began = tokio::time::Instant::now();
        let (status, why) = match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(resp)) => {
                crate::metrics::global().upstream_latency(began.elapsed());
                return Ok(resp);
            }
            Ok(Err(ForwardError::Body(BodyError::Exhausted))) => {
                let busy = "redirect: too many responses in flight; retry\n";
                return Err(plain_bytes(
                    StatusCode::SERVICE_UNAVAILABLE,
                    busy.to_owned(),
                ));
            }
            Ok(Err(e)) => (StatusCode::BAD_GATEWAY, format!("failed: {e}")),
            Err(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("sent no response within {limit:?}"),
            ),
        };
        let url = &self.settings.url;
        tracing::warn!("upstream {url} {why} (asked by {peer})");
        Err(plain_bytes(
            status,
            format!("redirect: upstream {url} {why}\n"),
        ))
    }

    async fn exchange(
        &self,
        parts: &Parts,
        body: Bytes,
        budget: &Budget,
    ) -> Result<Response<Bytes>, ForwardError> {
        let upstream = match &self.password_server {
            Some(password) if parts.headers.contains_key(PASSWORD_HEADER) => &**password,
            _ => &self.upstream,
        };
        let mut sent_again = false;
        let (mut lease, resp) = loop {
            let mut lease = upstream
                .lease(sent_again)
                .await
                .map_err(ForwardError::Connect)?;
            match lease.send(self.upstream_request(parts, body.clone())).await {
                Ok(resp) => break (lease, resp),
                // A kept-alive connection the upstream had just closed, found only once the
                // request was on it: safe to repeat, on a new one, for an idempotent method.
                Err(e)
                    if lease.reused
                        && !sent_again
                        && idempotent(&parts.method)
                        && closed_unanswered(&e) =>
                {
                    sent_again = true;
                }
                Err(e) => return Err(ForwardError::Upstream(e)),
            }
        };
        let (mut head, body) = resp.into_parts();
        if let Some(coding) = head.headers.get(header::TRANSFER_ENCODING)
            && !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Err(ForwardError::Coding(
                String::from_utf8_lossy(coding.as_bytes()).into(),
            ));
        }
        strip_hop_by_hop(&mut head.headers);
        let declared = body.size_hint().exact();
        let body = lease
            .drive(budget.collect(body, MAX_RESPONSE_BODY, declared))
            .await?;
        lease.release();
        Ok(Response::from_parts(head, body))
    }

    fn upstream_request(&self, parts: &Parts, body: Bytes) -> Request<Full<Bytes>> {
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        // Answered by hyper before the body was read; the length is the body's own.
        headers.remove(header::EXPECT);
        headers.remove(header::CONTENT_LENGTH);
        if !headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(
                self.settings
                    .url
                    .authority()
                    .map_or(crate::router::DATA_SERVER, |a| a.as_str()),
            )
        {
            headers.insert(header::HOST, host); // HTTP/1.0 may omit it; the upstream gets one
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        // Origin-form (see `admission`), as it goes on the wire: the connection is the
        // upstream's already.
        *req.uri_mut() = parts.uri.clone();
        *req.headers_mut() = headers;
        req
    }

    /// The budget of one exchange: the upstream timeout, or a GCE long poll's own (GCE's
    /// `wait_for_change` exists only under `/computeMetadata/`).
    fn deadline(&self, uri: &Uri) -> Duration {
        let query = uri.query().unwrap_or_default();
        let param = |name: &str| {
            let mut pairs = query.split('&').filter_map(|kv| kv.split_once('='));
            pairs.find(|(k, _)| *k == name).map(|(_, v)| v)
        };
        let long_poll = uri.path().starts_with("/computeMetadata/")
            && param("wait_for_change").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !long_poll {
            return self.settings.timeout;
        }
        let asked = param("timeout_sec")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        asked.unwrap_or(DEFAULT_LONG_POLL).min(MAX_LONG_POLL) + LONG_POLL_MARGIN
    }
}

fn idempotent(method: &Method) -> bool {
    use Method as M;
    matches!(
        *method,
        M::GET | M::HEAD | M::OPTIONS | M::PUT | M::DELETE | M::TRACE
    )
}

fn closed_unanswered(e: &hyper::Error) -> bool {
    e.is_incomplete_message() || e.is_canceled() || e.is_closed()
}

/// "connect to 127.0.0.1:9 ...: Connection refused (os error 111)"
fn chain(e: &dyn std::error::Error) -> String {
    let causes = std::iter::successors(Some(e), |e| e.source()).map(|e| e.to_string());
    causes.collect::<Vec<_>>().join(": ")
}

/// The hop-by-hop headers of RFC 9110 §7.6.1, and the old `Keep-Alive`/`Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers: the fixed list and any named in `Connection`. Most
/// messages carry none, so one pass over the names decides whether there is anything to do.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = connection_options(headers).collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}
