//! The connections to the upstream metadata service: hyper-util's pooled client (keep-alive
//! reuse, a request given a pooled connection that turns out dead is sent again on a new one)
//! over our own connector, which exempts each socket from the redirect before it connects.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::{TcpSocket, TcpStream};

use crate::ebpf::Exemptions;

/// Largest upstream response head: beyond it, a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// How long an unused upstream connection is kept (nginx's upstream `keepalive_timeout`).
const POOL_IDLE: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE: usize = 64;

pub type UpstreamClient = Client<Connector, Full<Bytes>>;

pub fn client(connector: Connector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .http1_max_buf_size(MAX_RESPONSE_HEAD)
        // The request's own Host goes upstream (see `forward`).
        .set_host(false)
        .build(connector)
}

/// Connects to the upstream on sockets exempt from the redirect.
#[derive(Clone)]
pub struct Connector {
    /// `None` only where no programs are loaded (unit tests, the fuzzer).
    exemptions: Option<Arc<Exemptions>>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(exemptions: Option<Arc<Exemptions>>, connect_timeout: Duration) -> Self {
        Connector {
            exemptions,
            connect_timeout,
        }
    }

    async fn connect(self, uri: Uri) -> io::Result<TokioIo<TcpStream>> {
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let mut last = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match self.connect_to(addr).await {
                Ok(stream) => return Ok(TokioIo::new(stream)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other(format!("{host} has no address"))))
    }

    async fn connect_to(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Exempt until the connect has returned: only the connect is rewritten.
        let _exempt = self
            .exemptions
            .as_ref()
            .map(|e| e.exempt(&socket))
            .transpose()?;
        let stream = tokio::time::timeout(self.connect_timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {addr} timed out after {:?}",
                        self.connect_timeout
                    ),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}
