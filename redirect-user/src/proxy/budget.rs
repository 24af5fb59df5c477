//! The memory that buffered bodies may take, all connections together.
//!
//! Every body the proxy holds (a request body before it goes upstream, an upstream response
//! before it goes to the client) is counted here from its first byte until hyper has written
//! its last: the bytes are handed over with their reservation as their owner
//! ([`Bytes::from_owner`]), so a client that stops reading keeps its share, and no more, until
//! the send timeout closes it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes that buffered bodies may take in all.
#[derive(Clone)]
pub struct Budget(Arc<Semaphore>);

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the proxy's memory for bodies is in use")]
    Exhausted,
    #[error("reading the body: {0}")]
    Read(String),
}

impl Budget {
    pub fn new(bytes: usize) -> Self {
        Budget(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Reads `body` whole, up to `limit` bytes, each byte counted against the budget first.
    /// `expected` (a `Content-Length`) is reserved at once, so that a body that will not fit
    /// is refused before any of it is read.
    pub async fn collect<B>(
        &self,
        body: B,
        limit: usize,
        expected: Option<u64>,
    ) -> Result<Bytes, BodyError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut reserved: Option<OwnedSemaphorePermit> = None;
        let mut data = BytesMut::new();
        if let Some(expected) = expected {
            let expected = usize::try_from(expected).unwrap_or(usize::MAX);
            if expected > limit {
                return Err(BodyError::TooLarge(limit));
            }
            self.grow(&mut reserved, expected)?;
        }
        let mut body = std::pin::pin!(body);
        // Most bodies come in one frame, which is kept as it is; more are copied together.
        let mut first: Option<Bytes> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(chunk) = frame.into_data() else {
                continue; // trailers: not forwarded
            };
            let so_far = first.as_ref().map_or(data.len(), Bytes::len);
            if so_far + chunk.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            let held = reserved.as_ref().map_or(0, |r| r.num_permits());
            self.grow(&mut reserved, (so_far + chunk.len()).saturating_sub(held))?;
            match first.take() {
                None if data.is_empty() => first = Some(chunk),
                earlier => {
                    data.extend_from_slice(&earlier.unwrap_or_default());
                    data.extend_from_slice(&chunk);
                }
            }
        }
        let data = first.unwrap_or_else(|| data.freeze());
        Ok(match reserved {
            Some(_permit) if data.is_empty() => Bytes::new(),
            Some(_permit) => Bytes::from_owner(Held { data, _permit }),
            None => Bytes::new(),
        })
    }

    fn grow(
        &self,
        reserved: &mut Option<OwnedSemaphorePermit>,
        bytes: usize,
    ) -> Result<(), BodyError> {
        if bytes == 0 {
            return Ok(());
        }
        let bytes = u32::try_from(bytes).map_err(|_| BodyError::Exhausted)?;
        let more = Arc::clone(&self.0)
            .try_acquire_many_owned(bytes)
            .map_err(|_| BodyError::Exhausted)?;
        match reserved {
            Some(permit) => permit.merge(more),
            None => *reserved = Some(more),
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// Body bytes and their share of the budget, returned when the last `Bytes` goes.
struct Held {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    /// A body arriving in these pieces.
    struct Chunks(std::collections::VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            let next = self.0.pop_front();
            std::task::Poll::Ready(next.map(|p| Ok(hyper::body::Frame::data(Bytes::from(p)))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(parts.iter().copied().collect())
    }

    #[tokio::test]
    async fn bodies_are_held_against_the_budget_until_their_bytes_go() {
        let budget = Budget::new(10);
        let body = budget
            .collect(chunks(&["abc", "def"]), 8, None)
            .await
            .unwrap();
        assert_eq!(&body[..], b"abcdef");
        assert_eq!(budget.available(), 4);
        let copy = body.clone();
        drop(body);
        assert_eq!(budget.available(), 4, "a clone still holds the bytes");
        drop(copy);
        assert_eq!(budget.available(), 10);
    }

    #[tokio::test]
    async fn over_the_limit_or_the_budget_is_refused_and_nothing_stays_taken() {
        let budget = Budget::new(10);
        let err = budget.collect(chunks(&["abcde", "fghij"]), 8, None).await;
        assert!(matches!(err, Err(BodyError::TooLarge(8))), "{err:?}");
        let err = budget.collect(Full::new(Bytes::new()), 8, Some(9)).await;
        assert!(
            matches!(err, Err(BodyError::TooLarge(8))),
            "declared length"
        );
        let held = budget.collect(chunks(&["1234567"]), 8, None).await.unwrap();
        let err = budget.collect(chunks(&["1234"]), 8, None).await;
        assert!(matches!(err, Err(BodyError::Exhausted)), "{err:?}");
        let err = budget.collect(Full::new(Bytes::new()), 8, Some(4)).await;
        assert!(
            matches!(err, Err(BodyError::Exhausted)),
            "refused before reading"
        );
        drop(held);
        assert_eq!(budget.available(), 10);
        assert!(
            budget
                .collect(Full::new(Bytes::new()), 0, None)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
