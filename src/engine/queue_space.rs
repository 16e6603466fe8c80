//! Backpressure with hysteresis for blocking submits.
//!
//! A `submit` on a full queue used to block in crossbeam's `send`, which wakes the
//! submitter at every slot a consumer frees: a program submitting in a loop slept and
//! woke once per request (1.6 context switches per request in `benches/cpu.rs` against
//! 1.1 for `Pool::batch`). Here a submitter that finds the queue full sleeps until it
//! has drained to its low-water mark (an eighth of the capacity free), then fills it
//! again without sleeping: one wake-up per `capacity / 8` requests.
//!
//! Blocked submitters wait in line, in arrival order (tickets): only the first in line
//! sends, and `try_submit` refuses (`Busy`) while anyone is in line, so neither a newer
//! blocking submitter nor a stream of `try_submit`/`submit_timeout` calls can take the
//! slots the first in line is waiting for. A `submit_timeout` waits in the same line
//! until its deadline and leaves it then.
//!
//! No wake-up is lost: a submitter registers (`waiters`), says it is going to sleep
//! (`sleeping`) and re-reads the queue's length under the lock, after a `SeqCst`
//! fence; a consumer, after each take, fences and reads `waiters` and `sleeping`, and
//! notifies under the same lock. Of the two fenced store-then-load pairs at least one
//! sees the other's store, and the submitter holds the lock from its check until
//! `wait` releases it. One consumer per sleep notifies (it swaps `sleeping` back):
//! the others, taking jobs until the woken submitter runs, neither lock nor notify
//! (when each of them did, that lock was the pool's most contended: 0.5
//! `sched_yield` per request in `benches/cpu.rs`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// Where blocked submitters wait for the queue to drain, in arrival order.
pub(crate) struct QueueSpace {
    /// Submitters in line (a consumer's `took` and `try_submit` read it without the
    /// lock).
    waiters: AtomicUsize,
    line: Mutex<Line>,
    cv: Condvar,
    /// Submitters wake when the queue holds at most this many jobs.
    low_water: usize,
    /// The queue's capacity.
    capacity: usize,
    /// The first in line takes any free slot (a `submit_timeout`): consumers wake it
    /// at every take, not only at the mark.
    eager: std::sync::atomic::AtomicBool,
    /// A submitter is (about to be) asleep in `wait`, not yet notified.
    sleeping: std::sync::atomic::AtomicBool,
}

/// The line of blocked submitters: tickets in arrival order.
#[derive(Default)]
struct Line {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Tickets whose holders left before their turn (a `submit_timeout` that timed
    /// out): skipped when the line moves on.
    left: BTreeSet<u64>,
}

impl Line {
    /// The turn passes to the next ticket still in line.
    fn advance(&mut self) {
        self.serving += 1;
        while self.left.remove(&self.serving) {
            self.serving += 1;
        }
    }
}

/// How a wait in line ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// The item went into the queue.
    Sent,
    /// `stop()` held (shutdown): the caller falls back to a plain blocking send.
    Stopped,
    /// The deadline passed before the turn came with space.
    TimedOut,
}

impl QueueSpace {
    /// For a queue of `capacity` jobs (at least 1).
    pub(crate) fn new(capacity: usize) -> QueueSpace {
        QueueSpace {
            waiters: AtomicUsize::new(0),
            line: Mutex::new(Line::default()),
            cv: Condvar::new(),
            low_water: capacity.saturating_sub((capacity / 8).max(1)),
            capacity: capacity.max(1),
            eager: std::sync::atomic::AtomicBool::new(false),
            sleeping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether submitters wait in line: a `try_submit` must not take the slot the
    /// first of them is owed.
    #[inline]
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters.load(Ordering::SeqCst) > 0
    }

    /// Every consumer calls this after taking a job from the queue, which now holds
    /// `len()` jobs: wakes the waiting submitters once the queue is at the mark.
    #[inline]
    pub(crate) fn took(&self, len: impl FnOnce() -> usize) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0
            && self.sleeping.load(Ordering::Relaxed)
            && (self.eager.load(Ordering::Relaxed) || len() <= self.low_water)
            && self.sleeping.swap(false, Ordering::SeqCst)
        {
            let _g = self.line.lock();
            self.cv.notify_all();
        }
    }

    /// Wakes every waiting submitter (shutdown: `stop` has become true).
    pub(crate) fn wake_all(&self) {
        let _g = self.line.lock();
        self.cv.notify_all();
    }

    /// Waits in line, in arrival order, until it is this caller's turn and `try_send`
    /// is done. The first in line that finds the queue full sleeps until it has
    /// drained to the low-water mark (one wake-up per eighth of the queue; `eager`: to
    /// any free slot), then the line fills it again without sleeping. `try_send`
    /// returns `false` when the queue was full (it keeps the item), `true` when it is
    /// done (sent, or the queue is gone). Ends early when `stop()` holds or at
    /// `deadline`.
    pub(crate) fn send_in_turn(
        &self,
        mut try_send: impl FnMut() -> bool,
        len: impl Fn() -> usize,
        stop: impl Fn() -> bool,
        deadline: Option<Instant>,
        eager: bool,
    ) -> Turn {
        let mut g = self.line.lock();
        let ticket = g.next;
        g.next += 1;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let outcome = loop {
            // Before the checks, so that a consumer's take after them notifies.
            self.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if stop() {
                break Turn::Stopped;
            }
            if g.serving == ticket {
                if try_send() {
                    break Turn::Sent;
                }
                // Full: sleep until the queue drained to the mark (re-checked under
                // the lock after the fence, so a consumer's `took` cannot be missed).
                if eager {
                    self.eager.store(true, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                }
                let mark = if eager {
                    self.capacity - 1
                } else {
                    self.low_water
                };
                if len() <= mark {
                    continue;
                }
            }
            match deadline {
                Some(at) => {
                    if self.cv.wait_until(&mut g, at).timed_out() && Instant::now() >= at {
                        break Turn::TimedOut;
                    }
                }
                None => self.cv.wait(&mut g),
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        // Everyone still waiting is notified below and says so again if it sleeps.
        self.sleeping.store(false, Ordering::SeqCst);
        if g.serving == ticket {
            self.eager.store(false, Ordering::SeqCst);
            g.advance();
        } else if ticket > g.serving {
            g.left.insert(ticket);
        }
        // The next in line may have its turn now (or everyone, at shutdown).
        self.cv.notify_all();
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn sender(tx: &crossbeam_channel::Sender<u32>, item: u32) -> impl FnMut() -> bool + '_ {
        let mut held = Some(item);
        move || match tx.try_send(held.take().unwrap()) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Full(v)) => {
                held = Some(v);
                false
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_mark_leaves_an_eighth_free() {
        assert_eq!(QueueSpace::new(1).low_water, 0);
        assert_eq!(QueueSpace::new(8).low_water, 7);
        assert_eq!(QueueSpace::new(4096).low_water, 3584);
    }

    /// A submitter waiting on a full queue sends once consumers drain it to the mark,
    /// and returns at once when it is stopped.
    #[test]
    fn waiters_send_at_the_mark_or_return_when_stopped() {
        let (tx, rx) = crossbeam_channel::bounded::<u32>(8);
        for i in 0..8 {
            tx.send(i).unwrap();
        }
        let space = Arc::new(QueueSpace::new(8));
        let stop = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (space, tx2) = (space.clone(), tx.clone());
            std::thread::spawn(move || {
                space.send_in_turn(sender(&tx2, 100), || tx2.len(), || false, None, false)
            })
        };
        while !space.has_waiters() {
            std::thread::yield_now();
        }
        rx.recv().unwrap();
        space.took(|| rx.len());
        assert_eq!(waiter.join().unwrap(), Turn::Sent);
        assert_eq!(tx.len(), 8);

        // Stopped: returns although the queue is full.
        let waiter = {
            let (space, tx2, stop2) = (space.clone(), tx.clone(), stop.clone());
            std::thread::spawn(move || {
                space.send_in_turn(
                    sender(&tx2, 101),
                    || tx2.len(),
                    || stop2.load(Ordering::SeqCst),
                    None,
                    false,
                )
            })
        };
        while !space.has_waiters() {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        space.wake_all();
        assert_eq!(waiter.join().unwrap(), Turn::Stopped);
        assert_eq!(tx.len(), 8, "woken by the stop, not by space");

        // A deadline: leaves the line when it passes.
        let t = Instant::now();
        let at = t + Duration::from_millis(50);
        let turn = space.send_in_turn(sender(&tx, 102), || tx.len(), || false, Some(at), true);
        assert_eq!(turn, Turn::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(!space.has_waiters());
    }

    /// Blocked submitters send in arrival order, and one that left the line on its
    /// deadline does not block the ones behind it.
    #[test]
    fn the_line_is_served_in_arrival_order() {
        let (tx, rx) = crossbeam_channel::bounded::<u32>(8);
        for i in 0..8 {
            tx.send(i).unwrap();
        }
        let space = Arc::new(QueueSpace::new(8));
        let mut handles = Vec::new();
        for n in 0..6u32 {
            let (sp, tx2) = (space.clone(), tx.clone());
            // Ticket n: the third leaves the line (deadline) before its turn.
            let deadline = (n == 2).then(|| Instant::now() + Duration::from_millis(30));
            handles.push(std::thread::spawn(move || {
                sp.send_in_turn(
                    sender(&tx2, 100 + n),
                    || tx2.len(),
                    || false,
                    deadline,
                    false,
                )
            }));
            // In line (its ticket taken) before the next arrives.
            while space.line.lock().next < u64::from(n) + 1 {
                std::thread::yield_now();
            }
        }
        // Let the third time out while the queue is still full.
        std::thread::sleep(Duration::from_millis(60));
        let mut got = Vec::new();
        while got.len() < 8 + 5 {
            let v = rx.recv().unwrap();
            space.took(|| rx.len());
            got.push(v);
        }
        let turns: Vec<Turn> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(turns[2], Turn::TimedOut);
        let sent: Vec<u32> = got.into_iter().filter(|&v| v >= 100).collect();
        assert_eq!(sent, vec![100, 101, 103, 104, 105]);
    }

    /// Many submitters and consumers: every item gets through (no lost wake-up leaves
    /// a submitter asleep on a queue that drained), with submitters that wait for the
    /// mark, ones that wait for any free slot (`submit_timeout`), and ones whose short
    /// deadlines often pass (they leave the line), in the same line.
    #[test]
    fn no_submitter_is_left_asleep() {
        let (tx, rx) = crossbeam_channel::bounded::<u32>(16);
        let space = Arc::new(QueueSpace::new(16));
        let per = 20_000u32;
        let far = Instant::now() + Duration::from_secs(3600);
        let submitters: Vec<_> = (0..6)
            .map(|s| {
                let (tx, space) = (tx.clone(), space.clone());
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    for i in 0..per {
                        let (deadline, eager) = match s % 3 {
                            0 => (None, false),
                            1 => (Some(far), true),
                            _ => (Some(Instant::now() + Duration::from_micros(50)), true),
                        };
                        let mut item = Some(i);
                        if let Err(crossbeam_channel::TrySendError::Full(v)) =
                            tx.try_send(item.take().unwrap())
                        {
                            let t = space.send_in_turn(
                                sender(&tx, v),
                                || tx.len(),
                                || false,
                                deadline,
                                eager,
                            );
                            match t {
                                Turn::Sent => {}
                                Turn::TimedOut if s % 3 == 2 => continue,
                                other => panic!("submitter {s}: {other:?}"),
                            }
                        }
                        sent += 1;
                    }
                    sent
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
        let sent: Vec<u64> = submitters.into_iter().map(|s| s.join().unwrap()).collect();
        let total: u64 = consumers.into_iter().map(|c| c.join().unwrap()).sum();
        assert_eq!(total, sent.iter().sum::<u64>());
        // The submitters without a short deadline sent everything.
        for (s, n) in sent.iter().enumerate() {
            if s % 3 != 2 {
                assert_eq!(*n, u64::from(per), "submitter {s}");
            }
        }
    }
}
