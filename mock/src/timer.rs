//! Precise delays for the mock's latency.
//!
//! tokio's timer works in whole milliseconds and rounds up: a nominal 100 ms latency
//! measured 101.4 ms at the client's p50, which skews any benchmark that compares
//! throughput with `slots / latency`. One thread keeps the pending deadlines in a heap
//! and sleeps with the OS's (sub-millisecond) timeout resolution until the earliest,
//! then completes each due delay's oneshot.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

type Entry = (Instant, oneshot::Sender<()>);

/// A handle to the timer thread; the thread exits when every handle is dropped.
#[derive(Debug)]
pub(crate) struct PreciseTimer {
    tx: mpsc::Sender<Entry>,
}

impl PreciseTimer {
    pub(crate) fn start() -> std::io::Result<PreciseTimer> {
        let (tx, rx) = mpsc::channel::<Entry>();
        std::thread::Builder::new()
            .name("mock-timer".into())
            .spawn(move || run(rx))?;
        Ok(PreciseTimer { tx })
    }

    /// Waits until `d` has passed, to within the OS's timer slack.
    pub(crate) async fn sleep(&self, d: Duration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send((Instant::now() + d, done)).is_err() {
            tokio::time::sleep(d).await; // the timer thread is gone: fall back
            return;
        }
        let _ = wait.await;
    }
}

fn run(rx: mpsc::Receiver<Entry>) {
    // Ordered by deadline; the sequence number breaks ties (senders are not `Ord`).
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: std::collections::HashMap<u64, oneshot::Sender<()>> = Default::default();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = heap.peek() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(done) = waiting.remove(&id) {
                let _ = done.send(());
            }
        }
        let next = match heap.peek() {
            Some(&Reverse((at, _))) => rx.recv_timeout(at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((at, done)) => {
                seq += 1;
                heap.push(Reverse((at, seq)));
                waiting.insert(seq, done);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
