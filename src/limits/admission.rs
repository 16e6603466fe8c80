//! One admission state machine per key: "may this key take a request now?" is decided
//! here and nowhere else.
//!
//! The state (idle workers, trial, cooldown, rate budget, disabled/parked) lives under
//! one lock. [`Gate::try_admit`] checks every rule and, when it admits, applies the
//! admission in the same critical section — before the job is handed to a worker — so
//! two callers can never both take the last slot, the only trial, or the last token.
//! [`Gate::complete`] is called exactly once per admission, after the attempt (or when
//! the job left the key unsent), and applies the attempt's verdict for the key.
//!
//! Trial ("half-open"): a key whose ability to serve is in doubt takes one request at
//! a time until one is answered. A key starts in doubt when key probing is on (a
//! revoked key then costs one request, not `max_concurrent`), and is put in doubt by
//! every 429: when its cooldown ends, one request goes first and the others follow
//! only once it was answered without a 429 — not a burst of every worker at once.
//!
//! Lock-free mirrors (`idle`, `disabled`, `cooldown_until`, `trial_out`) let the
//! dispatcher's and workers' heuristics ("is any usable worker idle?") and stats read
//! the state without the lock; every decision that admits goes through the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::adaptive::Aimd;
use crate::group::GroupGate;

/// The longest wait a rate budget ever asks for: a bucket can owe at most one minute of
/// its rate, so it refills within a minute whatever a server reported.
const MAX_BUDGET_WAIT: Duration = Duration::from_secs(60);

/// Converts seconds to a `Duration`, saturating (never panics on NaN, ∞ or huge values).
pub(crate) fn secs_saturating(secs: f64, max: Duration) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else if secs >= max.as_secs_f64() {
        max
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// A token bucket: `capacity` tokens, refilled at `rate` per second. Its debt (negative
/// balance, after a response used more tokens than estimated) is bounded by one
/// minute's worth, so no server-reported usage can park a key for longer than that.
#[derive(Debug)]
pub(crate) struct Bucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    /// The lowest the balance may go (about minus one minute of refill).
    floor: f64,
    last: Instant,
}

impl Bucket {
    /// `per_minute` with a burst of about one second's worth (at least 1): any window of
    /// `T` seconds sees at most `per_minute·T/60 + burst`.
    pub(crate) fn per_minute(per_minute: f64, now: Instant) -> Bucket {
        let capacity = (per_minute / 60.0).ceil().max(1.0);
        Bucket {
            capacity,
            tokens: capacity,
            rate: per_minute / 60.0,
            // Owing at most a minute's refill, less the burst: any request fits again
            // within `MAX_BUDGET_WAIT`.
            floor: capacity - per_minute,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// `None` if `n` tokens are available now, else when they will be (at most a minute
    /// away).
    pub(crate) fn ready_at(&mut self, n: f64, now: Instant) -> Option<Instant> {
        self.refill(now);
        let n = n.min(self.capacity);
        if self.tokens >= n {
            None
        } else {
            Some(now + secs_saturating((n - self.tokens) / self.rate, MAX_BUDGET_WAIT))
        }
    }

    pub(crate) fn take(&mut self, n: f64) {
        self.tokens = (self.tokens - n.min(self.capacity)).max(self.floor);
    }

    /// Adds back `estimated − actual` tokens (either sign), within the floor and cap.
    pub(crate) fn correct(&mut self, estimated: u64, actual: u64) {
        let delta = estimated as f64 - actual as f64;
        self.tokens = (self.tokens + delta).clamp(self.floor, self.capacity);
    }

    /// The balance now.
    pub(crate) fn balance(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// `limit` per `window` (at least [`MIN_WINDOW`](crate::ratelimit::MIN_WINDOW)),
    /// with a burst of a sixtieth of the limit (at least 1) — for a per-minute budget
    /// about one second's worth, like a configured one — and a debt of at most one
    /// window. Starts with `level` tokens (at most the burst).
    fn learned(limit: u64, window: Duration, level: f64, now: Instant) -> Bucket {
        let mut b = Bucket {
            capacity: 1.0,
            tokens: 0.0,
            rate: 1.0,
            floor: 0.0,
            last: now,
        };
        b.set_rate(limit, window);
        b.tokens = level.clamp(0.0, b.capacity);
        b
    }

    /// Changes the rate to `limit` per `window` (refill up to now at the old rate first).
    fn set_rate(&mut self, limit: u64, window: Duration) {
        let limit = limit.clamp(1, crate::ratelimit::MAX_COUNT) as f64;
        let window = window.max(crate::ratelimit::MIN_WINDOW).as_secs_f64();
        self.capacity = (limit / 60.0).ceil().max(1.0);
        self.rate = limit / window;
        self.floor = self.capacity - limit;
        self.tokens = self.tokens.clamp(self.floor, self.capacity);
    }
}

/// A daily request quota (`rpd`): `limit` requests per UTC day, counted from 0 at
/// every midnight UTC (the day OpenRouter's free-model quota resets on).
#[derive(Debug)]
pub(crate) struct Daily {
    limit: u32,
    used: u32,
    /// Days since the Unix epoch (UTC) `used` counts.
    day: u64,
}

/// Today as days since the Unix epoch (UTC), and how long until the next midnight UTC.
pub(crate) fn utc_day() -> (u64, Duration) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let day = (secs / 86_400.0).floor();
    let left = (day + 1.0) * 86_400.0 - secs;
    (
        day as u64,
        secs_saturating(left, Duration::from_secs(86_400)),
    )
}

impl Daily {
    pub(crate) fn new(limit: u32) -> Daily {
        Daily {
            limit,
            used: 0,
            day: utc_day().0,
        }
    }

    /// Whether today's quota is spent (a new day starts the count over).
    pub(crate) fn spent(&mut self, day: u64) -> bool {
        if day != self.day {
            self.day = day;
            self.used = 0;
        }
        self.used >= self.limit
    }

    /// Counts one request; true if that spent the quota.
    pub(crate) fn take(&mut self) -> bool {
        self.used = self.used.saturating_add(1);
        self.used >= self.limit
    }

    /// Gives back a request that never reached the wire.
    pub(crate) fn refund(&mut self) {
        self.used = self.used.saturating_sub(1);
    }

    /// Raises the count to `used` if `day` is the one counted: requests other processes
    /// spent too (the shared count, `shared_limits`), so the request that spends the
    /// last of the quota anywhere takes the key out here, and a later outage of the
    /// shared store goes on from there.
    pub(crate) fn at_least(&mut self, day: u64, used: u64) {
        if day == self.day {
            self.used = self.used.max(u32::try_from(used).unwrap_or(u32::MAX));
        }
    }

    /// The reason a key (or group) at its quota is out, naming when it comes back.
    pub(crate) fn reason(&self, left: Duration) -> String {
        format!(
            "daily quota of {} requests (rpd) spent: exhausted until {}",
            self.limit,
            httpdate::fmt_http_date(SystemTime::now() + left)
        )
    }
}

/// A budget learned from a key's rate-limit headers (`ratelimit.rs`): `limit` per
/// `window`, the window being the longest reset seen. Only for a key without a
/// configured `rpm` (requests) or `tpm` (tokens): a configured budget always wins.
#[derive(Debug)]
pub(crate) struct Learned {
    limit: u64,
    window: Duration,
    bucket: Bucket,
}

impl Learned {
    /// Folds one response's report into `slot` (creating the budget on the first
    /// `limit`), and lowers the bucket to the server's `remaining` (never raises it: a
    /// response may be older than requests admitted since).
    fn observe(slot: &mut Option<Learned>, b: &crate::ratelimit::Budget, now: Instant) {
        let reset = b.reset.unwrap_or(Duration::ZERO);
        match (slot.as_mut(), b.limit) {
            (Some(l), limit) => {
                if let Some(limit) = limit {
                    l.limit = limit;
                }
                l.window = l.window.max(reset);
                l.bucket.refill(now);
                l.bucket.set_rate(l.limit, l.window);
            }
            (None, Some(limit)) => {
                let window = reset.max(crate::ratelimit::MIN_WINDOW);
                *slot = Some(Learned {
                    limit,
                    window,
                    bucket: Bucket::learned(limit, window, f64::INFINITY, now),
                });
            }
            (None, None) => return,
        }
        if let (Some(l), Some(r)) = (slot.as_mut(), b.remaining) {
            l.bucket.tokens = l.bucket.tokens.min(r as f64).max(l.bucket.floor);
        }
    }

    /// The budget as a per-minute rate.
    fn per_minute(&self) -> f64 {
        self.limit as f64 * 60.0 / self.window.max(crate::ratelimit::MIN_WINDOW).as_secs_f64()
    }
}

/// Where a key stands on trial requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trial {
    /// Trusted: every idle worker may take a request.
    Open,
    /// In doubt: the next admission is a trial, the only request until it is answered.
    Pending,
    /// A trial request is out; nothing else is admitted until it completes.
    Out,
}

/// Why `try_admit` said no, or that it said yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Admitted. The caller hands the job to the key and later calls
    /// [`Gate::complete`] with this admission exactly once.
    Yes(Admission),
    /// Not before this instant (cooldown, rate budget).
    WakeAt(Instant),
    /// Usable but busy: no idle worker, or a trial request is out. A worker going idle
    /// (with `wants_idle` set) or a trial ending nudges the dispatcher.
    Busy,
    /// Disabled or parked: never again.
    Never,
    /// The shared limits' store (Redis) is unreachable and configured to fail:
    /// the request ends with `Error::SharedUnavailable`.
    Unavailable,
}

/// Proof of one admission, carried by the job until [`Gate::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// This request is the key's trial (probe or half-open).
    pub trial: bool,
    /// Tokens taken from the `tpm` bucket (0 when no limit).
    pub tokens: u64,
    /// The learned limit's cut count when admitted (0 when not adaptive): a 429 cuts
    /// the limit only if no cut happened since.
    pub cuts: u64,
    /// Its lease in the limits shared with other processes (0: none), for its release.
    pub lease: u64,
}

/// Who asks for an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The dispatcher, handing the job to an idle worker: takes one off the idle count.
    Dispatcher,
    /// A worker that just finished and takes the next queued request itself.
    SelfServe,
}

/// What an attempt (or a job leaving unsent) tells the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyVerdict {
    /// The server answered without rejecting the key or rate-limiting it: a trial
    /// succeeds. (Any HTTP answer but 401/402/403/429, a malformed one included.)
    pub accepted: bool,
    /// Cool the key down for this long (429): it goes back on trial afterwards.
    pub cooldown: Option<Duration>,
    /// Take the key out of rotation, with this reason (401, a spent credit, a 403
    /// proven to be the key's).
    pub disable: Option<String>,
    /// With `disable`: parked for its credit; a credit check above the floor brings it
    /// back ([`Gate::unpark`]).
    pub park: bool,
    /// With `disable`: out only for this long (a daily quota spent, its reset beyond
    /// `max_retry_after_ms`): the key comes back on its own, on trial.
    pub disable_for: Option<Duration>,
    /// The server answered 429: a learned limit is cut.
    pub rate_limited: bool,
    /// The response's rate-limit headers, if it had any: a key without a configured
    /// `rpm`/`tpm` learns its budgets from them, and a learned concurrency limit does
    /// not grow while they say little is left.
    pub limits: Option<crate::ratelimit::Observed>,
    /// Cool the key's whole group (account) for this long: a 429 its rule attributes to
    /// the account.
    pub group_cooldown: Option<Duration>,
    /// A success whose response carried no rate-limit header at all: after
    /// [`FORGET_LEARNED_AFTER`] of them in a row a learned budget is forgotten.
    pub quiet: bool,
}

/// Successes in a row without any rate-limit header after which a key forgets the
/// budgets it learned from such headers: the server (or a proxy in front of it) no
/// longer announces one, so the old figure may no longer describe the key.
pub(crate) const FORGET_LEARNED_AFTER: u32 = 100;

#[derive(Debug)]
struct State {
    idle: usize,
    trial: Trial,
    cooldown_until: Option<Instant>,
    /// A 429 arrived while a trial was out: that trial, even if answered, must not
    /// reopen the key (the 429 is the newer news).
    trial_stale: bool,
    /// On trial since the start and never answered: a key proof (`retry.prove_keys`)
    /// may still open it.
    unproven: bool,
    disabled: Option<(String, u64)>,
    /// The key is out for its credit (may come back), not revoked.
    parked: bool,
    /// Out only until then (a spent quota): `check` brings it back after.
    disabled_until: Option<Instant>,
    /// Requests per UTC day (`rpd`).
    rpd: Option<Daily>,
    /// Out for the daily quota (`rpd`) until `disabled_until`; a refund may bring it back.
    rpd_out: bool,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// Admissions not yet completed.
    out: usize,
    /// The learned concurrency limit (`adaptive` keys).
    aimd: Option<Aimd>,
    /// Budgets learned from rate-limit headers (keys without `rpm` / `tpm`).
    learned_rpm: Option<Learned>,
    learned_tpm: Option<Learned>,
    /// Successes in a row whose responses carried no rate-limit header, while a
    /// budget is learned (see [`FORGET_LEARNED_AFTER`]).
    quiet_successes: u32,
}

/// The admission state of one key. See the module docs.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<State>,
    epoch: Instant,
    has_limits: bool,
    /// The key's account: its limits are checked and taken with the key's, in one step.
    group: Option<Arc<GroupGate>>,
    // Lock-free mirrors, written only under the lock.
    idle: AtomicUsize,
    /// The learned limit is used up.
    at_limit: AtomicBool,
    /// The learned limit (0: not adaptive).
    limit: AtomicUsize,
    /// A budget was learned from rate-limit headers.
    learned: AtomicBool,
    disabled: AtomicBool,
    /// `State::disabled_until`, microseconds since `epoch` (0: none).
    disabled_until: AtomicU64,
    trial_out: AtomicBool,
    /// `State::rpd_out`: out only for the daily quota (which the last admission spent).
    quota_out: AtomicBool,
    /// Cooldown end, microseconds since `epoch` (0: none).
    cooldown_until: AtomicU64,
    /// Limits shared with other processes (`Config::shared`), asked after the local rules.
    shared: Option<crate::shared_limits::KeyLink>,
    /// The pool's key-event queue (`events.rs`): changes are queued under the lock,
    /// delivered by another thread.
    events: Option<crate::events::KeyEvents>,
}

impl Gate {
    pub(crate) fn new(probe: bool, rpm: Option<u64>, tpm: Option<u64>, epoch: Instant) -> Gate {
        Gate {
            state: Mutex::new(State {
                idle: 0,
                trial: if probe { Trial::Pending } else { Trial::Open },
                cooldown_until: None,
                trial_stale: false,
                unproven: probe,
                disabled: None,
                parked: false,
                disabled_until: None,
                rpd: None,
                rpd_out: false,
                rpm: rpm.map(|r| Bucket::per_minute(r as f64, epoch)),
                tpm: tpm.map(|t| Bucket::per_minute(t as f64, epoch)),
                out: 0,
                aimd: None,
                learned_rpm: None,
                learned_tpm: None,
                quiet_successes: 0,
            }),
            epoch,
            has_limits: rpm.is_some() || tpm.is_some(),
            group: None,
            idle: AtomicUsize::new(0),
            at_limit: AtomicBool::new(false),
            limit: AtomicUsize::new(0),
            learned: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
            disabled_until: AtomicU64::new(0),
            trial_out: AtomicBool::new(false),
            quota_out: AtomicBool::new(false),
            cooldown_until: AtomicU64::new(0),
            shared: None,
            events: None,
        }
    }

    /// Makes this gate also ask the limits shared with other processes.
    pub(crate) fn attach_shared(&mut self, link: crate::shared_limits::KeyLink) {
        self.shared = Some(link);
    }

    /// Queues this key's state changes on the pool's event queue.
    pub(crate) fn attach_events(&mut self, events: crate::events::KeyEvents) {
        self.events = Some(events);
    }

    /// Queues an event (a `try_send`: safe under the lock).
    fn emit(
        &self,
        kind: crate::events::KeyEventKind,
        reason: Option<&str>,
        duration: Option<Duration>,
    ) {
        if let Some(ev) = &self.events {
            let ms = duration.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            ev.emit(kind, reason, ms);
        }
    }

    /// Makes the key a member of `group`, whose limits it then also obeys.
    pub(crate) fn with_group(mut self, group: Arc<GroupGate>) -> Gate {
        self.has_limits |= group.has_limits;
        self.group = Some(group);
        self
    }

    /// Limits the key to `limit` requests per UTC day.
    pub(crate) fn with_rpd(self, limit: Option<u32>) -> Gate {
        self.state.lock().rpd = limit.map(Daily::new);
        self
    }

    /// Makes the key's concurrency learned (AIMD), up to `max`.
    pub(crate) fn with_adaptive(self, max: usize) -> Gate {
        {
            let mut s = self.state.lock();
            s.aimd = Some(Aimd::new(max));
            self.mirror(&s);
        }
        self
    }

    /// The key's group, if it has one.
    pub(crate) fn group(&self) -> Option<&Arc<GroupGate>> {
        self.group.as_ref()
    }

    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn mirror(&self, s: &State) {
        self.idle.store(s.idle, SeqCst);
        self.disabled.store(s.disabled.is_some(), SeqCst);
        self.disabled_until.store(
            s.disabled_until.map_or(0, |u| self.micros(u).max(1)),
            SeqCst,
        );
        self.trial_out.store(s.trial == Trial::Out, SeqCst);
        self.quota_out.store(s.rpd_out, SeqCst);
        self.learned
            .store(s.learned_rpm.is_some() || s.learned_tpm.is_some(), SeqCst);
        if let Some(a) = &s.aimd {
            self.at_limit.store(s.out >= a.limit(), SeqCst);
            self.limit.store(a.limit(), SeqCst);
        }
        self.cooldown_until.store(
            s.cooldown_until.map_or(0, |u| self.micros(u).max(1)),
            SeqCst,
        );
    }

    /// The rules, in order. `now` is the caller's clock; `tokens` the job's estimate.
    fn check(
        &self,
        s: &mut State,
        g: Option<&mut crate::group::GroupState>,
        via: Via,
        tokens: u64,
        now: Instant,
    ) -> Admit {
        let group_tpm = g.as_ref().is_some_and(|g| g.tpm.is_some());
        if s.disabled.is_some() {
            match s.disabled_until {
                // A spent quota's reset has come: back, on trial.
                Some(until) if until <= now => {
                    s.disabled = None;
                    s.disabled_until = None;
                    s.parked = false;
                    // Back after a daily quota reset: no doubt about the key itself.
                    let quota = std::mem::take(&mut s.rpd_out);
                    if s.trial == Trial::Open && !quota {
                        s.trial = Trial::Pending;
                    }
                    self.emit(crate::events::KeyEventKind::Rejoined, None, None);
                }
                _ => return Admit::Never,
            }
        }
        if let Some(d) = s.rpd.as_mut() {
            let (day, left) = utc_day();
            if d.spent(day) {
                let reason = d.reason(left);
                self.quota_out(s, reason, left, now);
                // Out from now on (normally since its last admission): asked again at
                // once, the caller sees it out and stops waiting for it.
                return Admit::WakeAt(now);
            }
        }
        if let Some(until) = s.cooldown_until {
            if until > now {
                return Admit::WakeAt(until);
            }
            s.cooldown_until = None;
        }
        if via == Via::Dispatcher && s.idle == 0 {
            return Admit::Busy;
        }
        if s.trial == Trial::Out {
            return Admit::Busy;
        }
        if s.aimd.as_ref().is_some_and(|a| s.out >= a.limit()) {
            return Admit::Busy;
        }
        let a = s.rpm.as_mut().and_then(|b| b.ready_at(1.0, now));
        let b = s.tpm.as_mut().and_then(|b| b.ready_at(tokens as f64, now));
        let c = (s.learned_rpm.as_mut()).and_then(|l| l.bucket.ready_at(1.0, now));
        let d = (s.learned_tpm.as_mut()).and_then(|l| l.bucket.ready_at(tokens as f64, now));
        if let Some(at) = a.max(b).max(c).max(d) {
            return Admit::WakeAt(at);
        }
        if let (Some(group), Some(g)) = (&self.group, g) {
            if let Some(no) = group.check(g, tokens, now) {
                return no;
            }
        }
        Admit::Yes(Admission {
            trial: s.trial == Trial::Pending,
            tokens: if s.tpm.is_some() || s.learned_tpm.is_some() || group_tpm {
                tokens
            } else {
                0
            },
            cuts: s.aimd.as_ref().map_or(0, Aimd::cuts),
            lease: 0,
        })
    }

    /// Admits one request of `tokens` (estimated) if every rule allows it now, applying
    /// the admission (idle worker taken, trial out, budget spent) in the same step.
    pub(crate) fn try_admit(&self, via: Via, tokens: u64, now: Instant) -> Admit {
        let mut s = self.state.lock();
        // The key's lock, then the group's: the only order either is ever taken in.
        let mut g = self.group.as_ref().map(|g| g.state.lock());
        let mut verdict = self.check(&mut s, g.as_deref_mut(), via, tokens, now);
        if let (Admit::Yes(_), Some(link)) = (verdict, &self.shared) {
            // One atomic step in the shared store, under this key's lock: the local and
            // the shared admission are taken together or not at all.
            let shared = link.acquire(tokens);
            if let (Some(group), Some(g)) = (&self.group, g.as_deref_mut()) {
                use crate::shared_limits::SharedAdmit;
                match &shared {
                    // The account cools elsewhere: here too, for all its keys.
                    SharedAdmit::GroupCooling(until) => group.cool_until(g, *until),
                    // Its daily quota is spent, over every process: out here too.
                    SharedAdmit::GroupExhausted(left) => group.exhaust(g, *left, Instant::now()),
                    // What every process spent today counts here (then `take`).
                    SharedAdmit::Yes(_, day) => group.spent_elsewhere(g, day.day, day.group),
                    _ => {}
                }
            }
            verdict = self.apply_shared(&mut s, shared, verdict);
        }
        if let Admit::Yes(adm) = verdict {
            if via == Via::Dispatcher {
                s.idle -= 1;
            }
            s.out += 1;
            if let (Some(group), Some(g)) = (&self.group, g.as_deref_mut()) {
                group.take(g, adm.tokens);
            }
            if adm.trial {
                s.trial = Trial::Out;
            }
            if let Some(b) = s.rpm.as_mut() {
                b.take(1.0);
            }
            if let Some(b) = s.tpm.as_mut() {
                b.take(tokens as f64);
            }
            if let Some(l) = s.learned_rpm.as_mut() {
                l.bucket.take(1.0);
            }
            if let Some(l) = s.learned_tpm.as_mut() {
                l.bucket.take(tokens as f64);
            }
            if let Some(d) = s.rpd.as_mut() {
                if d.take() {
                    // The quota's last request: out from now on, not at the next ask.
                    let left = utc_day().1;
                    let reason = d.reason(left);
                    self.quota_out(&mut s, reason, left, now);
                }
            }
        }
        self.mirror(&s);
        verdict
    }

    /// Takes the key out until its daily quota resets, `left` from `now`.
    /// Emits `Exhausted` when it takes the key out (its reset emits `Rejoined`); the
    /// events thread logs it (`log::warn!`, with the key's label).
    fn quota_out(&self, s: &mut State, reason: String, left: Duration, now: Instant) {
        if s.disabled.is_none() {
            self.emit(
                crate::events::KeyEventKind::Exhausted,
                Some(&reason),
                Some(left),
            );
            s.disabled = Some((reason, unix_ms_now()));
            s.parked = false;
            s.rpd_out = true;
            s.disabled_until = Some(now.checked_add(left).unwrap_or(now));
        }
    }

    /// The error of a request refused because the shared limits are unreachable.
    pub(crate) fn shared_unavailable_error(&self) -> crate::Error {
        match &self.shared {
            Some(link) => link.unavailable_error(),
            None => crate::Error::SharedUnavailable {
                message: "shared limits unavailable".to_owned(),
            },
        }
    }

    /// Folds the shared store's answer into the local state: a key disabled or cooling
    /// elsewhere is disabled or cooling here too (so stats show it, and a shared
    /// cooldown ends with a local trial like a local one).
    fn apply_shared(
        &self,
        s: &mut State,
        shared: crate::shared_limits::SharedAdmit,
        local: Admit,
    ) -> Admit {
        use crate::shared_limits::SharedAdmit;
        match shared {
            SharedAdmit::Yes(lease, day) => match local {
                Admit::Yes(adm) => {
                    // The shared count, less this request (which `try_admit` counts):
                    // if it spends the quota, the key goes out here in the same step.
                    if let Some(d) = s.rpd.as_mut() {
                        d.at_least(day.day, day.key.saturating_sub(1));
                    }
                    Admit::Yes(Admission { lease, ..adm })
                }
                other => other,
            },
            SharedAdmit::WakeAt(at) | SharedAdmit::GroupCooling(at) => Admit::WakeAt(at),
            SharedAdmit::Exhausted(left) => {
                // Spent by every process together: out until the reset, as if spent
                // here (a refund here brings it back, to ask the store again).
                let now = Instant::now();
                let Some(d) = &s.rpd else {
                    // Never: the store counts a quota only for a gate that has one.
                    return Admit::WakeAt(now.checked_add(left).unwrap_or(now));
                };
                let reason = d.reason(left);
                self.quota_out(s, reason, left, now);
                Admit::WakeAt(now)
            }
            SharedAdmit::GroupExhausted(_) => Admit::WakeAt(Instant::now()),
            SharedAdmit::Cooling(until) => {
                let now = Instant::now();
                if s.cooldown_until.is_none_or(|u| u <= now) && until > now {
                    self.emit(
                        crate::events::KeyEventKind::Cooled,
                        Some("cooling in another process"),
                        Some(until - now),
                    );
                }
                if s.cooldown_until.is_none_or(|u| u < until) {
                    s.cooldown_until = Some(until);
                }
                if s.trial == Trial::Open {
                    s.trial = Trial::Pending;
                }
                Admit::WakeAt(until)
            }
            SharedAdmit::Disabled(reason) => {
                if s.disabled.is_none() {
                    log::warn!("keypool: key disabled by another process: {reason}");
                    s.disabled = Some((format!("{reason} (shared)"), unix_ms_now()));
                    self.emit(
                        crate::events::KeyEventKind::Disabled,
                        Some(&format!("{reason} (shared)")),
                        None,
                    );
                }
                Admit::Never
            }
            SharedAdmit::Unavailable => Admit::Unavailable,
        }
    }

    /// Ends an admission: applies the attempt's verdict for the key (cooldown, disable)
    /// and settles the trial, all in one step, so the next trial can never start before
    /// a "bad key" verdict has disabled the key. Returns true if the dispatcher should
    /// re-evaluate (a trial ended, the key cooled or was disabled).
    pub(crate) fn complete(&self, adm: Admission, v: &KeyVerdict, now: Instant) -> bool {
        let mut s = self.state.lock();
        let mut changed = false;
        let busy = s.aimd.as_ref().is_some_and(|a| s.out >= a.limit());
        s.out = s.out.saturating_sub(1);
        if let Some(a) = s.aimd.as_mut() {
            if v.rate_limited {
                a.on_429(adm.cuts);
            } else if v.accepted {
                // No growth while the server says its budget is nearly spent: more
                // concurrency would only reach the pause sooner.
                a.on_success(busy && !v.limits.is_some_and(|o| o.low()));
            }
            // A slot freed (or the limit moved): a waiting job may fit now.
            changed |= busy || v.rate_limited;
        }
        if let Some(o) = &v.limits {
            // A configured budget always wins: learn only what is not configured.
            if s.rpm.is_none() {
                Learned::observe(&mut s.learned_rpm, &o.requests, now);
            }
            if s.tpm.is_none() {
                Learned::observe(&mut s.learned_tpm, &o.tokens, now);
            }
            s.quiet_successes = 0;
        } else if v.quiet && (s.learned_rpm.is_some() || s.learned_tpm.is_some()) {
            s.quiet_successes += 1;
            if s.quiet_successes >= FORGET_LEARNED_AFTER {
                (s.learned_rpm, s.learned_tpm) = (None, None);
                s.quiet_successes = 0;
                changed = true; // a job waiting on the old budget may go now
            }
        }
        if let Some(group) = &self.group {
            let mut g = group.state.lock();
            changed |= group.release(&mut g, v.group_cooldown, now);
        }
        if let Some(d) = v.cooldown {
            let until = now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(86_400));
            if s.cooldown_until.is_none_or(|u| u <= now) {
                let reason = v.rate_limited.then_some("rate limited (HTTP 429)");
                self.emit(crate::events::KeyEventKind::Cooled, reason, Some(d));
            }
            if s.cooldown_until.is_none_or(|u| u < until) {
                s.cooldown_until = Some(until);
            }
            // Half-open after the cooldown: one request first. A trial already out
            // settles it.
            match s.trial {
                Trial::Open => s.trial = Trial::Pending,
                Trial::Out if !adm.trial => s.trial_stale = true,
                _ => {}
            }
            changed = true;
        }
        if let Some(reason) = &v.disable {
            // A revocation replaces a park (a parked key must not come back after a 401).
            if s.disabled.is_none()
                || ((s.parked || s.rpd_out) && !v.park && v.disable_for.is_none())
            {
                s.disabled = Some((reason.clone(), unix_ms_now()));
                s.parked = v.park;
                s.rpd_out = false;
                s.disabled_until = v.disable_for.and_then(|d| now.checked_add(d));
                use crate::events::KeyEventKind as K;
                let (kind, d) = match (s.disabled_until, v.park) {
                    (Some(_), _) => (K::Exhausted, v.disable_for),
                    (None, true) => (K::Parked, None),
                    (None, false) => (K::Disabled, None),
                };
                self.emit(kind, Some(reason), d);
            }
            changed = true;
        }
        // Any answer about the key itself settles what a proof could only guess.
        if v.accepted || v.cooldown.is_some() || v.disable.is_some() {
            s.unproven = false;
        }
        if adm.trial && s.trial == Trial::Out {
            let reopen = v.accepted && v.cooldown.is_none() && !s.trial_stale;
            s.trial_stale = false;
            s.trial = if reopen { Trial::Open } else { Trial::Pending };
            if reopen && s.disabled.is_none() {
                // News only after a cooldown (`events.rs` drops it otherwise).
                self.emit(crate::events::KeyEventKind::Reopened, None, None);
            }
            changed = true;
        }
        self.mirror(&s);
        drop(s);
        if let Some(link) = &self.shared {
            link.release(adm.lease, v);
        }
        changed
    }

    /// Whether the key is still on its first trial, never answered (a proof may open it).
    pub(crate) fn unproven(&self) -> bool {
        self.state.lock().unproven
    }

    /// The server accepted the key at an authenticated `GET` (`key_proof`) before any
    /// completion answered: the key opens to all its workers now. A trial request already
    /// out stays out and settles as usual (a 401 on it still disables the key). Does
    /// nothing once the key was answered, cooled or disabled. Returns true if the key
    /// opened (the dispatcher should re-evaluate).
    pub(crate) fn prove(&self) -> bool {
        let mut s = self.state.lock();
        let was = std::mem::replace(&mut s.unproven, false);
        if !was || s.disabled.is_some() || s.cooldown_until.is_some() || s.trial == Trial::Open {
            return false;
        }
        s.trial = Trial::Open;
        self.mirror(&s);
        true
    }

    /// Gives back the budget of an admission whose job never reached the wire.
    pub(crate) fn refund(&self, adm: Admission) {
        {
            let mut s = self.state.lock();
            if let Some(d) = s.rpd.as_mut() {
                d.refund();
                if s.rpd_out {
                    // Out for a quota this request no longer spends: back.
                    s.rpd_out = false;
                    s.disabled = None;
                    s.disabled_until = None;
                    self.mirror(&s);
                }
            }
        }
        if let Some(group) = &self.group {
            group.refund_day();
        }
        // Shared budgets first: a shared daily quota (`rpd` alone, which `has_limits`
        // does not count) is given back in Redis too. The link returns at once when
        // nothing there was charged.
        if let Some(link) = &self.shared {
            link.refund(adm.lease, adm.tokens);
        }
        if !self.has_limits() {
            return;
        }
        let mut s = self.state.lock();
        if let Some(b) = s.rpm.as_mut() {
            b.correct(1, 0);
        }
        if let Some(b) = s.tpm.as_mut() {
            b.correct(adm.tokens, 0);
        }
        if let Some(l) = s.learned_rpm.as_mut() {
            l.bucket.correct(1, 0);
        }
        if let Some(l) = s.learned_tpm.as_mut() {
            l.bucket.correct(adm.tokens, 0);
        }
        if let Some(group) = &self.group {
            let mut g = group.state.lock();
            if let Some(b) = g.rpm.as_mut() {
                b.correct(1, 0);
            }
            if let Some(b) = g.tpm.as_mut() {
                b.correct(adm.tokens, 0);
            }
        }
    }

    /// Corrects the token bucket once the real usage is known.
    pub(crate) fn correct_tokens(&self, estimated: u64, actual: u64) {
        if !self.has_limits() {
            return;
        }
        let mut s = self.state.lock();
        if let Some(b) = s.tpm.as_mut() {
            b.correct(estimated, actual);
        }
        if let Some(l) = s.learned_tpm.as_mut() {
            l.bucket.correct(estimated, actual);
        }
        if let Some(group) = &self.group {
            if let Some(b) = group.state.lock().tpm.as_mut() {
                b.correct(estimated, actual);
            }
        }
        drop(s); // the Redis round trip outside the key's lock
        if let Some(link) = &self.shared {
            link.correct_tokens(estimated, actual);
        }
    }

    /// A worker of this key is about to wait for a job from the dispatcher.
    pub(crate) fn worker_idle(&self) {
        let mut s = self.state.lock();
        s.idle += 1;
        self.mirror(&s);
    }

    /// A waiting worker left without a job (shutdown).
    pub(crate) fn worker_gone(&self) {
        let mut s = self.state.lock();
        s.idle = s.idle.saturating_sub(1);
        self.mirror(&s);
    }

    // ---- lock-free reads (heuristics and stats; never an admission) ----

    pub(crate) fn idle(&self) -> usize {
        self.idle.load(SeqCst)
    }

    /// Parks the key outside an admission (a credit check found it at its floor).
    /// Returns true if this call parked it (it was not disabled already).
    pub(crate) fn park(&self, reason: String) -> bool {
        self.take_out(reason, true)
    }

    /// Takes the key out of rotation outside an admission: parked for its credit
    /// (`parked`: may come back, [`Gate::unpark`]) or disabled for good (a 403 proven
    /// to be the key's). Returns true if this call took it out.
    pub(crate) fn take_out(&self, reason: String, parked: bool) -> bool {
        let mut s = self.state.lock();
        // Already out — unless parked and now taken out for good (a revocation), or
        // out only for the day (`rpd`).
        if s.disabled.is_some() && !s.rpd_out && (!s.parked || parked) {
            return false;
        }
        let shared = self.shared.as_ref().map(|link| (link, reason.clone()));
        let kind = if parked {
            crate::events::KeyEventKind::Parked
        } else {
            crate::events::KeyEventKind::Disabled
        };
        self.emit(kind, Some(&reason), None);
        s.disabled = Some((reason, unix_ms_now()));
        s.parked = parked;
        s.rpd_out = false;
        s.disabled_until = None;
        self.mirror(&s);
        drop(s);
        if let Some((link, reason)) = shared {
            link.disable(&reason); // parked in every process sharing the key
        }
        true
    }

    pub(crate) fn is_disabled(&self) -> bool {
        // Its group's daily quota spent: out with it until the reset.
        if self
            .group
            .as_ref()
            .is_some_and(|g| g.exhausted_until(Instant::now()).is_some())
        {
            return true;
        }
        if !self.disabled.load(SeqCst) {
            return false;
        }
        // Out until an instant (a spent quota): not disabled once it has passed (the
        // next admission clears it).
        let until = self.disabled_until.load(SeqCst);
        until == 0 || until > self.micros(Instant::now())
    }

    /// Whether a job admitted a moment ago must go back unsent: the key was disabled
    /// or started cooling since. A daily quota (the key's or its group's) does not
    /// count: the admission that spent its last request is taken out with it, and that
    /// request goes.
    pub(crate) fn stopped_since_admission(&self, now: Instant) -> bool {
        let disabled = self.disabled.load(SeqCst) && !self.quota_out.load(SeqCst) && {
            let until = self.disabled_until.load(SeqCst);
            until == 0 || until > self.micros(now)
        };
        disabled || self.cooling_until(now).is_some()
    }

    /// Whether the key itself is out with no reset instant (revoked by a 401 or a
    /// 403 judged the key's, or parked for its credit).
    pub(crate) fn is_revoked(&self) -> bool {
        self.disabled.load(SeqCst) && self.disabled_until.load(SeqCst) == 0
    }

    /// When a key that is out only until an instant — its own spent quota, or its
    /// group's daily quota — comes back, if it is out at `now`: the dispatcher wakes
    /// then, so an idle key back from its reset is not left waiting for a nudge.
    pub(crate) fn back_at(&self, now: Instant) -> Option<Instant> {
        let own = self
            .out_until()
            .filter(|u| *u > now && self.disabled.load(SeqCst));
        let group = self.group.as_ref().and_then(|g| g.exhausted_until(now));
        own.max(group)
    }

    /// When a key out only until an instant (a spent quota) comes back, if it is.
    pub(crate) fn out_until(&self) -> Option<Instant> {
        match self.disabled_until.load(SeqCst) {
            0 => None,
            us => Some(self.epoch + Duration::from_micros(us)),
        }
    }

    /// Ends the key's own cooldown now (a pause taken on suspicion that the evidence
    /// then cleared). A trial pending stays: the next request still goes alone.
    pub(crate) fn lift_cooldown(&self) {
        let mut s = self.state.lock();
        if s.cooldown_until.take().is_some() {
            self.mirror(&s);
        }
    }

    /// Whether the key is out for its credit (and may come back).
    pub(crate) fn is_parked(&self) -> bool {
        let s = self.state.lock();
        s.disabled.is_some() && s.parked
    }

    /// Brings a key parked for its credit back into rotation (a credit check found its
    /// balance above the floor). It comes back on trial: one request first. Returns
    /// true if it was parked. A revoked key (401) stays out.
    pub(crate) fn unpark(&self) -> bool {
        let mut s = self.state.lock();
        if s.disabled.is_none() || !s.parked {
            return false;
        }
        s.disabled = None;
        s.parked = false;
        if s.trial == Trial::Open {
            s.trial = Trial::Pending;
        }
        self.emit(crate::events::KeyEventKind::Rejoined, None, None);
        self.mirror(&s);
        true
    }

    /// Configured or learned rate budgets (the key's or its group's).
    pub(crate) fn has_limits(&self) -> bool {
        self.has_limits || self.learned.load(SeqCst)
    }

    /// When the cooldown ends, if the key (or its whole account) is cooling at `now`.
    pub(crate) fn cooling_until(&self, now: Instant) -> Option<Instant> {
        let until = self.cooldown_until.load(SeqCst);
        let own = (until > self.micros(now)).then(|| self.epoch + Duration::from_micros(until));
        let group = self.group.as_ref().and_then(|g| g.cooling_until(now));
        own.max(group)
    }

    /// The learned concurrency limit, if the key is adaptive.
    pub(crate) fn learned_limit(&self) -> Option<usize> {
        match self.limit.load(SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    /// An idle worker, on a key that is not disabled, cooling, waiting on a trial, at
    /// its learned limit, or in a full group.
    pub(crate) fn usable_idle(&self, now: Instant) -> bool {
        self.idle() > 0
            && !self.is_disabled()
            && !self.trial_out.load(SeqCst)
            && !self.at_limit.load(SeqCst)
            && !self.group.as_ref().is_some_and(|g| g.is_full())
            && self.cooling_until(now).is_none()
    }

    /// Whether a worker of this key may take a queued request itself: healthy, trusted
    /// (no trial pending or out) and without rate limits, whose pacing is the
    /// dispatcher's. (`try_admit` still decides.)
    pub(crate) fn self_serve_allowed(&self, now: Instant) -> bool {
        !self.has_limits()
            && !self.is_disabled()
            && self.cooling_until(now).is_none()
            && self.state.lock().trial == Trial::Open
    }

    /// The disabled reason and when (Unix ms), if disabled.
    pub(crate) fn disabled(&self) -> Option<(String, u64)> {
        let own = self.state.lock().disabled.clone();
        own.or_else(|| {
            let g = self.group.as_ref()?;
            g.exhausted_until(Instant::now())?;
            g.exhausted_reason()
        })
    }

    /// Rate budgets now: (requests, tokens) — the configured ones, else the learned.
    pub(crate) fn budgets(&self, now: Instant) -> (Option<f64>, Option<f64>) {
        if !self.has_limits() {
            return (None, None);
        }
        let mut s = self.state.lock();
        let s = &mut *s;
        (
            (s.rpm.as_mut())
                .or(s.learned_rpm.as_mut().map(|l| &mut l.bucket))
                .map(|b| b.balance(now)),
            (s.tpm.as_mut())
                .or(s.learned_tpm.as_mut().map(|l| &mut l.bucket))
                .map(|b| b.balance(now)),
        )
    }

    /// Budgets learned from rate-limit headers, per minute: (requests, tokens).
    pub(crate) fn learned_budgets(&self) -> (Option<f64>, Option<f64>) {
        if !self.learned.load(SeqCst) {
            return (None, None);
        }
        let s = self.state.lock();
        (
            s.learned_rpm.as_ref().map(Learned::per_minute),
            s.learned_tpm.as_ref().map(Learned::per_minute),
        )
    }
}

/// Now as Unix milliseconds (0 if the clock is before 1970).
fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(probe: bool) -> (Gate, Instant) {
        let epoch = Instant::now();
        (Gate::new(probe, None, None, epoch), epoch)
    }

    fn yes(a: Admit) -> Admission {
        match a {
            Admit::Yes(adm) => adm,
            other => panic!("expected Yes, got {other:?}"),
        }
    }

    /// A shared store that admits everything and counts the refunds it is asked for.
    #[derive(Default)]
    struct CountingStore {
        refunds: std::sync::atomic::AtomicUsize,
    }

    impl crate::shared_limits::SharedLimits for CountingStore {
        fn acquire(&self, _: usize, _: u64) -> crate::shared_limits::SharedAdmit {
            crate::shared_limits::SharedAdmit::Yes(1, Default::default())
        }
        fn release(&self, _: usize, _: u64, _: &KeyVerdict) {}
        fn disable(&self, _: usize, _: &str) {}
        fn refund(&self, _: usize, _: u64, _: u64) {
            self.refunds.fetch_add(1, SeqCst);
        }
        fn correct_tokens(&self, _: usize, _: u64, _: u64) {}
        fn unavailable_reason(&self) -> String {
            String::new()
        }
        fn cool_model(&self, _: &[usize], _: &str, _: Duration) {}
    }

    #[test]
    fn an_unsent_admission_of_a_key_with_only_a_daily_quota_is_refunded_in_the_store() {
        // `rpd` alone (no rpm/tpm): the shared count must come back too, or every
        // process sees the key's quota spent early.
        let store = std::sync::Arc::new(CountingStore::default());
        let mut g = Gate::new(false, None, None, Instant::now()).with_rpd(Some(5));
        g.attach_shared(crate::shared_limits::KeyLink::new(store.clone(), 0));
        let now = Instant::now();
        let a = yes(g.try_admit(Via::SelfServe, 0, now));
        g.refund(a);
        g.complete(a, &KeyVerdict::default(), now);
        assert_eq!(store.refunds.load(SeqCst), 1);
    }

    #[test]
    fn a_daily_quota_takes_the_key_out_with_its_last_admission() {
        let epoch = Instant::now();
        let g = Gate::new(false, None, None, epoch).with_rpd(Some(2));
        let now = Instant::now();
        let a = yes(g.try_admit(Via::SelfServe, 0, now));
        g.complete(a, &KeyVerdict::default(), now);
        assert!(!g.is_disabled());
        let last = yes(g.try_admit(Via::SelfServe, 0, now));
        // Out at once, but the request that spent the quota still goes.
        assert!(g.is_disabled());
        assert!(!g.stopped_since_admission(now));
        let (reason, _) = g.disabled().unwrap();
        assert!(reason.contains("exhausted until"), "{reason}");
        assert_eq!(g.try_admit(Via::SelfServe, 0, now), Admit::Never);
        // It left unsent: its count comes back, and so does the key.
        g.refund(last);
        g.complete(last, &KeyVerdict::default(), now);
        assert!(!g.is_disabled());
        yes(g.try_admit(Via::SelfServe, 0, now));
        // A revocation while out for the day is not undone at midnight.
        assert!(g.take_out("revoked".into(), false));
        assert!(g.stopped_since_admission(now));
    }

    #[test]
    fn dispatcher_needs_an_idle_worker() {
        let (g, now) = gate(false);
        assert_eq!(g.try_admit(Via::Dispatcher, 0, now), Admit::Busy);
        g.worker_idle();
        let a = yes(g.try_admit(Via::Dispatcher, 0, now));
        assert!(!a.trial);
        assert_eq!(g.idle(), 0);
        assert_eq!(g.try_admit(Via::Dispatcher, 0, now), Admit::Busy);
        // A worker serving itself needs no idle count.
        yes(g.try_admit(Via::SelfServe, 0, now));
    }

    #[test]
    fn probe_admits_one_until_answered() {
        let (g, now) = gate(true);
        g.worker_idle();
        g.worker_idle();
        let a = yes(g.try_admit(Via::Dispatcher, 0, now));
        assert!(a.trial);
        assert_eq!(g.try_admit(Via::Dispatcher, 0, now), Admit::Busy);
        assert!(!g.usable_idle(now));
        // A transport failure settles nothing: the next trial may go.
        assert!(g.complete(a, &KeyVerdict::default(), now));
        let a = yes(g.try_admit(Via::Dispatcher, 0, now));
        assert!(a.trial);
        let ok = KeyVerdict {
            accepted: true,
            ..KeyVerdict::default()
        };
        assert!(g.complete(a, &ok, now));
        g.worker_idle();
        g.worker_idle();
        assert!(!yes(g.try_admit(Via::Dispatcher, 0, now)).trial);
        assert!(!yes(g.try_admit(Via::Dispatcher, 0, now)).trial);
    }

    #[test]
    fn rejected_probe_disables_before_release() {
        let (g, now) = gate(true);
        g.worker_idle();
        g.worker_idle();
        let a = yes(g.try_admit(Via::Dispatcher, 0, now));
        let bad = KeyVerdict {
            disable: Some("HTTP 401".into()),
            ..KeyVerdict::default()
        };
        g.complete(a, &bad, now);
        assert_eq!(g.try_admit(Via::Dispatcher, 0, now), Admit::Never);
        assert_eq!(g.disabled().unwrap().0, "HTTP 401");
    }

    #[test]
    fn cooldown_then_half_open() {
        let (g, now) = gate(false);
        for _ in 0..4 {
            g.worker_idle();
        }
        let a = yes(g.try_admit(Via::Dispatcher, 0, now));
        let b = yes(g.try_admit(Via::Dispatcher, 0, now));
        let limited = KeyVerdict {
            accepted: false,
            cooldown: Some(Duration::from_secs(2)),
            ..KeyVerdict::default()
        };
        g.complete(a, &limited, now);
        let until = now + Duration::from_secs(2);
        assert_eq!(g.try_admit(Via::Dispatcher, 0, now), Admit::WakeAt(until));
        // A request that started before the 429 and succeeds does not reopen the key.
        let ok = KeyVerdict {
            accepted: true,
            ..KeyVerdict::default()
        };
        g.complete(b, &ok, now);
        let later = until + Duration::from_millis(1);
        let t = yes(g.try_admit(Via::Dispatcher, 0, later));
        assert!(t.trial, "the first request after a cooldown is a trial");
        assert_eq!(g.try_admit(Via::Dispatcher, 0, later), Admit::Busy);
        assert!(!g.self_serve_allowed(later));
        g.complete(t, &ok, later);
        g.worker_idle();
        g.worker_idle();
        assert!(!yes(g.try_admit(Via::Dispatcher, 0, later)).trial);
        assert!(!yes(g.try_admit(Via::Dispatcher, 0, later)).trial);
    }

    #[test]
    fn cooldowns_only_lengthen() {
        let (g, now) = gate(false);
        let adm = Admission {
            trial: false,
            tokens: 0,
            cuts: 0,
            lease: 0,
        };
        let cool = |d| KeyVerdict {
            cooldown: Some(d),
            ..KeyVerdict::default()
        };
        g.complete(adm, &cool(Duration::from_secs(5)), now);
        let long = g.cooling_until(now).expect("cooling");
        g.complete(
            adm,
            &cool(Duration::from_secs(1)),
            now + Duration::from_secs(1),
        );
        assert_eq!(g.cooling_until(now), Some(long));
        g.complete(adm, &cool(Duration::from_secs(9)), now);
        assert!(g.cooling_until(now).unwrap() > long);
        assert_eq!(g.cooling_until(now + Duration::from_secs(10)), None);
        // An absurd cooldown saturates instead of overflowing.
        g.complete(adm, &cool(Duration::MAX), now);
        assert!(g.cooling_until(now).is_some());
    }

    #[test]
    fn token_debt_is_bounded() {
        let epoch = Instant::now();
        // tpm below 120 once made the wait computation overflow and panic.
        for tpm in [1u64, 60, 119, 120, 10_000] {
            let g = Gate::new(false, None, Some(tpm), epoch);
            g.worker_idle();
            let a = yes(g.try_admit(Via::Dispatcher, 1, epoch));
            // The server reports absurd usage.
            g.correct_tokens(a.tokens, u64::MAX);
            g.complete(a, &KeyVerdict::default(), epoch);
            g.worker_idle();
            let at = match g.try_admit(Via::Dispatcher, 1, epoch) {
                Admit::WakeAt(at) => at,
                other => panic!("tpm {tpm}: expected a wait, got {other:?}"),
            };
            assert!(at <= epoch + MAX_BUDGET_WAIT, "tpm {tpm}: waits too long");
            // When it said, the key is usable again.
            yes(g.try_admit(Via::Dispatcher, 1, at + Duration::from_millis(1)));
        }
    }

    fn observed(limit: &str, remaining: &str, reset: &str) -> crate::ratelimit::Observed {
        let h: Vec<(String, String)> = [
            ("x-ratelimit-limit-requests", limit),
            ("x-ratelimit-remaining-requests", remaining),
            ("x-ratelimit-reset-requests", reset),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        crate::ratelimit::observe(&h, Duration::from_secs(60)).unwrap()
    }

    fn learn(g: &Gate, o: crate::ratelimit::Observed, now: Instant) {
        let v = KeyVerdict {
            accepted: true,
            limits: Some(o),
            ..KeyVerdict::default()
        };
        let adm = Admission {
            trial: false,
            tokens: 0,
            cuts: 0,
            lease: 0,
        };
        g.state.lock().out += 1;
        g.complete(adm, &v, now);
    }

    /// Admits as many requests as the gate allows over `span`, asking every `step`;
    /// returns the admission instants (offsets from `t0`).
    fn admit_over(g: &Gate, t0: Instant, span: Duration, step: Duration) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t < span {
            if let Admit::Yes(_) = g.try_admit(Via::SelfServe, 0, t0 + t) {
                out.push(t);
                // Answered without headers: nothing new learned.
                g.complete(
                    Admission {
                        trial: false,
                        tokens: 0,
                        cuts: 0,
                        lease: 0,
                    },
                    &KeyVerdict::default(),
                    t0 + t,
                );
            } else {
                t += step;
            }
        }
        out
    }

    #[test]
    fn learned_request_budget_spaces_requests() {
        let (g, t0) = gate(false);
        assert!(!g.has_limits());
        // 10 requests per second, 4 left in this window.
        learn(&g, observed("10", "4", "1s"), t0);
        assert!(g.has_limits(), "a learned budget makes the key paced");
        assert!(!g.self_serve_allowed(t0), "pacing is the dispatcher's");
        let (rpm, _) = g.learned_budgets();
        assert!((rpm.unwrap() - 600.0).abs() < 1e-6, "{rpm:?}");
        assert_eq!(g.budgets(t0).0, Some(1.0), "burst: one request");
        let at = admit_over(&g, t0, Duration::from_secs(2), Duration::from_millis(5));
        // Spaced by about a tenth of a second, never more than 10 + 1 in a second.
        assert!((19..=22).contains(&at.len()), "{at:?}");
        for w in at.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(95), "{at:?}");
        }
        // The window only grows: a shorter reset keeps it, a longer one widens it.
        learn(&g, observed("10", "9", "100ms"), t0);
        assert!((g.learned_budgets().0.unwrap() - 600.0).abs() < 1e-6);
        learn(&g, observed("10", "9", "2s"), t0);
        assert!((g.learned_budgets().0.unwrap() - 300.0).abs() < 1e-6);
    }

    #[test]
    fn remaining_seeds_the_level() {
        let (g, t0) = gate(false);
        // 600 per minute: a burst of 10; nothing left now.
        learn(&g, observed("600", "0", "60s"), t0);
        assert!(matches!(
            g.try_admit(Via::SelfServe, 0, t0),
            Admit::WakeAt(_)
        ));
        // A later report of plenty never raises the level above what refilled.
        learn(&g, observed("600", "500", "60s"), t0);
        assert!(matches!(
            g.try_admit(Via::SelfServe, 0, t0),
            Admit::WakeAt(_)
        ));
        yes(g.try_admit(Via::SelfServe, 0, t0 + Duration::from_millis(150)));
    }

    #[test]
    fn configured_budget_wins_over_learned() {
        let epoch = Instant::now();
        let g = Gate::new(false, Some(60), None, epoch);
        learn(&g, observed("100000", "99999", "1s"), epoch);
        assert_eq!(g.learned_budgets(), (None, None));
        // Still one request per second, as configured (a burst of 1).
        let at = admit_over(&g, epoch, Duration::from_secs(3), Duration::from_millis(10));
        assert!(at.len() <= 4, "{at:?}");
    }

    #[test]
    fn hostile_learned_budgets_never_park_for_good() {
        // limit 0 with a reset far away: one request per window, the window clamped to
        // the longest believed (60 s here).
        let (g, t0) = gate(false);
        learn(&g, observed("0", "0", "99999999999999"), t0);
        let (rpm, _) = g.learned_budgets();
        assert!((rpm.unwrap() - 1.0).abs() < 1e-9, "{rpm:?}");
        let wake = match g.try_admit(Via::SelfServe, 0, t0) {
            Admit::WakeAt(at) => at,
            other => panic!("{other:?}"),
        };
        assert!(wake <= t0 + Duration::from_secs(60));
        yes(g.try_admit(Via::SelfServe, 0, t0 + Duration::from_secs(61)));
        // Huge limits: no overflow, no panic, effectively unlimited.
        let (g, t0) = gate(false);
        learn(&g, observed("1e300", "1e300", "0"), t0);
        for _ in 0..100 {
            yes(g.try_admit(Via::SelfServe, u64::MAX, t0));
        }
        g.correct_tokens(0, u64::MAX);
        assert!(g.budgets(t0).0.unwrap().is_finite());
    }

    #[test]
    fn adaptive_limit_holds_while_budget_is_low() {
        let (g, t0) = gate(false);
        let g = g.with_adaptive(8);
        let run = |g: &Gate, o: Option<crate::ratelimit::Observed>| {
            for _ in 0..50 {
                let n = g.learned_limit().unwrap();
                let adms: Vec<_> = (0..n)
                    .map(|_| yes(g.try_admit(Via::SelfServe, 0, t0)))
                    .collect();
                for adm in adms {
                    let v = KeyVerdict {
                        accepted: true,
                        limits: o,
                        ..KeyVerdict::default()
                    };
                    g.complete(adm, &v, t0);
                }
            }
            g.learned_limit().unwrap()
        };
        // A token budget (these admissions ask for no tokens, so it never stops them):
        // 50 of 1000 left is low, no growth; 500 of 1000 is not.
        let tokens = |remaining: u64| crate::ratelimit::Observed {
            tokens: crate::ratelimit::Budget {
                limit: Some(1000),
                remaining: Some(remaining),
                reset: Some(Duration::from_secs(1)),
            },
            ..Default::default()
        };
        assert_eq!(run(&g, Some(tokens(50))), 1);
        assert_eq!(run(&g, Some(tokens(500))), 8);
    }

    #[test]
    fn saturating_seconds() {
        let max = Duration::from_secs(60);
        assert_eq!(secs_saturating(f64::NAN, max), Duration::ZERO);
        assert_eq!(secs_saturating(-1.0, max), Duration::ZERO);
        assert_eq!(secs_saturating(1e300, max), max);
        assert_eq!(secs_saturating(f64::INFINITY, max), max);
        assert_eq!(secs_saturating(1.5, max), Duration::from_millis(1500));
    }
}
