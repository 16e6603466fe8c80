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
    /// Take the key out of rotation for good, with this reason (401/403, 402).
    pub disable: Option<String>,
    /// The server answered 429: a learned limit is cut.
    pub rate_limited: bool,
    /// Cool the key's whole group (account) for this long: a 429 its rule attributes to
    /// the account.
    pub group_cooldown: Option<Duration>,
}

#[derive(Debug)]
struct State {
    idle: usize,
    trial: Trial,
    cooldown_until: Option<Instant>,
    /// A 429 arrived while a trial was out: that trial, even if answered, must not
    /// reopen the key (the 429 is the newer news).
    trial_stale: bool,
    disabled: Option<(String, u64)>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// Admissions not yet completed.
    out: usize,
    /// The learned concurrency limit (`adaptive` keys).
    aimd: Option<Aimd>,
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
    disabled: AtomicBool,
    trial_out: AtomicBool,
    /// Cooldown end, microseconds since `epoch` (0: none).
    cooldown_until: AtomicU64,
    /// Limits shared with other processes (`Config::shared`), asked after the local rules.
    shared: Option<crate::shared_limits::KeyLink>,
}

impl Gate {
    pub(crate) fn new(probe: bool, rpm: Option<u64>, tpm: Option<u64>, epoch: Instant) -> Gate {
        Gate {
            state: Mutex::new(State {
                idle: 0,
                trial: if probe { Trial::Pending } else { Trial::Open },
                cooldown_until: None,
                trial_stale: false,
                disabled: None,
                rpm: rpm.map(|r| Bucket::per_minute(r as f64, epoch)),
                tpm: tpm.map(|t| Bucket::per_minute(t as f64, epoch)),
                out: 0,
                aimd: None,
            }),
            epoch,
            has_limits: rpm.is_some() || tpm.is_some(),
            group: None,
            idle: AtomicUsize::new(0),
            at_limit: AtomicBool::new(false),
            limit: AtomicUsize::new(0),
            disabled: AtomicBool::new(false),
            trial_out: AtomicBool::new(false),
            cooldown_until: AtomicU64::new(0),
            shared: None,
        }
    }

    /// Makes this gate also ask the limits shared with other processes.
    pub(crate) fn attach_shared(&mut self, link: crate::shared_limits::KeyLink) {
        self.shared = Some(link);
    }

    /// Makes the key a member of `group`, whose limits it then also obeys.
    pub(crate) fn with_group(mut self, group: Arc<GroupGate>) -> Gate {
        self.has_limits |= group.has_limits;
        self.group = Some(group);
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
        self.trial_out.store(s.trial == Trial::Out, SeqCst);
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
            return Admit::Never;
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
        if let Some(at) = a.max(b) {
            return Admit::WakeAt(at);
        }
        if let (Some(group), Some(g)) = (&self.group, g) {
            if let Some(no) = group.check(g, tokens, now) {
                return no;
            }
        }
        Admit::Yes(Admission {
            trial: s.trial == Trial::Pending,
            tokens: if s.tpm.is_some() || group_tpm {
                tokens
            } else {
                0
            },
            cuts: s.aimd.as_ref().map_or(0, Aimd::cuts),
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
            verdict = self.apply_shared(&mut s, link.acquire(tokens), verdict);
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
        }
        self.mirror(&s);
        verdict
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
            SharedAdmit::Yes => local,
            SharedAdmit::WakeAt(at) => Admit::WakeAt(at),
            SharedAdmit::Cooling(until) => {
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
                a.on_success(busy);
            }
            // A slot freed (or the limit moved): a waiting job may fit now.
            changed |= busy || v.rate_limited;
        }
        if let Some(group) = &self.group {
            let mut g = group.state.lock();
            changed |= group.release(&mut g, v.group_cooldown, now);
        }
        if let Some(d) = v.cooldown {
            let until = now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(86_400));
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
            if s.disabled.is_none() {
                s.disabled = Some((reason.clone(), unix_ms_now()));
            }
            changed = true;
        }
        if adm.trial && s.trial == Trial::Out {
            let reopen = v.accepted && v.cooldown.is_none() && !s.trial_stale;
            s.trial_stale = false;
            s.trial = if reopen { Trial::Open } else { Trial::Pending };
            changed = true;
        }
        self.mirror(&s);
        drop(s);
        if let Some(link) = &self.shared {
            link.release(v);
        }
        changed
    }

    /// Gives back the budget of an admission whose job never reached the wire.
    pub(crate) fn refund(&self, adm: Admission) {
        if !self.has_limits {
            return;
        }
        let mut s = self.state.lock();
        if let Some(b) = s.rpm.as_mut() {
            b.correct(1, 0);
        }
        if let Some(b) = s.tpm.as_mut() {
            b.correct(adm.tokens, 0);
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
        drop(s);
        if let Some(link) = &self.shared {
            link.refund(adm.tokens);
        }
    }

    /// Corrects the token bucket once the real usage is known.
    pub(crate) fn correct_tokens(&self, estimated: u64, actual: u64) {
        if !self.has_limits {
            return;
        }
        let mut s = self.state.lock();
        if let Some(b) = s.tpm.as_mut() {
            b.correct(estimated, actual);
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
        let mut s = self.state.lock();
        if s.disabled.is_some() {
            return false;
        }
        let shared = self.shared.as_ref().map(|link| (link, reason.clone()));
        s.disabled = Some((reason, unix_ms_now()));
        self.mirror(&s);
        drop(s);
        if let Some((link, reason)) = shared {
            link.disable(&reason); // parked in every process sharing the key
        }
        true
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled.load(SeqCst)
    }

    pub(crate) fn has_limits(&self) -> bool {
        self.has_limits
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
        !self.has_limits
            && !self.is_disabled()
            && self.cooling_until(now).is_none()
            && self.state.lock().trial == Trial::Open
    }

    /// The disabled reason and when (Unix ms), if disabled.
    pub(crate) fn disabled(&self) -> Option<(String, u64)> {
        self.state.lock().disabled.clone()
    }

    /// Rate budgets now: (requests, tokens).
    pub(crate) fn budgets(&self, now: Instant) -> (Option<f64>, Option<f64>) {
        if !self.has_limits {
            return (None, None);
        }
        let mut s = self.state.lock();
        (
            s.rpm.as_mut().map(|b| b.balance(now)),
            s.tpm.as_mut().map(|b| b.balance(now)),
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
