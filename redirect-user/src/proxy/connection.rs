//! Serving one client connection: the server side of HTTP/1.1, our own.
//!
//! Like the upstream client (`upstream`), it reads a whole request, head and body, asks the
//! backend, and writes the whole response. Between requests a keep-alive connection holds its
//! socket and nothing else: the read buffer is dropped once it is empty, as nginx does, and a
//! request's state is one allocation that lives only while the request does. hyper's server,
//! which this replaced, kept an 8 KB read and an 8 KB write buffer for the life of each
//! connection; replacing it cut the mock's instructions per request by 14 % and the memory of
//! 10,000 idle connections from 60 to 20 MB (BENCHMARKS.md).
//!
//! What the client gets, by RFC 9112 section:
//! - §3, §5: a head that does not parse gets 400, an HTTP version other than 1.0 and 1.1 gets
//!   505, a head over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] lines gets 431 (414 when the
//!   request line alone is that long). These close the connection, lingering (see
//!   `Connection::refuse`).
//! - §6: a body is framed by `Transfer-Encoding: chunked`, else by `Content-Length` (a list of
//!   equal values is one length), else there is none. Chunked with `Content-Length` too: the
//!   transfer coding wins and the connection closes after the response (§6.3 item 3). A
//!   transfer coding other than chunked gets 501, chunked not last or on HTTP/1.0 400, an
//!   invalid `Content-Length` 400, a body over [`MAX_REQUEST_BODY`] 413 before any of it is
//!   read. The backend sees a chunked body decoded, with its `Content-Length`.
//! - §9.3: HTTP/1.1 connections persist unless `Connection: close`; HTTP/1.0 ones only with
//!   `Connection: keep-alive` (answered in kind). Pipelined requests are answered in order.
//! - RFC 9110 §10.1.1: `Expect: 100-continue` gets `100 Continue` before the body is read.
//!
//! Responses carry `Date` and `Content-Length` (none for 1xx and 204; HEAD and 304 keep the
//! length the backend gave). A request has [`REQUEST_READ_TIMEOUT`] from its first byte to its
//! last; a slower client (slowloris) is disconnected.

use std::{
    cell::RefCell,
    future::{Future, poll_fn},
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, atomic::Ordering},
    task::Poll,
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderValue},
    http::request::Parts,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::{
    Backend, ProxyStats,
    codec::{
        Chunked, CodecError, MAX_HEAD, MAX_HEADERS, Span, chunked, connection_lists,
        content_length, header_map, only_chunked, put_header, put_headers, record_spans,
    },
    forward::plain,
    idle::IdleConnections,
    ticker::Ticker,
};

/// Request bodies larger than this get 413 (nginx's `client_max_body_size`).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// A request that has not fully arrived this long after its first byte is dropped, with its
/// connection (give or take one [`DEADLINE_TICK`]). (Short in unit tests, which run on real
/// sockets and so in real time.)
pub const REQUEST_READ_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};

/// Resolution of the request read timeout (see `ticker`: no tokio timer per request).
pub const DEADLINE_TICK: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(1)
};

/// How long a refused client may go on sending before the connection is closed on it.
const LINGER: Duration = Duration::from_secs(2);

/// Room made in an empty read buffer: most requests are a few hundred bytes.
const FIRST_READ: usize = 1 << 10;
/// Response bodies up to this size are copied behind the head and go out in one write.
const INLINE_BODY: usize = 16 << 10;

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    clock: Arc<Ticker>,
    idle: Option<Arc<IdleConnections>>,
    shutdown: CancellationToken,
) {
    let mut conn = Connection {
        stream,
        buf: BytesMut::new(),
        peer,
    };
    // Declared after `conn`, so dropped before it: the entry leaves the idle sweep's table
    // before the socket is closed.
    let idle = idle.map(|idle| idle.register(&conn.stream));
    // Made once: registering with the token on every wait would cost more than waiting.
    let mut cancelled = pin!(shutdown.cancelled());
    loop {
        if conn.buf.is_empty() {
            // Between requests: all that an idle connection holds is this wait (and its
            // entry in the idle sweep's table, which may shut the socket down).
            if let Some(idle) = &idle {
                idle.idle();
            }
            match conn
                .fill(false, cancelled.as_mut(), &mut None, &clock)
                .await
            {
                Waited::Read => {}
                Waited::Gone | Waited::Shutdown | Waited::TimedOut => return,
            }
            if let Some(idle) = &idle {
                idle.busy();
            }
        }
        // Boxed: a request's state (its parts, the backend's future, the writes) exists only
        // while the request is in progress, and the idle task stays small (BENCHMARKS.md).
        let exchange = conn.exchange(&backend, &stats, cancelled.as_mut(), &clock, &shutdown);
        if !Box::pin(exchange).await {
            return;
        }
    }
}

/// A request as the backend gets it, with what the connection must do after the response.
struct Incoming {
    request: Request<Bytes>,
    /// The client asked to close, or its framing means the connection cannot be trusted.
    close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`: the response says so too.
    keep_alive_10: bool,
}

/// A request refused before it reached the backend; the connection closes after the answer.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// How a request body is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// The `Connection` header a response gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConnectionHeader {
    None,
    Close,
    KeepAlive,
}

/// What ended a wait for more of a request.
enum Waited {
    Read,
    /// The client closed its side, or the socket failed.
    Gone,
    /// Shut down while no request had begun.
    Shutdown,
    /// The request did not arrive within [`REQUEST_READ_TIMEOUT`].
    TimedOut,
}

type Deadline = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet used; no allocation while the connection is idle.
    buf: BytesMut,
    peer: SocketAddr,
}

impl Connection {
    /// Serves the request that has begun to arrive. False when the connection is to close.
    async fn exchange(
        &mut self,
        backend: &Backend,
        stats: &ProxyStats,
        cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        clock: &Ticker,
        shutdown: &CancellationToken,
    ) -> bool {
        let peer = self.peer;
        let Incoming {
            request,
            mut close,
            keep_alive_10,
        } = match self.read_request(cancelled, clock).await {
            Ok(Some(request)) => request,
            Ok(None) => return false,
            Err(refusal) => {
                tracing::debug!("{peer}: {} {}", refusal.status.as_u16(), refusal.reason);
                // Boxed: rare, and it would enlarge every request's future.
                Box::pin(self.refuse(&refusal, clock)).await;
                return false;
            }
        };
        let head_only = request.method() == Method::HEAD;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let logged = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        let resp = match respond(backend, request) {
            Responding::Ready(resp) => resp,
            Responding::Waiting(upstream) => upstream.await,
        };
        if let Some((method, path)) = logged {
            tracing::debug!("{peer} {method} {path} {}", resp.status().as_u16());
        }
        // Shut down while it was served: this was the connection's last request.
        close |= shutdown.is_cancelled();
        let connection = if close {
            ConnectionHeader::Close
        } else if keep_alive_10 {
            ConnectionHeader::KeepAlive
        } else {
            ConnectionHeader::None
        };
        if let Err(e) = self.write_response(&resp, head_only, connection).await {
            tracing::debug!("{peer}: {e}");
            return false;
        }
        if close {
            self.drain();
            return false;
        }
        if self.buf.is_empty() {
            // Idle connections hold no buffer.
            self.buf = BytesMut::new();
        }
        true
    }

    /// Reads the next request, head and body. `Ok(None)`: the connection is done (the client
    /// closed it, the daemon is shutting down, or the request was too slow to arrive).
    async fn read_request(
        &mut self,
        mut cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        clock: &Ticker,
    ) -> Result<Option<Incoming>, Refusal> {
        // Armed at the first wait after the request's first byte.
        let mut deadline: Option<Deadline> = None;
        let (parts, framing, close, keep_alive_10) = loop {
            if !self.buf.is_empty()
                && let Some(head) = parse_head(&mut self.buf)?
            {
                break head;
            }
            let started = !self.buf.is_empty();
            match self
                .fill(started, cancelled.as_mut(), &mut deadline, clock)
                .await
            {
                Waited::Read => {}
                Waited::Gone | Waited::Shutdown => return Ok(None),
                Waited::TimedOut => {
                    tracing::debug!(
                        "{}: no complete request head within {REQUEST_READ_TIMEOUT:?}",
                        self.peer
                    );
                    return Ok(None);
                }
            }
        };
        let (parts, body) = match framing {
            Framing::None => (parts, Bytes::new()),
            // Most bodies (most requests have none) arrive with their head.
            Framing::Length(len) if self.buf.len() >= len => {
                (parts, self.buf.split_to(len).freeze())
            }
            framing => {
                // Boxed: the waits for a body would enlarge every request's future.
                match Box::pin(self.read_body(parts, framing, cancelled, deadline, clock)).await? {
                    Some(read) => read,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Incoming {
            request: Request::from_parts(parts, body),
            close,
            keep_alive_10,
        }))
    }

    /// Reads a body that has not fully arrived with its head. `Ok(None)`: the connection is
    /// done.
    async fn read_body(
        &mut self,
        mut parts: Parts,
        framing: Framing,
        mut cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        mut deadline: Option<Deadline>,
        clock: &Ticker,
    ) -> Result<Option<(Parts, Bytes)>, Refusal> {
        let expects_continue = parts.version == Version::HTTP_11
            && parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let body = match framing {
            Framing::None => Bytes::new(),
            Framing::Length(len) => {
                if self.buf.len() < len && expects_continue {
                    self.write_continue().await;
                }
                while self.buf.len() < len {
                    if !self.more_body(&mut cancelled, &mut deadline, clock).await {
                        return Ok(None);
                    }
                }
                self.buf.split_to(len).freeze()
            }
            Framing::Chunked => {
                if expects_continue {
                    self.write_continue().await;
                }
                let mut decoder = Chunked::new(MAX_REQUEST_BODY);
                loop {
                    match decoder.decode(&mut self.buf) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(CodecError::TooLarge(limit)) => return Err(too_large(limit)),
                        Err(CodecError::Invalid(what)) => {
                            return Err(Refusal::new(StatusCode::BAD_REQUEST, what));
                        }
                    }
                    if !self.more_body(&mut cancelled, &mut deadline, clock).await {
                        return Ok(None);
                    }
                }
                let body = decoder.into_body();
                // The backend gets the body whole, so it gets its length instead of the
                // transfer coding.
                parts.headers.remove(header::TRANSFER_ENCODING);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                body
            }
        };
        Ok(Some((parts, body)))
    }

    /// Waits for more of a request's body; false when the connection is done.
    async fn more_body(
        &mut self,
        cancelled: &mut Pin<&mut WaitForCancellationFuture<'_>>,
        deadline: &mut Option<Deadline>,
        clock: &Ticker,
    ) -> bool {
        match self.fill(true, cancelled.as_mut(), deadline, clock).await {
            Waited::Read => true,
            Waited::TimedOut => {
                tracing::debug!(
                    "{}: request body incomplete after {REQUEST_READ_TIMEOUT:?}",
                    self.peer
                );
                false
            }
            Waited::Gone | Waited::Shutdown => false,
        }
    }

    /// Reads what the client sent next. Between requests the wait ends on shutdown; once a
    /// request has `started`, it ends at the request's deadline instead.
    async fn fill(
        &mut self,
        started: bool,
        mut cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        deadline: &mut Option<Deadline>,
        clock: &Ticker,
    ) -> Waited {
        if started && deadline.is_none() {
            // Boxed: most requests arrive in one read and never need one.
            *deadline = Some(Box::pin(clock.expire(REQUEST_READ_TIMEOUT)));
        }
        let (stream, buf) = (&mut self.stream, &mut self.buf);
        poll_fn(|cx| {
            if started
                && let Some(deadline) = deadline.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Waited::TimedOut);
            }
            let read = if buf.capacity() == buf.len() {
                // The buffer is made only once there is something to read: an idle
                // connection waits without one.
                match stream.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        buf.reserve(FIRST_READ);
                        tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf)
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            } else {
                tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf)
            };
            match read {
                Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Waited::Gone),
                Poll::Ready(Ok(_)) => Poll::Ready(Waited::Read),
                // The shutdown is looked at only when there is nothing to read, which spares
                // a poll of it per request; a request that arrives with the shutdown is
                // answered, with `Connection: close`.
                Poll::Pending if !started && cancelled.as_mut().poll(cx).is_ready() => {
                    Poll::Ready(Waited::Shutdown)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    async fn write_continue(&mut self) {
        // A failed write shows in the reads that follow (the body never comes).
        let _ = self
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await;
    }

    async fn write_response(
        &mut self,
        resp: &Response<Bytes>,
        head_only: bool,
        connection: ConnectionHeader,
    ) -> io::Result<()> {
        let mut out = OUT.take();
        out.clear();
        let body = encode_response(resp, head_only, connection, &mut out);
        let written = if body.len() <= INLINE_BODY {
            out.extend_from_slice(body);
            self.stream.write_all(&out).await
        } else {
            match self.stream.write_all(&out).await {
                Ok(()) => self.stream.write_all(body).await,
                Err(e) => Err(e),
            }
        };
        if out.capacity() <= 4 * INLINE_BODY {
            OUT.set(out);
        }
        written
    }

    /// Answers a refused request; the connection closes after it. The client may still be
    /// sending (a body over the limit, say): closing with its bytes unread would make the
    /// kernel send a reset, which can destroy the answer before the client reads it. So, as
    /// nginx's lingering close does, the write side is shut and what the client sends is read
    /// and discarded until it closes its side, for at most [`LINGER`].
    async fn refuse(&mut self, refusal: &Refusal, clock: &Ticker) {
        let resp = plain(refusal.status, format!("redirect: {}\n", refusal.reason));
        if self
            .write_response(&resp, false, ConnectionHeader::Close)
            .await
            .is_err()
            || self.stream.shutdown().await.is_err()
        {
            return;
        }
        let discard = async {
            let mut sink = [0u8; 4096];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            () = discard => {}
            () = clock.expire(LINGER) => {}
        }
    }

    /// Makes ready to close the connection after a response. Bytes the client sent that were
    /// not read would make the kernel answer the close with a reset, which can destroy the
    /// response still in flight: whatever has arrived is read and discarded, without waiting
    /// for more.
    fn drain(&mut self) {
        let mut sink = [0u8; 1024];
        while matches!(self.stream.try_read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// A backend's response: the mock's at once, the upstream's later.
enum Responding<'a> {
    Ready(Response<Bytes>),
    /// Boxed: the mock's requests need none of its room in the request's future.
    Waiting(Pin<Box<dyn Future<Output = Response<Bytes>> + Send + 'a>>),
}

/// Not async, so that the request is not kept in the request's future while the upstream
/// answers.
fn respond(backend: &Backend, request: Request<Bytes>) -> Responding<'_> {
    match backend {
        Backend::Ec2(mock) => Responding::Ready(mock.handle(&request)),
        Backend::Upstream(forwarder) => Responding::Waiting(Box::pin(forwarder.forward(request))),
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes"),
    )
}

/// Parses a request head at the front of `buf`, taking it off when complete: the parts, the
/// body's framing, whether to close after the response and whether this is an HTTP/1.0
/// keep-alive request.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(Parts, Framing, bool, bool)>, Refusal> {
    let bad = |what: String| Refusal::new(StatusCode::BAD_REQUEST, what);
    // Uninitialised: initialising room for every header costs more than parsing.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let parsed_len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(too_large_head(buf)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(too_large_head(buf)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::Version) => {
            return Err(Refusal::new(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.0 and HTTP/1.1 are served",
            ));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} header lines"),
            ));
        }
        Err(e) => return Err(bad(format!("malformed request head: {e}"))),
    };
    let method = parsed.method.unwrap_or_default();
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| bad(format!("method {method:?}")))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where the target lies in the head (httparse gives a slice of `buf`).
    let path = match parsed.path {
        Some(path) if !path.is_empty() => {
            let start = path.as_ptr() as usize - buf.as_ptr() as usize;
            start..start + path.len()
        }
        _ => return Err(bad("no request target".to_owned())),
    };
    SPANS.with_borrow_mut(|spans| record_spans(buf, parsed.headers, spans));
    let head = buf.split_to(parsed_len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path))
        .map_err(|e| bad(format!("request target: {e}")))?;
    let mut headers = SPANS
        .with_borrow(|spans| header_map(&head, spans))
        .map_err(|e| bad(e.to_string()))?;

    let mut close = wants_close(version, &headers);
    let keep_alive_10 = version == Version::HTTP_10 && !close;
    let framing = match chunked(&headers) {
        Some(_) if version == Version::HTTP_10 => {
            // RFC 9112 §6.1: the framing of such a message is faulty.
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request".to_owned()));
        }
        Some(true) if !only_chunked(&headers) => {
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            ));
        }
        Some(true) => {
            if headers.remove(header::CONTENT_LENGTH).is_some() {
                // A smuggling attempt or a broken client: the transfer coding wins and the
                // connection is not trusted with another request.
                close = true;
            }
            Framing::Chunked
        }
        Some(false) => return Err(bad("chunked is not the final transfer coding".to_owned())),
        None => match content_length(&headers).map_err(|e| bad(e.to_string()))? {
            None | Some(0) => Framing::None,
            Some(len) => match usize::try_from(len) {
                Ok(len) if len <= MAX_REQUEST_BODY => Framing::Length(len),
                _ => return Err(too_large(MAX_REQUEST_BODY)),
            },
        },
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((parts, framing, close, keep_alive_10)))
}

/// 414 when the request line alone is longer than a head may be, 431 otherwise.
fn too_large_head(buf: &[u8]) -> Refusal {
    if buf[..MAX_HEAD].contains(&b'\n') {
        Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head larger than {MAX_HEAD} bytes"),
        )
    } else {
        Refusal::new(
            StatusCode::URI_TOO_LONG,
            format!("request line longer than {MAX_HEAD} bytes"),
        )
    }
}

/// Whether the client wants the connection closed after this exchange.
fn wants_close(version: Version, headers: &HeaderMap) -> bool {
    match version {
        Version::HTTP_10 => !connection_lists(headers, "keep-alive"),
        _ => connection_lists(headers, "close"),
    }
}

thread_local! {
    /// The response being written, kept per thread so that each response does not allocate.
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Where a request head's headers lie, kept per thread so that each request does not
    /// allocate.
    static SPANS: RefCell<Vec<Span>> = const { RefCell::new(Vec::new()) };
    /// The `Date` value of the current second (formatting one costs more than a response).
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Seconds since the epoch from the coarse clock: it only has to tell when the second changes,
/// and it is read for every response.
fn unix_seconds() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) } == 0 {
        u64::try_from(now.tv_sec).unwrap_or(0)
    } else {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// Writes the status line and headers of `resp` into `out`; returns the body to send after
/// them (empty where the response has none).
fn encode_response<'a>(
    resp: &'a Response<Bytes>,
    head_only: bool,
    connection: ConnectionHeader,
    out: &mut Vec<u8>,
) -> &'a [u8] {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = resp.headers();
    // Framing and connection management are this side's.
    put_headers(out, headers, |name| {
        matches!(
            *name,
            header::CONTENT_LENGTH | header::CONNECTION | header::TRANSFER_ENCODING
        )
    });
    if !headers.contains_key(header::DATE) {
        DATE.with_borrow_mut(|(second, text)| {
            let s = unix_seconds();
            if s != *second {
                let formatted =
                    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                if formatted.len() == text.len() {
                    text.copy_from_slice(formatted.as_bytes());
                    *second = s;
                }
            }
            put_header(out, b"date", text);
        });
    }
    let body = resp.body();
    let no_body = status.is_informational() || status == StatusCode::NO_CONTENT;
    // Answers that describe a representation without sending it.
    let without_body = head_only || status == StatusCode::NOT_MODIFIED;
    let mut digits = itoa::Buffer::new();
    let length: Option<&[u8]> = if no_body {
        None
    } else if without_body {
        // The length of what a GET would have had, if the backend gave it.
        headers
            .get(header::CONTENT_LENGTH)
            .map(HeaderValue::as_bytes)
            .or_else(|| head_only.then(|| digits.format(body.len()).as_bytes()))
    } else {
        Some(digits.format(body.len()).as_bytes())
    };
    if let Some(length) = length {
        put_header(out, b"content-length", length);
    }
    match connection {
        ConnectionHeader::None => {}
        ConnectionHeader::Close => out.extend_from_slice(b"connection: close\r\n"),
        ConnectionHeader::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if no_body || without_body { &[] } else { body }
}

#[cfg(test)]
mod tests {
    //! The server side over real loopback sockets, with the built-in mock behind it.

    use std::sync::atomic::Ordering;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        task::JoinHandle,
    };

    use super::super::{Backend, ProxyStats, serve};
    use super::*;
    use crate::mock::ec2::{Ec2Mock, Ec2Values};

    const GET: &[u8] =
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
    const ID: &str = "i-0123456789abcdef0";

    struct Server {
        addr: SocketAddr,
        stats: Arc<ProxyStats>,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn start() -> Server {
        start_with_idle_timeout(Duration::ZERO).await
    }

    async fn start_with_idle_timeout(idle_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Backend::Ec2(Arc::new(Ec2Mock::new(Ec2Values::default()))));
        let stats = Arc::new(ProxyStats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            vec![listener],
            backend,
            Arc::clone(&stats),
            shutdown.clone(),
            Duration::from_secs(5),
            idle_timeout,
        ));
        Server {
            addr,
            stats,
            shutdown,
            task,
        }
    }

    /// Reads one response with a Content-Length body; returns (head, body).
    async fn response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("content-length");
                if pending.len() >= end + 4 + length {
                    let body =
                        String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).to_string();
                    pending.drain(..end + 4 + length);
                    return (head, body);
                }
            }
            let mut chunk = [0u8; 4096];
            // A guard against a lost response hanging the test; never reached otherwise.
            let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk))
                .await
                .expect("no response")
                .unwrap();
            assert!(n > 0, "connection closed before a full response");
            pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the server closed the connection. A server that keeps it open fails this after
    /// a few seconds instead of hanging the test run.
    async fn at_eof(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn keep_alive_serves_many_requests_on_one_socket() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        for _ in 0..3 {
            // Idle in between: the connection has given its buffer back and takes a new one.
            c.write_all(GET).await.unwrap();
            let (head, body) = response(&mut c, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
            assert_eq!(body, ID);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.stats.connections_total.load(Ordering::Relaxed), 1);
        assert_eq!(server.stats.requests.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let other = b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\n\r\n";
        c.write_all(&[GET, other.as_slice(), GET].concat())
            .await
            .unwrap();
        let mut pending = Vec::new();
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
        assert_eq!(response(&mut c, &mut pending).await.1, "us-east-1");
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
    }

    #[tokio::test]
    async fn a_request_head_split_across_reads_is_answered() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        c.write_all(GET).await.unwrap();
        response(&mut c, &mut pending).await;
        // Half a head, a pause (well within the timeout), the rest.
        c.write_all(&GET[..20]).await.unwrap();
        tokio::time::sleep(REQUEST_READ_TIMEOUT / 3).await;
        c.write_all(&GET[20..]).await.unwrap();
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
    }

    /// A head left unfinished after earlier requests is cut off like a first one.
    #[tokio::test]
    async fn a_stalled_head_after_requests_is_cut_off() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        for _ in 0..2 {
            c.write_all(GET).await.unwrap();
            response(&mut c, &mut pending).await;
        }
        c.write_all(&GET[..30]).await.unwrap();
        tokio::time::sleep(REQUEST_READ_TIMEOUT * 2).await;
        assert!(at_eof(&mut c).await);
    }

    /// A body that stops coming is cut off as a head is.
    #[tokio::test]
    async fn a_stalled_body_is_cut_off() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(REQUEST_READ_TIMEOUT * 2).await;
        assert!(at_eof(&mut c).await);
        assert_eq!(server.stats.requests.load(Ordering::Relaxed), 0);
    }

    /// Many short connections from two threads: every request that arrived is answered in
    /// full before the close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_on_a_closing_connection_is_answered() {
        let server = start().await;
        let close =
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let clients: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(async move {
                    for _ in 0..150 {
                        let mut c = TcpStream::connect(server.addr).await.unwrap();
                        c.write_all(close).await.unwrap();
                        let mut all = Vec::new();
                        c.read_to_end(&mut all).await.unwrap();
                        let text = String::from_utf8_lossy(&all);
                        assert!(text.ends_with(ID), "incomplete response: {text:?}");
                    }
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
    }

    #[tokio::test]
    async fn close_requests_close_the_socket() {
        let server = start().await;
        for request in [
            &b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                [..],
            b"GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n",
        ] {
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            c.write_all(request).await.unwrap();
            let mut pending = Vec::new();
            assert_eq!(response(&mut c, &mut pending).await.1, ID);
            assert!(at_eof(&mut c).await, "socket left open after {request:?}");
        }
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_ends_the_server() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        c.write_all(GET).await.unwrap();
        response(&mut c, &mut pending).await;
        server.shutdown.cancel();
        assert!(at_eof(&mut c).await);
        server.task.await.unwrap();
        assert_eq!(server.stats.connections_open.load(Ordering::Relaxed), 0);
    }

    /// In unit tests the clock ticks every 50 ms (`DEADLINE_TICK`), so the sweep looks every
    /// 75 ms for connections idle for 300 ms.
    const IDLE_TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_connection_idle_for_the_idle_timeout_is_closed() {
        let server = start_with_idle_timeout(IDLE_TIMEOUT).await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        c.write_all(GET).await.unwrap();
        response(&mut c, &mut pending).await;
        let idle_from = std::time::Instant::now();
        assert!(at_eof(&mut c).await, "still open after 5 s");
        assert!(
            idle_from.elapsed() >= IDLE_TIMEOUT,
            "{:?}",
            idle_from.elapsed()
        );
        // The connection's task ended, as if the client had closed.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while server.stats.connections_open.load(Ordering::Relaxed) > 0 {
                tokio::task::yield_now().await;
            }
        });
        assert!(ended.await.is_ok(), "the connection's task did not end");
        // A connection that never sent a request is idle too.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        assert!(at_eof(&mut silent).await, "still open after 5 s");
    }

    #[tokio::test]
    async fn requests_keep_a_connection_open_past_the_idle_timeout() {
        let server = start_with_idle_timeout(IDLE_TIMEOUT).await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        let started = std::time::Instant::now();
        // A request every 100 ms for three times the timeout, all on the one socket.
        while started.elapsed() < IDLE_TIMEOUT * 3 {
            c.write_all(GET).await.unwrap();
            let (head, body) = response(&mut c, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, ID);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(server.stats.connections_total.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_stalled_request_head_is_cut_off() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        tokio::time::sleep(REQUEST_READ_TIMEOUT * 2).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
        assert!(at_eof(&mut c).await);
    }

    /// Sends `request` on a fresh connection; returns everything until the server closes.
    async fn exchange_and_close(server: &Server, request: &[u8]) -> String {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut all))
            .await
            .expect("the server did not close")
            .unwrap();
        String::from_utf8_lossy(&all).into_owned()
    }

    #[tokio::test]
    async fn bad_requests_get_the_status_of_rfc_9112_and_a_close() {
        let server = start().await;
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        let long_head = format!(
            "GET / HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD + 10)
        );
        let many_headers = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "x-h: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let too_long = format!(
            "PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            MAX_REQUEST_BODY + 1
        );
        let too_long_chunked = format!(
            "PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_REQUEST_BODY + 1
        );
        let cases: [(&[u8], &str); 12] = [
            (b"GARBAGE\r\n\r\n", "400 Bad Request"),
            (b"GET / HTTP/2.0\r\n\r\n", "505 HTTP Version Not Supported"),
            (long_line.as_bytes(), "414 URI Too Long"),
            (long_head.as_bytes(), "431 Request Header Fields Too Large"),
            (
                many_headers.as_bytes(),
                "431 Request Header Fields Too Large",
            ),
            (
                b"PUT / HTTP/1.1\r\ncontent-length: 1x\r\n\r\n",
                "400 Bad Request",
            ),
            (
                b"PUT / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
                "400 Bad Request",
            ),
            (
                b"PUT / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                "400 Bad Request",
            ),
            (
                b"PUT / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                "501 Not Implemented",
            ),
            (
                b"PUT / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "400 Bad Request",
            ),
            (too_long.as_bytes(), "413 Payload Too Large"),
            (too_long_chunked.as_bytes(), "413 Payload Too Large"),
        ];
        for (request, status) in cases {
            let shown = String::from_utf8_lossy(&request[..request.len().min(60)]);
            let response = exchange_and_close(&server, request).await;
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{shown:?}: {response}"
            );
            assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
            assert!(!response.contains("100 Continue"), "{response}");
        }
        let chunked_garbage = exchange_and_close(
            &server,
            b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        )
        .await;
        assert!(
            chunked_garbage.starts_with("HTTP/1.1 400 "),
            "{chunked_garbage}"
        );
        assert_eq!(server.stats.requests.load(Ordering::Relaxed), 0);
    }

    /// A client that sends a body over the limit in full, without waiting for an answer, gets
    /// its 413 and a clean close: the server lingers, reading what comes, instead of closing
    /// with bytes unread, which makes the kernel reset the connection (and, off loopback, can
    /// destroy the answer in flight).
    #[tokio::test]
    async fn an_oversized_body_sent_in_full_gets_its_answer_and_no_reset() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        // More than the socket buffers hold, so that the body is still coming when the
        // server has answered.
        let length = MAX_REQUEST_BODY * 32;
        let head = format!("PUT /latest/api/token HTTP/1.1\r\ncontent-length: {length}\r\n\r\n");
        let (mut read, mut write) = c.split();
        let send = async {
            write.write_all(head.as_bytes()).await?;
            write.write_all(&vec![b'x'; length]).await?;
            write.shutdown().await
        };
        let receive = async {
            let mut all = Vec::new();
            read.read_to_end(&mut all).await.map(|_| all)
        };
        let (sent, received) = tokio::join!(send, receive);
        sent.expect("the whole body was taken");
        let response = String::from_utf8(received.expect("a clean close, not a reset")).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{response:?}"
        );
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_before_the_body_is_read() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(
            b"PUT /latest/api/token HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\
              x-aws-ec2-metadata-token-ttl-seconds: 60\r\ncontent-length: 4\r\n\r\n",
        )
        .await
        .unwrap();
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let mut got = vec![0; interim.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, interim);
        c.write_all(b"body").await.unwrap();
        let (head, token) = response(&mut c, &mut Vec::new()).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(!token.is_empty());
    }

    #[tokio::test]
    async fn chunked_request_bodies_are_read_and_the_connection_kept() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let put = b"PUT /latest/api/token HTTP/1.1\r\nhost: x\r\n\
                    x-aws-ec2-metadata-token-ttl-seconds: 60\r\ntransfer-encoding: chunked\r\n\r\n\
                    2\r\nab\r\n0\r\n\r\n";
        c.write_all(&[&put[..], GET].concat()).await.unwrap();
        let mut pending = Vec::new();
        let (head, _) = response(&mut c, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        // The body was consumed exactly: the pipelined GET is the next request.
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
    }

    #[tokio::test]
    async fn chunked_with_content_length_is_served_then_closed() {
        let server = start().await;
        let response = exchange_and_close(
            &server,
            b"PUT /latest/api/token HTTP/1.1\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\n\
              content-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
    }

    #[tokio::test]
    async fn head_responses_have_the_length_and_no_body() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let head = b"HEAD /latest/meta-data/instance-id HTTP/1.1\r\nhost: x\r\n\r\n";
        // The GET behind it shows that no body bytes came between.
        c.write_all(&[&head[..], GET].concat()).await.unwrap();
        let mut all = Vec::new();
        while !all.ends_with(ID.as_bytes()) {
            let mut chunk = [0; 4096];
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            all.extend_from_slice(&chunk[..n]);
        }
        let all = String::from_utf8(all).unwrap();
        let (first, second) = all.split_once("\r\n\r\n").unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
        assert!(
            first.contains(&format!("\r\ncontent-length: {}", ID.len())),
            "{all}"
        );
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    }

    #[tokio::test]
    async fn http_1_0_keep_alive_is_answered_in_kind() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        let request =
            b"GET /latest/meta-data/instance-id HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        for _ in 0..2 {
            c.write_all(request).await.unwrap();
            let (head, body) = response(&mut c, &mut pending).await;
            assert!(head.contains("\r\nconnection: keep-alive"), "{head}");
            assert_eq!(body, ID);
        }
    }

    #[tokio::test]
    async fn responses_carry_a_date() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(GET).await.unwrap();
        let (head, _) = response(&mut c, &mut Vec::new()).await;
        let date = head
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date header");
        let sent = httpdate::parse_http_date(date).unwrap();
        let skew = SystemTime::now()
            .duration_since(sent)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(60), "{date}");
    }

    /// An idle connection's task is the `serve` future; a request's state is one allocation
    /// of the `exchange` future, small enough for the allocator's per-thread cache.
    #[tokio::test]
    async fn connection_state_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Backend::Ec2(Arc::new(Ec2Mock::new(Ec2Values::default()))));
        let stats = Arc::new(ProxyStats::default());
        let clock = Arc::new(Ticker::start(DEADLINE_TICK));
        let shutdown = CancellationToken::new();
        let stream = TcpStream::connect(addr).await.unwrap();
        let idle = super::serve(
            stream,
            addr,
            Arc::clone(&backend),
            Arc::clone(&stats),
            Arc::clone(&clock),
            Some(Arc::new(IdleConnections::new(
                Duration::from_secs(75),
                Arc::clone(&clock),
            ))),
            shutdown.clone(),
        );
        assert!(size_of_val(&idle) <= 512, "serve: {}", size_of_val(&idle));
        let mut conn = Connection {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            peer: addr,
        };
        let mut cancelled = pin!(shutdown.cancelled());
        let exchange = conn.exchange(&backend, &stats, cancelled.as_mut(), &clock, &shutdown);
        super::super::assert_fits_allocator_cache("exchange", size_of_val(&exchange));
    }

    /// Whatever arrives, parsing answers or refuses and never panics: valid requests with
    /// bytes flipped, cut or repeated, and plain noise (a fixed-seed generator, so a failure
    /// repeats).
    #[test]
    fn parsing_survives_any_input() {
        let valid: [&[u8]; 3] = [
            GET,
            b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\
              Content-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
            b"POST http://h/x?y HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\
              Connection: keep-alive\r\n\r\n1\r\na\r\n0\r\n\r\n",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut input = valid[round % valid.len()].to_vec();
            match next() % 4 {
                0 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % input.len();
                        input[i] = next() as u8;
                    }
                }
                1 => input.truncate((next() as usize) % input.len()),
                2 => {
                    let i = (next() as usize) % input.len();
                    let piece = input[i..].to_vec();
                    input.extend_from_slice(&piece);
                }
                _ => input = (0..next() % 200).map(|_| next() as u8).collect(),
            }
            let mut buf = BytesMut::from(&input[..]);
            if let Ok(Some(_)) = parse_head(&mut buf) {
                let mut decoder = Chunked::new(MAX_REQUEST_BODY);
                let _ = decoder.decode(&mut buf);
            }
        }
    }

    #[test]
    fn close_rules() {
        let headers = |connection: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(c) = connection {
                h.insert(header::CONNECTION, HeaderValue::from_static(c));
            }
            h
        };
        assert!(!wants_close(Version::HTTP_11, &headers(None)));
        assert!(wants_close(Version::HTTP_11, &headers(Some("close"))));
        assert!(wants_close(
            Version::HTTP_11,
            &headers(Some("Upgrade, Close"))
        ));
        assert!(wants_close(Version::HTTP_10, &headers(None)));
        assert!(!wants_close(Version::HTTP_10, &headers(Some("Keep-Alive"))));
    }

    #[test]
    fn response_framing() {
        let encode = |status: u16, length: Option<&'static str>, body: &'static str, head_only| {
            let mut resp = Response::new(Bytes::from_static(body.as_bytes()));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(l) = length {
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static(l));
            }
            resp.headers_mut()
                .insert(header::DATE, HeaderValue::from_static("d"));
            let mut out = Vec::new();
            let body = encode_response(&resp, head_only, ConnectionHeader::None, &mut out).len();
            (String::from_utf8(out).unwrap(), body)
        };
        let cases = [
            // (status, backend's length, body, HEAD) -> (head, body bytes sent)
            (
                (200, None, "abc", false),
                ("HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 3\r\n\r\n", 3),
            ),
            (
                (200, Some("9"), "abc", false),
                ("HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 3\r\n\r\n", 3),
            ),
            (
                (200, Some("9"), "", true),
                ("HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 9\r\n\r\n", 0),
            ),
            (
                (200, None, "abc", true),
                ("HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 3\r\n\r\n", 0),
            ),
            (
                (204, Some("3"), "abc", false),
                ("HTTP/1.1 204 No Content\r\ndate: d\r\n\r\n", 0),
            ),
            (
                (304, Some("7"), "", false),
                (
                    "HTTP/1.1 304 Not Modified\r\ndate: d\r\ncontent-length: 7\r\n\r\n",
                    0,
                ),
            ),
            (
                (304, None, "", false),
                ("HTTP/1.1 304 Not Modified\r\ndate: d\r\n\r\n", 0),
            ),
            (
                (299, None, "", false),
                ("HTTP/1.1 299 \r\ndate: d\r\ncontent-length: 0\r\n\r\n", 0),
            ),
        ];
        for ((status, length, body, head_only), expected) in cases {
            assert_eq!(
                encode(status, length, body, head_only),
                (expected.0.to_owned(), expected.1),
                "{status} {length:?} {body:?} {head_only}"
            );
        }
    }
}
