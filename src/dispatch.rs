//! The dispatcher: one thread that takes each job (new or retried) and hands it to a
//! key's worker according to the strategy — without ever polling.
//!
//! Each key's workers receive from a zero-capacity (`bounded(0)`) channel. A send on it
//! completes only when one of the key's workers is idle and waiting, so:
//! - "does key `i` have an idle worker?" is its idle count (raised by a worker just
//!   before it waits, lowered here when a send completes), and a send to such a key
//!   completes at once;
//! - "wait until any of these keys has an idle worker" is a `crossbeam_channel::Select`
//!   over their senders, which blocks on the channels' wait queues;
//! - a key can never have more than `max_concurrent` requests in flight, because it has
//!   exactly that many workers and each handles one job at a time.
//!
//! The same `Select` also listens for shutdown, retries coming back from workers, and key
//! health changes; its only timeout is the next known instant something changes (a
//! cooldown ending, a rate-limit budget refilling, a backoff or deadline expiring).
//!
//! When every usable worker is busy the dispatcher leaves new requests in the queue and
//! the first worker to free up takes the next one itself (see `worker::self_serve` and
//! ARCHITECTURE.md): the same choice, without two thread hand-offs per request.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use crossbeam_channel::{Receiver, Select, Sender};

use crate::config::Strategy;
use crate::error::Error;
use crate::job::Job;
use crate::shared::Shared;

/// A retry waiting out its backoff.
struct Delayed {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub(crate) struct Dispatcher {
    pub shared: Arc<Shared>,
    pub intake: Receiver<Job>,
    pub retry_rx: Receiver<Job>,
    pub events_rx: Receiver<()>,
    /// Never carries a message: its sender is dropped to signal shutdown.
    pub shutdown_rx: Receiver<()>,
    /// One zero-capacity sender per key, in config order.
    pub senders: Vec<Sender<Job>>,
    pub strategy: Strategy,
    ready: VecDeque<Job>,
    delayed: BinaryHeap<Delayed>,
    seq: u64,
    rr_next: usize,
}

/// How `place` ended.
enum Placed {
    /// The job went to a worker or was answered.
    Done,
    /// Shutdown began while the job waited; it has been answered.
    Shutdown,
}

impl Dispatcher {
    pub(crate) fn new(
        shared: Arc<Shared>,
        intake: Receiver<Job>,
        retry_rx: Receiver<Job>,
        events_rx: Receiver<()>,
        shutdown_rx: Receiver<()>,
        senders: Vec<Sender<Job>>,
    ) -> Dispatcher {
        let strategy = shared.config.strategy;
        Dispatcher {
            shared,
            intake,
            retry_rx,
            events_rx,
            shutdown_rx,
            senders,
            strategy,
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            seq: 0,
            rr_next: 0,
        }
    }

    pub(crate) fn run(mut self) {
        while let Some(job) = self.next_job() {
            if let Placed::Shutdown = self.place(job) {
                break;
            }
        }
        self.drain();
    }

    /// Queues a job handed back by a worker (a retry, or a bounce off a cooling key).
    fn defer(&mut self, mut job: Job) {
        match job.not_before.take() {
            Some(at) if at > Instant::now() => {
                self.seq += 1;
                self.delayed.push(Delayed {
                    at,
                    seq: self.seq,
                    job,
                });
            }
            _ => self.ready.push_back(job),
        }
    }

    fn promote_due(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|d| d.at <= now) {
            let d = self.delayed.pop().expect("peeked");
            self.ready.push_back(d.job);
        }
    }

    /// The next job to place: a due retry first, else a new request. `None` on shutdown.
    ///
    /// With self-serve on (every strategy but round-robin), the dispatcher takes new
    /// requests only while some usable worker is idle; when all are busy it leaves the
    /// queue to the workers, which take the next request themselves as they free up,
    /// and waits for a worker to go idle (`wants_idle` + a nudge) instead.
    fn next_job(&mut self) -> Option<Job> {
        loop {
            let now = Instant::now();
            self.promote_due(now);
            if let Some(j) = self.ready.pop_front() {
                return Some(j);
            }
            // (With every key disabled no worker will ever take a request: the
            // dispatcher takes it and answers `NoUsableKey`.)
            let take_intake = !self.shared.self_serve
                || self.shared.any_usable_idle(now)
                || self.shared.keys.iter().all(|k| k.is_disabled());
            let mut wake = self.delayed.peek().map(|d| d.at);
            if !take_intake {
                self.shared.wants_idle.store(true, SeqCst);
                // Re-check after announcing, so a worker going idle in between is seen
                // either here or by its own nudge.
                if self.shared.any_usable_idle(Instant::now()) {
                    self.shared.wants_idle.store(false, SeqCst);
                    continue;
                }
                // Idle workers of a cooling key become usable when the cooldown ends.
                for k in &self.shared.keys {
                    if k.idle.load(SeqCst) > 0 {
                        if let Some(until) = k.cooling_until(now) {
                            wake = Some(wake.map_or(until, |w| w.min(until)));
                        }
                    }
                }
            }
            // What woke us, taken out of the select before acting on it.
            enum Woke {
                Shutdown,
                Retry(Job),
                Intake(Job),
                Nothing,
            }
            let woke = {
                let mut sel = Select::new();
                let i_shutdown = sel.recv(&self.shutdown_rx);
                let i_retry = sel.recv(&self.retry_rx);
                let i_events = sel.recv(&self.events_rx);
                let i_intake = if take_intake {
                    sel.recv(&self.intake)
                } else {
                    usize::MAX
                };
                let selected = match wake {
                    Some(at) => sel.select_deadline(at).ok(),
                    None => Some(sel.select()),
                };
                match selected {
                    None => Woke::Nothing, // a backoff or cooldown ended
                    Some(oper) => match oper.index() {
                        i if i == i_shutdown => {
                            let _ = oper.recv(&self.shutdown_rx);
                            Woke::Shutdown
                        }
                        i if i == i_retry => {
                            oper.recv(&self.retry_rx).map_or(Woke::Nothing, Woke::Retry)
                        }
                        i if i == i_events => {
                            let _ = oper.recv(&self.events_rx);
                            Woke::Nothing
                        }
                        i if i == i_intake => {
                            oper.recv(&self.intake).map_or(Woke::Shutdown, Woke::Intake)
                        }
                        _ => unreachable!("select returned an index it was not given"),
                    },
                }
            };
            self.shared.wants_idle.store(false, SeqCst);
            match woke {
                Woke::Shutdown => return None,
                Woke::Retry(job) => self.defer(job),
                Woke::Intake(job) => return Some(job),
                Woke::Nothing => {}
            }
        }
    }

    /// The keys `job` may go to now, in the order the strategy prefers them; or why none.
    fn candidates(&self, job: &Job, now: Instant) -> Result<Vec<usize>, Option<Instant>> {
        let keys = &self.shared.keys;
        let mut wake: Option<Instant> = None;
        let mut usable = Vec::with_capacity(keys.len());
        // Keys whose first (probe) request is still out: busy, not unusable. A worker
        // nudges the dispatcher when the probe ends.
        let mut probing = Vec::new();
        for k in keys {
            if k.is_disabled() {
                continue;
            }
            if let Some(until) = k.cooling_until(now) {
                wake = Some(wake.map_or(until, |w| w.min(until)));
                continue;
            }
            if k.has_limits() {
                if let Some(at) = k.budget_ready_at(job.est_tokens, now) {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    continue;
                }
            }
            if !k.probe_allows() {
                probing.push(k.index);
                continue;
            }
            usable.push(k.index);
        }
        // Failover: a retry prefers keys it has not tried yet.
        if !job.tried.is_empty() {
            let fresh: Vec<usize> = usable
                .iter()
                .copied()
                .filter(|i| !job.tried.contains(i))
                .collect();
            if !fresh.is_empty() {
                usable = fresh;
            }
        }
        if self.strategy == Strategy::RoundRobin && !probing.is_empty() {
            // Strict rotation waits for a busy key rather than skipping it.
            let n = keys.len();
            let next = (0..n)
                .map(|off| (self.rr_next + off) % n)
                .find(|i| usable.contains(i) || probing.contains(i));
            if next.is_some_and(|i| probing.contains(&i)) {
                return Err(wake);
            }
        }
        if usable.is_empty() {
            return Err(wake);
        }
        match self.strategy {
            Strategy::FirstAvailable => {}
            Strategy::LeastLoaded => {
                // Fewest in flight relative to capacity; stable sort keeps config order on ties.
                usable.sort_by(|&a, &b| {
                    let (ka, kb) = (&keys[a], &keys[b]);
                    let la =
                        ka.in_flight.load(std::sync::atomic::Ordering::Relaxed) * kb.max_concurrent;
                    let lb =
                        kb.in_flight.load(std::sync::atomic::Ordering::Relaxed) * ka.max_concurrent;
                    la.cmp(&lb)
                });
            }
            Strategy::RoundRobin => {
                // Strict rotation: only the next usable key at or after the cursor.
                let n = keys.len();
                let next = (0..n)
                    .map(|off| (self.rr_next + off) % n)
                    .find(|i| usable.contains(i))
                    .expect("usable is not empty");
                usable = vec![next];
            }
        }
        Ok(usable)
    }

    fn no_usable_key(&self, job: &Job) -> Error {
        let detail = self
            .shared
            .keys
            .iter()
            .map(|k| {
                format!(
                    "{}: {}",
                    k.label,
                    k.disabled_reason().unwrap_or_else(|| "disabled".into())
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        // The key that answered the job's last attempt, if it made one.
        let key = match &job.last_error {
            Some(Error::Http { response, .. }) => Some(response.key_label().to_owned()),
            Some(Error::Transport { key, .. }) if !key.is_empty() => Some(key.clone()),
            Some(Error::Timeout { key, .. }) => key.clone(),
            _ => None,
        };
        Error::NoUsableKey {
            detail,
            attempts: job.attempts,
            key,
        }
    }

    fn sent(&mut self, key: usize, job_tokens: u64) {
        let k = &self.shared.keys[key];
        // A send completes only into a waiting worker: it is idle no more. (Counted
        // here rather than by the worker, so the next decision never sees it as idle.)
        k.idle.fetch_sub(1, SeqCst);
        k.note_dispatched();
        if k.has_limits() {
            k.spend(job_tokens);
        }
        self.rr_next = (key + 1) % self.senders.len();
    }

    /// Hands `job` to a worker, waiting (without polling) for one to be free.
    fn place(&mut self, mut job: Job) -> Placed {
        loop {
            let now = Instant::now();
            if job.deadline.is_some_and(|d| now >= d) {
                job.finish_deadline();
                return Placed::Done;
            }
            if self.shared.keys.iter().all(|k| k.is_disabled()) {
                let e = self.no_usable_key(&job);
                job.finish(Err(e));
                return Placed::Done;
            }
            let (order, wake) = match self.candidates(&job, now) {
                Ok(order) => (order, None),
                Err(wake) => (Vec::new(), wake),
            };
            // Fast path: the first preferred key with an idle worker takes it. A worker
            // counts itself idle just before it waits to receive, and only this thread
            // sends, so a send to a key with idle > 0 completes at once (the worker is
            // in, or entering, its receive) — no race with a worker still on its way.
            let tokens = job.est_tokens;
            for &i in &order {
                if self.shared.keys[i].idle.load(SeqCst) == 0 {
                    continue;
                }
                match self.senders[i].send(job) {
                    Ok(()) => {
                        self.sent(i, tokens);
                        return Placed::Done;
                    }
                    Err(e) => job = e.into_inner(),
                }
            }
            // Slow path: block until a candidate's worker frees up, or something changes.
            let wake = match (wake, job.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut sel = Select::new();
            let i_shutdown = sel.recv(&self.shutdown_rx);
            let i_retry = sel.recv(&self.retry_rx);
            let i_events = sel.recv(&self.events_rx);
            let base = 3;
            for &i in &order {
                sel.send(&self.senders[i]);
            }
            // While blocked here, workers that free up come to this job rather than
            // taking newer requests past it.
            self.shared
                .dispatcher_waiting
                .store(!order.is_empty(), SeqCst);
            let oper = match wake {
                Some(at) => match sel.select_deadline(at) {
                    Ok(op) => op,
                    Err(_) => {
                        self.shared.dispatcher_waiting.store(false, SeqCst);
                        continue;
                    }
                },
                None => sel.select(),
            };
            self.shared.dispatcher_waiting.store(false, SeqCst);
            match oper.index() {
                i if i == i_shutdown => {
                    let _ = oper.recv(&self.shutdown_rx);
                    drop(job); // answers Cancelled (or its last attempt's error)
                    return Placed::Shutdown;
                }
                i if i == i_retry => {
                    if let Ok(r) = oper.recv(&self.retry_rx) {
                        self.defer(r);
                    }
                }
                i if i == i_events => {
                    let _ = oper.recv(&self.events_rx);
                }
                i => {
                    let key = order[i - base];
                    match oper.send(&self.senders[key], job) {
                        Ok(()) => {
                            self.sent(key, tokens);
                            return Placed::Done;
                        }
                        Err(e) => job = e.into_inner(),
                    }
                }
            }
        }
    }

    /// Shutdown: answer everything still held, let workers exit after their current
    /// request, and cancel whatever is still queued. The pool has dropped its intake
    /// sender; `submit` calls already past the closed check hold clones, so the drain
    /// below ends exactly when the last of them has delivered its job.
    fn drain(self) {
        let Dispatcher {
            intake,
            retry_rx,
            senders,
            ready,
            delayed,
            ..
        } = self;
        drop(senders);
        drop(ready);
        drop(delayed);
        // Dropping the unbounded retry receiver discards (and so answers) anything in it;
        // workers whose retry send fails drop the job, which answers it too.
        drop(retry_rx);
        for job in intake.iter() {
            job.finish(Err(Error::Cancelled));
        }
    }
}
