//! Coarse per-worker clocks: one task ticks and broadcasts the count, and only while someone
//! listens. Used where a tokio timer per request or per connection would cost too much:
//!
//! - Upstream deadlines. `tokio::time::timeout` registers a timer; when that timer is due
//!   before the one the runtime is parked on, tokio wakes its own driver through an eventfd,
//!   even from the same thread: one more `write` and `epoll_wait` per proxied request, more
//!   than the rest of the proxying cost on the benchmark VM (BENCHMARKS.md). Upstream timeouts
//!   are seconds long, so a 100 ms clock does.
//! - The read deadline of a client's request (see `connection`), on a one-second clock.

use std::{
    future::Future,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

struct Shared {
    tick: AtomicU64,
    /// Woken at every tick.
    ticked: Notify,
    listeners: AtomicUsize,
    start_ticking: Notify,
}

pub struct Ticker {
    period: Duration,
    shared: Arc<Shared>,
}

impl Ticker {
    /// Spawns the ticking task on the current runtime; it ends with the runtime.
    pub fn start(period: Duration) -> Self {
        let shared = Arc::new(Shared {
            tick: AtomicU64::new(0),
            ticked: Notify::new(),
            listeners: AtomicUsize::new(0),
            start_ticking: Notify::new(),
        });
        let task = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                // Nobody listening: sleep until someone does, so an idle daemon stays asleep.
                if task.listeners.load(Ordering::Acquire) == 0 {
                    task.start_ticking.notified().await;
                }
                tokio::time::sleep(period).await;
                task.tick.fetch_add(1, Ordering::AcqRel);
                task.ticked.notify_waiters();
            }
        });
        Ticker { period, shared }
    }

    /// Completes once `after` has passed, give or take one period (a deadline of `d` fires
    /// after `d` to `d + period`). Dropping it early costs nothing more. It allocates
    /// nothing: one runs per proxied request.
    pub fn expire(&self, after: Duration) -> impl Future<Output = ()> + Send + 'static {
        let listening = self.listen();
        let wait = after.as_nanos().div_ceil(self.period.as_nanos().max(1)) as u64;
        async move {
            let shared = &listening.0;
            let deadline = shared.tick.load(Ordering::Acquire) + wait + 1;
            loop {
                let mut ticked = pin!(shared.ticked.notified());
                // Registered before the tick is read, so a tick in between is not missed.
                ticked.as_mut().enable();
                if shared.tick.load(Ordering::Acquire) >= deadline {
                    return;
                }
                ticked.await;
            }
        }
    }

    /// Counts a listener until the guard drops; the first one starts the ticking.
    fn listen(&self) -> Listening {
        if self.shared.listeners.fetch_add(1, Ordering::AcqRel) == 0 {
            self.shared.start_ticking.notify_one();
        }
        Listening(Arc::clone(&self.shared))
    }
}

struct Listening(Arc<Shared>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::AcqRel);
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
        assert_eq!(ticker.shared.listeners.load(Ordering::Acquire), 0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Fifty periods passed; at most the one tick the brief listener had asked for.
        let idle_ticks = ticker.shared.tick.load(Ordering::Acquire);
        assert!(idle_ticks <= 1, "{idle_ticks} ticks without listeners");
        // A listener starts it again.
        ticker.expire(TICK * 2).await;
        let ticks = ticker.shared.tick.load(Ordering::Acquire);
        assert!(ticks >= idle_ticks + 2, "{idle_ticks} -> {ticks}");
    }
}
