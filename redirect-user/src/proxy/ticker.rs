//! Coarse clocks and timers that need no timer in the proxy workers' runtimes. The workers'
//! runtimes are built without tokio's time driver: with it, every time a worker parks, tokio
//! looks at its timer wheel and reads the clock, 4.6 % of the instructions of a proxied request
//! (BENCHMARKS.md), and a tokio timer due before the one the runtime is parked on makes tokio
//! wake its own driver through an eventfd, even from the same thread: one more `write` and
//! `epoll_wait` per proxied request. Instead a [`Ticker`] thread ticks and broadcasts the
//! count, and only while someone listens. Used for:
//!
//! - upstream deadlines (connect and response), on a 100 ms clock: they are seconds long;
//! - the read deadline of a client's request (see `connection`), on a one-second clock;
//! - [`sleep`], for the rare waits (accept back-off, shutdown grace).

use std::{
    future::Future,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, Thread},
    time::Duration,
};

use tokio::sync::{Notify, oneshot};

/// Ticker threads do nothing but sleep and notify.
const STACK_SIZE: usize = 64 << 10;

struct Shared {
    tick: AtomicU64,
    /// Woken at every tick.
    ticked: Notify,
    listeners: AtomicUsize,
    /// The ticking thread, unparked by the first listener and by the `Ticker`'s drop.
    thread: Thread,
    stopped: AtomicBool,
}

/// A clock of `period` ticks, run by a thread of its own that sleeps while nobody listens.
/// The thread ends soon after the `Ticker` is dropped.
pub struct Ticker {
    period: Duration,
    shared: Arc<Shared>,
}

impl Ticker {
    pub fn start(period: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Shared>>();
        let spawned = thread::Builder::new()
            .name("redirect-ticker".to_owned())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let Ok(shared) = rx.recv() else { return };
                while !shared.stopped.load(Ordering::Acquire) {
                    // Nobody listening: sleep until someone does, so an idle daemon stays
                    // asleep. (An unpark that came first makes this return at once.)
                    if shared.listeners.load(Ordering::Acquire) == 0 {
                        thread::park();
                        continue;
                    }
                    thread::sleep(period);
                    shared.tick.fetch_add(1, Ordering::AcqRel);
                    shared.ticked.notify_waiters();
                }
            });
        let thread = match spawned {
            Ok(handle) => handle.thread().clone(),
            // Out of threads: a clock that never ticks. Its deadlines never fire, which only
            // lets slow peers take longer, and the failure is logged.
            Err(e) => {
                tracing::error!("cannot start a clock thread: {e}");
                thread::current()
            }
        };
        let shared = Arc::new(Shared {
            tick: AtomicU64::new(0),
            ticked: Notify::new(),
            listeners: AtomicUsize::new(0),
            thread,
            stopped: AtomicBool::new(false),
        });
        let _ = tx.send(Arc::clone(&shared));
        Ticker { period, shared }
    }

    /// The clock's reading: ticks so far. It advances only while someone waits on the clock
    /// (see [`Ticker::expire`]).
    pub fn now(&self) -> u64 {
        self.shared.tick.load(Ordering::Acquire)
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// `duration` in whole ticks, rounded up.
    pub fn ticks(&self, duration: Duration) -> u64 {
        let ticks = duration.as_nanos().div_ceil(self.period.as_nanos().max(1));
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Completes once `after` has passed, give or take one period (a deadline of `d` fires
    /// after `d` to `d + period`). Dropping it early costs nothing more. It allocates
    /// nothing: one runs per proxied request.
    pub fn expire(&self, after: Duration) -> impl Future<Output = ()> + Send + 'static {
        let listening = self.listen();
        let wait = self.ticks(after);
        async move {
            let shared = &listening.0;
            let deadline = shared
                .tick
                .load(Ordering::Acquire)
                .saturating_add(wait)
                .saturating_add(1);
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
            self.shared.thread.unpark();
        }
        Listening(Arc::clone(&self.shared))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.thread.unpark();
    }
}

struct Listening(Arc<Shared>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completes after `duration`, timed by a thread of its own: for the rare waits of a runtime
/// without a time driver. If the thread cannot be made, it completes at once.
pub fn sleep(duration: Duration) -> impl Future<Output = ()> + Send + 'static {
    let (tx, rx) = oneshot::channel::<()>();
    let spawned = thread::Builder::new()
        .name("redirect-sleep".to_owned())
        .stack_size(STACK_SIZE)
        .spawn(move || {
            thread::sleep(duration);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a timer thread: {e}");
    }
    async move {
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const TICK: Duration = Duration::from_millis(20);

    #[test]
    fn durations_round_up_to_whole_ticks() {
        let second = Ticker::start(Duration::from_secs(1));
        assert_eq!(second.ticks(Duration::from_secs(75)), 75);
        assert_eq!(second.ticks(Duration::from_millis(1500)), 2);
        assert_eq!(second.ticks(Duration::from_millis(1)), 1);
        let nano = Ticker::start(Duration::from_nanos(1));
        assert_eq!(nano.ticks(Duration::MAX), u64::MAX);
    }

    /// Real time (the ticker is a thread): the upper bounds leave room for a loaded machine.
    #[tokio::test]
    async fn deadlines_fire_after_their_time_and_not_before() {
        let ticker = Ticker::start(TICK);
        let started = Instant::now();
        ticker.expire(Duration::from_millis(50)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn the_ticker_runs_only_while_listened_to() {
        let ticker = Ticker::start(TICK);
        drop(ticker.expire(Duration::from_secs(1)));
        assert_eq!(ticker.shared.listeners.load(Ordering::Acquire), 0);
        thread::sleep(TICK * 20);
        // Twenty periods passed; at most the one tick the brief listener had started.
        let idle_ticks = ticker.shared.tick.load(Ordering::Acquire);
        assert!(idle_ticks <= 1, "{idle_ticks} ticks without listeners");
        // A listener starts it again.
        ticker.expire(TICK * 2).await;
        let ticks = ticker.shared.tick.load(Ordering::Acquire);
        assert!(ticks >= idle_ticks + 2, "{idle_ticks} -> {ticks}");
    }

    #[test]
    fn a_dropped_ticker_stops_its_thread() {
        let ticker = Ticker::start(TICK);
        let shared = Arc::clone(&ticker.shared);
        drop(ticker);
        // The thread's own reference goes when it ends.
        let started = Instant::now();
        while Arc::strong_count(&shared) > 1 {
            assert!(started.elapsed() < Duration::from_secs(10), "still running");
            thread::sleep(TICK);
        }
    }

    #[tokio::test]
    async fn sleep_completes_after_its_time() {
        let started = Instant::now();
        sleep(Duration::from_millis(30)).await;
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
