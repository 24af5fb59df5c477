//! The HTTP/1.1 server that redirected connects land on, answering from the built-in mock or
//! forwarding upstream.

pub mod exempt;
pub mod forward;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::mock::ec2::Ec2Mock;
use forward::Forwarder;

/// Response bodies: complete ones from the mock and error paths, streamed ones from upstream.
pub type Body = Either<Full<Bytes>, Incoming>;

/// A client that has not sent a complete request head within this time is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers the requests.
#[expect(
    clippy::large_enum_variant,
    reason = "one instance per daemon, behind an Arc"
)]
pub enum Backend {
    Ec2(Ec2Mock),
    Upstream(Forwarder),
}

impl Backend {
    async fn respond(&self, req: Request<Incoming>) -> Response<Body> {
        match self {
            Backend::Ec2(mock) => mock.handle(&req).map(|b| Either::Left(Full::new(b))),
            Backend::Upstream(forwarder) => forwarder.forward(req).await,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Backend::Ec2(mock) => format!(
                "built-in EC2 mock (IMDSv2 tokens {})",
                match mock.http_tokens() {
                    crate::mock::ec2::HttpTokens::Optional => "optional",
                    crate::mock::ec2::HttpTokens::Required => "required",
                }
            ),
            Backend::Upstream(f) => format!("upstream {}", f.upstream()),
        }
    }
}

/// Counters shown by `redirect status`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
}

/// Serves `listeners` until `shutdown` is cancelled, then lets open connections finish their
/// current request for up to `grace` (idle keep-alive connections close at once).
pub async fn serve(
    listeners: Vec<TcpListener>,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = Arc::new(GracefulShutdown::new());
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(
            listener,
            Arc::clone(&backend),
            Arc::clone(&stats),
            Arc::clone(&graceful),
            shutdown.clone(),
        ));
    }
    accept_loops.join_all().await;
    let graceful = Arc::into_inner(graceful).expect("the accept loops have ended");
    let open = graceful.count();
    if open > 0 {
        tracing::info!("waiting up to {grace:?} for {open} open connection(s)");
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after {grace:?}; closing them");
    }
}

async fn accept_loop(
    listener: TcpListener,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    graceful: Arc<GracefulShutdown>,
    shutdown: CancellationToken,
) {
    let preserve_case = matches!(*backend, Backend::Upstream(_));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let backend = Arc::clone(&backend);
        let stats_conn = Arc::clone(&stats);
        let service = service_fn(move |req| {
            let backend = Arc::clone(&backend);
            let stats = Arc::clone(&stats_conn);
            async move { Ok::<_, std::convert::Infallible>(handle(&backend, &stats, req, peer).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .preserve_header_case(preserve_case)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer}: {e}");
            }
            stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn handle(
    backend: &Backend,
    stats: &ProxyStats,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return backend.respond(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = backend.respond(req).await;
    tracing::debug!("{peer} {method} {path} {}", resp.status().as_u16());
    resp
}
