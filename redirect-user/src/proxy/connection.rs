//! Serving one client connection, holding little more than the socket while it is idle.
//!
//! hyper keeps an 8 KB read and an 8 KB write buffer for as long as a connection lives, so
//! 10,000 idle keep-alive clients cost some 140 MB (BENCHMARKS.md). Here a client's hyper
//! connection is released when the client is not busy: it is asked to finish
//! (`graceful_shutdown`; the response head is already written, so the client sees plain
//! keep-alive), the socket is taken back (`without_shutdown`, with any bytes hyper had read
//! ahead) and the task waits for the next request with no buffer at all, as nginx does.
//!
//! "Busy" means more than one request within an [`IDLE_SWEEP`] period. A one-off request is
//! released as soon as its response ends; a busy client keeps its hyper connection until a
//! sweep finds it idle. A fresh hyper connection for every request would cost about a quarter
//! more CPU per request (measured); a busy client here rebuilds at most once per period.

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    Request, Version,
    body::{Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{Backend, Body, ProxyStats, connection_lists, handle, ticker::Ticker};

/// A client that has not sent a complete request head within this time (give or take two
/// [`IDLE_SWEEP`] periods) is disconnected. Checked by the sweep, not by hyper's
/// `header_read_timeout`: that one arms a tokio timer for every keep-alive request (5 % of the
/// proxy's instructions per request, BENCHMARKS.md) and, since each release starts a fresh
/// hyper connection, never fired for a head stalled across releases. (Short in unit tests,
/// which run on real sockets and so in real time.)
const HEADER_READ_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};

/// A client connection idle through a whole period gives its buffers back.
pub const IDLE_SWEEP: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(1)
};

/// What the service tells the connection loop about the client's requests. Lives as long as
/// the client connection, across the hyper connections it is served by.
#[derive(Default)]
struct Activity {
    /// Requests whose response body has not ended yet.
    in_flight: AtomicUsize,
    /// Requests started since the last sweep.
    this_period: AtomicUsize,
    /// Requests started on this client connection.
    total: AtomicUsize,
    /// The client asked to close after a response (HTTP/1.0 or `Connection: close`).
    close_after: AtomicBool,
    /// A response ended on a connection that is not busy: release it. Set from inside hyper's
    /// poll (the body ends there), so the loop reads it right after that poll.
    release: AtomicBool,
}

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    sweep: Arc<Ticker>,
    trimmer: Arc<Trimmer>,
    shutdown: CancellationToken,
) {
    let mut io = Rewind {
        prefix: Bytes::new(),
        inner: stream,
    };
    let activity = Arc::new(Activity::default());
    // Since when (sweep tick) the client has had an incomplete request head in the buffer, and
    // how many requests it had made then.
    let mut partial_head: Option<(u64, usize)> = None;
    let head_ticks = (HEADER_READ_TIMEOUT.as_millis() / IDLE_SWEEP.as_millis()) as u64;
    loop {
        if io.prefix.is_empty() {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                ready = io.inner.readable() => if let Err(e) = ready {
                    tracing::debug!("{peer}: {e}");
                    return;
                },
            }
        }
        let service = {
            let (backend, stats, activity) = (
                Arc::clone(&backend),
                Arc::clone(&stats),
                Arc::clone(&activity),
            );
            service_fn(move |req: Request<Incoming>| {
                activity.in_flight.fetch_add(1, Ordering::Relaxed);
                activity.this_period.fetch_add(1, Ordering::Relaxed);
                activity.total.fetch_add(1, Ordering::Relaxed);
                if wants_close(&req) {
                    activity.close_after.store(true, Ordering::Relaxed);
                }
                let (backend, stats, activity) = (
                    Arc::clone(&backend),
                    Arc::clone(&stats),
                    Arc::clone(&activity),
                );
                // Boxed: hyper's poll_without_shutdown wants an Unpin service future.
                Box::pin(async move {
                    let resp = handle(&backend, &stats, req, peer).await;
                    Ok::<_, std::convert::Infallible>(resp.map(|body| OnEnd {
                        body,
                        activity: Some(activity),
                    }))
                })
            })
        };
        // Boxed: it exists only while a request is in flight, and the idle task stays small.
        let mut conn = Box::new(http1::Builder::new().serve_connection(TokioIo::new(io), service));
        let mut sweeps = sweep.subscribe();
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        let mut stopping = false;
        let mut closing = false;
        // When the release was asked for, and how many requests the client had made by then.
        let mut stopped_at = (0, 0);
        // One poll function rather than a select: its side conditions are flags and futures
        // made once per hyper connection, not re-registered on every wake-up.
        // Every branch that returns Pending has registered for what it waits on; a consumed
        // tick goes round the loop again so that the next one is waited for.
        let result = poll_fn(|cx| {
            loop {
                if let Poll::Ready(done) = conn.poll_without_shutdown(cx) {
                    return Poll::Ready(Some(done));
                }
                let idle = activity.in_flight.load(Ordering::Relaxed) == 0;
                if stopping {
                    // Asked to finish while idle, hyper is still reading a request head: a
                    // client's first (hyper keeps that connection until it is answered). Cut a
                    // head that never completes.
                    if !idle || activity.total.load(Ordering::Relaxed) != stopped_at.1 {
                        return Poll::Pending;
                    }
                    match sweeps.poll_next(cx) {
                        Poll::Ready(now) if now.saturating_sub(stopped_at.0) >= head_ticks => {
                            return Poll::Ready(None);
                        }
                        Poll::Ready(_) => continue,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                // A one-off request's response ended (see OnEnd); stale once the next began.
                let one_off_done = activity.release.swap(false, Ordering::Relaxed);
                if cancelled.as_mut().poll(cx).is_ready() {
                    closing = true;
                } else if !idle {
                    return Poll::Pending;
                } else if !one_off_done {
                    match sweeps.poll_next(cx) {
                        Poll::Pending => return Poll::Pending,
                        // Busy connections keep their buffers; one idle for a whole period
                        // gives them back.
                        Poll::Ready(_) if activity.this_period.swap(0, Ordering::Relaxed) > 0 => {
                            continue;
                        }
                        Poll::Ready(_) => {}
                    }
                }
                Pin::new(&mut *conn).graceful_shutdown();
                stopping = true;
                stopped_at = (sweep.now(), activity.total.load(Ordering::Relaxed));
            }
        })
        .await;
        match result {
            None => {
                tracing::debug!("{peer}: no complete request head within {HEADER_READ_TIMEOUT:?}");
                return;
            }
            Some(Err(e)) => {
                tracing::debug!("connection from {peer}: {e}");
                return;
            }
            Some(Ok(())) => {}
        }
        if closing {
            return;
        }
        let parts = (*conn).into_parts();
        // The client asked to close: hyper answered and finished; close the socket, which
        // without_shutdown left open.
        if activity.close_after.load(Ordering::Relaxed) {
            close_after_response(parts.io.into_inner().inner);
            return;
        }
        // hyper finished on its own without being asked to: the client closed the connection
        // (or sent something hyper refused). Only a release we asked for keeps the socket.
        if !stopping {
            tracing::debug!("{peer}: closed by the client");
            return;
        }
        trimmer.released();
        let rewind = parts.io.into_inner();
        // hyper's buffer holds bytes it read but did not use (the start of the next request);
        // any bytes of the old prefix hyper did not read come after them.
        io = Rewind {
            prefix: if rewind.prefix.is_empty() {
                parts.read_buf
            } else {
                let mut joined = BytesMut::from(&parts.read_buf[..]);
                joined.extend_from_slice(&rewind.prefix);
                joined.freeze()
            },
            inner: rewind.inner,
        };
        // Released while idle with bytes left over: hyper parses a complete head as soon as it
        // has one, so these are the start of a request that has not fully arrived. A client
        // that keeps one unfinished for too long (slowloris) is let go.
        if io.prefix.is_empty() {
            partial_head = None;
        } else {
            let (now, requests) = (sweep.now(), activity.total.load(Ordering::Relaxed));
            match partial_head {
                Some((since, before)) if before == requests => {
                    if now.saturating_sub(since) >= head_ticks {
                        tracing::debug!(
                            "{peer}: no complete request head within {HEADER_READ_TIMEOUT:?}"
                        );
                        return;
                    }
                }
                _ => partial_head = Some((now, requests)),
            }
        }
    }
}

/// Gives the memory of released connections back to the operating system. glibc's malloc
/// keeps freed memory for reuse, so after a burst of connections goes idle the process would
/// stay at its peak size; one `malloc_trim` after each sweep that released connections returns
/// the free pages.
pub struct Trimmer {
    released: AtomicUsize,
    wake: tokio::sync::Notify,
}

impl Trimmer {
    /// Spawns the trimming task on the current runtime.
    pub fn start(sweep: Arc<Ticker>) -> Arc<Self> {
        let trimmer = Arc::new(Trimmer {
            released: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
        });
        let this = Arc::clone(&trimmer);
        tokio::spawn(async move {
            loop {
                this.wake.notified().await;
                // Let the rest of this sweep's connections release first.
                sweep.subscribe().next().await;
                if this.released.swap(0, Ordering::Relaxed) > 0 {
                    trim();
                }
            }
        });
        trimmer
    }

    fn released(&self) {
        if self.released.fetch_add(1, Ordering::Relaxed) == 0 {
            self.wake.notify_one();
        }
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

/// Closes a connection whose client asked for that. hyper has read the whole request; a
/// well-behaved client sends nothing more, but bytes it did send would make the kernel answer
/// the close with a reset, which can destroy the response still in flight. Whatever has
/// arrived is read and discarded first, without waiting for more.
fn close_after_response(stream: TcpStream) {
    let mut sink = [0u8; 1024];
    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
}

/// Whether the client wants the connection closed after this exchange.
fn wants_close<B>(req: &Request<B>) -> bool {
    match req.version() {
        Version::HTTP_10 => !connection_lists(req.headers(), "keep-alive"),
        _ => connection_lists(req.headers(), "close"),
    }
}

/// A response body that tells the connection loop when it has ended (or was dropped).
struct OnEnd {
    body: Body,
    activity: Option<Arc<Activity>>,
}

impl OnEnd {
    fn signal(&mut self) {
        if let Some(activity) = self.activity.take()
            && activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1
            && activity.this_period.load(Ordering::Relaxed) <= 1
        {
            activity.release.store(true, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for OnEnd {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.signal();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        self.signal();
    }
}

/// A socket with bytes already read from it put back in front.
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_rules() {
        let req = |version, connection: Option<&str>| {
            let mut b = Request::builder().version(version);
            if let Some(c) = connection {
                b = b.header("connection", c);
            }
            b.body(()).unwrap()
        };
        assert!(!wants_close(&req(Version::HTTP_11, None)));
        assert!(wants_close(&req(Version::HTTP_11, Some("close"))));
        assert!(wants_close(&req(Version::HTTP_11, Some("Upgrade, Close"))));
        assert!(wants_close(&req(Version::HTTP_10, None)));
        assert!(!wants_close(&req(Version::HTTP_10, Some("Keep-Alive"))));
    }
}

#[cfg(test)]
mod lifecycle_tests {
    //! The connection lifecycle over real loopback sockets, with the built-in mock behind it.

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
    async fn keep_alive_across_releases() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        for _ in 0..3 {
            // A one-off request is released right after its response; the next one must be
            // served on the same socket by a fresh hyper connection.
            c.write_all(GET).await.unwrap();
            let (head, body) = response(&mut c, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                !head.to_ascii_lowercase().contains("connection: close"),
                "{head}"
            );
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
    async fn a_request_head_split_across_a_release() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        c.write_all(GET).await.unwrap();
        response(&mut c, &mut pending).await;
        // Half a head, a pause long enough for the connection to be released, the rest.
        c.write_all(&GET[..20]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(&GET[20..]).await.unwrap();
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
    }

    /// A connection that made two requests (busy, so the hyper connection is kept) and then
    /// sent the first 30 bytes of a third; returns it and the bytes read past the responses.
    async fn busy_then_half_a_head(server: &Server) -> (TcpStream, Vec<u8>) {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        for _ in 0..2 {
            c.write_all(GET).await.unwrap();
            response(&mut c, &mut pending).await;
        }
        c.write_all(&GET[..30]).await.unwrap();
        (c, pending)
    }

    #[tokio::test]
    async fn a_partial_head_survives_a_sweep_release() {
        let server = start().await;
        let (mut c, mut pending) = busy_then_half_a_head(&server).await;
        // A sweep finds it idle while it holds half a request head in its buffer.
        tokio::time::sleep(IDLE_SWEEP * 3).await;
        c.write_all(&GET[30..]).await.unwrap();
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
    }

    /// A head left unfinished after earlier requests: every sweep releases the connection
    /// and carries the bytes over, and still the client is cut off in the end.
    #[tokio::test]
    async fn a_stalled_head_after_requests_is_cut_off() {
        let server = start().await;
        let (mut c, _) = busy_then_half_a_head(&server).await;
        tokio::time::sleep(HEADER_READ_TIMEOUT * 2).await;
        assert!(at_eof(&mut c).await);
    }

    /// Many fresh connections while sweeps tick: a sweep may find a hyper connection whose
    /// request has arrived but is not parsed yet. That request must still be answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweeps_never_drop_a_request_that_has_arrived() {
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
    async fn a_busy_connection_survives_sweeps_and_idles_out_of_hyper() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let mut pending = Vec::new();
        // Busy across several sweep periods: kept, and every request answered.
        for _ in 0..40 {
            c.write_all(GET).await.unwrap();
            assert_eq!(response(&mut c, &mut pending).await.1, ID);
            tokio::time::sleep(IDLE_SWEEP / 8).await;
        }
        // Idle for a few periods (released by a sweep), then busy again.
        tokio::time::sleep(IDLE_SWEEP * 3).await;
        c.write_all(GET).await.unwrap();
        assert_eq!(response(&mut c, &mut pending).await.1, ID);
        assert_eq!(server.stats.connections_total.load(Ordering::Relaxed), 1);
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

    #[tokio::test]
    async fn a_stalled_request_head_is_cut_off() {
        let server = start().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        tokio::time::sleep(HEADER_READ_TIMEOUT * 2).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
        assert!(at_eof(&mut c).await);
    }
}
