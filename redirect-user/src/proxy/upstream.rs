//! The connections to the upstream metadata service: hyper-util's pooled client (keep-alive
//! reuse; a request given a pooled connection that turns out dead is sent again on a new one)
//! over our own connector, which exempts each socket from the redirect before it connects.

use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc, task, time::Duration};

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

pub type UpstreamClient = Client<Connector, Full<Bytes>>;

/// `exemptions` is `None` only where no programs are loaded (unit tests, the fuzzer).
pub fn client(exemptions: Option<Arc<Exemptions>>, connect_timeout: Duration) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // nginx's upstream `keepalive_timeout`, and `keepalive 64` as in the benchmark.
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .http1_max_buf_size(MAX_RESPONSE_HEAD)
        // The request's own Host goes upstream (see `forward`).
        .set_host(false)
        .build(Connector {
            exemptions,
            connect_timeout,
        })
}

/// Connects to the upstream on sockets exempt from the redirect.
#[derive(Clone)]
pub struct Connector {
    exemptions: Option<Arc<Exemptions>>,
    connect_timeout: Duration,
}

impl Connector {
    async fn connect(self, uri: Uri) -> io::Result<TokioIo<TcpStream>> {
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut last = io::Error::other(format!("{host} has no address"));
        for addr in tokio::net::lookup_host((host, uri.port_u16().unwrap_or(80))).await? {
            match self.connect_to(addr).await {
                Ok(stream) => return Ok(TokioIo::new(stream)),
                Err(e) => last = e,
            }
        }
        Err(last)
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
        let timeout = self.connect_timeout;
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                let why = format!("connect to {addr} timed out after {timeout:?}");
                io::Error::new(io::ErrorKind::TimedOut, why)
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut task::Context<'_>) -> task::Poll<io::Result<()>> {
        task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}
