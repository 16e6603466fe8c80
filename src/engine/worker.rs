//! Worker threads: each key has exactly `max_concurrent` of them, sharing one transport.
//! A worker takes one job at a time — from its key's rendezvous channel, or, when the
//! pool is saturated, straight from the queue (`self_serve`) — makes one HTTP attempt,
//! and either answers the job or hands it back to the dispatcher for a retry.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::admission::{Admission, Admit, KeyVerdict, Via};
use crate::blame::{Blame, Fault};
use crate::body;
use crate::config::ApiKey;
use crate::error::{Error, TimeoutPhase};
use crate::job::Job;
use crate::key::{FailClass, KeyState};
use crate::request::Response;
use crate::retry::{Verdict, backoff, judge_fault};
use crate::shared::Shared;
use crate::transport::{HttpRequest, HttpResponse, Transport, TransportError};

/// What every worker of one key needs.
pub(crate) struct KeyWorkerCtx {
    pub shared: Arc<Shared>,
    pub index: usize,
    pub transport: Arc<dyn Transport>,
    pub base_url: String,
    /// `base_url` + [`DEFAULT_PATH`](crate::request::DEFAULT_PATH), built once.
    pub default_url: String,
    pub key: ApiKey,
    /// Pool headers overridden by key headers.
    pub headers: Vec<(String, String)>,
    pub attempt_timeout: Duration,
    /// The pool's queue, for taking the next request without the dispatcher.
    pub intake: Receiver<Job>,
}

impl KeyWorkerCtx {
    fn state(&self) -> &KeyState {
        &self.shared.keys[self.index]
    }
}

/// The worker loop: runs until the dispatcher drops the key's sender.
pub(crate) fn run(ctx: Arc<KeyWorkerCtx>, rx: Receiver<Job>, started: Sender<()>) {
    // Told once, when this worker first waits for a job: `Pool::new` returns only when
    // every worker has, so the first requests meet idle workers in config order.
    let mut started = Some(started);
    // The key's first worker checks its balance before anyone can submit (`Pool::new`
    // waits for `started`), so a key at its floor gets no request.
    crate::credits::check_at_start(&ctx);
    loop {
        let job = match self_serve(&ctx) {
            Some(job) => job,
            None => {
                let gate = &ctx.state().gate;
                gate.worker_idle();
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
                if ctx.shared.wants_idle.load(SeqCst) {
                    ctx.shared.nudge();
                }
                // The dispatcher's admission takes this worker off the idle count. The
                // first worker of a key parked for its credit wakes at its re-check
                // time (`credits.recheck_ms`) — a known instant, not a poll.
                let got = match crate::credits::parked_recheck_at(&ctx) {
                    Some(at) => match rx.recv_deadline(at) {
                        Ok(job) => Some(job),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            gate.worker_gone();
                            crate::credits::recheck_parked(&ctx);
                            continue;
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => None,
                    },
                    None => rx.recv().ok(),
                };
                match got {
                    Some(job) => job,
                    None => {
                        gate.worker_gone();
                        break; // shutdown: the dispatcher dropped the sender
                    }
                }
            }
        };
        // A panic anywhere in handling (a transport bug, a user callback) must not kill
        // the worker: the key would silently lose capacity. The job, dropped while
        // unwinding, answers `Error::Panic`; the admission guard settles the key.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| handle(&ctx, job))) {
            log::error!(
                "keypool: worker of key {} caught a panic: {}",
                ctx.state().label,
                panic_message(&p)
            );
        }
    }
}

/// Takes the next queued request directly when that is what the dispatcher would do:
/// the pool is saturated (no usable worker anywhere is idle), the dispatcher holds no
/// job of its own, the retry backlog has room, and this key's gate admits it. The
/// first worker to free up is `first_available`'s choice when none is idle, and the
/// least loaded key's when all are full.
#[inline(never)]
fn self_serve(ctx: &KeyWorkerCtx) -> Option<Job> {
    let sh = &ctx.shared;
    if !sh.self_serve
        || sh.closing.load(SeqCst)
        || sh.dispatcher_waiting.load(SeqCst)
        || sh.aside.load(SeqCst) > 0
        || sh.backlog_full()
        || sh.spend.is_exhausted()
    {
        // (At the spend cap the dispatcher answers what is queued, unsent.)
        return None;
    }
    let gate = &ctx.state().gate;
    let now = Instant::now();
    if !gate.self_serve_allowed(now) || sh.any_usable_idle(now) {
        return None; // the dispatcher places by strategy while a worker waits
    }
    let mut job = ctx.intake.try_recv().ok()?;
    sh.took_from(&ctx.intake);
    if job.is_answered() {
        return None; // cancelled (or past its deadline) while queued: dropped unsent
    }
    // A job bound to another key by its affinity is the dispatcher's to place.
    if let Some(h) = job.affinity {
        if crate::routing::affinity_home(sh, &job, h, Instant::now()) != Some(ctx.index) {
            hand_back(ctx, job);
            return None;
        }
    }
    // The same admission as the dispatcher's: the key must serve the job's model, and
    // its gate and group must admit, in one step.
    match crate::routing::admit(sh, ctx.index, &job, Via::SelfServe, Instant::now()) {
        Admit::Yes(adm) => {
            job.admission = Some((ctx.index, adm));
            Some(job)
        }
        _ => {
            // The key changed between the check and the take: the dispatcher places it.
            hand_back(ctx, job);
            None
        }
    }
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Settles a job's admission exactly once: with the attempt's verdict for the key, or,
/// if the job left unsent or handling panicked, with a neutral one (a trial may go
/// again). Nudges the dispatcher when the key's state changed.
struct Settle<'a> {
    ctx: &'a KeyWorkerCtx,
    adm: Option<Admission>,
}

impl Settle<'_> {
    fn complete(&mut self, v: &KeyVerdict) {
        if let Some(adm) = self.adm.take() {
            let ks = self.ctx.state();
            if let Some(reason) = &v.disable {
                if !ks.gate.is_disabled() {
                    ks.log_disabled(reason);
                }
            }
            if ks.gate.complete(adm, v, Instant::now()) {
                self.ctx.shared.nudge();
            }
        }
    }

    /// The job leaves without an attempt: its budget goes back too.
    fn unsent(&mut self) {
        if let Some(adm) = self.adm {
            self.ctx.state().gate.refund(adm);
        }
        self.complete(&KeyVerdict::default());
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.complete(&KeyVerdict::default());
    }
}

/// Never inlined, nor are the paths taken after the attempt (`judge_response`,
/// `transport_failure`, `success_verdict`, `conclude`) or before it (`self_serve`): a
/// frame is sized for everything inlined into it, and this one stays on the stack below
/// ureq's and rustls's for the whole attempt. Inlined, the worker loop's frame was
/// 15 KiB, every page of it resident in each of the pool's worker stacks
/// (`benches/cpu.rs --memory`); out of line, 2.5 KiB here and 3 KiB in `handle`.
#[inline(never)]
fn handle(ctx: &KeyWorkerCtx, mut job: Job) {
    let ks = ctx.state();
    let adm = match job.admission.take() {
        Some((i, adm)) if i == ctx.index => Some(adm),
        _ => None, // cannot happen: every hand-off carries its admission
    };
    let mut settle = Settle { ctx, adm };
    let now = Instant::now();
    // The key was admitted when usable; it may have started cooling in the
    // microseconds since. Hand the job back untouched rather than send into a cooldown.
    if ks.gate.stopped_since_admission(now) {
        settle.unsent();
        hand_back(ctx, job);
        return;
    }
    let mut timeout = ctx.attempt_timeout;
    let mut deadline_bound = false;
    if let Some(d) = job.deadline {
        let left = d.saturating_duration_since(now);
        if left.is_zero() {
            settle.unsent();
            job.finish_deadline();
            return;
        }
        if left < timeout {
            timeout = left;
            deadline_bound = true;
        }
    }
    if job.req.is_cancelled() {
        settle.unsent();
        job.finish(Err(Error::Cancelled)); // given up by its caller before this attempt
        return;
    }
    if let Some(e) = ctx.shared.spend.refusal() {
        settle.unsent();
        job.finish(Err(e)); // the spend cap was reached since it was admitted
        return;
    }
    if !job.begin_attempt(ctx.index, &ks.label, now) {
        settle.unsent();
        return; // answered already (its deadline passed in the queue)
    }
    let first_start = job.first_start.unwrap_or(now);
    if job.attempts == 1 {
        ks.record_queue(job.queue_time());
    }

    let other_url;
    let url: &str = if &*job.req.path == crate::request::DEFAULT_PATH {
        &ctx.default_url
    } else {
        other_url = format!("{}{}", ctx.base_url, job.req.path);
        &other_url
    };
    let extra;
    let headers: &[(String, String)] = if job.req.headers.is_empty() {
        &ctx.headers
    } else {
        extra = ctx
            .headers
            .iter()
            .chain(job.req.headers.iter())
            .cloned()
            .collect::<Vec<_>>();
        &extra
    };
    let body = job.req.body.clone();
    // A mapped model: a per-attempt copy of the body with this key's model id.
    let mapped = crate::routing::body_for(&ctx.shared.config.keys[ctx.index], &job);
    let http = HttpRequest {
        url,
        key: &ctx.key,
        headers,
        body: mapped.as_deref().unwrap_or(&body),
        timeout,
    };
    ks.begin();
    let t0 = Instant::now();
    // A cancel of the request while this attempt runs shuts its connection down.
    let wire = crate::cancel::on_wire(
        job.slot()
            .map(|s| s.clone() as Arc<dyn crate::cancel::Attempt>),
    );
    if job.stream.is_some() {
        // A stream holds this worker (and so one of the key's `max_concurrent` slots)
        // until it ends.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            crate::stream::attempt(ctx, &mut job, &http, first_start, t0, deadline_bound)
        }));
        drop(wire);
        ks.end(t0.elapsed());
        job.end_attempt();
        if outcome.as_ref().is_ok_and(|o| o.is_err()) && job.was_cancelled() {
            return cancelled(&mut settle);
        }
        let (err, verdict, class) = match outcome {
            Ok(Ok(response)) => {
                settle.complete(&success_verdict(ctx, &response.headers));
                forbidden_evidence(ctx, &job);
                job.finish(Ok(response));
                crate::credits::recheck_if_due(ctx);
                return;
            }
            Ok(Err(e)) => *e,
            Err(p) => (
                Error::Panic(panic_message(&p)),
                Verdict::default(),
                FailClass::Other,
            ),
        };
        return conclude(ctx, &mut settle, job, err, verdict, class);
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| ctx.transport.send(&http)));
    drop(wire);
    ks.end(t0.elapsed());
    job.end_attempt();
    if matches!(outcome, Ok(Err(_))) && job.was_cancelled() {
        return cancelled(&mut settle);
    }

    let (err, verdict, class) = match outcome {
        Ok(Ok(resp)) => match judge_response(ctx, &mut job, resp, first_start) {
            Ok(response) => {
                settle.complete(&success_verdict(ctx, &response.headers));
                forbidden_evidence(ctx, &job);
                // A key that serves forgets its unexplained refusals: the evidence
                // against it must be two refusals in a row, not two in a day.
                let strikes = &ctx.state().forbidden_strikes;
                if strikes.load(SeqCst) != 0 {
                    strikes.store(0, SeqCst);
                }
                job.finish(Ok(response));
                crate::credits::recheck_if_due(ctx);
                return;
            }
            Err(e) => *e,
        },
        Ok(Err(e)) => transport_failure(ctx, &job, e, deadline_bound),
        Err(p) => {
            let err = Error::Panic(panic_message(&p));
            (err, Verdict::default(), FailClass::Other)
        }
    };
    conclude(ctx, &mut settle, job, err, verdict, class);
}

/// The caller cancelled the request while its attempt ran, and the attempt failed —
/// most likely because the cancel shut its connection down. The request was answered
/// `Cancelled` by the cancel; the key did nothing wrong: its admission is settled
/// without a verdict (no cooldown, no strike, a trial may go again) and the worker is
/// free at once.
fn cancelled(settle: &mut Settle<'_>) {
    settle.complete(&KeyVerdict::default());
}

/// The key's part of a success: a spent budget announced in the headers pauses the key
/// before a 429; the budgets they announce are learned (`ratelimit.rs`).
#[inline(never)]
fn success_verdict(ctx: &KeyWorkerCtx, headers: &[(String, String)]) -> KeyVerdict {
    // Both readers look only at `x-ratelimit-*` headers (and build their names per
    // call): most responses have none.
    let ratelimit = headers.iter().any(|(k, _)| {
        k.get(..12)
            .is_some_and(|p| p.eq_ignore_ascii_case("x-ratelimit-"))
    });
    if !ratelimit {
        return KeyVerdict {
            accepted: true,
            quiet: true,
            ..KeyVerdict::default()
        };
    }
    let cfg = &ctx.shared.config.retry;
    let max = Duration::from_millis(cfg.max_retry_after_ms);
    KeyVerdict {
        accepted: true,
        cooldown: crate::ratelimit::pause(
            headers,
            Duration::from_millis(cfg.default_cooldown_ms),
            max,
        ),
        limits: observed_limits(ctx, headers),
        ..KeyVerdict::default()
    }
}

/// The budgets an answer's rate-limit headers announce, for the key to learn; `None`
/// when `retry.learn_rate_limits` is off.
fn observed_limits(
    ctx: &KeyWorkerCtx,
    headers: &[(String, String)],
) -> Option<crate::ratelimit::Observed> {
    let cfg = &ctx.shared.config.retry;
    if !cfg.learn_rate_limits {
        return None;
    }
    crate::ratelimit::observe(headers, Duration::from_millis(cfg.max_retry_after_ms))
}

/// An attempt that got no response: its error, verdict and class.
#[inline(never)]
pub(crate) fn transport_failure(
    ctx: &KeyWorkerCtx,
    job: &Job,
    e: TransportError,
    deadline_bound: bool,
) -> (Error, Verdict, FailClass) {
    let label = || ctx.state().label.to_string();
    match e {
        TransportError::Timeout(phase) => {
            let phase = if deadline_bound && phase == TimeoutPhase::Attempt {
                TimeoutPhase::Deadline
            } else {
                phase
            };
            let err = Error::Timeout {
                phase,
                key: Some(label()),
                attempts: job.attempts,
            };
            let retry = phase != TimeoutPhase::Deadline;
            (
                err,
                Verdict {
                    retry,
                    ..Verdict::default()
                },
                FailClass::Timeout,
            )
        }
        TransportError::Failed(message) => {
            let err = Error::Transport {
                key: label(),
                // A custom transport's message may quote a key: mask it like server text.
                message: ctx.shared.masker.mask_str(message),
                attempts: job.attempts,
            };
            (
                err,
                Verdict {
                    retry: true,
                    ..Verdict::default()
                },
                FailClass::Transport,
            )
        }
        // The endpoint's certificate (or its refusal of ours), or a proxy refusing the
        // tunnel: no other key can do better, so no retry, and no key is blamed.
        TransportError::Tls(message) | TransportError::Proxy(message) => (
            Error::Transport {
                key: label(),
                message: ctx.shared.masker.mask_str(message),
                attempts: job.attempts,
            },
            Verdict::default(),
            FailClass::Transport,
        ),
    }
}

/// Settles a failed attempt's admission with the key's part of the verdict, then
/// retries or answers the job.
#[inline(never)]
fn conclude(
    ctx: &KeyWorkerCtx,
    settle: &mut Settle<'_>,
    job: Job,
    err: Error,
    verdict: Verdict,
    class: FailClass,
) {
    // The key's part of the verdict first — a "bad key" verdict disables the key before
    // its next trial can start — then the request's part.
    let out_of_credit = verdict.park || matches!(err, Error::Http { status: 402, .. });
    let answered = matches!(
        class,
        FailClass::RateLimited | FailClass::ClientError | FailClass::ServerError
    );
    // An answer's rate-limit headers teach the key's budgets, a 429's included.
    let limits = match &err {
        Error::Http { response, .. } | Error::InvalidResponse { response, .. } => {
            observed_limits(ctx, &response.headers)
        }
        _ => None,
    };
    settle.complete(&KeyVerdict {
        accepted: answered && verdict.cooldown.is_none() && verdict.disable.is_none(),
        cooldown: verdict.cooldown,
        disable: verdict.disable.clone(),
        park: verdict.park,
        disable_for: verdict.disable_for,
        rate_limited: class == FailClass::RateLimited,
        group_cooldown: verdict.group_cooldown,
        limits,
        quiet: false,
    });
    retry_or_finish(ctx, job, err, verdict, class);
    if out_of_credit {
        // After the job moved on: the balance, for stats, and a park at the floor
        // even when `retry.park_on_402` is off.
        crate::credits::check(ctx);
    }
}

/// Turns an HTTP response into the job's success, or into an error with its verdict.
///
/// A 2xx is a success only if its body is one (`body::inspect_success`): an error
/// inside it is judged by its code, a body that is not valid JSON (or a chat completion
/// without `choices`) is an `InvalidResponse`, retried like a 5xx. A success body is
/// returned untouched (the caller owns the key); on every error path the body, the
/// kept headers and the message have every configured secret masked first.
#[inline(never)]
pub(crate) fn judge_response(
    ctx: &KeyWorkerCtx,
    job: &mut Job,
    resp: HttpResponse,
    first_start: Instant,
) -> Result<Response, Box<(Error, Verdict, FailClass)>> {
    let ks = ctx.state();
    let problem = if (200..300).contains(&resp.status) {
        let content_type = resp
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str());
        match body::inspect_success_billed(&resp.body, &job.req.path, content_type) {
            Ok((usage, cost)) => {
                let usage = usage.unwrap_or_default();
                crate::spend::record(&ctx.shared, ctx.index, job, cost, usage);
                ks.record_success(usage.prompt_tokens, usage.completion_tokens);
                if ks.gate.has_limits() {
                    ks.gate.correct_tokens(
                        job.est_tokens,
                        usage.prompt_tokens.saturating_add(usage.completion_tokens),
                    );
                }
                return Ok(Response {
                    status: resp.status,
                    headers: resp.headers,
                    body: resp.body,
                    key_label: ks.label.clone(),
                    key_index: ctx.index,
                    attempts: job.attempts,
                    latency: first_start.elapsed(),
                    // The job ends with this success: its list moves, no copy.
                    keys_tried: std::mem::take(&mut job.tried),
                    ttft: None,
                    blame: None,
                    queue: job.queue_time(),
                    fallback: job.fallback.clone(),
                });
            }
            Err(p) => Some(p),
        }
    } else {
        None
    };
    // Error path: nothing the server sent leaves here with a key in it.
    let masker = &ctx.shared.masker;
    let mut headers = resp.headers;
    for (_, v) in &mut headers {
        *v = masker.mask_str(std::mem::take(v));
    }
    let body = masker.mask_bytes(&resp.body).unwrap_or(resp.body);
    let response = Response {
        status: resp.status,
        headers,
        body,
        key_label: ks.label.clone(),
        key_index: ctx.index,
        attempts: job.attempts,
        latency: first_start.elapsed(),
        keys_tried: job.tried.clone(),
        ttft: None,
        blame: None,
        queue: job.queue_time(),
        fallback: job.fallback.clone(),
    };
    let status = match problem {
        Some(body::Problem::Invalid(why)) => {
            // The message is masked again: the reason or the snippet could hold a key
            // in a form the body scan missed (decoded JSON escapes).
            let message = masker.mask_str(format!(
                "{why}; body: {}",
                body::text_message(&response.body)
            ));
            let err = Error::InvalidResponse {
                message,
                response: Box::new(response),
            };
            let verdict = Verdict {
                retry: true,
                ..Verdict::default()
            };
            return Err(Box::new((err, verdict, FailClass::ServerError)));
        }
        Some(body::Problem::Embedded(code)) => code.unwrap_or(response.status),
        None => response.status,
        // A 200 whose choice failed: judged like an error answer with that choice's
        // error (a 502 when it has no code), so it is retried, never recorded as a
        // success with empty text.
        Some(body::Problem::ChoiceFailed(..)) => 0,
    };
    // An error inside a 2xx (`{"error": …}`, a failed choice) is upstream's, never the
    // key's: see `blame::judge_in_2xx`.
    let in_2xx = problem.is_some();
    let (status, evidence) = match &problem {
        Some(body::Problem::ChoiceFailed(code, err)) => (
            code.unwrap_or(502),
            masker.mask_bytes(err).unwrap_or_else(|| err.clone()),
        ),
        _ => (status, Vec::new()),
    };
    let evidence: &[u8] = if evidence.is_empty() {
        &response.body
    } else {
        &evidence
    };
    let message = masker.mask_str(body::error_message(evidence));
    let retry_after = response.retry_after();
    let should_retry = response.header("x-should-retry").map(str::to_owned);
    let cfg = &ctx.shared.config.retry;
    // Whose fault, from the evidence (`blame.rs`); then act on that scope only.
    let model = job.model().cloned();
    let fault = if in_2xx {
        crate::blame::judge_in_2xx(status, evidence, model.as_deref())
    } else {
        crate::blame::judge(status, evidence, model.as_deref())
    };
    let mut verdict = judge_fault(
        &fault,
        should_retry.as_deref(),
        retry_after,
        &response.headers,
        cfg,
    );
    let blame = scope(ctx, job, &fault, &mut verdict, model.as_ref());
    // "Overloaded" (a 503 blamed on the model) moves a job with fallbacks on at once.
    job.model_overloaded = fault == Fault::ModelBusy && status == 503;
    if job.model_overloaded && job.can_fall_back() {
        // It moves to its fallback at once: the attempt does not count, so the job
        // lives to move on (`max_attempts` 1 would otherwise end it here). A model
        // that is only cooling stays charged: its retries on the same model end.
        verdict.uncharged = true;
    }
    let mut response = response;
    response.blame = Some(blame);
    if fault == Fault::RateLimited {
        if ctx.shared.config.keys[ctx.index].adaptive && retry_after.is_none() {
            // A learning key answers a bare 429 by cutting its limit (in `complete`),
            // not by cooling: the request is retried at once within the new limit.
            verdict.cooldown = None;
            verdict.retry_after = Some(Duration::ZERO);
        }
        if let Some(group) = ks.gate.group() {
            if group.is_account_429(&message, &response.headers) {
                let d = retry_after.unwrap_or(Duration::from_millis(cfg.default_cooldown_ms));
                verdict.group_cooldown = Some(d.min(Duration::from_millis(cfg.max_retry_after_ms)));
            }
        }
    }
    // Spent budgets announced in the headers pause the key too.
    if let Some(p) = crate::ratelimit::pause(
        &response.headers,
        Duration::from_millis(cfg.default_cooldown_ms),
        Duration::from_millis(cfg.max_retry_after_ms),
    ) {
        verdict.cooldown = verdict.cooldown.max(Some(p));
    }
    let class = match status {
        429 => FailClass::RateLimited,
        500..=599 => FailClass::ServerError,
        _ => FailClass::ClientError,
    };
    let err = if fault == Fault::Flagged {
        Error::Flagged {
            message,
            response: Box::new(response),
        }
    } else {
        Error::Http {
            status,
            message,
            response: Box::new(response),
        }
    };
    Err(Box::new((err, verdict, class)))
}

/// Applies the scope of a fault that depends on more than the answer: a 403 that does
/// not say why (once more on another key, then the request's), a model busy or missing
/// at this key (recorded for the `(key, model)` pair, or for every key on this base
/// URL). Returns whom a final error is blamed on.
pub(crate) fn scope(
    ctx: &KeyWorkerCtx,
    job: &mut Job,
    fault: &Fault,
    verdict: &mut Verdict,
    model: Option<&Arc<str>>,
) -> Blame {
    let sh = &ctx.shared;
    match fault {
        Fault::Forbidden => {
            let elsewhere = || {
                (0..sh.keys.len())
                    .any(|i| i != ctx.index && crate::routing::could_serve(sh, i, job))
            };
            match job.forbidden_by {
                None if elsewhere() => {
                    // Unknown: the key or the request. Once more on another key, not
                    // charged; served there, it is evidence against this key. Until
                    // then the key pauses (`default_cooldown_ms`, then one request
                    // first), so a key that refuses everything cannot refuse a burst.
                    job.forbidden_by = Some(ctx.index);
                    verdict.retry = true;
                    verdict.uncharged = true;
                    let cfg = &sh.config.retry;
                    verdict.cooldown = Some(Duration::from_millis(
                        cfg.default_cooldown_ms.min(cfg.max_retry_after_ms),
                    ));
                }
                // Refused by a second key too: the request is at fault, and the first
                // key's pause is lifted.
                Some(k) if k != ctx.index => {
                    sh.keys[k].gate.lift_cooldown();
                    sh.nudge();
                }
                _ => {}
            }
            Blame::Request
        }
        Fault::ModelBusy => {
            let d = verdict.model_cooldown.unwrap_or_default();
            match model {
                Some(m) => {
                    let until = Instant::now()
                        .checked_add(d)
                        .unwrap_or_else(|| Instant::now() + crate::retry::MAX_WAIT);
                    sh.models.cool(ctx.index, m, until);
                    sh.share_model_cooldown(&[ctx.index], m, d);
                }
                // No model to scope it to: the key cools.
                None => verdict.cooldown = verdict.cooldown.max(Some(d)),
            }
            Blame::Model
        }
        Fault::FreeModels => {
            let d = verdict.model_cooldown.unwrap_or_default();
            let until = Instant::now()
                .checked_add(d)
                .unwrap_or_else(|| Instant::now() + crate::retry::MAX_WAIT);
            // The account's limit: this key's free models, and its group's keys'.
            let group = sh.config.keys[ctx.index].group.as_deref();
            let keys: Vec<usize> = (0..sh.keys.len())
                .filter(|&i| {
                    i == ctx.index
                        || group.is_some_and(|g| sh.config.keys[i].group.as_deref() == Some(g))
                })
                .collect();
            sh.models.cool_free(keys.iter().copied(), until);
            sh.share_model_cooldown(&keys, crate::routing::FREE_MODELS, d);
            Blame::Model
        }
        Fault::ModelMissing | Fault::ModelDenied => {
            match model {
                // Access is the key's (its project or organisation): the pair only.
                Some(m) if *fault == Fault::ModelDenied => {
                    sh.models.exclude([ctx.index], m);
                    // Per key, the first denial is the key's; from the second the
                    // model itself is likely wrong: charged.
                    if std::mem::replace(&mut job.model_denied, true) {
                        verdict.uncharged = false;
                    }
                }
                Some(m) => {
                    // Keys on the same base URL share the verdict: no resend there.
                    let base = sh.config.key_base_url(ctx.index);
                    let same = (0..sh.keys.len()).filter(|&i| sh.config.key_base_url(i) == base);
                    sh.models.exclude(same, m);
                }
                None => {
                    verdict.retry = false;
                    verdict.uncharged = false;
                    verdict.model_missing = false;
                }
            }
            Blame::Model
        }
        f => f.blame(),
    }
}

/// A request that one key refused with an unexplained 403 was served by another: one
/// strike against the refusing key. Two requests refused and then served elsewhere
/// separate the key from the requests: it is taken out of rotation for good.
pub(crate) fn forbidden_evidence(ctx: &KeyWorkerCtx, job: &Job) {
    let Some(k) = job.forbidden_by.filter(|&k| k != ctx.index) else {
        return;
    };
    let ks = &ctx.shared.keys[k];
    let strikes = ks.forbidden_strikes.fetch_add(1, SeqCst).saturating_add(1);
    if strikes >= FORBIDDEN_STRIKES {
        let reason = format!("HTTP 403: refused {strikes} requests that other keys then served");
        if ks.gate.take_out(reason.clone(), false) {
            ks.log_disabled(&reason);
            ctx.shared.nudge();
        }
    }
}

/// Requests a key refused with an unexplained 403, each then served by another key,
/// after which the key is taken out.
const FORBIDDEN_STRIKES: u32 = 2;

fn retry_or_finish(ctx: &KeyWorkerCtx, mut job: Job, err: Error, v: Verdict, class: FailClass) {
    let ks = ctx.state();
    let now = Instant::now();
    let cfg = &ctx.shared.config.retry;
    // A key's fault (revoked, out of credit, the model missing at its base URL, an
    // unexplained 403) is not the request's: that attempt is not charged against
    // `max_attempts`, and the request moves to another key.
    let key_fault = v.uncharged;
    if !key_fault {
        job.charged += 1;
    }
    let retry = v.retry && job.charged < cfg.max_attempts;
    ks.record_failure(class, retry);
    if !retry {
        job.finish(Err(err));
        return;
    }
    // A key problem (429, revoked key) fails over at once: the key's own cooldown keeps
    // it out of rotation. Provider trouble (5xx, timeouts) backs off first.
    let delay = if v.cooldown.is_some() || v.model_cooldown.is_some() || key_fault {
        Duration::ZERO
    } else {
        let cap = Duration::from_millis(cfg.max_retry_after_ms);
        v.retry_after
            .map(|d| d.min(cap))
            .unwrap_or_else(|| backoff(job.charged.saturating_sub(1), cfg))
    };
    if let Some(d) = job.deadline {
        if now + delay >= d {
            log::debug!(
                "keypool: request gives up at its deadline after {} attempt(s): {err}",
                job.attempts
            );
            job.last_error = Some(err);
            job.finish_deadline();
            return;
        }
    }
    log::debug!(
        "keypool: retrying after {delay:?} (attempt {} failed: {err})",
        job.attempts
    );
    job.not_before = (!delay.is_zero()).then(|| now + delay);
    job.last_error = Some(err);
    hand_back(ctx, job);
}

/// Hands a job back to the dispatcher (a retry, or a job that left a key unsent). If
/// the dispatcher is gone (shutdown) the job comes back and drops, answering with its
/// last error (or `Cancelled`).
fn hand_back(ctx: &KeyWorkerCtx, job: Job) {
    // Counted before the send, so the dispatcher's decrement never comes first.
    ctx.shared.backlog.fetch_add(1, SeqCst);
    if let Err(e) = ctx.shared.retry_tx.send(job) {
        ctx.shared.backlog.fetch_sub(1, SeqCst);
        drop(e.into_inner());
    }
}
