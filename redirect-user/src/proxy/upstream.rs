//! The HTTP/1.1 client for the one upstream, run on the request's own task.
//!
//! hyper's client drives each connection from a task of its own; a request crosses to that
//! task through a channel and the response and its body come back through two more: a third
//! of the proxy's user time, and what kept it behind nginx at one connection (BENCHMARKS.md). Here
//! the task that serves the client's request also writes the upstream request and reads the
//! whole response, as nginx does with its default `proxy_buffering on`: both bodies are
//! buffered (metadata documents are small; the server side bounds the request's, [`Limits`]
//! the response's), and the connection goes back to the idle list as soon as the response has
//! been read, before the client has it.
//!
//! Responses are delimited as RFC 9112 §6.3 says: no body for HEAD, 1xx, 204 and 304; chunked
//! when chunked is the final transfer coding; otherwise read until the upstream closes, unless
//! a valid `Content-Length` gives the length. Interim 1xx responses are skipped. A connection
//! is used again only after a complete HTTP/1.1 response that did not ask to close and left no
//! stray bytes behind.
//!
//! A worker talks to a single upstream from a single thread, so the pool is a short list of
//! idle connections: no keying by host, no cross-thread contention.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use hyper::{HeaderMap, Method, Response, StatusCode, header, http::request::Parts};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use super::{
    codec::{
        Chunked, CodecError, MAX_HEAD, MAX_HEADERS, Span, chunked, connection_lists,
        content_length, header_map, put_header, put_headers, record_spans,
    },
    exempt::ExemptSockets,
    ticker::Ticker,
};
use crate::config::UpstreamSettings;

/// Idle connections kept beyond this are closed.
const MAX_IDLE: usize = 64;
/// Room made in an empty read buffer: metadata responses are a few hundred bytes, and an
/// allocation this small comes from the allocator's per-thread cache. It doubles from there.
const FIRST_READ: usize = 1 << 10;

/// Caps on what is buffered per request (the request body's is the server side's, see
/// `connection`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub response_body: usize,
}

impl Default for Limits {
    /// A response body up to 16 MiB (AWS caps user data at 16 KiB, GCE all metadata at
    /// 512 KiB).
    fn default() -> Self {
        Limits {
            response_body: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream")]
    Connect(#[source] io::Error),
    #[error("sending the request")]
    Write(#[source] io::Error),
    #[error("reading the response")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    #[error("invalid response: {0}")]
    Invalid(String),
    #[error("response body larger than {0} bytes")]
    ResponseTooLarge(usize),
}

impl From<CodecError> for UpstreamError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Invalid(what) => UpstreamError::Invalid(what),
            CodecError::TooLarge(limit) => UpstreamError::ResponseTooLarge(limit),
        }
    }
}

pub struct Upstream {
    connector: UpstreamConnector,
    limits: Limits,
    #[expect(
        clippy::vec_box,
        reason = "a connection moves in and out of the list and into the request's future, \
                  where a pointer takes less room than the connection"
    )]
    idle: Mutex<Vec<Box<Conn>>>,
}

impl Upstream {
    pub fn new(connector: UpstreamConnector, limits: Limits) -> Self {
        Upstream {
            connector,
            limits,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends a request (`parts` with an origin-form URI and the headers to forward, and its
    /// whole body) and returns the complete response, its headers as the upstream sent them.
    ///
    /// A request that fails on a kept-alive connection before any of its response arrived
    /// (the upstream had closed that connection) is sent again on another one if its method
    /// is idempotent (RFC 9110 §9.2.2); anything else is not repeated, as the upstream may
    /// have acted on it.
    pub async fn send(&self, parts: &Parts, body: &[u8]) -> Result<Response<Bytes>, UpstreamError> {
        let framed = !body.is_empty()
            || parts.headers.contains_key(header::CONTENT_LENGTH)
            || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
        let request = Outgoing {
            parts,
            body: framed.then_some(body),
        };
        let repeatable = parts.method.is_idempotent();
        while let Some(mut conn) = self.checkout() {
            match conn.exchange(&request, self.limits).await {
                Ok((resp, reusable)) => {
                    if reusable {
                        self.checkin(conn);
                    }
                    return Ok(resp);
                }
                Err(Failure { error, stale }) if !(stale && repeatable) => return Err(error),
                Err(_) => {}
            }
        }
        // Boxed: the rare path would otherwise enlarge every request's future, which is
        // moved (copied) several times per request.
        Box::pin(self.send_new(&request)).await
    }

    async fn send_new(&self, request: &Outgoing<'_>) -> Result<Response<Bytes>, UpstreamError> {
        let stream = self
            .connector
            .connect()
            .await
            .map_err(UpstreamError::Connect)?;
        let mut conn = Box::new(Conn {
            stream,
            buf: BytesMut::new(),
            out: Vec::new(),
            spans: Vec::new(),
            reused: false,
        });
        let (resp, reusable) = conn
            .exchange(request, self.limits)
            .await
            .map_err(|f| f.error)?;
        if reusable {
            self.checkin(conn);
        }
        Ok(resp)
    }

    fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_idle() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Box<Conn>) {
        conn.reused = true;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

/// A failed exchange; `stale` when it failed on a kept-alive connection before any of the
/// response arrived, so that the request may not have reached the upstream.
struct Failure {
    error: UpstreamError,
    stale: bool,
}

/// A request to send: the head to forward and the buffered body, if the request is framed.
struct Outgoing<'a> {
    parts: &'a Parts,
    body: Option<&'a [u8]>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet parsed; empty between exchanges.
    buf: BytesMut,
    /// The request in wire form, built here to reuse the allocation.
    out: Vec<u8>,
    /// Where the response's header names and values lie in its head (reused likewise).
    spans: Vec<Span>,
    /// Whether an earlier exchange used this connection.
    reused: bool,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Conn {
    /// Whether an idle connection can take a request: nothing arrived on it since its last
    /// response, neither data nor the upstream's close. Costs no system call: a read that
    /// drained the socket cleared tokio's readiness, so readiness here means a new event.
    fn is_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Possibly a stale readiness: look.
            Poll::Ready(Ok(())) => {
                matches!(self.stream.try_read(&mut [0; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request and reads the response. Returns it with whether the connection can
    /// be used again.
    async fn exchange(
        &mut self,
        request: &Outgoing<'_>,
        limits: Limits,
    ) -> Result<(Response<Bytes>, bool), Failure> {
        debug_assert!(self.buf.is_empty());
        self.out.clear();
        encode_request(request.parts, request.body, &mut self.out);
        if let Err(e) = self.stream.write_all(&self.out).await {
            return Err(Failure {
                stale: self.reused,
                error: UpstreamError::Write(e),
            });
        }
        let (mut head, mut reusable) = match self.read_head().await {
            Ok(head) => head,
            Err(error) => {
                let stale = self.reused
                    && self.buf.is_empty()
                    && match &error {
                        UpstreamError::Closed => true,
                        UpstreamError::Read(e) => matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                        ),
                        _ => false,
                    };
                return Err(Failure { error, stale });
            }
        };
        let head_only = request.parts.method == Method::HEAD;
        let transfer_coding = chunked(head.headers());
        if transfer_coding.is_some() && head.headers_mut().remove(header::CONTENT_LENGTH).is_some()
        {
            // Both: a smuggling attempt or a broken upstream (RFC 9112 §6.3 item 3). The
            // transfer coding wins and the connection is not trusted again.
            reusable = false;
        }
        let framing = framing(head.status(), head_only, transfer_coding, head.headers()).map_err(
            |error| Failure {
                error,
                stale: false,
            },
        )?;
        let body = self
            .read_body(framing, limits.response_body)
            .await
            .map_err(|error| Failure {
                error,
                stale: false,
            })?;
        reusable &= framing != Framing::UntilClose && self.buf.is_empty();
        Ok((head.map(|()| body), reusable))
    }

    /// Reads the final response head, skipping interim (1xx) responses. Also returns whether
    /// the upstream lets the connection be used again.
    async fn read_head(&mut self) -> Result<(Response<()>, bool), UpstreamError> {
        loop {
            if !self.buf.is_empty() {
                // Uninitialised: initialising room for every header costs more than parsing.
                let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut []);
                let config = httparse::ParserConfig::default();
                match config.parse_response_with_uninit_headers(
                    &mut parsed,
                    &self.buf,
                    &mut headers,
                ) {
                    Ok(httparse::Status::Complete(len)) => {
                        let code = parsed.code.unwrap_or_default();
                        if (100..200).contains(&code) && code != 101 {
                            self.buf.advance(len);
                            continue;
                        }
                        record_spans(&self.buf, parsed.headers, &mut self.spans);
                        let version = parsed.version;
                        let head = self.buf.split_to(len).freeze();
                        return build_head(version, code, &head, &self.spans);
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(UpstreamError::Invalid(format!(
                            "response head larger than {MAX_HEAD} bytes"
                        )));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(UpstreamError::Invalid(e.to_string())),
                }
            }
            if self.read().await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }

    async fn read_body(&mut self, framing: Framing, limit: usize) -> Result<Bytes, UpstreamError> {
        match framing {
            Framing::Empty => Ok(Bytes::new()),
            Framing::Length(len) => {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&len| len <= limit)
                    .ok_or(UpstreamError::ResponseTooLarge(limit))?;
                while self.buf.len() < len {
                    if self.read().await? == 0 {
                        return Err(UpstreamError::Closed);
                    }
                }
                // Shares the read buffer's allocation; the next read makes a new one.
                Ok(self.buf.split_to(len).freeze())
            }
            Framing::Chunked => {
                let mut decoder = Chunked::new(limit);
                while !decoder.decode(&mut self.buf)? {
                    if self.read().await? == 0 {
                        return Err(UpstreamError::Closed);
                    }
                }
                Ok(decoder.into_body())
            }
            Framing::UntilClose => loop {
                if self.buf.len() > limit {
                    return Err(UpstreamError::ResponseTooLarge(limit));
                }
                if self.read().await? == 0 {
                    return Ok(self.buf.split().freeze());
                }
            },
        }
    }

    async fn read(&mut self) -> Result<usize, UpstreamError> {
        if self.buf.capacity() - self.buf.len() < FIRST_READ / 2 {
            self.buf.reserve(self.buf.len().max(FIRST_READ));
        }
        self.stream
            .read_buf(&mut self.buf)
            .await
            .map_err(UpstreamError::Read)
    }
}

/// Connects to the upstream with its own sockets, each exempted from the redirect before its
/// connect() and bounded by the connect timeout.
pub struct UpstreamConnector {
    host: String,
    port: u16,
    exempt: Option<Arc<ExemptSockets>>,
    connect_timeout: Duration,
    /// Times the connect timeout (see `ticker`).
    clock: Arc<Ticker>,
}

impl UpstreamConnector {
    pub fn new(
        settings: &UpstreamSettings,
        exempt: Option<Arc<ExemptSockets>>,
        clock: Arc<Ticker>,
    ) -> Self {
        let authority = &settings.url.authority;
        UpstreamConnector {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            exempt,
            connect_timeout: settings.connect_timeout,
            clock,
        }
    }

    pub async fn connect(&self) -> io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await?
                .collect(),
        };
        let mut last_error = None;
        for addr in addrs {
            let connected = tokio::select! {
                biased;
                connected = self.connect_one(addr) => Some(connected),
                () = self.clock.expire(self.connect_timeout) => None,
            };
            match connected {
                Some(Ok(stream)) => return Ok(stream),
                Some(Err(e)) => {
                    last_error = Some(io::Error::new(e.kind(), format!("connect to {addr}: {e}")))
                }
                None => {
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

/// The request line and headers in HTTP/1.1 wire form, then the body. The target is in origin
/// form, as clients send it to a metadata service (an absolute-form target from a client that
/// took us for a forward proxy is reduced to its path and query). Header names go out in
/// lower case, as `HeaderMap` holds them. `body` is `None` for a request without framing
/// (no `Content-Length` is sent); any `Content-Length` of the client's is replaced by the
/// buffered body's length.
fn encode_request(parts: &Parts, body: Option<&[u8]>, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_headers(out, &parts.headers, |name| name == header::CONTENT_LENGTH);
    if let Some(body) = body {
        put_header(
            out,
            b"content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.unwrap_or_default());
}

/// The response head as a `Response<()>`, and whether the upstream keeps the connection open:
/// HTTP/1.1 without `Connection: close` (an HTTP/1.0 upstream's connections are not reused).
/// `spans` locate each header's name and value in `head`; the values share its bytes.
fn build_head(
    version: Option<u8>,
    code: u16,
    head: &Bytes,
    spans: &[Span],
) -> Result<(Response<()>, bool), UpstreamError> {
    let invalid = |what: &str| UpstreamError::Invalid(what.to_owned());
    let status = StatusCode::from_u16(code).map_err(|_| invalid("status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrade is never forwarded, so nothing asked for this.
        return Err(invalid(
            "101 Switching Protocols without an upgrade request",
        ));
    }
    let headers = header_map(head, spans)?;
    let keep_alive = version == Some(1) && !connection_lists(&headers, "close");
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok((resp, keep_alive))
}

/// `transfer_coding`: [`chunked`] of the response's headers.
fn framing(
    status: StatusCode,
    head_only: bool,
    transfer_coding: Option<bool>,
    headers: &HeaderMap,
) -> Result<Framing, UpstreamError> {
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    Ok(match transfer_coding {
        Some(true) => Framing::Chunked,
        Some(false) => Framing::UntilClose,
        None => content_length(headers)?.map_or(Framing::UntilClose, Framing::Length),
    })
}

/// A scripted upstream for tests, speaking raw HTTP/1.1 on loopback.
#[cfg(test)]
pub mod testing {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };

    /// What the scripted upstream does with each request it reads on a connection.
    #[derive(Clone, Copy)]
    pub enum Reply {
        Send(&'static str),
        /// Sends the bytes, then closes the connection.
        SendAndClose(&'static str),
        /// Closes the connection without answering.
        Close,
    }

    /// An upstream on 127.0.0.1 (port 0): the n-th connection it accepts plays `scripts[n]`,
    /// one reply per request. Each request arrives on the receiver as (connection, bytes).
    pub async fn upstream(
        scripts: Vec<Vec<Reply>>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<(usize, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for (n, script) in scripts.into_iter().enumerate() {
                let (mut stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    for reply in script {
                        let Some(request) = read_request(&mut stream, &mut pending).await else {
                            return;
                        };
                        tx.send((n, request)).unwrap();
                        match reply {
                            Reply::Send(bytes) => stream.write_all(bytes.as_bytes()).await.unwrap(),
                            Reply::SendAndClose(bytes) => {
                                stream.write_all(bytes.as_bytes()).await.unwrap();
                                return;
                            }
                            Reply::Close => return,
                        }
                    }
                    // Keeps the connection open; a request beyond the script shows up as
                    // such, and the connection closes.
                    if let Some(request) = read_request(&mut stream, &mut pending).await {
                        tx.send((n, format!("unscripted: {request}"))).unwrap();
                    }
                });
            }
        });
        (addr, rx)
    }

    /// One request (head and `content-length` body) off the stream.
    async fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
                let body_len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse::<usize>().unwrap());
                if pending.len() >= end + 4 + body_len {
                    let request: Vec<u8> = pending.drain(..end + 4 + body_len).collect();
                    return Some(String::from_utf8(request).unwrap());
                }
            }
            let mut chunk = [0; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};
    use crate::config::UpstreamUrl;
    use hyper::{Request, header::HeaderValue};
    use tokio::sync::mpsc;

    fn client(addr: SocketAddr, limits: Limits) -> Upstream {
        let settings = UpstreamSettings {
            url: format!("http://{addr}").parse::<UpstreamUrl>().unwrap(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let clock = Arc::new(Ticker::start(Duration::from_millis(100)));
        Upstream::new(UpstreamConnector::new(&settings, None, clock), limits)
    }

    fn parts(method: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder().method(method).uri(target);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    async fn get(up: &Upstream, target: &str) -> Result<Response<Bytes>, UpstreamError> {
        up.send(&parts("GET", target, &[("host", "md")]), b"").await
    }

    /// The connections that the requests seen so far came on, in order.
    fn connections(seen: &mut mpsc::UnboundedReceiver<(usize, String)>) -> Vec<usize> {
        std::iter::from_fn(|| seen.try_recv().ok())
            .map(|(n, request)| {
                assert!(!request.starts_with("unscripted"), "{request}");
                n
            })
            .collect()
    }

    fn body(resp: &Response<Bytes>) -> &str {
        std::str::from_utf8(resp.body()).unwrap()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const OK2: &str = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok2";

    #[tokio::test]
    async fn requests_reuse_one_connection_and_go_out_as_sent() {
        let (addr, mut seen) = upstream(vec![vec![
            Reply::Send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello"),
            Reply::Send(OK),
        ]])
        .await;
        let up = client(addr, Limits::default());
        let resp = up
            .send(
                &parts(
                    "GET",
                    "/a?b=%2F",
                    &[("host", "md"), ("x-aws-ec2-metadata-token", "t")],
                ),
                b"",
            )
            .await
            .unwrap();
        assert_eq!((resp.status(), body(&resp)), (StatusCode::OK, "hello"));
        assert_eq!(resp.headers()["x-up"], "1");
        assert_eq!(
            seen.recv().await.unwrap(),
            (
                0,
                "GET /a?b=%2F HTTP/1.1\r\nhost: md\r\nx-aws-ec2-metadata-token: t\r\n\r\n".into()
            )
        );
        assert_eq!(body(&get(&up, "/b").await.unwrap()), "ok");
        assert_eq!(connections(&mut seen), [0], "same connection");
    }

    #[tokio::test]
    async fn request_bodies_are_sent_with_their_length() {
        let (addr, mut seen) = upstream(vec![vec![Reply::Send(OK); 3]]).await;
        let up = client(addr, Limits::default());
        // A PUT without a body still says so (RFC 9110 §8.6).
        let put = parts("PUT", "/latest/api/token", &[("x-ttl", "21600")]);
        up.send(&put, b"").await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap().1,
            "PUT /latest/api/token HTTP/1.1\r\nx-ttl: 21600\r\ncontent-length: 0\r\n\r\n"
        );
        // The client's own Content-Length is replaced, not repeated.
        let post = parts("POST", "/p", &[("content-length", "3")]);
        up.send(&post, b"abc").await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap().1,
            "POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        );
        // A body that came without a length (chunked, decoded by the server side) goes out
        // with its length.
        up.send(&parts("POST", "/p", &[]), b"abcd").await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap().1,
            "POST /p HTTP/1.1\r\ncontent-length: 4\r\n\r\nabcd"
        );
    }

    #[tokio::test]
    async fn chunked_responses_are_decoded_and_the_connection_kept() {
        let (addr, mut seen) = upstream(vec![vec![
            Reply::Send(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                 3;ext=\"x\"\r\nabc\r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n",
            ),
            Reply::Send(OK),
        ]])
        .await;
        let up = client(addr, Limits::default());
        assert_eq!(body(&get(&up, "/").await.unwrap()), "abc0123456789");
        assert_eq!(body(&get(&up, "/").await.unwrap()), "ok");
        assert_eq!(connections(&mut seen), [0, 0], "same connection");
    }

    #[tokio::test]
    async fn close_delimited_and_closing_responses_are_not_reused() {
        let (addr, mut seen) = upstream(vec![
            vec![Reply::SendAndClose("HTTP/1.1 200 OK\r\n\r\nuntil the end")],
            vec![Reply::Send(
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nc2",
            )],
            vec![Reply::Send(
                "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nc3",
            )],
            vec![Reply::Send(OK)],
        ])
        .await;
        let up = client(addr, Limits::default());
        for expected in ["until the end", "c2", "c3", "ok"] {
            assert_eq!(body(&get(&up, "/").await.unwrap()), expected);
        }
        assert_eq!(connections(&mut seen), [0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn interim_and_bodiless_responses() {
        let (addr, mut seen) = upstream(vec![vec![
            Reply::Send("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nhi"),
            // HEAD: the length of what a GET would get, and no body.
            Reply::Send("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
            Reply::Send("HTTP/1.1 204 No Content\r\n\r\n"),
            Reply::Send("HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n"),
            Reply::Send(OK),
        ]])
        .await;
        let up = client(addr, Limits::default());
        let created = get(&up, "/").await.unwrap();
        assert_eq!(
            (created.status(), body(&created)),
            (StatusCode::CREATED, "hi")
        );
        let head = up.send(&parts("HEAD", "/", &[]), b"").await.unwrap();
        assert_eq!(
            (head.headers()["content-length"].as_bytes(), body(&head)),
            (&b"10"[..], "")
        );
        assert_eq!(
            get(&up, "/").await.unwrap().status(),
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            get(&up, "/").await.unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(body(&get(&up, "/").await.unwrap()), "ok");
        assert_eq!(connections(&mut seen), [0; 5], "one connection throughout");
    }

    /// Answers the first request, then closes that connection on the second one, unanswered;
    /// answers `OK2` on the next connection.
    async fn drops_the_second_request() -> (SocketAddr, mpsc::UnboundedReceiver<(usize, String)>) {
        upstream(vec![
            vec![Reply::Send(OK), Reply::Close],
            vec![Reply::Send(OK2)],
        ])
        .await
    }

    #[tokio::test]
    async fn a_connection_dropped_by_the_upstream_is_replaced_for_idempotent_requests() {
        let (addr, mut seen) = drops_the_second_request().await;
        let up = client(addr, Limits::default());
        assert_eq!(body(&get(&up, "/").await.unwrap()), "ok");
        // Sent on the kept connection, which the upstream closes unanswered: sent again.
        assert_eq!(body(&get(&up, "/").await.unwrap()), "ok2");
        assert_eq!(connections(&mut seen), [0, 0, 1]);
    }

    #[tokio::test]
    async fn a_dropped_post_is_not_repeated() {
        let (addr, mut seen) = drops_the_second_request().await;
        let up = client(addr, Limits::default());
        let post = || parts("POST", "/p", &[]);
        up.send(&post(), b"").await.unwrap();
        let err = up.send(&post(), b"").await.unwrap_err();
        assert!(matches!(err, UpstreamError::Closed), "{err}");
        assert_eq!(connections(&mut seen), [0, 0], "not sent again");
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used() {
        let (addr, mut seen) = upstream(vec![
            // A complete, keep-alive response, and then the upstream goes anyway.
            vec![Reply::SendAndClose(OK)],
            vec![Reply::Send(OK2)],
        ])
        .await;
        let up = client(addr, Limits::default());
        let post = || parts("POST", "/p", &[]);
        up.send(&post(), b"").await.unwrap();
        // Let the close arrive while the connection is idle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = up.send(&post(), b"").await.unwrap();
        assert_eq!(body(&resp), "ok2");
        assert_eq!(connections(&mut seen), [0, 1]);
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_obeys_the_coding_and_closes() {
        let (addr, mut seen) = upstream(vec![
            vec![Reply::Send(
                "HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            )],
            vec![Reply::Send(OK2)],
        ])
        .await;
        let up = client(addr, Limits::default());
        let resp = get(&up, "/").await.unwrap();
        assert_eq!(body(&resp), "ok");
        assert!(!resp.headers().contains_key("content-length"));
        assert_eq!(body(&get(&up, "/").await.unwrap()), "ok2");
        assert_eq!(connections(&mut seen), [0, 1], "not trusted again");
    }

    #[tokio::test]
    async fn broken_responses_are_errors() {
        for (reply, expected) in [
            ("SSH-2.0-OpenSSH\r\n\r\n", "invalid response"),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
                "Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
                "closed the connection",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n",
                "line end",
            ),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            ("HTTP/1.1 200 OK\r\ncontent-le", "closed the connection"),
            ("", "closed the connection"),
        ] {
            let (addr, _seen) = upstream(vec![vec![Reply::SendAndClose(reply)]]).await;
            let err = get(&client(addr, Limits::default()), "/")
                .await
                .unwrap_err();
            let chain = format!("{err}: {:?}", std::error::Error::source(&err));
            assert!(chain.contains(expected), "{reply:?}: {chain}");
        }
    }

    /// A listener whose accept queue is full drops further SYNs, so a connect to it neither
    /// succeeds nor fails: only the connect timeout (on the ticker) ends it.
    #[tokio::test]
    async fn a_connect_that_never_completes_times_out() {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // A backlog of 0 queues one connection (Linux); it fills the queue.
        let _queued = TcpStream::connect(addr).await.unwrap();
        let settings = UpstreamSettings {
            url: format!("http://{addr}").parse::<UpstreamUrl>().unwrap(),
            connect_timeout: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
        };
        let clock = Arc::new(Ticker::start(Duration::from_millis(50)));
        let connector = UpstreamConnector::new(&settings, None, clock);
        let err = connector.connect().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("timed out after 200ms"), "{err}");
    }

    #[tokio::test]
    async fn response_bodies_beyond_the_limit_are_refused() {
        let limits = Limits { response_body: 8 };
        for reply in [
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n123456789",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n12345\r\n4\r\n6789\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n123456789",
        ] {
            let (addr, _seen) = upstream(vec![vec![Reply::SendAndClose(reply)]]).await;
            let err = get(&client(addr, limits), "/").await.unwrap_err();
            assert!(
                matches!(err, UpstreamError::ResponseTooLarge(8)),
                "{reply:?}: {err}"
            );
        }
    }

    /// [`framing`] as `exchange` calls it.
    fn framing_of(
        status: StatusCode,
        head_only: bool,
        headers: &HeaderMap,
    ) -> Result<Framing, UpstreamError> {
        framing(status, head_only, chunked(headers), headers)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let headers = |lines: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in lines {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let ok = StatusCode::OK;
        let cases = [
            (
                vec![
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "Chunked"),
                ],
                Framing::Chunked,
            ),
            (
                vec![("transfer-encoding", "chunked, gzip")],
                Framing::UntilClose,
            ),
            (
                vec![("content-length", "7"), ("content-length", "7 , 7")],
                Framing::Length(7),
            ),
            (vec![], Framing::UntilClose),
        ];
        for (lines, expected) in cases {
            assert_eq!(
                framing_of(ok, false, &headers(&lines)).unwrap(),
                expected,
                "{lines:?}"
            );
        }
        let seven = headers(&[("content-length", "7")]);
        assert_eq!(
            framing_of(ok, true, &seven).unwrap(),
            Framing::Empty,
            "HEAD"
        );
        assert_eq!(
            framing_of(StatusCode::NO_CONTENT, false, &seven).unwrap(),
            Framing::Empty
        );
        for bad in ["+7", "7 7", "", "99999999999999999999"] {
            assert!(
                framing_of(ok, false, &headers(&[("content-length", bad)])).is_err(),
                "{bad:?}"
            );
        }
    }
}
