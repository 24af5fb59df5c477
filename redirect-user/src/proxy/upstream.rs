//! The connections to the upstream metadata service: hyper's HTTP/1.1 client connections in a
//! small pool, each driven by the task of the request that holds it (no task of its own, so
//! a proxied request crosses no channel to another task and back), on sockets exempt from
//! the redirect before they connect.

use std::{
    future::{Future, pending, poll_fn},
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, Mutex, PoisonError},
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self, Connection, SendRequest},
    http::uri::Authority,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpSocket, TcpStream},
    time::Instant,
};

use crate::{ebpf::Exemptions, router::Router};

/// Largest upstream response head: beyond it, a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// How long an unused upstream connection is kept (nginx's upstream `keepalive_timeout`).
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Unused upstream connections kept at most (nginx's `keepalive 64`, as in the benchmark).
const POOL_MAX_IDLE: usize = 64;

type Body = Full<Bytes>;

struct Pooled {
    /// Where it is connected (a moved CloudStack router leaves its connections unused).
    peer: SocketAddr,
    sender: SendRequest<Body>,
    /// `None` once it has ended (the upstream closed it, or it failed).
    connection: Option<Connection<TokioIo<TcpStream>, Body>>,
    idle_since: Instant,
}

pub struct Upstream {
    dial: Dial,
    /// `None` only where no programs are loaded (unit tests, the fuzzer).
    exemptions: Option<Arc<Exemptions>>,
    connect_timeout: Duration,
    idle: Mutex<Vec<Pooled>>,
}

/// Where upstream connections go.
pub enum Dial {
    /// A host (name or address) and port.
    Authority(Authority),
    /// CloudStack's virtual router, wherever it is now, on this port; from the VM's own
    /// address.
    Router(Arc<Router>, u16),
}

/// A connection held for one exchange; back to the pool with [`Lease::release`], closed if
/// dropped.
pub struct Lease<'a> {
    upstream: &'a Upstream,
    pooled: Pooled,
    /// It served an earlier exchange: the upstream may have closed it meanwhile.
    pub reused: bool,
}

impl Upstream {
    pub fn new(dial: Dial, exemptions: Option<Arc<Exemptions>>, connect_timeout: Duration) -> Self {
        Upstream {
            dial,
            exemptions,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A kept connection that is still open and ready, else a new one (`fresh`: always new).
    pub async fn lease(&self, fresh: bool) -> io::Result<Lease<'_>> {
        while let Some(mut pooled) = if fresh { None } else { self.take_idle() } {
            // Polling the connection notices an upstream that closed it while it was kept.
            let Pooled {
                sender, connection, ..
            } = &mut pooled;
            let ready = tokio::select! {
                biased;
                ready = sender.ready() => ready.is_ok(),
                _ = drive(connection) => false,
            };
            if ready {
                return Ok(Lease {
                    upstream: self,
                    pooled,
                    reused: true,
                });
            }
        }
        let stream = self.connect().await?;
        let peer = stream.peer_addr()?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD)
            .max_header_size(MAX_RESPONSE_HEAD)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let pooled = Pooled {
            peer,
            sender,
            connection: Some(connection),
            idle_since: Instant::now(),
        };
        Ok(Lease {
            upstream: self,
            pooled,
            reused: false,
        })
    }

    fn take_idle(&self) -> Option<Pooled> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Most recently used last; the oldest go once unused for POOL_IDLE.
        let pooled = idle.pop()?;
        let expired = pooled.idle_since.elapsed() >= POOL_IDLE;
        let moved = match &self.dial {
            Dial::Router(router, _) => router
                .current()
                .is_none_or(|found| pooled.peer.ip() != found.router),
            Dial::Authority(_) => false,
        };
        if expired || moved {
            idle.clear();
            return None;
        }
        Some(pooled)
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let authority = match &self.dial {
            Dial::Authority(authority) => authority,
            Dial::Router(router, port) => {
                let found = router.current().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "no CloudStack virtual router found yet (the daemon's log says where it looked)",
                    )
                })?;
                let addr = SocketAddr::new(found.router.into(), *port);
                let source = found.source.map(|s| SocketAddr::new(s.into(), 0));
                return self.connect_to(addr, source).await.inspect_err(|_| {
                    router.failed();
                });
            }
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let mut last = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match self.connect_to(addr, None).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other(format!("{host} has no address"))))
    }

    /// Connects to `addr`, from `source` if given.
    async fn connect_to(
        &self,
        addr: SocketAddr,
        source: Option<SocketAddr>,
    ) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(source) = source {
            socket.bind(source)?;
        }
        // The escape guard lets this socket's packets reach the metadata address.
        mark_for_guard(&socket);
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

/// Marks `socket` (`SO_MARK`, which needs CAP_NET_ADMIN or CAP_NET_RAW) so that the escape
/// guard passes it; without the mark, a daemon inside a covered cgroup cannot reach its
/// upstream at a target's address (said once).
fn mark_for_guard(socket: &TcpSocket) {
    if let Err(e) = socket2::SockRef::from(socket).set_mark(redirect_common::GUARD_MARK) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "cannot mark upstream sockets for the escape guard ({e}); if the daemon runs in a covered cgroup, its upstream at a metadata address is dropped (give it CAP_NET_ADMIN)"
            )
        });
    }
}

impl Lease<'_> {
    /// Sends `req` and waits for the response head.
    pub async fn send(&mut self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        let Pooled {
            sender, connection, ..
        } = &mut self.pooled;
        let response = sender.send_request(req);
        run_with(connection, response).await
    }

    /// Runs `work` (reading the response body) while driving the connection.
    pub async fn drive<T>(&mut self, work: impl Future<Output = T>) -> T {
        run_with(&mut self.pooled.connection, work).await
    }

    /// The exchange is complete: the connection is kept for the next one, unless it ended.
    pub fn release(mut self) {
        if self.pooled.connection.is_none() || self.pooled.sender.is_closed() {
            return;
        }
        self.pooled.idle_since = Instant::now();
        let mut idle = self
            .upstream
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL_MAX_IDLE {
            idle.push(self.pooled);
        }
    }
}

/// Polls `work` and the connection together, on this task. `work` is polled again right
/// after the connection (which may just have handed it its response), instead of in a wakeup
/// of its own. If the connection ends first, `work` ends with what hyper makes of that.
async fn run_with<T>(
    connection: &mut Option<Connection<TokioIo<TcpStream>, Body>>,
    work: impl Future<Output = T>,
) -> T {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if let Some(conn) = connection
            && let Poll::Ready(ended) = Pin::new(conn).poll(cx)
        {
            if let Err(e) = ended {
                tracing::debug!("upstream connection: {e}");
            }
            *connection = None;
        }
        work.as_mut().poll(cx)
    })
    .await
}

/// Drives the connection until it ends (then marks it ended); never resolves for one that
/// has.
async fn drive(connection: &mut Option<Connection<TokioIo<TcpStream>, Body>>) {
    let Some(conn) = connection else {
        return pending().await;
    };
    if let Err(e) = conn.await {
        tracing::debug!("upstream connection: {e}");
    }
    *connection = None;
}
