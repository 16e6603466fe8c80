//! Streaming batches: results delivered as they complete, tagged with their input
//! index, with memory bounded by a window of requests in flight.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::pool::Pool;
use crate::request::Request;
use crate::ticket::RequestResult;

enum Msg {
    Result(usize, RequestResult),
    /// The feeder is done: this many requests were submitted (or failed to submit).
    End(usize),
}

/// An iterator over `(input index, result)` pairs in completion order, created by
/// [`Pool::stream`]. Every input yields exactly one pair.
///
/// Input is read lazily: at most `window` requests are in flight or waiting to be
/// read at any time, so a batch of any size runs in bounded memory. Dropping the
/// stream stops submitting further input (requests already submitted still run).
pub struct ResultStream {
    rx: Receiver<Msg>,
    permits: Sender<()>,
    received: usize,
    total: Option<usize>,
    feeder: Option<JoinHandle<()>>,
}

impl Iterator for ResultStream {
    type Item = (usize, RequestResult);

    fn next(&mut self) -> Option<(usize, RequestResult)> {
        loop {
            if self.total == Some(self.received) {
                if let Some(f) = self.feeder.take() {
                    let _ = f.join();
                }
                return None;
            }
            match self.rx.recv() {
                Ok(Msg::Result(i, r)) => {
                    self.received += 1;
                    // Frees a slot in the window (the feeder may be waiting for it).
                    let _ = self.permits.try_send(());
                    return Some((i, r));
                }
                Ok(Msg::End(n)) => self.total = Some(n),
                // Cannot happen while the feeder or a reply holds a sender; stop safely.
                Err(_) => return None,
            }
        }
    }
}

impl Pool {
    /// Runs `requests` and yields `(index, result)` as each completes. At most `window`
    /// results are pending at once (0 means the pool's capacity plus its queue).
    ///
    /// The input iterator runs on a separate feeder thread.
    pub fn stream<I>(&self, requests: I, window: usize) -> ResultStream
    where
        I: IntoIterator<Item = Request>,
        I::IntoIter: Send + 'static,
    {
        let window = if window == 0 {
            self.capacity() + self.config().queue_capacity
        } else {
            window
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        // `permits` holds one token per free slot in the window.
        let (permit_tx, permit_rx) = crossbeam_channel::bounded::<()>(window);
        for _ in 0..window {
            let _ = permit_tx.try_send(());
        }
        let pool = self.clone();
        let iter = requests.into_iter();
        let feeder = std::thread::Builder::new()
            .name("keypool-stream".into())
            .spawn(move || feed(pool, iter, tx, permit_rx))
            .expect("spawn the stream feeder thread");
        ResultStream {
            rx,
            permits: permit_tx,
            received: 0,
            total: None,
            feeder: Some(feeder),
        }
    }
}

fn feed(pool: Pool, iter: impl Iterator<Item = Request>, tx: Sender<Msg>, permits: Receiver<()>) {
    let tx = Arc::new(tx);
    let mut n = 0;
    for req in iter {
        // Wait for a free slot; if the stream was dropped, stop reading input.
        if permits.recv().is_err() {
            break;
        }
        let i = n;
        n += 1;
        let out = tx.clone();
        if let Err(e) = pool.submit_with(req, move |r| {
            let _ = out.send(Msg::Result(i, r));
        }) {
            let _ = tx.send(Msg::Result(i, Err(e)));
        }
    }
    let _ = tx.send(Msg::End(n));
}
