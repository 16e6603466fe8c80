//! The response body: a few chunks, optionally delayed, that ends the request's
//! accounting when its last chunk has been handed to hyper (or when it is dropped).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::stats::InFlight;

/// How a body ends after its last chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Normally.
    Finish,
    /// Never: the connection stays open and silent until the client gives up.
    Stall,
    /// The connection is reset (hyper aborts it).
    Abort,
}

/// The error a body yields to make hyper abort the connection.
#[derive(Debug)]
pub(crate) struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body aborted by fault injection")
    }
}

impl std::error::Error for Aborted {}

pub(crate) struct MockBody {
    /// Each chunk with the delay before it.
    chunks: VecDeque<(Duration, Bytes)>,
    len: Option<u64>,
    end: End,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The chunk waiting for its delay.
    ready: Option<Bytes>,
    abort_armed: bool,
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
            let d = if chunks.is_empty() {
                Duration::ZERO
            } else {
                delay.unwrap_or(Duration::ZERO)
            };
            chunks.push_back((d, rest.split_to(n)));
        }
        MockBody {
            chunks,
            len: Some(len),
            end: End::Finish,
            sleep: None,
            ready: None,
            abort_armed: false,
            guard,
        }
    }

    /// A streamed body (no length: chunked encoding): each chunk after its delay, then
    /// `end`.
    pub(crate) fn steps(
        chunks: VecDeque<(Duration, Bytes)>,
        end: End,
        guard: Option<InFlight>,
    ) -> Self {
        MockBody {
            chunks,
            len: None,
            end,
            sleep: None,
            ready: None,
            abort_armed: false,
            guard,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if let Some(chunk) = this.ready.take() {
                if this.chunks.is_empty() && this.end == End::Finish {
                    // The whole body is now with hyper: the request is finished.
                    this.guard.take();
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            let Some((delay, chunk)) = this.chunks.pop_front() else {
                return match this.end {
                    End::Finish => {
                        this.guard.take();
                        Poll::Ready(None)
                    }
                    End::Abort if !this.abort_armed => {
                        // Let hyper flush what was sent before resetting.
                        this.abort_armed = true;
                        this.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                        continue;
                    }
                    End::Abort => {
                        this.guard.take();
                        Poll::Ready(Some(Err(Aborted)))
                    }
                    // Silent until the client closes and hyper drops the body (which
                    // ends the request's accounting).
                    End::Stall => {
                        this.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_secs(3600))));
                        continue;
                    }
                };
            };
            this.ready = Some(chunk);
            if !delay.is_zero() {
                this.sleep = Some(Box::pin(tokio::time::sleep(delay)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.ready.is_none() && self.end == End::Finish
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
