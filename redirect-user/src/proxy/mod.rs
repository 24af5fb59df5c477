//! The HTTP/1.1 server that redirected connects land on, answering from the built-in mock or
//! forwarding upstream.

mod codec;
mod connection;
pub mod exempt;
pub mod forward;
mod idle;
pub mod ticker;
pub mod upstream;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::mock::ec2::Ec2Mock;
use forward::Forwarder;
use idle::IdleConnections;
use ticker::Ticker;

/// What answers the requests.
pub enum Backend {
    /// Shared by all workers: it holds no per-connection state.
    Ec2(Arc<Ec2Mock>),
    /// One per worker, so that each worker keeps its own upstream connections.
    Upstream(Forwarder),
}

/// Checks that a future made once per request fits glibc's per-thread cache, which serves
/// allocations up to 1,032 bytes; a larger one comes from the allocator's bins and cost some
/// 450 more instructions per request (BENCHMARKS.md). Sizes, not speed: they change only with
/// the code.
#[cfg(test)]
fn assert_fits_allocator_cache(what: &str, size: usize) {
    assert!(size <= 1024, "{what}: {size} bytes");
}

/// Counters shown by `redirect status`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
}

/// The proxy's worker threads. Each runs a single-threaded runtime with its own listening
/// sockets (SO_REUSEPORT: the kernel spreads connections over them) and its own backend, so a
/// request, its upstream request and their wakeups stay on one thread, as in nginx's workers.
/// Tokio's work-stealing runtime instead moved the two sides of a proxied request between
/// threads, and each hop was a cross-CPU wakeup (see BENCHMARKS.md).
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Vec<Arc<ProxyStats>>,
}

impl Workers {
    /// Starts one worker per element of `listeners`, each serving `backend(i)`, which is
    /// called on the worker's thread, inside its runtime. For `grace` and `idle_timeout` see
    /// [`serve`].
    pub fn spawn(
        listeners: Vec<Vec<std::net::TcpListener>>,
        backend: impl Fn(usize) -> Backend + Send + Sync + 'static,
        shutdown: &CancellationToken,
        grace: Duration,
        idle_timeout: Duration,
    ) -> std::io::Result<Self> {
        let backend = Arc::new(backend);
        let mut threads = Vec::new();
        let mut stats = Vec::new();
        for (i, listeners) in listeners.into_iter().enumerate() {
            // No time driver: see `ticker`.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            let worker_stats = Arc::new(ProxyStats::default());
            let backend = Arc::clone(&backend);
            let (shutdown, thread_stats) = (shutdown.clone(), Arc::clone(&worker_stats));
            let thread = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listeners: Vec<TcpListener> =
                            match listeners.into_iter().map(TcpListener::from_std).collect() {
                                Ok(listeners) => listeners,
                                Err(e) => {
                                    tracing::error!("proxy worker {i}: {e}");
                                    return;
                                }
                            };
                        let backend = Arc::new(backend(i));
                        serve(
                            listeners,
                            backend,
                            thread_stats,
                            shutdown,
                            grace,
                            idle_timeout,
                        )
                        .await;
                    });
                })?;
            threads.push(thread);
            stats.push(worker_stats);
        }
        Ok(Workers { threads, stats })
    }

    /// Each worker's counters.
    pub fn stats(&self) -> Vec<Arc<ProxyStats>> {
        self.stats.clone()
    }

    /// Waits for every worker to finish (they stop when the shutdown token is cancelled).
    pub async fn join(self) {
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a proxy worker panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::error!("waiting for the proxy workers failed");
        }
    }
}

/// Serves `listeners` until `shutdown` is cancelled, then lets open connections finish their
/// current request for up to `grace` (idle keep-alive connections close at once). A
/// connection idle between requests for `idle_timeout` is closed (see `idle`; zero: never).
pub async fn serve(
    listeners: Vec<TcpListener>,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    shutdown: CancellationToken,
    grace: Duration,
    idle_timeout: Duration,
) {
    let clock = Arc::new(Ticker::start(connection::DEADLINE_TICK));
    let idle = (!idle_timeout.is_zero())
        .then(|| Arc::new(IdleConnections::new(idle_timeout, Arc::clone(&clock))));
    if let Some(idle) = &idle {
        tokio::spawn(Arc::clone(idle).sweep(shutdown.clone()));
    }
    let connections = TaskTracker::new();
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(
            listener,
            Arc::clone(&backend),
            Arc::clone(&stats),
            Arc::clone(&clock),
            idle.clone(),
            connections.clone(),
            shutdown.clone(),
        ));
    }
    accept_loops.join_all().await;
    connections.close();
    let open = connections.len();
    if open == 0 {
        return;
    }
    tracing::info!("waiting up to {grace:?} for {open} open connection(s)");
    tokio::select! {
        () = connections.wait() => {}
        () = ticker::sleep(grace) => {
            tracing::warn!("connections still busy after {grace:?}; closing them");
        }
    }
}

/// Turns Nagle's algorithm off for every socket `listener` accepts: on Linux accepted sockets
/// inherit TCP_NODELAY from the listener, so this is one setsockopt instead of one per
/// connection. Responses go out whole, but a 100 Continue followed by the response, or
/// pipelined answers, must not wait for an ACK.
fn nodelay_for_accepted(listener: &TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

async fn accept_loop(
    listener: TcpListener,
    backend: Arc<Backend>,
    stats: Arc<ProxyStats>,
    clock: Arc<Ticker>,
    idle: Option<Arc<IdleConnections>>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    if let Err(e) = nodelay_for_accepted(&listener) {
        tracing::warn!("TCP_NODELAY on the listener: {e}");
    }
    let mut failed = AcceptFailures::default();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    failed.ended(&listener);
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: the connection stays queued and
                    // the listener ready, so back off instead of spinning.
                    let pause = failed.failed(&listener, &e);
                    ticker::sleep(pause).await;
                    continue;
                }
            },
        };
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let (backend, stats, clock, idle, shutdown) = (
            Arc::clone(&backend),
            Arc::clone(&stats),
            Arc::clone(&clock),
            idle.clone(),
            shutdown.clone(),
        );
        connections.spawn(async move {
            connection::serve(
                stream,
                peer,
                backend,
                Arc::clone(&stats),
                clock,
                idle,
                shutdown,
            )
            .await;
            stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// A run of failed accepts on one listener (typically EMFILE: the daemon is out of file
/// descriptors, as when clients hold more connections than its limit allows). It is logged
/// once when it starts and once when it ends, not at every retry, and the retries back off
/// from 50 ms to 1 s.
#[derive(Default)]
struct AcceptFailures {
    count: u64,
}

impl AcceptFailures {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// Counts a failure; returns how long to wait before the next accept.
    fn failed(&mut self, listener: &TcpListener, e: &std::io::Error) -> Duration {
        self.count += 1;
        if self.count == 1 {
            tracing::warn!(
                "cannot accept connections on {}: {e}; retrying, without a line per retry",
                local(listener)
            );
        }
        Self::pause(self.count)
    }

    /// An accept succeeded: ends a run of failures, if any.
    fn ended(&mut self, listener: &TcpListener) {
        if self.count > 0 {
            tracing::info!(
                "accepting connections on {} again, after {} failed accepts",
                local(listener),
                self.count
            );
            self.count = 0;
        }
    }

    /// 50 ms after the first failure, doubling up to 1 s.
    fn pause(count: u64) -> Duration {
        let doublings = count.saturating_sub(1).min(5) as u32;
        (Self::FIRST_PAUSE * 2u32.pow(doublings)).min(Self::MAX_PAUSE)
    }
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "its listening socket".to_owned(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_back_off_from_50_ms_to_1_s() {
        let pauses: Vec<u128> = (1..=8)
            .map(|n| AcceptFailures::pause(n).as_millis())
            .collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(AcceptFailures::pause(u64::MAX), AcceptFailures::MAX_PAUSE);
    }

    /// What saves the per-connection setsockopt: the kernel copies TCP_NODELAY from the
    /// listener into each accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (before, _) = listener.accept().await.unwrap();
        assert!(!before.nodelay().unwrap(), "off by default");

        nodelay_for_accepted(&listener).unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (after, _) = listener.accept().await.unwrap();
        assert!(after.nodelay().unwrap());
    }
}
