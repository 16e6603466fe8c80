//! Deadlines that hold wherever a request waits.
//!
//! A request with a deadline may wait in places no thread looks at in time: the intake
//! queue behind a saturated pool, or behind keys that are all cooling. Its reply then
//! lives in a shared [`Slot`] registered here, and the dispatcher — which already wakes
//! at every known instant — answers expired slots (`Timeout{Deadline}`) wherever their
//! job is. A job whose slot was answered this way is dropped, unsent, by whoever takes
//! it next. A job on the wire is left to its worker: its attempt's timeout is already
//! bounded by the deadline.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::cancel::{Attempt, Conn};
use crate::error::{Error, TimeoutPhase};
use crate::ticket::Reply;

/// The reply of a job with a deadline or a cancel handle, shared by the job, the
/// registry and the caller's handle ([`Ticket`](crate::Ticket),
/// [`ResponseStream`](crate::ResponseStream)): whoever takes it answers.
pub(crate) struct Slot {
    inner: Mutex<SlotState>,
}

struct SlotState {
    reply: Option<Reply>,
    /// An attempt is on the wire: its worker answers, not the registry.
    on_wire: bool,
    attempts: u32,
    last_key: Option<Arc<str>>,
    /// The caller cancelled the request (see `cancel.rs`).
    cancelled: bool,
    /// The connection the attempt on the wire uses, and that attempt's number.
    wire: Option<(u64, Weak<dyn Conn>)>,
}

impl Slot {
    pub(crate) fn new(reply: Reply) -> Arc<Slot> {
        Arc::new(Slot {
            inner: Mutex::new(SlotState {
                reply: Some(reply),
                on_wire: false,
                attempts: 0,
                last_key: None,
                cancelled: false,
                wire: None,
            }),
        })
    }

    /// Takes the reply (to answer it), if nobody has.
    pub(crate) fn take(&self) -> Option<Reply> {
        self.inner.lock().reply.take()
    }

    pub(crate) fn is_answered(&self) -> bool {
        self.inner.lock().reply.is_none()
    }

    /// An attempt on `key` starts. False if the request was already answered.
    pub(crate) fn begin_attempt(&self, key: &Arc<str>) -> bool {
        let mut s = self.inner.lock();
        if s.reply.is_none() {
            return false;
        }
        s.on_wire = true;
        s.attempts += 1;
        s.last_key = Some(key.clone());
        true
    }

    pub(crate) fn end_attempt(&self) {
        let mut s = self.inner.lock();
        s.on_wire = false;
        s.wire = None;
    }

    /// The caller gives the request up: answers it `Cancelled` now unless it was
    /// answered already, and shuts down the connection of an attempt on the wire.
    /// True if this call answered it.
    pub(crate) fn cancel(&self) -> bool {
        let reply = {
            let mut s = self.inner.lock();
            let Some(reply) = s.reply.take() else {
                return false;
            };
            s.cancelled = true;
            // Under the lock: once the attempt ends (`end_attempt`) its connection
            // may carry another request, which must not be cut.
            if let Some((attempt, conn)) = s.wire.take() {
                if let Some(conn) = conn.upgrade() {
                    conn.close_if_used_by(attempt);
                }
            }
            reply
        };
        reply.send(Err(Error::Cancelled));
        true
    }

    /// Whether the caller cancelled the request.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.inner.lock().cancelled
    }

    /// The attempt `attempt` now uses `conn` (`claim` marks it so, under this lock).
    /// False if the request was cancelled: the attempt must stop.
    pub(crate) fn attach(
        &self,
        attempt: u64,
        conn: Weak<dyn Conn>,
        claim: impl FnOnce(u64),
    ) -> bool {
        let mut s = self.inner.lock();
        if s.cancelled {
            return false;
        }
        claim(attempt);
        s.wire = Some((attempt, conn));
        true
    }

    /// The deadline passed: answer now unless an attempt is on the wire.
    fn expire(&self) {
        let (reply, key, attempts) = {
            let mut s = self.inner.lock();
            if s.on_wire {
                return;
            }
            match s.reply.take() {
                Some(r) => (r, s.last_key.clone(), s.attempts),
                None => return,
            }
        };
        reply.send(Err(Error::Timeout {
            phase: TimeoutPhase::Deadline,
            key: key.map(|k| k.to_string()),
            attempts,
        }));
    }
}

struct Entry {
    at: Instant,
    seq: u64,
    slot: Arc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest deadline goes first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Every outstanding deadline, earliest first.
pub(crate) struct Deadlines {
    heap: Mutex<BinaryHeap<Entry>>,
    seq: AtomicU64,
    /// Entries in the heap (read without the lock to skip it when empty).
    len: AtomicUsize,
    /// Heap size after the last prune: entries of finished jobs are pruned when the
    /// heap has doubled since, so it stays within twice the live deadlines.
    pruned_len: AtomicUsize,
}

impl Deadlines {
    pub(crate) fn new() -> Deadlines {
        Deadlines {
            heap: Mutex::new(BinaryHeap::new()),
            seq: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            pruned_len: AtomicUsize::new(0),
        }
    }

    /// Registers `slot` to expire at `at`. Returns true if it is now the earliest
    /// deadline (the dispatcher should re-evaluate its wake-up time).
    pub(crate) fn register(&self, at: Instant, slot: Arc<Slot>) -> bool {
        let seq = self.seq.fetch_add(1, SeqCst);
        let mut h = self.heap.lock();
        let earliest = h.peek().is_none_or(|e| at < e.at);
        h.push(Entry { at, seq, slot });
        if h.len() >= 1024 && h.len() >= 2 * self.pruned_len.load(SeqCst) {
            // Only the heap holds the slot of a finished job.
            h.retain(|e| Arc::strong_count(&e.slot) > 1 && !e.slot.is_answered());
            self.pruned_len.store(h.len(), SeqCst);
        }
        self.len.store(h.len(), SeqCst);
        earliest
    }

    /// Answers every slot whose deadline is at or before `now`; returns the next
    /// deadline, if any.
    pub(crate) fn expire(&self, now: Instant) -> Option<Instant> {
        if self.len.load(SeqCst) == 0 {
            return None;
        }
        let mut due = Vec::new();
        let next = {
            let mut h = self.heap.lock();
            while h.peek().is_some_and(|e| e.at <= now) {
                due.push(h.pop().expect("peeked").slot);
            }
            self.len.store(h.len(), SeqCst);
            h.peek().map(|e| e.at)
        };
        // Replies (user callbacks) run outside the lock.
        for slot in due {
            slot.expire();
        }
        next
    }
}

impl Attempt for Slot {
    fn attach(&self, attempt: u64, conn: Weak<dyn Conn>, claim: &mut dyn FnMut(u64)) -> bool {
        Slot::attach(self, attempt, conn, claim)
    }
}
