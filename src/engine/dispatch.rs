//! The dispatcher: one thread that takes each job (new or retried) and hands it to a
//! key's worker according to the strategy — without ever polling.
//!
//! Each key's workers receive from a zero-capacity (`bounded(0)`) channel. A worker
//! about to wait on it counts itself idle in its key's [`Gate`](crate::admission::Gate);
//! the dispatcher asks the gates, in strategy order, to admit the job
//! (`Gate::try_admit`: idle worker, cooldown, trial, rate budget and disabled state, all
//! decided and applied in one step, before the hand-off) and sends to the first that
//! does — a send that completes at once, since the worker it took is waiting. A key can
//! never have more than `max_concurrent` requests in flight: it has exactly that many
//! workers and each handles one job at a time.
//!
//! When no key admits the job, the dispatcher blocks in one biased `Select` over
//! shutdown, retries coming back from workers, and events (a worker going idle while
//! `wants_idle` is set, a trial ending, a key cooling or disabled); its only timeout is
//! the next known instant something changes (a cooldown ending, a rate-limit budget
//! refilling, a backoff or a deadline expiring). Deadlines of requests still in the
//! queue are answered here too (`deadline.rs`).
//!
//! When every usable worker is busy the dispatcher leaves new requests in the queue and
//! the first worker to free up takes the next one itself (see `worker::self_serve` and
//! ARCHITECTURE.md): the same choice, without two thread hand-offs per request.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Instant;

use crossbeam_channel::{Receiver, Select, Sender};

use crate::admission::{Admission, Admit, KeyVerdict, Via};
use crate::config::Strategy;
use crate::error::Error;
use crate::job::Job;
use crate::routing;
use crate::shared::Shared;
use crate::worker::panic_message;

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
    /// Jobs set aside: none of the keys they may use could take them while a key they
    /// may not use stood idle. Placed first, oldest first, at every wake-up; counted in
    /// the retry backlog (`Shared::backlog`), so they bound intake like retries do.
    aside: VecDeque<Job>,
    /// Scratch space for the strategy's key order.
    order: Vec<usize>,
    /// Smooth weighted round-robin: each key's weight (`keys[].weight`, else 1: plain
    /// rotation).
    weights: Vec<i64>,
    /// Smooth weighted round-robin: each key's current score.
    current: Vec<i64>,
    /// Scratch: keys `choose` skipped (cannot admit now) in this round.
    skipped: Vec<usize>,
}

/// How `place` ended.
enum Placed {
    /// The job went to a worker or was answered.
    Done,
    /// Shutdown began while the job waited; it has been answered.
    Shutdown,
}

/// Why no key admitted a job now.
struct NotNow {
    /// The next instant a key may admit (cooldown end, budget refill).
    wake: Option<Instant>,
    /// Some preferred key is usable but busy: wait for a worker or a trial.
    busy: bool,
    /// A key's shared limits are unreachable and configured to fail (its index).
    unavailable: Option<usize>,
}

/// Consecutive dispatcher panics after which it gives up (answering everything).
const MAX_CONSECUTIVE_PANICS: u32 = 3;

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What woke the dispatcher, taken out of the select before acting on it.
#[allow(clippy::large_enum_variant)] // lives for one match
enum Woke {
    Shutdown,
    Retry(Job),
    Intake(Job),
    /// A backoff, cooldown or deadline came due, or a key's state changed.
    Nothing,
}

impl Dispatcher {
    /// Blocks until the shutdown signal, a retry, a key event, a new request (only
    /// when `take_intake`) or the instant `wake`. Biased: shutdown first, then
    /// retries (older work) before new requests.
    fn wait(&self, take_intake: bool, wake: Option<Instant>) -> Woke {
        let mut sel = Select::new_biased();
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
        let Some(oper) = selected else {
            return Woke::Nothing;
        };
        match oper.index() {
            i if i == i_shutdown => {
                let _ = oper.recv(&self.shutdown_rx);
                Woke::Shutdown
            }
            i if i == i_retry => oper.recv(&self.retry_rx).map_or(Woke::Nothing, Woke::Retry),
            i if i == i_events => {
                let _ = oper.recv(&self.events_rx);
                Woke::Nothing
            }
            i if i == i_intake => match oper.recv(&self.intake) {
                Ok(job) => {
                    self.shared.took_from(&self.intake);
                    Woke::Intake(job)
                }
                Err(_) => Woke::Shutdown,
            },
            _ => unreachable!("select returned an index it was not given"),
        }
    }

    pub(crate) fn new(
        shared: Arc<Shared>,
        intake: Receiver<Job>,
        retry_rx: Receiver<Job>,
        events_rx: Receiver<()>,
        shutdown_rx: Receiver<()>,
        senders: Vec<Sender<Job>>,
    ) -> Dispatcher {
        let strategy = shared.config.strategy;
        let n = senders.len();
        let weights = shared
            .config
            .keys
            .iter()
            .map(|k| i64::from(k.weight.unwrap_or(1)))
            .collect();
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
            aside: VecDeque::new(),
            order: Vec::with_capacity(n),
            weights,
            current: vec![0; n],
            skipped: Vec::new(),
        }
    }

    /// The dispatcher thread. Each step runs under `catch_unwind`: a panic (a bug, never
    /// a server value) answers the job it held with [`Error::Panic`] (see `Job`'s
    /// `Drop`) and the loop goes on; after repeated panics in a row the dispatcher gives
    /// up for good and answers every queued and later request with an error instead of
    /// leaving them unanswered.
    pub(crate) fn run(mut self) {
        let mut panics = 0;
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.step())) {
                Ok(true) => panics = 0,
                Ok(false) => break,
                Err(p) => {
                    self.shared.wants_idle.store(false, SeqCst);
                    self.shared.dispatcher_waiting.store(false, SeqCst);
                    panics += 1;
                    let msg = panic_message(&p);
                    log::error!("keypool: the dispatcher caught a panic: {msg}");
                    if panics >= MAX_CONSECUTIVE_PANICS {
                        self.fail(msg);
                        return;
                    }
                }
            }
        }
        self.drain();
    }

    /// Takes and places one job. False on shutdown.
    fn step(&mut self) -> bool {
        match self.next_job() {
            Some(job) => {
                #[cfg(test)]
                self.shared.test_maybe_panic();
                !matches!(self.place(job), Placed::Shutdown)
            }
            None => false,
        }
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
    /// and waits for a worker to go idle (`wants_idle` + a nudge) instead. While the
    /// retry backlog is full it takes no new requests at all.
    fn next_job(&mut self) -> Option<Job> {
        loop {
            let now = Instant::now();
            let mut wake = self.shared.deadlines.expire(now);
            let exhausted = self.shared.spend.is_exhausted();
            if exhausted {
                // The spend cap is reached: retries waiting out a backoff end now too
                // (placing answers them).
                while let Some(d) = self.delayed.pop() {
                    self.ready.push_back(d.job);
                }
            }
            self.promote_due(now);
            if !self.aside.is_empty() {
                // Announced before trying, so a worker that goes idle after the try
                // nudges (one that went idle before it is seen by the try).
                self.shared.wants_idle.store(true, SeqCst);
                wake = earliest(wake, self.place_aside(now));
            }
            if let Some(j) = self.ready.pop_front() {
                self.shared.backlog.fetch_sub(1, SeqCst);
                return Some(j);
            }
            let backlog_full = self.shared.backlog_full();
            // (With every key disabled no worker will ever take a request: the
            // dispatcher takes it and answers `NoUsableKey`.)
            let take_intake = exhausted
                || !backlog_full
                    && (!self.shared.self_serve
                        || self.shared.any_usable_idle(now)
                        || self.shared.keys.iter().all(|k| k.gate.is_disabled()));
            wake = earliest(wake, self.delayed.peek().map(|d| d.at));
            if !take_intake && !backlog_full {
                self.shared.wants_idle.store(true, SeqCst);
                // Re-check after announcing, so a worker going idle in between is seen
                // either here or by its own nudge.
                if self.shared.any_usable_idle(Instant::now()) {
                    self.shared.wants_idle.store(false, SeqCst);
                    continue;
                }
                // Idle workers of a cooling key become usable when the cooldown ends.
                for k in &self.shared.keys {
                    if k.gate.idle() > 0 {
                        wake = earliest(wake, k.gate.cooling_until(now));
                    }
                }
            }
            if !self.aside.is_empty() {
                self.shared.wants_idle.store(true, SeqCst);
            }
            let woke = self.wait(take_intake, wake);
            self.shared.wants_idle.store(false, SeqCst);
            match woke {
                Woke::Shutdown => return None,
                Woke::Retry(job) => self.defer(job),
                Woke::Intake(job) => return Some(job),
                Woke::Nothing => {}
            }
        }
    }

    /// Fills `self.order` with the keys of `pass` in the strategy's preference order.
    fn order_keys(&mut self, pass: impl Fn(usize) -> bool) {
        let keys = &self.shared.keys;
        let n = keys.len();
        self.order.clear();
        match self.strategy {
            Strategy::FirstAvailable => self.order.extend((0..n).filter(|&i| pass(i))),
            Strategy::RoundRobin => {
                // Smooth weighted round-robin (nginx; weight 1 each: plain rotation):
                // the key whose score would be highest after this round's increase goes
                // first; ties to config order. A key that cannot take the job now is
                // skipped, not waited for (`choose`).
                self.order.extend((0..n).filter(|&i| pass(i)));
                let (cur, w) = (&self.current, &self.weights);
                self.order
                    .sort_by_key(|&i| std::cmp::Reverse(cur[i].saturating_add(w[i])));
            }
            Strategy::LeastLoaded => {
                self.order.extend((0..n).filter(|&i| pass(i)));
                // Fewest in flight relative to capacity; stable sort keeps config order
                // on ties.
                self.order.sort_by(|&a, &b| {
                    let (ka, kb) = (&keys[a], &keys[b]);
                    let la = ka.in_flight.load(Relaxed) * kb.max_concurrent;
                    let lb = kb.in_flight.load(Relaxed) * ka.max_concurrent;
                    la.cmp(&lb)
                });
            }
        }
    }

    /// Asks the keys, in strategy order, to admit `job`; the first that does has taken
    /// it (idle worker, trial, budget all applied). A retry prefers keys it has not
    /// tried: the keys it tried are asked only if no untried key is usable at all.
    fn choose(&mut self, job: &Job, now: Instant) -> Result<(usize, Admission), NotNow> {
        let mut not_now = NotNow {
            wake: None,
            busy: false,
            unavailable: None,
        };
        if let Some(h) = job.affinity {
            return self.choose_by_affinity(job, h, now, not_now);
        }
        let passes: &[bool] = if job.tried.is_empty() {
            &[true]
        } else {
            &[false, true]
        };
        for &tried_pass in passes {
            if job.tried.is_empty() {
                self.order_keys(|_| true);
            } else {
                self.order_keys(|i| job.tried.contains(&i) == tried_pass);
            }
            self.skipped.clear();
            for idx in 0..self.order.len() {
                let i = self.order[idx];
                match routing::admit(&self.shared, i, job, Via::Dispatcher, now) {
                    Admit::Yes(adm) => {
                        if self.strategy == Strategy::RoundRobin {
                            self.swrr_pick(i, now);
                        }
                        return Ok((i, adm));
                    }
                    Admit::WakeAt(at) => {
                        not_now.wake = earliest(not_now.wake, Some(at));
                        self.skipped.push(i);
                    }
                    // Busy (every worker taken, a trial out, at its learned limit, its
                    // group full): the next key in order may take it — round-robin too,
                    // where the busy key keeps its turn (its score) for when it admits.
                    Admit::Busy => not_now.busy = true,
                    Admit::Never => self.skipped.push(i),
                    Admit::Unavailable => not_now.unavailable = Some(i),
                }
            }
            if not_now.busy {
                break; // an untried key is usable, only busy: wait for it
            }
        }
        Err(not_now)
    }

    /// A job with an affinity: the keys that serve it by rendezvous weight (a retry
    /// asks the keys it has not tried first, in the same order, so a session moves to
    /// one next key, not around); one that is out or cooling is passed over, one that
    /// is only busy is waited for (the job is set aside meanwhile if another key stands
    /// idle, so nothing waits behind it). The rotation's scores are left alone.
    fn choose_by_affinity(
        &mut self,
        job: &Job,
        h: u64,
        now: Instant,
        mut not_now: NotNow,
    ) -> Result<(usize, Admission), NotNow> {
        let sh = &self.shared;
        self.order.clear();
        self.order
            .extend((0..sh.keys.len()).filter(|&i| routing::serves(job, i)));
        self.order.sort_by_key(|&i| {
            let weight = std::cmp::Reverse(routing::affinity_weight(sh, i, h));
            (job.tried.contains(&i), weight, i)
        });
        for idx in 0..self.order.len() {
            let i = self.order[idx];
            match routing::admit(sh, i, job, Via::Dispatcher, now) {
                Admit::Yes(adm) => return Ok((i, adm)),
                Admit::WakeAt(at) => not_now.wake = earliest(not_now.wake, Some(at)),
                Admit::Busy => {
                    not_now.busy = true;
                    break; // its key: wait for it
                }
                Admit::Never => {}
                Admit::Unavailable => not_now.unavailable = Some(i),
            }
        }
        Err(not_now)
    }

    /// Smooth weighted round-robin's step for a pick of `i`: every key that could
    /// take requests this round (ordered, not skipped, not disabled or cooling — a busy
    /// key keeps its turn) gains its weight, and the picked one gives back the round's
    /// total. A score never exceeds the weights' sum: a key busy for a long stretch is
    /// owed at most one round when it admits again, not a burst.
    fn swrr_pick(&mut self, i: usize, now: Instant) {
        let w = &self.weights;
        let cap: i64 = w.iter().fold(0, |a, &b| a.saturating_add(b));
        let mut total: i64 = 0;
        for &j in &self.order {
            let gate = &self.shared.keys[j].gate;
            if j == i
                || !(self.skipped.contains(&j)
                    || gate.is_disabled()
                    || gate.cooling_until(now).is_some())
            {
                self.current[j] = self.current[j].saturating_add(w[j]).min(cap);
                total = total.saturating_add(w[j]);
            }
        }
        self.current[i] = self.current[i].saturating_sub(total);
    }

    fn no_usable_key(&self, job: &Job) -> Error {
        let detail = self
            .shared
            .keys
            .iter()
            .map(|k| {
                let reason = k
                    .gate
                    .disabled()
                    .map_or_else(|| "disabled".to_owned(), |(r, _)| r);
                format!("{}: {reason}", k.label)
            })
            .collect::<Vec<_>>()
            .join("; ");
        // The key that answered the job's last attempt, if it made one.
        let key = match &job.last_error {
            Some(e) if e.response().is_some() => e.response().map(|r| r.key_label().to_owned()),
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

    /// Hands an admitted job to key `i`'s idle worker.
    fn hand_off(&mut self, i: usize, adm: Admission, mut job: Job) {
        job.admission = Some((i, adm));
        // The admission took a worker that is waiting (or about to wait) to receive,
        // so this completes at once.
        if let Err(e) = self.senders[i].send(job) {
            // The key's workers are gone (shutdown): settle the admission; dropping the
            // job answers it.
            let mut job = e.into_inner();
            job.admission = None;
            let gate = &self.shared.keys[i].gate;
            gate.refund(adm);
            gate.complete(adm, &KeyVerdict::default(), Instant::now());
        }
    }

    /// Whether every key serving `job`'s model is out (disabled, cooling, or the model
    /// cooling there) until at or past the job's deadline: waiting cannot serve it.
    /// False for a job without a deadline (a cooling model is waited for).
    fn out_past_deadline(&self, job: &Job, now: Instant) -> bool {
        let Some(deadline) = job.deadline else {
            return false;
        };
        let sh = &self.shared;
        (0..sh.keys.len())
            .filter(|&i| routing::serves(job, i))
            .all(|i| {
                !routing::could_serve(sh, i, job)
                    || sh.keys[i]
                        .gate
                        .cooling_until(now)
                        .is_some_and(|t| t >= deadline)
                    || matches!(
                        sh.models.refuses(i, || job.model(), now),
                        Some(Admit::WakeAt(t)) if t >= deadline
                    )
            })
    }

    /// One try at placing `job` now: handed to a worker, or answered (deadline passed,
    /// no key could ever serve it, shared limits unreachable) — `Ok` — or, when no key
    /// admits it now, the job back with why.
    #[allow(clippy::result_large_err)] // the job itself comes back: moved, not boxed
    fn try_place(&mut self, mut job: Job, now: Instant) -> Result<(), (Job, NotNow)> {
        if job.is_answered() {
            return Ok(()); // its deadline passed while it waited
        }
        if job.req.is_cancelled() {
            job.finish(Err(Error::Cancelled)); // given up by its caller, never sent
            return Ok(());
        }
        if job.deadline.is_some_and(|d| now >= d) {
            job.finish_deadline();
            return Ok(());
        }
        if let Some(e) = self.shared.spend.refusal() {
            job.finish(Err(e)); // the spend cap is reached: nothing more is sent
            return Ok(());
        }
        let n = self.shared.keys.len();
        if !job.fallbacks.is_empty() {
            // Its model cannot be served anywhere, the provider said it is overloaded,
            // or every key serving it is out past the job's deadline: the next
            // fallback model's keys may serve it.
            let overloaded = std::mem::take(&mut job.model_overloaded);
            if (overloaded
                || !(0..n).any(|i| routing::could_serve(&self.shared, i, &job))
                || self.out_past_deadline(&job, now))
                && job.next_fallback(&self.shared)
            {
                return self.try_place(job, now);
            }
        }
        if !(0..n).any(|i| routing::could_serve(&self.shared, i, &job)) {
            // The model is missing wherever it was asked: that answer (a 404 blamed on
            // the model) says more than "no usable key".
            let model_missing = (0..n).any(|i| {
                routing::serves(&job, i)
                    && !self.shared.keys[i].gate.is_disabled()
                    && job.last_error.is_some()
            });
            let e = match job.last_error.take() {
                Some(e) if model_missing => e,
                last => {
                    job.last_error = last;
                    self.no_usable_key(&job)
                }
            };
            job.finish(Err(e));
            return Ok(());
        }
        match self.choose(&job, now) {
            Ok((i, adm)) => {
                self.hand_off(i, adm, job);
                Ok(())
            }
            Err(NotNow {
                unavailable: Some(i),
                ..
            }) => {
                // Shared limits unreachable, `on_unavailable: fail`: a typed error now.
                job.finish(Err(self.shared.keys[i].gate.shared_unavailable_error()));
                Ok(())
            }
            Err(n) => Err((job, n)),
        }
    }

    /// Places the jobs set aside, oldest first. A job that still cannot go stays, and
    /// so do the later ones of its kind (same keys, same model: no key that refused
    /// the first would take them), in order. Returns the earliest instant one of them
    /// may go (a cooldown's end).
    fn place_aside(&mut self, now: Instant) -> Option<Instant> {
        if self.aside.is_empty() {
            self.shared.aside.store(0, SeqCst);
            return None;
        }
        let mut kept = VecDeque::with_capacity(self.aside.len());
        let mut stuck: Vec<(usize, Option<Arc<str>>)> = Vec::new();
        let mut wake = None;
        let models = self.shared.models.is_active();
        while let Some(job) = self.aside.pop_front() {
            // Retries (which asked keys in another order) and jobs bound to a key by
            // their affinity are each their own kind.
            let kind = (job.tried.is_empty() && job.affinity.is_none()).then(|| {
                let serves = job.serves.as_ref().map_or(0, |s| s.as_ptr() as usize);
                (serves, models.then(|| job.model().cloned()).flatten())
            });
            if kind.as_ref().is_some_and(|k| stuck.contains(k)) {
                kept.push_back(job);
                continue;
            }
            match self.try_place(job, now) {
                Ok(()) => {
                    self.shared.backlog.fetch_sub(1, SeqCst);
                }
                Err((job, n)) => {
                    wake = earliest(wake, n.wake);
                    stuck.extend(kind);
                    kept.push_back(job);
                }
            }
        }
        self.aside = kept;
        self.shared.aside.store(self.aside.len(), SeqCst);
        wake
    }

    /// Hands `job` to a worker, waiting (without polling) for a key to admit it — or,
    /// when a key it may not use stands idle meanwhile, setting it aside so the jobs
    /// behind it do not wait for it.
    fn place(&mut self, job: Job) -> Placed {
        let mut job = job;
        loop {
            let now = Instant::now();
            let next_deadline = self.shared.deadlines.expire(now);
            // Retries whose backoff ended queue behind this job: the wait below only
            // ever names a future instant (a due one would make it return at once,
            // again and again, for as long as every key refuses this job).
            self.promote_due(now);
            // The jobs set aside are older: they go first wherever they can. Announced
            // before the try, so a worker of their keys that goes idle after it nudges.
            if !self.aside.is_empty() {
                self.shared.wants_idle.store(true, SeqCst);
            }
            let aside_wake = self.place_aside(now);
            let not_now = match self.try_place(job, now) {
                Ok(()) => return Placed::Done,
                Err((j, n)) => {
                    job = j;
                    n
                }
            };
            if self.aside.len() < self.shared.config.queue_capacity
                && self.shared.any_usable_idle(now)
            {
                // No key this job may use can take it now, yet another key stands idle:
                // the jobs behind this one must not wait for it (head-of-line blocking).
                // It waits aside, first in line for its keys; counted in the backlog.
                self.shared.backlog.fetch_add(1, SeqCst);
                self.aside.push_back(job);
                self.shared.aside.store(self.aside.len(), SeqCst);
                return Placed::Done;
            }
            if let (Some(at), false, false) = (not_now.wake, not_now.busy, job.tried.is_empty()) {
                // A retry that only waits for an instant (its keys cool, or its model
                // cools on them): set it aside until then, so the requests behind it
                // do not wait for it (it stays counted in the retry backlog).
                self.shared.backlog.fetch_add(1, SeqCst);
                job.not_before = Some(at);
                self.defer(job);
                return Placed::Done;
            }
            // Wait for a worker to go idle, a trial to end, a key to change, or the
            // next known instant. While waiting on a busy key, workers that free up
            // come to this job rather than taking newer requests past it.
            self.shared.wants_idle.store(true, SeqCst);
            self.shared.dispatcher_waiting.store(not_now.busy, SeqCst);
            // Re-check after announcing: a worker that went idle before it could see
            // `wants_idle` did not nudge.
            if let Ok((i, adm)) = self.choose(&job, Instant::now()) {
                self.shared.wants_idle.store(false, SeqCst);
                self.shared.dispatcher_waiting.store(false, SeqCst);
                self.hand_off(i, adm, job);
                return Placed::Done;
            }
            let wake = earliest(earliest(not_now.wake, job.deadline), next_deadline);
            let wake = earliest(wake, self.delayed.peek().map(|d| d.at));
            let wake = earliest(wake, aside_wake);
            let woke = self.wait(false, wake);
            self.shared.wants_idle.store(false, SeqCst);
            self.shared.dispatcher_waiting.store(false, SeqCst);
            match woke {
                Woke::Shutdown => {
                    drop(job); // answers Cancelled (or its last attempt's error)
                    return Placed::Shutdown;
                }
                Woke::Retry(r) => self.defer(r),
                Woke::Intake(_) => unreachable!("wait(false, …) never takes from the intake"),
                Woke::Nothing => {}
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
            aside,
            shared,
            ..
        } = self;
        drop(senders);
        drop(ready);
        drop(delayed);
        drop(aside); // each answers `Cancelled` (or its last attempt's error)
        // Dropping the unbounded retry receiver discards (and so answers) anything in it;
        // workers whose retry send fails drop the job, which answers it too.
        drop(retry_rx);
        for job in intake.iter() {
            shared.took_from(&intake);
            job.finish(Err(Error::Cancelled));
        }
    }

    /// The dispatcher gave up after repeated panics: refuse new requests, answer every
    /// job it holds or will receive with an error, and end at shutdown.
    fn fail(mut self, msg: String) {
        let error = || Error::Panic(format!("the keypool dispatcher failed: {msg}"));
        *self.shared.broken.lock() = Some(msg.clone());
        self.shared.closing.store(true, SeqCst);
        // Submitters waiting for queue space stop waiting: their jobs go in and are
        // answered with the error below.
        self.shared.space.wake_all();
        // Workers finish their current attempt and exit.
        self.senders.clear();
        for job in std::mem::take(&mut self.ready) {
            job.finish(Err(error()));
        }
        for d in std::mem::take(&mut self.delayed) {
            d.job.finish(Err(error()));
        }
        for job in std::mem::take(&mut self.aside) {
            job.finish(Err(error()));
        }
        loop {
            match self.wait(true, None) {
                Woke::Shutdown => break,
                Woke::Retry(job) | Woke::Intake(job) => job.finish(Err(error())),
                Woke::Nothing => {}
            }
        }
        let Dispatcher {
            intake,
            retry_rx,
            shared,
            ..
        } = self;
        drop(retry_rx);
        for job in intake.iter() {
            shared.took_from(&intake);
            job.finish(Err(error()));
        }
    }
}
