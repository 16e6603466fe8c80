//! Streaming batches: results delivered as they complete, tagged with their input
//! index, with memory bounded by a window of requests in flight.

use crossbeam_channel::{Receiver, Sender};

use crate::error::Error;
use crate::pool::Pool;
use crate::request::Request;
use crate::ticket::RequestResult;

/// An iterator over `(input index, result)` pairs in completion order, created by
/// [`Pool::stream`]. Every input yields exactly one pair.
///
/// Input is read lazily, on the thread that iterates: at most `window` requests are
/// submitted and not yet yielded at any time, so a batch of any size runs in bounded
/// memory. Dropping the stream stops reading input (requests already submitted still
/// run; their results are discarded).
pub struct ResultStream<I> {
    pool: Pool,
    input: Option<I>,
    /// Taken from the input but refused with `Busy`: submitted first next time.
    pending: Option<Request>,
    next_index: usize,
    window: usize,
    /// Submitted and not yet yielded.
    outstanding: usize,
    tx: Sender<(usize, RequestResult)>,
    rx: Receiver<(usize, RequestResult)>,
}

impl<I> std::fmt::Debug for ResultStream<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStream")
            .field("window", &self.window)
            .field("outstanding", &self.outstanding)
            .field("next_index", &self.next_index)
            .field("input_done", &self.input.is_none())
            .finish()
    }
}

impl<I: Iterator<Item = Request>> ResultStream<I> {
    /// Submits input until the window is full. It blocks on a full queue only when no
    /// result is owed to the caller; otherwise it stops and lets `next` wait for one.
    fn top_up(&mut self) {
        while self.outstanding < self.window {
            let req = match self.pending.take() {
                Some(req) => req,
                None => match self.input.as_mut().and_then(Iterator::next) {
                    Some(req) => req,
                    None => {
                        self.input = None;
                        return;
                    }
                },
            };
            let i = self.next_index;
            let out = self.tx.clone();
            let reply = move |r| {
                let _ = out.send((i, r));
            };
            let sent = if self.outstanding == 0 {
                self.pool.submit_with(req, reply)
            } else {
                // Refused while busy: the request comes back, to be sent first next time.
                match self.pool.try_submit_with(req, reply) {
                    Err(e) if e.is_busy() => {
                        self.pending = Some(e.into_request());
                        return;
                    }
                    other => other.map_err(Error::from),
                }
            };
            self.next_index += 1;
            self.outstanding += 1;
            if let Err(e) = sent {
                // Refused (the pool is closed): its callback never runs, so answer here.
                let _ = self.tx.send((i, Err(e)));
            }
        }
    }
}

impl<I: Iterator<Item = Request>> Iterator for ResultStream<I> {
    type Item = (usize, RequestResult);

    fn next(&mut self) -> Option<(usize, RequestResult)> {
        self.top_up();
        if self.outstanding == 0 {
            return None; // input exhausted and every result yielded
        }
        // Every outstanding request is answered exactly once (the pool guarantees it),
        // and `self.tx` keeps the channel open, so this cannot fail or hang.
        let item = self.rx.recv().expect("the stream holds a sender");
        self.outstanding -= 1;
        Some(item)
    }
}

/// How many requests a [`Pool::stream`] keeps submitted and not yet yielded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Window {
    /// Enough to keep every worker busy and the queue full: the pool's capacity plus
    /// its `queue_capacity`. The default.
    #[default]
    Auto,
    /// At most this many (at least 1).
    Max(usize),
}

impl From<usize> for Window {
    /// `Window::Max(n)`; `0` is [`Window::Auto`] (kept for compatibility).
    fn from(n: usize) -> Window {
        if n == 0 { Window::Auto } else { Window::Max(n) }
    }
}

impl Pool {
    /// Runs `requests` and yields `(index, result)` as each completes, keeping at most
    /// `window` requests submitted and not yet yielded ([`Window::Auto`]: the pool's
    /// capacity plus its queue; [`Window::Max`]`(n)`, or just `n`). The input is read on
    /// the iterating thread, as results are taken: no extra thread, no `Send` bound.
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let pool = keypool::Pool::new(keypool::Config::builder().base_url(server.url()).key("sk-a", 4).build()?)?;
    /// use keypool::{Request, Window};
    /// let prompts = (0..100).map(|i| Request::chat("m", [("user", format!("q{i}"))]));
    /// let mut done = 0;
    /// for (index, result) in pool.stream(prompts, Window::Max(16)) {
    ///     assert!(index < 100 && result.is_ok());
    ///     done += 1;
    /// }
    /// assert_eq!(done, 100);
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn stream<I>(&self, requests: I, window: impl Into<Window>) -> ResultStream<I::IntoIter>
    where
        I: IntoIterator<Item = Request>,
    {
        let window = match window.into() {
            Window::Auto => self.capacity() + self.config().queue_capacity,
            Window::Max(n) => n.max(1),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        ResultStream {
            pool: self.clone(),
            input: Some(requests.into_iter()),
            pending: None,
            next_index: 0,
            window,
            outstanding: 0,
            tx,
            rx,
        }
    }
}
