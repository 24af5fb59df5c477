//! The HTTP/1.1 proxy that redirected connects land on: hyper's server, our admission rules,
//! and a backend (the built-in mock, or the upstream metadata service).
//!
//! Every process in a redirected cgroup can reach it and the host's credentials sit behind
//! it, so nothing a caller sends may take from the others what they need:
//! - connections: at most [`Limits::max_connections`]; at the limit the connection idle
//!   longest is closed to admit the new one (`listener`, `idle`);
//! - time: idle, request-read and send timeouts on every connection ([`Timeouts`]), a
//!   budget for each upstream exchange (`forward`);
//! - memory: heads up to [`MAX_HEAD`] bytes, bodies only where the backend takes one, and
//!   every buffered body within one [`budget::Budget`].

mod admission;
mod budget;
mod cache;
mod connection;
pub mod forward;
#[cfg(fuzzing)]
pub mod fuzzing;
mod idle;
mod listener;
mod socket;
#[cfg(test)]
mod tests;
mod upstream;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, server::conn::http1};
use hyper_util::rt::TokioTimer;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use admission::OwnNames;
use budget::Budget;
use forward::Forwarder;
use idle::IdleList;

use crate::{
    caller::{Caller, Callers, Peer},
    handover::{Listening, Role},
    host_callers::HostCallers,
    mock::{Mocks, Resp},
    policy::Policy,
};

/// Largest request head (request line and headers) read: beyond it, 431.
pub const MAX_HEAD: usize = 32 << 10;
/// Most header lines in a head: beyond it, 431 (hyper's default, which parses them without
/// an allocation).
pub const MAX_HEADERS: usize = 100;
/// Bytes that buffered request and response bodies may take in all.
pub const BODY_BUDGET: usize = 32 << 20;

/// What answers the requests.
pub enum Backend {
    Mock(Arc<Mocks>),
    Upstream(Box<Forwarder>),
}

impl Backend {
    /// The largest request body taken from a caller with `policy`: what its cloud's mock
    /// takes, or what the upstream is given.
    fn body_limit(&self, policy: &Policy) -> usize {
        match self {
            Backend::Mock(mocks) => mocks.cloud(policy.cloud).max_request_body(),
            Backend::Upstream(forwarder) => forwarder.max_request_body(),
        }
    }

    /// Answers `req` from `peer`, whose policy is `policy` (the mock gives it its role).
    async fn respond(
        &self,
        req: Request<Bytes>,
        peer: &Peer,
        policy: &Policy,
        budget: &Budget,
    ) -> Response<Full<Bytes>> {
        match self {
            Backend::Mock(mocks) => {
                let cloud = mocks.cloud(policy.cloud);
                let identity = policy.identity.as_deref();
                cloud.handle(&req, identity).resolve().await.map(Full::new)
            }
            Backend::Upstream(forwarder) => forwarder.forward(req, peer, budget).await,
        }
    }

    /// The metrics' `cloud` label of a caller with `policy`.
    fn cloud_label(&self, policy: &Policy) -> &'static str {
        match self {
            Backend::Mock(mocks) => mocks.cloud(policy.cloud).kind().name(),
            Backend::Upstream(_) => "upstream",
        }
    }

    /// The answer to a request `policy` refuses: as the caller's cloud refuses a forbidden
    /// request (upstream mode: as EC2 does, 403).
    fn forbidden(&self, policy: &Policy) -> Resp {
        match self {
            Backend::Mock(mocks) => mocks.cloud(policy.cloud).forbidden(),
            Backend::Upstream(_) => crate::mock::ec2::error(StatusCode::FORBIDDEN),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A parked connection idle this long is closed (nginx's `keepalive_timeout`); `None`:
    /// never. A request in progress, however long (a long poll), is never idle.
    pub idle: Option<Duration>,
    /// A head must be complete within this of its first byte (the slowloris cut-off: hyper's
    /// header read timeout), a body within this more.
    pub request_read: Duration,
    /// A write that makes no progress for this long closes the connection (`socket`).
    pub send: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections held at once.
    pub max_connections: usize,
    /// Client connections one caller (a network namespace other than the daemon's) may hold:
    /// beyond, its new connections are answered 503, so that one container's flood leaves
    /// the others their share.
    pub per_caller: usize,
    pub timeouts: Timeouts,
}

impl Limits {
    /// A quarter of the connections for any one caller, and never fewer than 16.
    pub fn per_caller_share(max_connections: usize) -> usize {
        (max_connections / 4).max(16)
    }
}

/// Counters shown by `redirect status`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    /// Requests answered by the proxy itself with a 4xx/5xx before reaching the backend.
    pub refused: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    /// Idle connections closed to admit new ones at the connection limit.
    pub evicted: AtomicU64,
}

impl ProxyStats {
    fn add(counter: &AtomicU64, delta: i64) {
        counter.fetch_add(delta as u64, Ordering::Relaxed); // wraps: -1 subtracts
    }
}

/// What every connection of a worker shares: its backend, and what all workers share.
struct Shared {
    backend: Backend,
    common: Arc<Common>,
}

struct Common {
    names: OwnNames,
    per_caller: usize,
    timeouts: Timeouts,
    http: http1::Builder,
    stats: Arc<ProxyStats>,
    idle: IdleList,
    /// One permit per connection slot.
    slots: Arc<Semaphore>,
    budget: Budget,
}

impl std::ops::Deref for Shared {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.common
    }
}

impl Shared {
    fn new(backend: Backend, names: OwnNames, limits: Limits, budget: usize) -> Arc<Self> {
        let mut http = http1::Builder::new();
        // The timer runs from the moment hyper waits for a head: for a parked connection, from
        // its next request's first byte (see `connection`).
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.timeouts.request_read)
            .max_buf_size(MAX_HEAD)
            .max_header_size(MAX_HEAD);
        let common = Common {
            names,
            per_caller: limits.per_caller,
            timeouts: limits.timeouts,
            http,
            stats: Arc::default(),
            idle: IdleList::default(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            budget: Budget::new(budget),
        };
        Arc::new(Shared {
            backend,
            common: Arc::new(common),
        })
    }
}

/// The running proxy: worker threads, each with a single-threaded runtime, listening sockets
/// of its own (SO_REUSEPORT: the kernel spreads new connections over the workers) and its own
/// upstream connections, as nginx's worker processes. A request, its upstream exchange and
/// their wakeups stay on one thread (a cross-CPU wakeup costs tens of microseconds on a VM:
/// BENCHMARKS.md). The limits are the workers' together.
pub struct Proxy {
    stats: Arc<ProxyStats>,
    workers: Vec<std::thread::JoinHandle<()>>,
    sink: ListenerSink,
    listening: Arc<Listening>,
}

/// A listening socket handed to the running proxy, served until `stop` is cancelled, who
/// connects to it, and what it is for (in a `--replace`).
type Added = (std::net::TcpListener, CancellationToken, Callers, Role);

/// Hands listening sockets opened after the start (in other network namespaces, see
/// `crate::netns`) to the workers, in turn.
#[derive(Clone)]
pub struct ListenerSink {
    workers: Vec<tokio::sync::mpsc::UnboundedSender<Added>>,
    next: Arc<AtomicU64>,
}

impl ListenerSink {
    /// Serves `listener` until `stop` (make it a child of the proxy's shutdown token) is
    /// cancelled; its connections then finish their request in progress and close.
    pub fn add(
        &self,
        listener: std::net::TcpListener,
        stop: CancellationToken,
        caller: Arc<Caller>,
        role: Role,
    ) {
        let caller = Callers::Namespace(caller);
        let next = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.workers.len();
        // A worker only stops at shutdown, when the listener is not wanted any more.
        let _ = self.workers[next].send((listener, stop, caller, role));
    }
}

impl Proxy {
    /// Starts one worker per element of `listeners` (its listening sockets, in the daemon's
    /// own namespace: their callers are the host's), each with the backend `backend()` makes,
    /// serving until `shutdown` is cancelled; then each lets its requests in progress finish
    /// for up to `grace` (idle connections close at once).
    pub fn spawn(
        listeners: Vec<Vec<std::net::TcpListener>>,
        host: &Arc<HostCallers>,
        backend: impl Fn() -> Backend,
        names: OwnNames,
        limits: Limits,
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let first = Shared::new(backend(), names, limits, BODY_BUDGET);
        let stats = Arc::clone(&first.stats);
        let listening = Arc::new(Listening::default());
        let mut threads = Vec::new();
        let mut senders = Vec::new();
        for (i, listeners) in listeners.into_iter().enumerate() {
            let (sender, added) = tokio::sync::mpsc::unbounded_channel();
            senders.push(sender);
            let shared = match i {
                0 => Arc::clone(&first),
                _ => Arc::new(Shared {
                    backend: backend(),
                    common: Arc::clone(&first.common),
                }),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Registered here, with the worker's runtime, so that they are listed in order
            // (worker by worker, endpoint by endpoint) for a daemon replacing this one.
            let listeners = {
                let _runtime = runtime.enter();
                let listeners = listeners
                    .into_iter()
                    .map(|l| TcpListener::from_std(l).map(Arc::new))
                    .collect::<std::io::Result<Vec<_>>>()?;
                for listener in &listeners {
                    listening.add(Role::Proxy, listener);
                }
                listeners
            };
            let (shutdown, host) = (shutdown.clone(), Callers::Host(Arc::clone(host)));
            let listening = Arc::clone(&listening);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("proxy-{i}"))
                    .spawn(move || {
                        runtime.block_on(work(
                            listeners, host, added, shared, listening, shutdown, grace,
                        ))
                    })?,
            );
        }
        Ok(Proxy {
            stats,
            workers: threads,
            sink: ListenerSink {
                workers: senders,
                next: Arc::default(),
            },
            listening,
        })
    }

    /// The listening sockets the workers accept on, for a daemon replacing this one.
    pub fn listening(&self) -> Arc<Listening> {
        Arc::clone(&self.listening)
    }

    /// Where to hand listening sockets opened later.
    pub fn sink(&self) -> ListenerSink {
        self.sink.clone()
    }

    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.stats)
    }

    /// Waits for the workers to finish (after shutdown).
    pub async fn join(self) {
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
    }
}

/// One worker: accepts on its listeners and on those added later (listed in `listening`)
/// until shutdown, then drains.
async fn work(
    listeners: Vec<Arc<TcpListener>>,
    host: Callers,
    mut added: tokio::sync::mpsc::UnboundedReceiver<Added>,
    shared: Arc<Shared>,
    listening: Arc<Listening>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    let mut accepting = tokio::task::JoinSet::new();
    let accept = |accepting: &mut tokio::task::JoinSet<()>, listener, stop, caller| {
        let (shared, connections) = (Arc::clone(&shared), connections.clone());
        accepting.spawn(listener::accept_loop(
            listener,
            caller,
            shared,
            connections,
            stop,
        ));
    };
    for listener in listeners {
        accept(&mut accepting, listener, shutdown.clone(), host.clone());
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some((listener, stop, caller, role)) = added.recv() => {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let listener = Arc::new(listener);
                        listening.add(role, &listener);
                        accept(&mut accepting, listener, stop, caller);
                    }
                    Err(e) => tracing::error!("proxy worker: cannot use a listening socket: {e}"),
                }
            }
            // Reaps the accept loops of listeners stopped before shutdown.
            Some(_) = accepting.join_next() => {}
        }
    }
    accepting.join_all().await;
    connections.close();
    let open = connections.len();
    if open == 0 {
        return;
    }
    tracing::info!("waiting up to {grace:?} for {open} open connection(s)");
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after {grace:?}; closing them");
    }
}
