//! One client connection: hyper's HTTP/1.1 server on a [`Timed`] socket, each request
//! admitted (`admission`), its body read within the limits, then answered by the backend.

use std::{convert::Infallible, future::pending, pin::pin, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{
    ProxyStats, Shared,
    admission::{self, Refusal},
    budget::BodyError,
    deadlines::Timed,
    idle::{Activity, IdleList},
};

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
    let io = TokioIo::new(Timed::new(stream, Arc::clone(&activity), shared.timeouts));
    let service = {
        let (shared, activity) = (Arc::clone(shared), Arc::clone(&activity));
        service_fn(move |req| {
            let (shared, activity) = (Arc::clone(&shared), Arc::clone(&activity));
            async move { Ok::<_, Infallible>(handle(req, &shared, &activity).await) }
        })
    };
    let mut conn = pin!(shared.http.serve_connection(io, service));
    let stop = async {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = activity.evicted() => {
                if !activity.is_busy() {
                    // Idle: closed now, as nginx closes a reusable connection.
                    return true;
                }
            }
        }
        false
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        close_now = stop => {
            if close_now {
                return;
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                // Evicted while finishing: hyper is done with the request.
                () = async { activity.evicted().await; pending::<()>().await } => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("client connection: {e}");
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
