//! Forwarding to the real metadata service (`--upstream`).
//!
//! Method, path, query, header values and body go upstream unchanged, except the hop-by-hop
//! headers a proxy must not forward (RFC 9110 §7.6.1). Header names go out in lower case: they
//! are case-insensitive (RFC 9110 §5.1), and keeping the original spelling cost an eighth of the
//! proxy's per-request work (BENCHMARKS.md). Nothing is added: metadata
//! services refuse token traffic that carries `X-Forwarded-For`, so no XFF, `Forwarded` or
//! `Via`. The request and the response are buffered whole (see `upstream`); upstream
//! connections are kept alive and exempt from the redirect (see `exempt`).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
    http::request::Parts,
};

use super::{
    exempt::ExemptSockets,
    ticker::Ticker,
    upstream::{Limits, Upstream, UpstreamConnector},
};
use crate::config::UpstreamSettings;

/// Resolution of the upstream timeout.
const DEADLINE_TICK: Duration = Duration::from_millis(100);

pub struct Forwarder {
    upstream: Upstream,
    settings: UpstreamSettings,
    /// 100 ms clock for the upstream timeouts (see `ticker`), shared with the connector.
    deadlines: Arc<Ticker>,
}

impl Forwarder {
    /// `exempt` is `None` only where no programs are loaded (unit tests).
    pub fn new(settings: UpstreamSettings, exempt: Option<Arc<ExemptSockets>>) -> Self {
        let deadlines = Arc::new(Ticker::start(DEADLINE_TICK));
        let connector = UpstreamConnector::new(&settings, exempt, Arc::clone(&deadlines));
        Forwarder {
            upstream: Upstream::new(connector, Limits::default()),
            settings,
            deadlines,
        }
    }

    /// Not an `async fn`: one would keep `req` in its future beside the parts made of it.
    pub fn forward(&self, req: Request<Bytes>) -> impl Future<Output = Response<Bytes>> + Send {
        let (mut parts, body) = req.into_parts();
        let long_poll = parts.uri.query().is_some_and(is_long_poll);
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/1.0 clients may omit Host; the upstream is entitled to one.
            if let Ok(host) = HeaderValue::from_str(self.settings.url.authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        // Answered by the server side before it read the body.
        parts.headers.remove(header::EXPECT);
        async move { self.exchange(&parts, &body, long_poll).await }
    }

    async fn exchange(&self, parts: &Parts, body: &[u8], long_poll: bool) -> Response<Bytes> {
        let request = self.upstream.send(parts, body);
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
            Some(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                resp
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

/// A `text/plain` answer of the proxy's own (its upstream's failures; the server side's
/// refusals).
pub(super) fn plain(status: StatusCode, text: String) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(text));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{
        Backend, ProxyStats,
        upstream::testing::{Reply, upstream},
    };
    use std::net::SocketAddr;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_util::sync::CancellationToken;

    /// The proxy (`proxy::serve`) on 127.0.0.1 (port 0), forwarding to `upstream`.
    async fn proxy_to(upstream: SocketAddr) -> SocketAddr {
        proxy_with_idle_timeout(upstream, Duration::ZERO).await
    }

    async fn proxy_with_idle_timeout(upstream: SocketAddr, idle_timeout: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = UpstreamSettings {
            url: format!("http://{upstream}").parse().unwrap(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let backend = Backend::Upstream(Forwarder::new(settings, None));
        tokio::spawn(crate::proxy::serve(
            vec![listener],
            Arc::new(backend),
            Arc::new(ProxyStats::default()),
            CancellationToken::new(),
            Duration::from_secs(5),
            idle_timeout,
        ));
        addr
    }

    /// Reads from `stream` until what has arrived ends with `end`.
    async fn read_until(stream: &mut TcpStream, end: &str) -> String {
        let mut got = Vec::new();
        while !got.ends_with(end.as_bytes()) {
            let mut chunk = [0; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn bodies_are_forwarded_whole_and_hop_by_hop_headers_stay_behind() {
        let (up, mut seen) = upstream(vec![vec![Reply::Send(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive, x-hop\r\n\
             x-hop: 1\r\nx-end: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )]])
        .await;
        let mut client = TcpStream::connect(proxy_to(up).await).await.unwrap();
        client
            .write_all(
                b"POST /x?y=1 HTTP/1.1\r\nhost: md\r\ntransfer-encoding: chunked\r\n\
                  expect: 100-continue\r\nconnection: keep-alive\r\nx-keep: k\r\n\r\n\
                  3\r\nabc\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        let response = read_until(&mut client, "hello").await.to_ascii_lowercase();
        let (_, last) = response.rsplit_once("http/1.1 ").unwrap();
        assert!(last.starts_with("200 ok\r\n"), "{response}");
        assert!(last.contains("\r\ncontent-length: 5\r\n"), "{response}");
        assert!(last.contains("\r\nx-end: 2\r\n"), "{response}");
        for gone in [
            "transfer-encoding",
            "x-hop",
            "connection: keep-alive, x-hop",
        ] {
            assert!(!last.contains(gone), "{gone}: {response}");
        }
        let (_, request) = seen.recv().await.unwrap();
        assert_eq!(
            request,
            "POST /x?y=1 HTTP/1.1\r\nhost: md\r\nx-keep: k\r\ncontent-length: 3\r\n\r\nabc"
        );
    }

    /// A request is not idleness: a client waiting longer than the idle timeout for a slow
    /// upstream (a GCE `wait_for_change` long poll, say) gets its answer.
    #[tokio::test]
    async fn a_request_outlasting_the_idle_timeout_is_answered() {
        let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = slow.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = slow.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                stream.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            // Over twice the proxy's idle timeout below.
            tokio::time::sleep(Duration::from_millis(800)).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
                .await
                .unwrap();
            let _ = stream.read(&mut [0]).await;
        });
        let proxy = proxy_with_idle_timeout(up, Duration::from_millis(300)).await;
        let mut client = TcpStream::connect(proxy).await.unwrap();
        client
            .write_all(
                b"GET /computeMetadata/v1/?wait_for_change=true HTTP/1.1\r\nhost: md\r\n\r\n",
            )
            .await
            .unwrap();
        let response = read_until(&mut client, "late").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test]
    async fn a_request_body_over_the_limit_is_refused_unread() {
        let (up, mut seen) = upstream(vec![vec![Reply::Send(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )]])
        .await;
        let mut client = TcpStream::connect(proxy_to(up).await).await.unwrap();
        let length = crate::proxy::connection::MAX_REQUEST_BODY + 1;
        client
            .write_all(
                format!("PUT /big HTTP/1.1\r\nhost: md\r\nexpect: 100-continue\r\ncontent-length: {length}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let response = read_until(&mut client, "bytes\n").await;
        assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
        assert!(!response.contains("100 Continue"), "{response}");
        assert!(seen.try_recv().is_err(), "nothing went upstream");
    }

    /// The forwarding future is one allocation per proxied request.
    #[tokio::test]
    async fn the_forwarding_state_stays_small() {
        let settings = UpstreamSettings {
            url: "http://127.0.0.1:9".parse().unwrap(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let forwarder = Forwarder::new(settings, None);
        let forwarding = forwarder.forward(Request::new(Bytes::new()));
        crate::proxy::assert_fits_allocator_cache("forward", size_of_val(&forwarding));
    }

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
