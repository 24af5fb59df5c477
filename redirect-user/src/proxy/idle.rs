//! Closing client connections that stay idle between requests for longer than the idle
//! timeout (`--idle-timeout`), as nginx's `keepalive_timeout` does.
//!
//! A timer per idle wait would cost every keep-alive request a registration (see `ticker` and
//! BENCHMARKS.md for what tokio's timers cost). Instead a connection only writes down the
//! worker's clock tick when it goes idle and a marker when a request arrives, two plain stores;
//! each worker keeps its connections in a table (an entry added at accept and removed at
//! close), and a sweep task walks the table every quarter of the timeout and shuts down the
//! sockets that have been idle for the whole timeout. The connection's task then reads
//! end-of-file and ends as if the client had closed: the client sees a FIN, never a reset.
//!
//! A connection is closed after idling for the timeout at least, and at most a quarter of it
//! (one second if that is more) and one second later. The sweep, and with it the worker's
//! one-second clock, runs only while the worker has connections, so a daemon without any
//! stays asleep.

use std::{
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, sync::Notify};
use tokio_util::sync::CancellationToken;

use super::ticker::Ticker;

/// `Idle::since` of a connection that is reading or answering a request.
const BUSY: u64 = u64::MAX;

/// One worker's connections, for the sweep.
pub struct IdleConnections {
    timeout: Duration,
    clock: Arc<Ticker>,
    table: Mutex<Table>,
    /// Wakes the sweep when the first connection arrives.
    arrived: Notify,
}

/// The connections, indexed by descriptor: an entry costs a store, no hashing. (The length is
/// the highest descriptor seen, 8 bytes each.)
#[derive(Default)]
struct Table {
    slots: Vec<Option<Arc<Idle>>>,
    count: usize,
}

/// Where a connection writes down whether, and since when, it is idle.
pub struct Idle {
    since: AtomicU64,
}

impl IdleConnections {
    /// `timeout` must not be zero (zero means no idle timeout: make no table).
    pub fn new(timeout: Duration, clock: Arc<Ticker>) -> Self {
        IdleConnections {
            timeout,
            clock,
            table: Mutex::new(Table::default()),
            arrived: Notify::new(),
        }
    }

    /// Adds `stream` to the table until the returned guard drops, which must happen before
    /// the stream is closed (the sweep shuts sockets down by their descriptor).
    pub fn register(self: &Arc<Self>, stream: &TcpStream) -> Registration {
        let fd = stream.as_raw_fd();
        let idle = Arc::new(Idle {
            since: AtomicU64::new(BUSY),
        });
        let first = {
            let mut table = self.table();
            let slot = fd as usize;
            if table.slots.len() <= slot {
                table.slots.resize(slot + 1, None);
            }
            table.slots[slot] = Some(Arc::clone(&idle));
            table.count += 1;
            table.count == 1
        };
        if first {
            self.arrived.notify_one();
        }
        Registration {
            connections: Arc::clone(self),
            fd,
            idle,
        }
    }

    /// Shuts down, every quarter of the timeout, the connections idle for the whole timeout,
    /// until `shutdown` (when the server closes idle connections itself). The tick a
    /// connection wrote down may be up to one period old, so it must be more than the
    /// timeout's ticks behind.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.timeout / 4).max(self.clock.period());
        let timeout_ticks = self.clock.ticks(self.timeout);
        loop {
            // No connections: wait for one without keeping the clock ticking. (A connection
            // that arrives between the check and the wait leaves a permit in `arrived`.)
            if self.table().count == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.arrived.notified() => continue,
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.clock.expire(every) => {}
            }
            let now = self.clock.now();
            let mut closed = 0;
            for (fd, idle) in self.table().slots.iter().enumerate() {
                let Some(idle) = idle else { continue };
                let since = idle.since.load(Ordering::Relaxed);
                if since != BUSY && now.saturating_sub(since) > timeout_ticks {
                    let fd = fd as RawFd;
                    // SAFETY: `fd` is open: an entry leaves the table (under this lock) before
                    // its socket is closed. shutdown(2) only ends the connection; the
                    // descriptor stays the connection's to close.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    closed += 1;
                }
            }
            if closed > 0 {
                tracing::debug!("closed {closed} connection(s) idle for {:?}", self.timeout);
            }
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; were it poisoned, the table would still be
        // whole.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's entry in its worker's table; removed on drop.
pub struct Registration {
    connections: Arc<IdleConnections>,
    fd: RawFd,
    idle: Arc<Idle>,
}

impl Registration {
    /// The connection waits for its next request from now on.
    pub fn idle(&self) {
        let now = self.connections.clock.now();
        self.idle.since.store(now, Ordering::Relaxed);
    }

    /// A request has begun arriving.
    pub fn busy(&self) {
        self.idle.since.store(BUSY, Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = self.connections.table();
        if let Some(entry) = table.slots.get_mut(self.fd as usize)
            && entry.take().is_some()
        {
            table.count -= 1;
        }
    }
}
