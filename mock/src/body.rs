//! The response body: a few chunks, optionally delayed, that ends the request's
//! accounting when its last chunk has been handed to hyper (or when it is dropped).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::stats::InFlight;

pub(crate) struct MockBody {
    chunks: VecDeque<Bytes>,
    len: u64,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    guard: Option<InFlight>,
}

impl MockBody {
    /// A body sent at once.
    pub(crate) fn full(data: Bytes, guard: Option<InFlight>) -> Self {
        Self::chunked(data, 1, None, guard)
    }

    /// A body split into `parts` chunks with `delay` before each chunk after the first.
    pub(crate) fn chunked(
        data: Bytes,
        parts: usize,
        delay: Option<Duration>,
        guard: Option<InFlight>,
    ) -> Self {
        let len = data.len() as u64;
        let mut chunks = VecDeque::new();
        let step = data.len().div_ceil(parts.max(1)).max(1);
        let mut rest = data;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            chunks.push_back(rest.split_to(n));
        }
        MockBody {
            chunks,
            len,
            delay,
            sleep: None,
            guard,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let Some(chunk) = this.chunks.pop_front() else {
            this.guard.take();
            return Poll::Ready(None);
        };
        if this.chunks.is_empty() {
            // The whole body is now with hyper: the request is finished.
            this.guard.take();
        } else if let Some(d) = this.delay {
            this.sleep = Some(Box::pin(tokio::time::sleep(d)));
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}
