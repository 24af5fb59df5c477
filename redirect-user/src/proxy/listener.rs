//! Accepting client connections: one slot per connection (mini-redis's semaphore), and at the
//! limit the connection idle longest is closed to make room, as nginx reuses keep-alive
//! connections when it runs short, so that idle connections can never lock a new caller out.
//! Failed accepts (out of descriptors) back off instead of spinning, and are logged once per
//! run of failures.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::OwnedSemaphorePermit};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{ProxyStats, Shared, connection};
use crate::caller::Callers;

/// `listener` is shared only with the registry of sockets to hand over (`crate::handover`),
/// which holds it weakly: it closes when this loop ends.
pub(super) async fn accept_loop(
    listener: Arc<TcpListener>,
    callers: Callers,
    shared: Arc<Shared>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    // Accepted sockets inherit TCP_NODELAY from the listener (one setsockopt, not one per
    // connection): a response must not wait for the client's ACK of the last one.
    if let Err(e) = socket2::SockRef::from(&*listener).set_tcp_nodelay(true) {
        tracing::warn!("TCP_NODELAY on the listener: {e}");
    }
    let mut failures = AcceptFailures::default();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failures.ended(&listener);
                    stream
                }
                Err(e) => {
                    // The connection stays queued and the listener ready: wait, do not spin.
                    let pause = failures.failed(&listener, &e);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        let slot = match Arc::clone(&shared.slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match make_room(&shared, &shutdown).await {
                Some(slot) => slot,
                None => return,
            },
        };
        ProxyStats::add(&shared.stats.connections_total, 1);
        let (shared, shutdown, callers) = (Arc::clone(&shared), shutdown.clone(), callers.clone());
        connections.spawn(async move {
            // In the task: naming a host caller asks the kernel (a few microseconds).
            let peer = callers.identify(&stream);
            let (_counted, held) = peer.caller.connection();
            // The share is each container's; the host's processes are trusted to share, and
            // the global limit covers them.
            let over = (!peer.caller.host && held > shared.per_caller).then_some(shared.per_caller);
            connection::serve(stream, &shared, &shutdown, peer, over).await;
            drop(slot);
        });
    }
}

/// At the limit: closes the connection idle longest, waiting for one to be idle if every
/// connection is busy (their requests are bounded by the timeouts), and returns the first
/// slot freed, by it or by any connection that ends first; `None` on shutdown.
async fn make_room(shared: &Shared, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    let mut slot = std::pin::pin!(Arc::clone(&shared.slots).acquire_owned());
    tokio::select! {
        () = shutdown.cancelled() => return None,
        freed = &mut slot => return freed.ok(),
        () = shared.idle.evict_oldest_when_idle() => ProxyStats::add(&shared.stats.evicted, 1),
    }
    tokio::select! {
        () = shutdown.cancelled() => None,
        freed = slot => freed.ok(),
    }
}

/// A run of failed accepts on one listener, typically EMFILE: logged when it starts and when
/// it ends, not at every retry; the retries back off from 50 ms to 1 s.
#[derive(Default)]
struct AcceptFailures {
    count: u64,
}

impl AcceptFailures {
    /// Counts a failure; returns how long to wait before the next accept.
    fn failed(&mut self, listener: &TcpListener, e: &std::io::Error) -> Duration {
        self.count += 1;
        if self.count == 1 {
            let on = local(listener);
            tracing::warn!(
                "cannot accept connections on {on}: {e}; retrying, without a line per retry"
            );
        }
        Self::pause(self.count)
    }

    fn ended(&mut self, listener: &TcpListener) {
        if self.count > 0 {
            let (on, failed) = (local(listener), std::mem::take(&mut self.count));
            tracing::info!("accepting connections on {on} again, after {failed} failed accepts");
        }
    }

    /// 50 ms after the first failure, doubling up to 1 s.
    fn pause(count: u64) -> Duration {
        let doublings = count.saturating_sub(1).min(5) as u32;
        (Duration::from_millis(50) * 2u32.pow(doublings)).min(Duration::from_secs(1))
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
        assert_eq!(AcceptFailures::pause(u64::MAX), Duration::from_secs(1));
    }
}
