//! A client connection's socket as hyper reads and writes it, with what hyper lacks: the send
//! timeout (nginx's `send_timeout`: a write that makes no progress for that long fails, and
//! hyper drops the connection) and bytes read ahead, served first (see `connection`'s
//! parking). It also tells the connection's [`Activity`] when a request has begun to arrive.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    time::{Instant, Sleep, sleep_until},
};

use super::idle::Activity;

pub struct ClientSocket<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Read ahead, served before the socket's next bytes.
    prefix: Bytes,
    send_timeout: Duration,
    /// Armed while a write waits for the client to read.
    stalled: Option<Pin<Box<Sleep>>>,
    stalled_armed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientSocket<S> {
    pub fn new(inner: S, activity: Arc<Activity>, send_timeout: Duration) -> Self {
        ClientSocket {
            inner,
            activity,
            prefix: Bytes::new(),
            send_timeout,
            stalled: None,
            stalled_armed: false,
        }
    }

    /// Serves `bytes` before what the socket has next.
    pub fn rewind(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty(), "rewound twice");
        self.prefix = bytes;
    }

    /// Waits, holding no buffer, for the first byte of the next request; false when the
    /// client closed instead.
    pub async fn next_request(&mut self) -> io::Result<bool> {
        if !self.prefix.is_empty() {
            return Ok(true);
        }
        let mut byte = [0u8; 1];
        if self.read(&mut byte).await? == 0 {
            return Ok(false);
        }
        self.prefix = Bytes::copy_from_slice(&byte);
        Ok(true)
    }

    /// A write-side operation under the send timeout.
    fn send<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Poll::Ready(done) = op(Pin::new(&mut self.inner), cx) else {
            let at = Instant::now() + self.send_timeout;
            let stalled = self
                .stalled
                .get_or_insert_with(|| Box::pin(sleep_until(at)));
            if !self.stalled_armed {
                stalled.as_mut().reset(at);
                self.stalled_armed = true;
            }
            if stalled.as_mut().poll(cx).is_ready() {
                let stopped = io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
                return Poll::Ready(Err(stopped));
            }
            return Poll::Pending;
        };
        self.stalled_armed = false;
        Poll::Ready(done)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientSocket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if this.prefix.is_empty() {
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
        }
        if buf.filled().len() > before {
            this.activity.arriving();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientSocket<S> {
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
        self.get_mut().send(cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::idle::IdleList;
    use tokio::io::{AsyncWriteExt as _, duplex};

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
        let list = IdleList::default();
        let (server, mut client) = duplex(16);
        let mut server = ClientSocket::new(server, list.track(), Duration::from_secs(60));
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

    #[tokio::test]
    async fn the_first_byte_is_read_ahead_and_marks_a_request_arriving() {
        let list = IdleList::default();
        let (server, mut client) = duplex(64);
        let activity = list.track();
        let mut server = ClientSocket::new(server, Arc::clone(&activity), Duration::from_secs(60));
        client.write_all(b"GET / HTTP/1.1").await.unwrap();
        assert!(!activity.is_arriving());
        assert!(server.next_request().await.unwrap());
        assert!(activity.is_arriving());
        let mut got = [0; 14];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1");
        drop(client);
        assert!(!server.next_request().await.unwrap(), "the client's end");
    }
}
