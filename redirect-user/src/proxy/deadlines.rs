//! A client connection's timeouts, kept on its socket with tokio's timers: hyper reads and
//! writes through [`Timed`], which fails the read or write whose deadline has passed, and
//! hyper then drops the connection.
//!
//! - idle: no request in progress and nothing arriving for `idle` (nginx's
//!   `keepalive_timeout`); a request in progress, however long (a long poll), is never idle;
//! - request read: a head must be complete within `request_read` of its first byte (the
//!   slowloris cut-off; the handler bounds the body the same way);
//! - send: a write that makes no progress for `send` (nginx's `send_timeout`): a client that
//!   stops reading.
//!
//! Not hyper's `header_read_timeout`: it runs from the moment hyper waits for a head, idle
//! time included, so it cannot tell an idle keep-alive connection from a slow request.
//!
//! A connection closed after a refused request whose body was left unread lingers, as
//! nginx's `lingering_close` does: it reads and drops what the client still sends, for up to
//! [`LINGER`], so that the client reads the answer instead of a reset.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep, sleep_until},
};

use super::idle::Activity;

/// How long a refused client may go on sending, and how much of it is read, before the
/// connection is closed on it.
pub const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `None`: idle connections stay open until the client closes them.
    pub idle: Option<Duration>,
    pub request_read: Duration,
    pub send: Duration,
}

/// What the read deadline currently guards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Waiting for a request, after `finished` requests.
    Idle { finished: u64 },
    /// A head has begun to arrive.
    Head { finished: u64 },
    /// The handler has the request: no read deadline.
    Handled,
}

pub struct Timed<S> {
    inner: S,
    /// Bytes read ahead and served before the socket's: the byte that ended an idle wait, or
    /// what a finished hyper connection had buffered.
    prefix: Bytes,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    reading: Reading,
    read_deadline: Deadline,
    send_deadline: Deadline,
    linger: Option<Linger>,
}

struct Linger {
    deadline: Deadline,
    drained: usize,
}

impl<S> Timed<S> {
    /// Must be called inside the runtime (it starts the idle clock).
    pub fn new(inner: S, activity: Arc<Activity>, timeouts: Timeouts) -> Self {
        let finished = activity.finished();
        let mut timed = Timed {
            inner,
            prefix: Bytes::new(),
            activity,
            timeouts,
            reading: Reading::Idle { finished },
            read_deadline: Deadline::default(),
            send_deadline: Deadline::default(),
            linger: None,
        };
        timed.start_idle_clock();
        timed
    }

    /// Serves `bytes` before what the socket has next.
    pub fn rewind(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty(), "rewound twice");
        self.prefix = bytes;
    }

    fn start_idle_clock(&mut self) {
        match self.timeouts.idle {
            Some(idle) => self.read_deadline.arm(Instant::now() + idle),
            None => self.read_deadline.disarm(),
        }
    }

    /// Catches up with the handler: a request taken or answered since the last look.
    fn follow_activity(&mut self) {
        if self.activity.is_busy() {
            self.reading = Reading::Handled;
            self.read_deadline.disarm();
            return;
        }
        let finished = self.activity.finished();
        let current = match self.reading {
            Reading::Idle { finished } | Reading::Head { finished } => Some(finished),
            Reading::Handled => None,
        };
        if current != Some(finished) {
            self.reading = Reading::Idle { finished };
            self.start_idle_clock();
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Timed<S> {
    /// Waits, holding no buffer, for the first byte of the next request (under the idle
    /// deadline); false when the client closed instead.
    pub async fn next_request(&mut self) -> io::Result<bool> {
        if !self.prefix.is_empty() {
            return Ok(true);
        }
        let mut byte = [0u8; 1];
        if tokio::io::AsyncReadExt::read(self, &mut byte).await? == 0 {
            return Ok(false);
        }
        self.prefix = Bytes::copy_from_slice(&byte);
        Ok(true)
    }

    /// A write-side operation under the send deadline.
    fn send<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        // The answer to a request is being written: from here the connection is idle.
        self.follow_activity();
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Pending => {
                if !self.send_deadline.armed {
                    self.send_deadline.arm(Instant::now() + self.timeouts.send);
                }
                if self.send_deadline.expired(cx) {
                    return Poll::Ready(Err(timed_out("the client stopped reading")));
                }
                // Registers the idle timer too: hyper may not read again until woken.
                let _ = self.read_deadline.expired(cx);
                Poll::Pending
            }
            done => {
                self.send_deadline.disarm();
                done
            }
        }
    }

    /// After a FIN: reads and drops what the client still sends, until it closes, or until
    /// [`LINGER`] or [`LINGER_BYTES`] is reached.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let linger = self.linger.get_or_insert_with(|| {
            let mut deadline = Deadline::default();
            deadline.arm(Instant::now() + LINGER);
            Linger {
                deadline,
                drained: 0,
            }
        });
        let mut scratch = [0u8; 4096];
        while linger.drained < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.drained += buf.filled().len();
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending if linger.deadline.expired(cx) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.follow_activity();
        let before = buf.filled().len();
        let read = if this.prefix.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            Poll::Ready(Ok(()))
        };
        match read {
            Poll::Ready(Ok(())) => {
                if let Reading::Idle { finished } = this.reading
                    && buf.filled().len() > before
                {
                    this.reading = Reading::Head { finished };
                    this.read_deadline
                        .arm(Instant::now() + this.timeouts.request_read);
                }
                Poll::Ready(Ok(()))
            }
            // An answer still going out is not idleness: that is the send deadline's.
            Poll::Pending if this.send_deadline.armed && this.read_deadline.expired(cx) => {
                this.start_idle_clock();
                let _ = this.read_deadline.expired(cx);
                Poll::Pending
            }
            Poll::Pending if this.read_deadline.expired(cx) => {
                Poll::Ready(Err(timed_out(match this.reading {
                    Reading::Head { .. } => "the request head did not arrive in time",
                    _ => "idle for the idle timeout",
                })))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().send(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .send(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().send(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(this.send(cx, |s, cx| s.poll_shutdown(cx)))?;
            if !this.activity.lingers() {
                return Poll::Ready(Ok(()));
            }
        }
        this.poll_linger(cx).map(Ok)
    }
}

/// A reusable tokio timer, one allocation per connection at most.
#[derive(Default)]
struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Deadline {
    fn arm(&mut self, at: Instant) {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(sleep_until(at))),
        }
        self.armed = true;
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Whether the armed deadline has passed; if not, the task is woken when it does.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed
            && self
                .sleep
                .as_mut()
                .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::idle::IdleList;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Some(Duration::from_secs(75)),
        request_read: Duration::from_secs(10),
        send: Duration::from_secs(60),
    };

    fn timed(
        list: &IdleList,
        buffer: usize,
    ) -> (
        Timed<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Activity>,
    ) {
        let (server, client) = duplex(buffer);
        let activity = list.track();
        (
            Timed::new(server, Arc::clone(&activity), TIMEOUTS),
            client,
            activity,
        )
    }

    fn kind(r: io::Result<usize>) -> Option<io::ErrorKind> {
        r.err().map(|e| e.kind())
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_times_out_after_the_idle_timeout_not_before() {
        let list = IdleList::default();
        let (mut server, _client, _) = timed(&list, 64);
        let start = Instant::now();
        let read = server.read(&mut [0; 8]).await;
        assert_eq!(kind(read), Some(io::ErrorKind::TimedOut));
        assert_eq!(start.elapsed(), Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_within_the_request_read_timeout_of_its_first_byte() {
        let list = IdleList::default();
        let (mut server, mut client, _) = timed(&list, 64);
        tokio::time::sleep(Duration::from_secs(70)).await;
        client.write_all(b"GET / HT").await.unwrap();
        let start = Instant::now();
        let mut buf = [0; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 8);
        // A byte now and then does not extend it.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if client.write_all(b"T").await.is_err() {
                    return;
                }
            }
        });
        let end = loop {
            match server.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(end.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_handled_has_no_read_deadline_and_its_end_restarts_the_idle_clock() {
        let list = IdleList::default();
        let (mut server, mut client, activity) = timed(&list, 64);
        client.write_all(b"GET /").await.unwrap();
        assert_eq!(server.read(&mut [0; 64]).await.unwrap(), 5);
        list.busy(&activity);
        // A long poll: far beyond both read timeouts, and the read stays pending.
        let waited = tokio::time::timeout(Duration::from_secs(600), server.read(&mut [0; 8])).await;
        assert!(waited.is_err(), "no deadline while handled");
        list.idle(&activity);
        let start = Instant::now();
        let read = server.read(&mut [0; 8]).await;
        assert_eq!(kind(read), Some(io::ErrorKind::TimedOut));
        assert_eq!(start.elapsed(), Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
        let list = IdleList::default();
        let (mut server, mut client, _) = timed(&list, 16);
        let start = Instant::now();
        // Reads slowly for a while: progress keeps the connection.
        let reader = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                client.read_exact(&mut [0; 16]).await.unwrap();
            }
            client // then holds it, unread
        });
        let mut wrote = 0;
        let err = loop {
            match server.write(&[b'x'; 16]).await {
                Ok(n) => wrote += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(wrote, 6 * 16, "the buffer's worth and five reads");
        assert_eq!(start.elapsed(), Duration::from_secs(5 * 50 + 60));
        drop(reader.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_lingers_reading_until_the_client_closes() {
        let list = IdleList::default();
        let (mut server, mut client, activity) = timed(&list, 64);
        activity.linger();
        let writer = tokio::spawn(async move {
            client.write_all(&[b'x'; 1000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(client);
        });
        let start = Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        writer.await.unwrap();

        let (mut server, _silent, activity) = timed(&list, 64);
        activity.linger();
        let start = Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(start.elapsed(), LINGER, "at most LINGER");
    }
}
