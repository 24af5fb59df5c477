//! One client connection: hyper's HTTP/1.1 server on a [`Timed`] socket, each request
//! admitted (`admission`), its body read within the limits, then answered by the backend.

use std::{
    convert::Infallible,
    future::poll_fn,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{
    ProxyStats, Shared,
    admission::{self, Refusal},
    budget::BodyError,
    deadlines::Timed,
    idle::{Activity, IdleList},
};

/// How long a kept-alive connection stays in hyper's hands without a request before it is
/// parked: hyper keeps two 8 KiB buffers per connection, a parked one only its socket and
/// timers (about 4 KB), as nginx frees a keep-alive connection's buffers. Long enough that a
/// client sending request after request keeps its hyper connection, short enough that a
/// burst of connections left idle never holds much (10,000 idle connections: 40 MB).
const PARK_AFTER: Duration = Duration::from_millis(10);

/// Serves one connection until the client or the proxy closes it. On shutdown, and when the
/// listener needs its slot, it finishes the request in progress, if any, and closes.
pub(super) async fn serve<S>(stream: S, shared: &Arc<Shared>, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared
        .stats
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let activity = shared.idle.track();
    let _open = Open(shared, &activity);
    let mut io = Timed::new(stream, Arc::clone(&activity), shared.timeouts);
    loop {
        match serve_requests(io, shared, &activity, shutdown).await {
            Some((mut parked, true)) => {
                // Parked: nothing but the socket until a request begins.
                tokio::select! {
                    next = parked.next_request() => match next {
                        Ok(true) => {}
                        Ok(false) | Err(_) => return,
                    },
                    () = shutdown.cancelled() => return,
                    () = activity.evicted() => return,
                }
                io = parked;
            }
            Some((mut done, false)) => {
                // A FIN, lingering if a refused body is still coming (see `deadlines`).
                let _ = done.shutdown().await;
                return;
            }
            None => return,
        }
    }
}

/// Runs a hyper connection until it is done. `Some((io, true))`: parked after
/// [`PARK_AFTER`] without a request, the socket (and whatever hyper had read of it) back
/// for the next request; `Some((io, false))`: to be closed; `None`: already dropped.
async fn serve_requests<S>(
    io: Timed<S>,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    shutdown: &CancellationToken,
) -> Option<(Timed<S>, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (shared, activity) = (Arc::clone(shared), Arc::clone(activity));
        service_fn(move |req| {
            let (shared, activity) = (Arc::clone(&shared), Arc::clone(&activity));
            // Boxed: hyper keeps a slot of the future's size per connection.
            Box::pin(async move { Ok::<_, Infallible>(handle(req, &shared, &activity).await) })
        })
    };
    let mut conn = shared.http.serve_connection(TokioIo::new(io), service);
    let stopped = tokio::select! {
        result = poll_fn(|cx| conn.poll_without_shutdown(cx)) => Err(result),
        () = idle_for(activity, PARK_AFTER) => Ok(true),
        () = shutdown.cancelled() => Ok(false),
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
            // Keep-alive off: an idle connection is done at once, a busy one after its
            // answer (whose head went out before this, so it does not say `close`).
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

/// Resolves once no request has been handled, or begun, for `period`.
async fn idle_for(activity: &Activity, period: Duration) {
    let mut last = activity.finished();
    loop {
        tokio::time::sleep(period).await;
        let now = activity.finished();
        if !activity.is_busy() && now == last {
            return;
        }
        last = now;
    }
}

/// Counts the connection as open and keeps it in the idle list while it lives.
struct Open<'a>(&'a Shared, &'a Arc<Activity>);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.idle.unlist(self.1);
        self.0
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection is busy while this lives (see `idle`).
struct Handling<'a>(&'a IdleList, &'a Arc<Activity>);

impl<'a> Handling<'a> {
    fn start(list: &'a IdleList, activity: &'a Arc<Activity>) -> Self {
        list.busy(activity);
        Handling(list, activity)
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.idle(self.1);
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    activity: &Arc<Activity>,
) -> Response<Full<Bytes>> {
    let _handling = Handling::start(&shared.idle, activity);
    ProxyStats::count(&shared.stats.requests);
    fault_injection(req.uri().path());
    let (mut parts, body) = req.into_parts();
    let body = match admission::admit(&mut parts, &shared.names) {
        Ok(()) => read_body(body, shared, activity).await,
        Err(refusal) => {
            if !body.is_end_stream() {
                activity.linger();
            }
            Err(refusal)
        }
    };
    match body {
        Ok(body) => {
            let req = Request::from_parts(parts, body);
            shared.backend.respond(req, &shared.budget).await
        }
        Err(refusal) => refused(shared, refusal),
    }
}

/// The request body, whole, if the backend takes one that large and the budget has room; it
/// must arrive within the request read timeout.
async fn read_body(body: Incoming, shared: &Shared, activity: &Activity) -> Result<Bytes, Refusal> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let declared = body.size_hint().exact();
    let limit = shared.backend.body_limit();
    let read = shared.budget.collect(body, limit, declared);
    match tokio::time::timeout(shared.timeouts.request_read, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            if !matches!(e, BodyError::Read(_)) {
                activity.linger();
            }
            Err(e.into())
        }
        Err(_) => Err(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            reason: "the request body did not arrive in time",
        }),
    }
}

/// The proxy's own answer to a request it will not pass on; the connection closes after it.
fn refused(shared: &Shared, refusal: Refusal) -> Response<Full<Bytes>> {
    ProxyStats::count(&shared.stats.refused);
    tracing::debug!("refused: {} {}", refusal.status.as_u16(), refusal.reason);
    let mut resp = plain(refusal.status, format!("redirect: {}\n", refusal.reason));
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// A `text/plain` answer of the proxy's own.
pub(super) fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// `REDIRECT_FAULT_PANIC_PATH=/some/path`: a request for that path panics its handler. For
/// the real-kernel test that a panic anywhere stops the daemon (see `main`'s panic hook);
/// read once.
fn fault_injection(path: &str) {
    static PANIC_PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let panic_path = PANIC_PATH.get_or_init(|| std::env::var("REDIRECT_FAULT_PANIC_PATH").ok());
    if panic_path.as_deref() == Some(path) {
        panic!("fault injection: REDIRECT_FAULT_PANIC_PATH={path}");
    }
}

impl From<BodyError> for Refusal {
    fn from(e: BodyError) -> Self {
        let (status, reason) = match e {
            BodyError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            ),
            BodyError::Exhausted => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies in flight; retry",
            ),
            BodyError::Read(_) => (StatusCode::BAD_REQUEST, "the request body is malformed"),
        };
        Refusal { status, reason }
    }
}
