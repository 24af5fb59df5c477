//! Coarse per-worker clocks: one task ticks and broadcasts the count, and only while someone
//! listens. Used where a tokio timer per request or per connection would cost too much:
//!
//! - Upstream deadlines. `tokio::time::timeout` registers a timer; when that timer is due
//!   before the one the runtime is parked on, tokio wakes its own driver through an eventfd,
//!   even from the same thread: one more `write` and `epoll_wait` per proxied request, more
//!   than the rest of the proxying cost on the benchmark VM (BENCHMARKS.md). Upstream timeouts
//!   are seconds long, so a 100 ms clock does.
//! - The idle sweep of client connections (see `connection`), once a second.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

pub struct Ticker {
    period: Duration,
    ticks: watch::Receiver<u64>,
    listeners: Arc<AtomicUsize>,
    start_ticking: Arc<Notify>,
}

impl Ticker {
    /// Spawns the ticking task on the current runtime; it ends with the runtime.
    pub fn start(period: Duration) -> Self {
        let (tx, ticks) = watch::channel(0u64);
        let listeners = Arc::new(AtomicUsize::new(0));
        let start_ticking = Arc::new(Notify::new());
        let (busy, wake) = (Arc::clone(&listeners), Arc::clone(&start_ticking));
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                // Nobody listening: sleep until someone does, so an idle daemon stays asleep.
                if busy.load(Ordering::Acquire) == 0 {
                    wake.notified().await;
                }
                tokio::time::sleep(period).await;
                tick += 1;
                if tx.send(tick).is_err() {
                    return;
                }
            }
        });
        Ticker {
            period,
            ticks,
            listeners,
            start_ticking,
        }
    }

    /// A listener: the ticker runs while any exists.
    pub fn subscribe(&self) -> Ticks {
        if self.listeners.fetch_add(1, Ordering::AcqRel) == 0 {
            self.start_ticking.notify_one();
        }
        let mut ticks = self.ticks.clone();
        // Starts at the current tick: `next` waits for a new one.
        ticks.borrow_and_update();
        Ticks {
            ticks,
            listeners: Arc::clone(&self.listeners),
        }
    }

    /// Completes once `after` has passed, give or take one period (a deadline of `d` fires
    /// after `d` to `d + period`). Dropping it early costs nothing more.
    pub fn expire(&self, after: Duration) -> impl Future<Output = ()> + Send + 'static {
        let mut ticks = self.subscribe();
        let wait = after.as_nanos().div_ceil(self.period.as_nanos().max(1)) as u64;
        async move {
            let deadline = ticks.now() + wait + 1;
            while ticks.next().await < deadline {}
        }
    }
}

/// A subscription to a [`Ticker`].
pub struct Ticks {
    ticks: watch::Receiver<u64>,
    listeners: Arc<AtomicUsize>,
}

impl Ticks {
    /// The current tick.
    pub fn now(&mut self) -> u64 {
        *self.ticks.borrow_and_update()
    }

    /// Waits for the next tick and returns it. Never returns if the ticker is gone (its
    /// runtime is shutting down).
    pub async fn next(&mut self) -> u64 {
        if self.ticks.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.ticks.borrow_and_update()
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_after_their_time_and_not_before() {
        let ticker = Ticker::start(TICK);
        let started = tokio::time::Instant::now();
        ticker.expire(Duration::from_millis(250)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert!(
            waited <= Duration::from_millis(250) + 2 * TICK,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_runs_only_while_listened_to() {
        let ticker = Ticker::start(TICK);
        drop(ticker.expire(Duration::from_secs(1)));
        assert_eq!(ticker.listeners.load(Ordering::Acquire), 0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Fifty periods passed; at most the one tick the brief listener had asked for.
        let idle_ticks = *ticker.ticks.borrow();
        assert!(idle_ticks <= 1, "{idle_ticks} ticks without listeners");
        let mut ticks = ticker.subscribe();
        assert_eq!(ticks.next().await, idle_ticks + 1);
        assert_eq!(ticks.next().await, idle_ticks + 2);
    }
}
