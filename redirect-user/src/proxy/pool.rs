//! Keep-alive connections to the one upstream, for one proxy worker.
//!
//! A worker talks to a single upstream from a single thread, so the pool is a short list of
//! idle connections: no keying by host, no cross-thread locking, no executor indirection, which
//! hyper-util's general-purpose client spent time on per request (BENCHMARKS.md). A connection
//! goes back to the list when its response body has been read to the end; one that was closed
//! by the upstream in the meantime is noticed before the request goes out, and the request is
//! sent on another.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};

use super::forward::UpstreamConnector;

/// Idle connections kept beyond this are closed.
const MAX_IDLE: usize = 64;

pub struct Pool {
    connector: UpstreamConnector,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to the upstream")]
    Connect(#[source] std::io::Error),
    #[error("HTTP handshake with the upstream")]
    Handshake(#[source] hyper::Error),
    #[error("upstream request")]
    Request(#[source] hyper::Error),
}

impl Pool {
    pub fn new(connector: UpstreamConnector) -> Arc<Self> {
        Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `req` (origin-form URI) on an idle connection, or on a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, PoolError> {
        while let Some(mut sender) = self.checkout() {
            // Resolves at once on a live idle connection; fails on one the upstream closed.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection went away first. Try the next one.
                    Some(unsent) => req = unsent,
                    // Sent and then failed: not repeated, the upstream may have acted on it.
                    None => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
        // Boxed: the rare path would otherwise enlarge every request's future, which is
        // moved (copied) several times per request.
        Box::pin(self.send_new(req)).await
    }

    /// Sends `req` on a new connection.
    async fn send_new(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, PoolError> {
        let mut sender = self.connect().await?;
        let resp = sender.send_request(req).await.map_err(PoolError::Request)?;
        Ok(self.wrap(resp, sender))
    }

    fn checkout(&self) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<Incoming>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, PoolError> {
        let io = self.connector.connect().await.map_err(PoolError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        });
        Ok(sender)
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<Incoming>,
    ) -> Response<PooledBody> {
        resp.map(|body| PooledBody {
            body,
            ret: Some((sender, Arc::downgrade(self))),
        })
    }
}

/// An upstream response body that gives its connection back to the pool once read to the end.
/// Dropped before the end (the client went away), the connection is closed instead: it still
/// carries unread bytes.
pub struct PooledBody {
    body: Incoming,
    ret: Option<(SendRequest<Incoming>, Weak<Pool>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.ret.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, Content-Length: 0) is never polled.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}
