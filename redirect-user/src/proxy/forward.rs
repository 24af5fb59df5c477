//! Forwarding to the real metadata service (`--upstream`).
//!
//! Method, path, query, header values and body go upstream unchanged, except the hop-by-hop
//! headers a proxy must not forward (RFC 9110 §7.6.1). Header names go out in lower case: they
//! are case-insensitive (RFC 9110 §5.1), and keeping the original spelling cost an eighth of the
//! proxy's per-request work (BENCHMARKS.md). Nothing is added: metadata
//! services refuse token traffic that carries `X-Forwarded-For`, so no XFF, `Forwarded` or
//! `Via`. Upstream connections are pooled and exempt from the redirect (see `exempt`).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use super::{Body, exempt::ExemptSockets, pool::Pool, ticker::Ticker};
use crate::config::UpstreamSettings;

/// Resolution of the upstream timeout.
const DEADLINE_TICK: Duration = Duration::from_millis(100);

pub struct Forwarder {
    pool: Arc<Pool>,
    settings: UpstreamSettings,
    /// 100 ms clock for the upstream timeout (see `ticker`).
    deadlines: Ticker,
}

impl Forwarder {
    /// `exempt` is `None` only where no programs are loaded (unit tests). Must be called
    /// inside the runtime that will run the forwarding (it starts the deadline ticker there).
    pub fn new(settings: UpstreamSettings, exempt: Option<Arc<ExemptSockets>>) -> Self {
        let authority = &settings.url.authority;
        let connector = UpstreamConnector {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            exempt,
            connect_timeout: settings.connect_timeout,
        };
        Forwarder {
            pool: Pool::new(connector),
            settings,
            deadlines: Ticker::start(DEADLINE_TICK),
        }
    }

    pub async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let long_poll = parts.uri.query().is_some_and(is_long_poll);
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        // Origin form on the wire, as clients send it to a metadata service (an absolute-form
        // target from a client that took us for a forward proxy is reduced to its path).
        parts.uri = Uri::from(path_and_query);
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/1.0 clients may omit Host; the upstream is entitled to one.
            if let Ok(host) = HeaderValue::from_str(self.settings.url.authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let request = self.pool.send(Request::from_parts(parts, body));
        let result = if long_poll {
            // GCE's wait_for_change holds the request open by design; its own timeout_sec
            // bounds it.
            Some(request.await)
        } else {
            tokio::select! {
                biased;
                response = request => Some(response),
                () = self.deadlines.expire(self.settings.timeout) => None,
            }
        };
        match result {
            Some(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Right(body))
            }
            Some(Err(e)) => {
                tracing::warn!("upstream {}: {}", self.settings.url, error_chain(&e));
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "redirect: upstream {} failed: {}\n",
                        self.settings.url,
                        error_chain(&e)
                    ),
                )
            }
            None => {
                tracing::warn!(
                    "upstream {} sent no response within {:?}",
                    self.settings.url,
                    self.settings.timeout
                );
                plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "redirect: upstream {} sent no response within {:?}\n",
                        self.settings.url, self.settings.timeout
                    ),
                )
            }
        }
    }
}

fn is_long_poll(query: &str) -> bool {
    query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("wait_for_change=true"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(text))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
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

/// Removes the hop-by-hop headers: the fixed list and any named in `Connection`. Most messages
/// carry none, so one pass over the names decides whether there is anything to do.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Connects to the upstream with its own sockets, each exempted from the redirect before its
/// connect() and bounded by the connect timeout.
pub struct UpstreamConnector {
    host: String,
    port: u16,
    exempt: Option<Arc<ExemptSockets>>,
    connect_timeout: Duration,
}

impl UpstreamConnector {
    pub async fn connect(&self) -> io::Result<TokioIo<TcpStream>> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await?
                .collect(),
        };
        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, self.connect_one(addr)).await {
                Ok(Ok(stream)) => return Ok(TokioIo::new(stream)),
                Ok(Err(e)) => {
                    last_error = Some(io::Error::new(e.kind(), format!("connect to {addr}: {e}")))
                }
                Err(_) => {
                    last_error = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "connect to {addr} timed out after {:?}",
                            self.connect_timeout
                        ),
                    ))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} has no address", self.host),
            )
        }))
    }

    async fn connect_one(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Held across the connect: the programs run inside connect(), and the guard's drop
        // (also when a timeout abandons this future) removes the exemption.
        let _exempt = self
            .exempt
            .as_ref()
            .map(|e| e.exempt(&socket))
            .transpose()?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-aws-ec2-metadata-token", HeaderValue::from_static("tok"));
        h.insert("metadata", HeaderValue::from_static("true"));
        h.insert("host", HeaderValue::from_static("169.254.169.254"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "metadata", "x-aws-ec2-metadata-token"]);
    }

    #[test]
    fn long_poll_detection() {
        assert!(is_long_poll("recursive=true&wait_for_change=true"));
        assert!(is_long_poll("WAIT_FOR_CHANGE=TRUE"));
        assert!(!is_long_poll("wait_for_change=false"));
        assert!(!is_long_poll("x=wait_for_change=true"));
    }
}
