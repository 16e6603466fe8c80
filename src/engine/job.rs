//! A request in motion: the request, where its answer goes, and its retry history.

use std::sync::Arc;
use std::time::Instant;

use crate::admission::Admission;
use crate::deadline::Slot;
use crate::error::{Error, TimeoutPhase};
use crate::request::Request;
use crate::stream::StreamState;
use crate::ticket::{Reply, RequestResult};

/// Where the job's one answer goes.
pub(crate) enum Answer {
    /// Only the job holds the reply (no deadline, no cancel handle).
    Own(Option<Reply>),
    /// Shared with the deadline registry, which answers it if the deadline passes
    /// while the job waits, and with the caller's cancel handle (`cancel.rs`).
    Shared(Arc<Slot>),
}

impl Answer {
    /// Disarms the reply without delivering anything (`submit` failed and tells the
    /// caller itself).
    pub(crate) fn defuse(self) {
        let reply = match self {
            Answer::Own(r) => r,
            Answer::Shared(slot) => slot.take(),
        };
        if let Some(r) = reply {
            r.defuse();
        }
    }

    /// The same answer in a slot, to share with the deadline registry.
    pub(crate) fn into_slot(self) -> Arc<Slot> {
        match self {
            Answer::Own(r) => Slot::new(r.expect("a new job's reply is unanswered")),
            Answer::Shared(slot) => slot,
        }
    }
}

pub(crate) struct Job {
    pub req: Request,
    answer: Answer,
    /// HTTP attempts made so far (what records and errors report).
    pub attempts: u32,
    /// Attempts charged against `retry.max_attempts`: an attempt that failed because of
    /// the key (401/403, 402) is not the request's fault and is not charged.
    pub charged: u32,
    /// Keys tried, in order.
    pub tried: Vec<usize>,
    /// When the first attempt started.
    pub first_start: Option<Instant>,
    /// When the request was submitted (its queue time runs to `first_start`).
    pub submitted: Instant,
    /// Overall deadline, if any.
    pub deadline: Option<Instant>,
    /// Not to be dispatched before this instant (retry backoff).
    pub not_before: Option<Instant>,
    /// The last attempt's error, reported if the job ends without another attempt.
    pub last_error: Option<Error>,
    /// Token estimate for `tpm` limits (0 when no key has one).
    pub est_tokens: u64,
    /// The key admission this job holds while it is with a worker (see `admission.rs`).
    pub admission: Option<(usize, Admission)>,
    /// Streamed requests: where chunks go and how much the caller has.
    pub stream: Option<Box<StreamState>>,
    /// The request's `"model"`: read at submit when routing by model, else when first
    /// asked ([`Job::model`]).
    pub model: std::sync::OnceLock<Option<Arc<str>>>,
    /// Which keys serve `model` (`None`: every key), see `routing.rs`.
    pub serves: Option<Arc<[bool]>>,
    /// The key that answered this request with a 403 that did not say why, if one did
    /// (`blame::Fault::Forbidden`): the request goes once more to another key; served
    /// there, it counts as evidence against that key.
    pub forbidden_by: Option<usize>,
    /// The hash of the request's affinity (`Request::with_affinity`, or its `"user"`
    /// with `affinity_from_user`): its first attempt waits for its key (`routing::
    /// affinity_home`) while that key is only busy.
    pub affinity: Option<u64>,
    /// Models still to fall back to, in order (`Request::with_fallback_models`, the
    /// config's `fallback_models`), and the one now in the body if it is a fallback.
    pub fallbacks: std::collections::VecDeque<Arc<str>>,
    pub fallback: Option<Arc<str>>,
    /// The provider answered that the model is overloaded (a 503 blamed on the
    /// model): with a fallback left, the job moves to it instead of waiting.
    pub model_overloaded: bool,
}

impl Job {
    pub(crate) fn with_answer(
        req: Request,
        answer: Answer,
        deadline: Option<Instant>,
        est_tokens: u64,
    ) -> Job {
        Job {
            req,
            answer,
            attempts: 0,
            charged: 0,
            tried: Vec::new(),
            first_start: None,
            submitted: Instant::now(),
            deadline,
            not_before: None,
            last_error: None,
            est_tokens,
            admission: None,
            stream: None,
            model: std::sync::OnceLock::new(),
            serves: None,
            forbidden_by: None,
            affinity: None,
            fallbacks: std::collections::VecDeque::new(),
            fallback: None,
            model_overloaded: false,
        }
    }

    /// Moves the job to its next fallback model that some key serves: the body's
    /// `"model"` replaced, its routing recomputed, the keys it tried forgotten (they
    /// were tried for another model). False when none is left, the body is not a JSON
    /// object, or a stream already delivered text (a fallback would repeat it).
    pub(crate) fn next_fallback(&mut self, shared: &crate::shared::Shared) -> bool {
        if self.stream.as_ref().is_some_and(|s| s.delivered()) {
            return false;
        }
        while let Some(model) = self.fallbacks.pop_front() {
            let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&self.req.body) else {
                return false;
            };
            let Some(obj) = body.as_object_mut() else {
                return false;
            };
            let serves = (shared.router.as_ref()).map(|r| r.serving(&shared.config, Some(&model)));
            if serves.as_ref().is_some_and(|s| !s.iter().any(|&b| b)) {
                continue; // no key serves this one either
            }
            obj.insert(
                "model".to_owned(),
                serde_json::Value::String(model.to_string()),
            );
            let Ok(bytes) = serde_json::to_vec(&body) else {
                return false;
            };
            log::info!(
                "keypool: falling back from model {:?} to {model:?}",
                self.model().map(|m| m.to_string())
            );
            self.req.body = Arc::from(bytes);
            self.model = std::sync::OnceLock::from(Some(model.clone()));
            self.serves = serves;
            self.tried.clear();
            self.model_overloaded = false;
            self.fallback = Some(model);
            return true;
        }
        false
    }

    /// The request's `"model"`, if its body has a string one (read once).
    pub(crate) fn model(&self) -> Option<&Arc<str>> {
        self.model
            .get_or_init(|| crate::routing::model_of(&self.req.body))
            .as_ref()
    }

    fn take_reply(&mut self) -> Option<Reply> {
        match &mut self.answer {
            Answer::Own(r) => r.take(),
            Answer::Shared(slot) => slot.take(),
        }
    }

    /// Whether the job was already answered elsewhere (its deadline passed while it
    /// waited): it must not be sent.
    pub(crate) fn is_answered(&self) -> bool {
        match &self.answer {
            Answer::Own(r) => r.is_none(),
            Answer::Shared(slot) => slot.is_answered(),
        }
    }

    /// The reply's slot, if it is shared (a deadline, or a caller's cancel handle).
    pub(crate) fn slot(&self) -> Option<&Arc<Slot>> {
        match &self.answer {
            Answer::Own(_) => None,
            Answer::Shared(slot) => Some(slot),
        }
    }

    /// Whether the caller cancelled the request through its handle (it was answered
    /// `Cancelled` then).
    pub(crate) fn was_cancelled(&self) -> bool {
        self.slot().is_some_and(|s| s.is_cancelled())
    }

    /// An attempt on `key` (key index `index`) starts now. False if the job was
    /// already answered (and must not be sent).
    pub(crate) fn begin_attempt(&mut self, index: usize, key: &Arc<str>, now: Instant) -> bool {
        if let Answer::Shared(slot) = &self.answer {
            if !slot.begin_attempt(key) {
                return false;
            }
        }
        self.attempts += 1;
        self.tried.push(index);
        self.first_start.get_or_insert(now);
        true
    }

    /// Submit to the first attempt's start (zero before any attempt).
    pub(crate) fn queue_time(&self) -> std::time::Duration {
        self.first_start.map_or(std::time::Duration::ZERO, |f| {
            f.saturating_duration_since(self.submitted)
        })
    }

    /// The attempt begun by `begin_attempt` has returned.
    pub(crate) fn end_attempt(&self) {
        if let Answer::Shared(slot) = &self.answer {
            slot.end_attempt();
        }
    }

    /// Delivers the job's one result (nothing, if it was already answered).
    pub(crate) fn finish(mut self, result: RequestResult) {
        if let Some(r) = self.take_reply() {
            r.send(result);
        }
    }

    /// Ends the job because its deadline passed.
    pub(crate) fn finish_deadline(self) {
        // Name the key of the last attempt, if there was one.
        let key = match &self.last_error {
            Some(e) if e.response().is_some() => e.response().map(|r| r.key_label().to_owned()),
            Some(Error::Transport { key, .. }) => Some(key.clone()),
            Some(Error::Timeout { key, .. }) => key.clone(),
            _ => None,
        };
        let attempts = self.attempts;
        self.finish(Err(Error::Timeout {
            phase: TimeoutPhase::Deadline,
            key,
            attempts,
        }));
    }

    /// Disarms the job's reply (`submit` failed and tells the caller itself) and hands
    /// the request back.
    pub(crate) fn into_request(mut self) -> Request {
        if let Some(r) = self.take_reply() {
            r.defuse();
        }
        // A placeholder for the field the job still owns (no JSON built: this runs on
        // every `Busy` refusal).
        let empty = Request::raw("/", &[]);
        std::mem::replace(&mut self.req, empty)
    }
}

impl Drop for Job {
    /// A job dropped unanswered still answers: during a panic with [`Error::Panic`]
    /// (it may have been sent: "cancelled" would be a lie), else with its last
    /// attempt's error if it had one, else `Cancelled` (shutdown before it was sent).
    fn drop(&mut self) {
        if let Some(r) = self.take_reply() {
            let e = if std::thread::panicking() {
                Error::Panic("a keypool thread panicked while handling the request".to_owned())
            } else {
                self.last_error.take().unwrap_or(Error::Cancelled)
            };
            r.send(Err(e));
        }
    }
}
