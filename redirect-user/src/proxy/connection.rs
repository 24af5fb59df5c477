//! One client connection: hyper's HTTP/1.1 server, each request admitted (`admission`), its
//! body read within the limits, then answered by the backend; between requests the
//! connection is parked out of hyper.

use std::{convert::Infallible, future::poll_fn, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::caller::Peer;

use super::{
    ProxyStats, Shared,
    admission::{self, Refusal},
    budget::BodyError,
    idle::{Activity, IdleList},
    socket::ClientSocket,
};

/// How long a kept-alive connection stays in hyper's hands without a request before it is
/// parked: hyper keeps two 8 KiB buffers per connection, a parked one only its socket (about
/// 4 KB), as nginx frees a keep-alive connection's buffers. A client sending request after
/// request keeps its hyper connection; a crowd of idle ones holds little (10,000: 34 MB).
pub(super) const PARK_AFTER: Duration = Duration::from_millis(10);

/// How long, and how much, a refused client may go on sending before the connection is
/// closed on it (nginx's lingering close): it then reads its answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Serves one connection until the client or the proxy closes it. On shutdown, and when the
/// listener needs its slot, it finishes the request in progress, if any, and closes.
pub(super) async fn serve<S>(
    stream: S,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    peer: Peer,
    over_budget: Option<usize>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    ProxyStats::add(&shared.stats.connections_open, 1);
    let activity = shared.idle.track();
    let _open = Open(shared, &activity);
    let mut io = ClientSocket::new(stream, Arc::clone(&activity), shared.timeouts.send);
    let peer = Arc::new(peer);
    loop {
        match serve_requests(io, shared, &activity, &peer, over_budget, shutdown).await {
            Some((mut parked, true)) => {
                // Parked: nothing but the socket until a request begins, or the idle timeout.
                let idle = shared.timeouts.idle.unwrap_or(Duration::MAX);
                tokio::select! {
                    next = tokio::time::timeout(idle, parked.next_request()) => {
                        if !matches!(next, Ok(Ok(true))) {
                            return close(parked, false).await;
                        }
                    }
                    () = shutdown.cancelled() => {
                        // Its next request may be on its way: it is still served, with
                        // `Connection: close`, as in `serve_requests`.
                        let next = tokio::time::timeout(STOP_GRACE, parked.next_request()).await;
                        if !matches!(next, Ok(Ok(true))) {
                            return close(parked, false).await;
                        }
                    }
                    () = activity.evicted() => return,
                }
                io = parked;
            }
            Some((done, false)) => return close(done, activity.lingers()).await,
            None => return,
        }
    }
}

/// Runs a hyper connection until it is done. `Some((io, true))`: parked after [`PARK_AFTER`]
/// without a request, the socket (and whatever hyper had read of it) back for the next one;
/// `Some((io, false))`: to be closed; `None`: already dropped.
async fn serve_requests<S>(
    io: ClientSocket<S>,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    peer: &Arc<Peer>,
    over_budget: Option<usize>,
    shutdown: &CancellationToken,
) -> Option<(ClientSocket<S>, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (shared, activity, peer) = (Arc::clone(shared), Arc::clone(activity), Arc::clone(peer));
        let stopping = shutdown.clone();
        service_fn(move |req| {
            let (shared, activity) = (Arc::clone(&shared), Arc::clone(&activity));
            let peer = Arc::clone(&peer);
            let stopping = stopping.clone();
            // Boxed: hyper keeps a slot of the future's size per connection.
            Box::pin(async move {
                let mut resp = match over_budget {
                    Some(limit) => over(req, &shared, &peer, limit),
                    None => handle(req, &shared, &activity, &peer).await,
                };
                // Stopping: the client learns from this answer that the connection ends
                // (hyper closes it once written), rather than from its next request failing.
                if stopping.is_cancelled() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            })
        })
    };
    let mut conn = shared.http.serve_connection(TokioIo::new(io), service);
    let stopped = tokio::select! {
        result = poll_fn(|cx| conn.poll_without_shutdown(cx)) => Err(result),
        () = idle_for(activity, PARK_AFTER) => Ok(true),
        () = shutdown.cancelled() => {
            // Between requests, the next may be on its way: on a kept-alive connection the
            // client reuses at this moment, or the first of a connection accepted just before
            // the stop (a replacing daemon took the port meanwhile). It is served, its answer
            // saying `Connection: close`, rather than the connection closed under the client.
            // A request in progress is answered first either way.
            if !activity.is_busy() {
                tokio::select! {
                    result = poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                        if let Err(e) = result {
                            tracing::debug!("client connection: {e}");
                        }
                        return None;
                    }
                    () = tokio::time::sleep(STOP_GRACE) => {}
                }
            }
            Ok(false)
        }
        () = activity.evicted() => {
            if !activity.is_busy() {
                return None; // idle: closed now, as nginx closes a reusable connection
            }
            Ok(false)
        }
    };
    let (result, park) = match stopped {
        Err(result) => (result, false),
        Ok(park) => {
            // Keep-alive off: an idle connection (parking) is done at once, and any answer
            // it was still writing went out without `Connection: close`; a busy one
            // (shutdown, eviction) is done after its answer, which says `close`.
            Pin::new(&mut conn).graceful_shutdown();
            (poll_fn(|cx| conn.poll_without_shutdown(cx)).await, park)
        }
    };
    if let Err(e) = result {
        tracing::debug!("client connection: {e}");
        return None;
    }
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    // A copy: the `Bytes` hyper hands back would keep its whole read buffer alive.
    io.rewind(Bytes::copy_from_slice(&parts.read_buf));
    Some((io, park))
}

/// How long a connection between requests is kept after a stop, for a request on its way.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Resolves once no request has been handled, begun, or begun to arrive for `period`.
async fn idle_for(activity: &Activity, period: Duration) {
    let mut last = activity.finished();
    loop {
        tokio::time::sleep(period).await;
        let now = activity.finished();
        if !activity.is_busy() && !activity.is_arriving() && now == last {
            return;
        }
        last = now;
    }
}

/// Closes with a FIN; lingering first when a refused request's body is still coming.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut io: ClientSocket<S>, linger: bool) {
    if io.shutdown().await.is_err() || !linger {
        return;
    }
    let drain = async {
        // On the heap: in the future, it would enlarge every connection's task.
        let (mut scratch, mut drained) = (vec![0u8; 4096], 0);
        while drained < LINGER_BYTES {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Counts the connection as open and keeps it in the idle list while it lives.
struct Open<'a>(&'a Shared, &'a Arc<Activity>);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.idle.unlist(self.1);
        ProxyStats::add(&self.0.stats.connections_open, -1);
    }
}

/// The connection is busy while this lives (see `idle`).
struct Handling<'a>(&'a IdleList, &'a Arc<Activity>);

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.idle(self.1);
    }
}

/// One request: admitted, its body read, answered; then one line in the access log (target
/// `access`) naming the caller.
async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    activity: &Arc<Activity>,
    peer: &Peer,
) -> Response<Full<Bytes>> {
    shared.idle.busy(activity);
    let _handling = Handling(&shared.idle, activity);
    ProxyStats::add(&shared.stats.requests, 1);
    peer.caller.count_request();
    fault_injection(req.uri().path());
    let (mut parts, body) = req.into_parts();
    let admitted = admission::admit(&mut parts, &shared.names);
    let policy = peer.caller.policy().await;
    let body = match admitted {
        Ok(()) => read_body(body, shared, shared.backend.body_limit(&policy)).await,
        Err(refusal) => Err((refusal, !body.is_end_stream())),
    };
    let permitted = policy.permits(parts.uri.path());
    let endpoint = crate::metrics::endpoint_class(parts.uri.path());
    // Copied only when the access log is on (`access=off` spares the allocation).
    let logged = tracing::enabled!(target: "access", tracing::Level::INFO)
        .then(|| (parts.method.clone(), parts.uri.path().to_owned()));
    let resp = match body {
        Ok(_) if !permitted => shared.backend.forbidden(&policy).map(Full::new),
        Ok(body) => {
            let req = Request::from_parts(parts, body);
            shared
                .backend
                .respond(req, peer, &policy, &shared.budget)
                .await
        }
        Err((refusal, unread)) => {
            if unread {
                activity.linger();
            }
            refused(shared, refusal)
        }
    };
    if let Some((method, path)) = logged {
        tracing::info!(target: "access", "{peer} {method} {path} {}", resp.status().as_u16());
    }
    crate::metrics::global().request(
        shared.backend.cloud_label(&policy),
        endpoint,
        resp.status().as_u16(),
        peer.caller.to_string(),
    );
    resp
}

/// A request on a connection beyond its caller's share: 503, and the connection closes.
fn over(
    req: Request<Incoming>,
    shared: &Shared,
    peer: &Peer,
    limit: usize,
) -> Response<Full<Bytes>> {
    tracing::info!(target: "access", "{peer} {} {} 503 (beyond its {limit} connections)", req.method(), req.uri().path());
    let reason = "this caller holds its share of the connections already; retry";
    refused(
        shared,
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason,
        },
    )
}

/// The request body, whole, if the backend takes one that large and the budget has room; it
/// must arrive within the request read timeout. A refusal says whether the body, or some of
/// it, was left unread.
async fn read_body(
    body: Incoming,
    shared: &Shared,
    limit: usize,
) -> Result<Bytes, (Refusal, bool)> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let declared = body.size_hint().exact();
    let read = shared.budget.collect(body, limit, declared);
    let refuse = |status, reason, unread| (Refusal { status, reason }, unread);
    match tokio::time::timeout(shared.timeouts.request_read, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(BodyError::TooLarge(_))) => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large",
            true,
        )),
        Ok(Err(BodyError::Exhausted)) => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many bodies in flight; retry",
            true,
        )),
        Ok(Err(BodyError::Read(_))) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "the request body is malformed",
            false,
        )),
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
            false,
        )),
    }
}

/// The proxy's own answer to a request it will not pass on; the connection closes after it.
fn refused(shared: &Shared, refusal: Refusal) -> Response<Full<Bytes>> {
    ProxyStats::add(&shared.stats.refused, 1);
    tracing::debug!("refused: {} {}", refusal.status.as_u16(), refusal.reason);
    let mut resp = plain(refusal.status, format!("redirect: {}\n", refusal.reason));
    let close = HeaderValue::from_static("close");
    resp.headers_mut().insert(header::CONNECTION, close);
    resp
}

/// A `text/plain` answer of the proxy's own; a 503 says when to retry.
pub(super) fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    plain_bytes(status, text).map(Full::new)
}

/// [`plain`], its body as bytes.
pub(super) fn plain_bytes(status: StatusCode, text: String) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(text));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// `REDIRECT_FAULT_PANIC_PATH=/some/path`: a request for that path panics its handler, for
/// the real-kernel test that a panic anywhere stops the daemon (`main`'s panic hook).
fn fault_injection(path: &str) {
    static PANIC_PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let panic_path = PANIC_PATH.get_or_init(|| std::env::var("REDIRECT_FAULT_PANIC_PATH").ok());
    if panic_path.as_deref() == Some(path) {
        panic!("fault injection: REDIRECT_FAULT_PANIC_PATH={path}");
    }
}
