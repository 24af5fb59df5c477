//! Which client connections are idle, oldest first, so that a full proxy can close the
//! longest-idle one to admit a new caller (nginx's reusable-connection queue).
//!
//! A connection is idle whenever no request of its is being handled: before its first request,
//! between requests, and while a head is still arriving (a slow head is the cheapest thing to
//! give up). Each connection's [`Activity`] is shared by its socket (see `socket`), its
//! request handler and this list.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

/// What a connection is doing, as its handler and the idle list see it.
#[derive(Default)]
pub struct Activity {
    /// Its key in the idle list; 0 while it is not listed. Changed under the list's lock.
    key: AtomicU64,
    busy: AtomicBool,
    /// Requests finished so far.
    finished: AtomicU64,
    /// Bytes have arrived since the last request began or ended: one is on its way.
    arriving: AtomicBool,
    /// A refused request's body was left unread: close lingering (see `connection`).
    linger: AtomicBool,
    /// The listener needs this connection's slot.
    evicted: Notify,
}

impl Activity {
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    pub fn arriving(&self) {
        if !self.is_busy() {
            self.arriving.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_arriving(&self) -> bool {
        self.arriving.load(Ordering::Relaxed)
    }

    pub fn linger(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    pub fn lingers(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }

    /// Resolves when the listener has chosen this connection to close.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

#[derive(Default)]
pub struct IdleList {
    inner: Mutex<Inner>,
    /// A connection has been listed: a listener waiting to make room can try again.
    listed: Notify,
}

#[derive(Default)]
struct Inner {
    /// Keys only grow, so the first entry has been idle longest.
    next_key: u64,
    by_age: BTreeMap<u64, Arc<Activity>>,
}

impl IdleList {
    /// A new connection: idle until its first request.
    pub fn track(&self) -> Arc<Activity> {
        let activity = Arc::new(Activity::default());
        self.idle(&activity);
        activity
    }

    /// A request of `activity`'s connection is being handled.
    pub fn busy(&self, activity: &Arc<Activity>) {
        activity.busy.store(true, Ordering::Release);
        activity.arriving.store(false, Ordering::Relaxed);
        self.unlist(activity);
    }

    /// Its request is answered (or the connection is new).
    pub fn idle(&self, activity: &Arc<Activity>) {
        let mut inner = self.lock();
        inner.next_key += 1;
        let key = inner.next_key;
        inner.by_age.insert(key, Arc::clone(activity));
        activity.key.store(key, Ordering::Relaxed);
        activity.finished.fetch_add(1, Ordering::AcqRel);
        activity.arriving.store(false, Ordering::Relaxed);
        activity.busy.store(false, Ordering::Release);
        drop(inner);
        self.listed.notify_waiters();
    }

    /// The connection is gone.
    pub fn unlist(&self, activity: &Activity) {
        let key = activity.key.swap(0, Ordering::Relaxed);
        if key != 0 {
            self.lock().by_age.remove(&key);
        }
    }

    /// Asks the connection idle longest to close; false when none is idle.
    pub fn evict_oldest(&self) -> bool {
        let Some((_, activity)) = self.lock().by_age.pop_first() else {
            return false;
        };
        activity.key.store(0, Ordering::Relaxed);
        activity.evicted.notify_one();
        true
    }

    /// Asks the connection idle longest to close, once one is: every connection may be busy,
    /// or just accepted and not yet listed, when a listener needs room.
    pub async fn evict_oldest_when_idle(&self) {
        loop {
            // Registered before looking, so that a connection listed in between is not missed.
            let mut listed = std::pin::pin!(self.listed.notified());
            listed.as_mut().enable();
            if self.evict_oldest() {
                return;
            }
            listed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_longest_idle_connection_goes_first_and_busy_ones_never() {
        let list = IdleList::default();
        let (a, b, c) = (list.track(), list.track(), list.track());
        list.busy(&a);
        list.busy(&b);
        list.idle(&b);
        // Idle longest: c (since it was tracked), then b (since its request ended); a is busy.
        assert!(list.evict_oldest());
        c.evicted().await;
        assert!(list.evict_oldest());
        b.evicted().await;
        assert!(!list.evict_oldest(), "a is busy");
        list.idle(&a);
        list.unlist(&a);
        assert!(!list.evict_oldest(), "a is gone");
        assert_eq!(a.finished(), 2, "tracked, then one request");
    }

    #[tokio::test]
    async fn with_every_connection_busy_eviction_waits_for_one_to_be_idle() {
        let list = Arc::new(IdleList::default());
        let (a, b) = (list.track(), list.track());
        list.busy(&a);
        list.busy(&b);
        let evict = tokio::spawn({
            let list = Arc::clone(&list);
            async move { list.evict_oldest_when_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!evict.is_finished(), "nothing is idle yet");
        list.idle(&b);
        evict.await.unwrap();
        b.evicted().await;
        assert!(!list.evict_oldest(), "b was taken, a is still busy");
    }
}
