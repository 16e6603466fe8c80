//! Backpressure with hysteresis for blocking submits.
//!
//! A `submit` on a full queue used to block in crossbeam's `send`, which wakes the
//! submitter at every slot a consumer frees: a program submitting in a loop slept and
//! woke once per request (1.6 context switches per request in `benches/cpu.rs` against
//! 1.1 for `Pool::batch`). Here a submitter that finds the queue full sleeps until it
//! has drained to its low-water mark (an eighth of the capacity free), then fills it
//! again without sleeping: one wake-up per `capacity / 8` requests.
//!
//! No wake-up is lost: a submitter registers (`waiters`) and re-reads the queue's
//! length under the lock, after a `SeqCst` fence; a consumer, after each take, fences
//! and reads `waiters`, and notifies under the same lock. Of the two fenced
//! store-then-load pairs at least one sees the other's store, and the submitter holds
//! the lock from its check until `wait` releases it.

use std::sync::atomic::{AtomicUsize, Ordering, fence};

use parking_lot::{Condvar, Mutex};

/// Where blocked submitters wait for the queue to drain.
pub(crate) struct QueueSpace {
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    /// Submitters wake when the queue holds at most this many jobs.
    low_water: usize,
}

impl QueueSpace {
    /// For a queue of `capacity` jobs (at least 1).
    pub(crate) fn new(capacity: usize) -> QueueSpace {
        QueueSpace {
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            low_water: capacity.saturating_sub((capacity / 8).max(1)),
        }
    }

    /// Every consumer calls this after taking a job from the queue, which now holds
    /// `len()` jobs: wakes the waiting submitters once the queue is at the mark.
    #[inline]
    pub(crate) fn took(&self, len: impl FnOnce() -> usize) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 && len() <= self.low_water {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// Wakes every waiting submitter (shutdown: `stop` has become true).
    pub(crate) fn wake_all(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    /// Waits until the queue holds at most the low-water mark (`len()`) or `stop()`
    /// holds.
    pub(crate) fn wait(&self, len: impl Fn() -> usize, stop: impl Fn() -> bool) {
        let mut g = self.lock.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while len() > self.low_water && !stop() {
            self.cv.wait(&mut g);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn the_mark_leaves_an_eighth_free() {
        assert_eq!(QueueSpace::new(1).low_water, 0);
        assert_eq!(QueueSpace::new(8).low_water, 7);
        assert_eq!(QueueSpace::new(4096).low_water, 3584);
    }

    /// A submitter waiting on a full queue wakes when consumers drain it to the mark,
    /// not before, and at once when it is stopped.
    #[test]
    fn waiters_wake_at_the_mark_or_when_stopped() {
        let (tx, rx) = crossbeam_channel::bounded::<u32>(8);
        for i in 0..8 {
            tx.send(i).unwrap();
        }
        let space = Arc::new(QueueSpace::new(8));
        let stop = Arc::new(AtomicBool::new(false));

        let (woke_tx, woke_rx) = crossbeam_channel::bounded::<usize>(1);
        let waiter = {
            let (space, tx2) = (space.clone(), tx.clone());
            std::thread::spawn(move || {
                space.wait(|| tx2.len(), || false);
                woke_tx.send(tx2.len()).unwrap();
            })
        };
        // Wait until it is registered, then take one job: 7 left, at the mark.
        while space.waiters.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        rx.recv().unwrap();
        space.took(|| rx.len());
        assert_eq!(woke_rx.recv_timeout(Duration::from_secs(5)), Ok(7));
        waiter.join().unwrap();

        // Stopped: wakes although the queue is full.
        tx.send(7).unwrap();
        let waiter = {
            let (space, tx2, stop2) = (space.clone(), tx.clone(), stop.clone());
            std::thread::spawn(move || space.wait(|| tx2.len(), || stop2.load(Ordering::SeqCst)))
        };
        while space.waiters.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        space.wake_all();
        waiter.join().unwrap();
        assert_eq!(tx.len(), 8, "woken by the stop, not by space");
    }

    /// Many submitters and consumers: every item gets through (no lost wake-up leaves
    /// a submitter asleep on a queue that drained).
    #[test]
    fn no_submitter_is_left_asleep() {
        let (tx, rx) = crossbeam_channel::bounded::<u32>(16);
        let space = Arc::new(QueueSpace::new(16));
        let per = 20_000u32;
        let submitters: Vec<_> = (0..4)
            .map(|_| {
                let (tx, space) = (tx.clone(), space.clone());
                std::thread::spawn(move || {
                    for i in 0..per {
                        let mut item = i;
                        loop {
                            match tx.try_send(item) {
                                Ok(()) => break,
                                Err(crossbeam_channel::TrySendError::Full(v)) => {
                                    item = v;
                                    space.wait(|| tx.len(), || false);
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let (rx, space) = (rx.clone(), space.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while rx.recv().is_ok() {
                        space.took(|| rx.len());
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for s in submitters {
            s.join().unwrap();
        }
        let total: u64 = consumers.into_iter().map(|c| c.join().unwrap()).sum();
        assert_eq!(total, 4 * u64::from(per));
    }
}
