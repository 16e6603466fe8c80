//! A request in motion: the request, where its answer goes, and its retry history.

use std::time::Instant;

use crate::error::{Error, TimeoutPhase};
use crate::request::Request;
use crate::ticket::{Reply, RequestResult};

pub(crate) struct Job {
    pub req: Request,
    reply: Option<Reply>,
    /// HTTP attempts made so far.
    pub attempts: u32,
    /// Keys tried, in order.
    pub tried: Vec<usize>,
    /// When the first attempt started.
    pub first_start: Option<Instant>,
    /// Overall deadline, if any.
    pub deadline: Option<Instant>,
    /// Not to be dispatched before this instant (retry backoff).
    pub not_before: Option<Instant>,
    /// The last attempt's error, reported if the job ends without another attempt.
    pub last_error: Option<Error>,
    /// Token estimate for `tpm` limits (0 when no key has one).
    pub est_tokens: u64,
}

impl Job {
    pub(crate) fn new(
        req: Request,
        reply: Reply,
        deadline: Option<Instant>,
        est_tokens: u64,
    ) -> Job {
        Job {
            req,
            reply: Some(reply),
            attempts: 0,
            tried: Vec::new(),
            first_start: None,
            deadline,
            not_before: None,
            last_error: None,
            est_tokens,
        }
    }

    /// Delivers the job's one result.
    pub(crate) fn finish(mut self, result: RequestResult) {
        if let Some(r) = self.reply.take() {
            r.send(result);
        }
    }

    /// Ends the job because its deadline passed.
    pub(crate) fn finish_deadline(self) {
        // Name the key of the last attempt, if there was one.
        let key = match &self.last_error {
            Some(Error::Http { response, .. }) => Some(response.key_label().to_owned()),
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

    /// Disarms the job's reply: `submit` failed and tells the caller itself.
    pub(crate) fn defuse(mut self) {
        if let Some(r) = self.reply.take() {
            r.defuse();
        }
    }
}

impl Drop for Job {
    /// A job dropped unanswered (shutdown, a torn-down channel) still answers: with its
    /// last attempt's error if it had one, else `Cancelled`.
    fn drop(&mut self) {
        if let Some(r) = self.reply.take() {
            r.send(Err(self.last_error.take().unwrap_or(Error::Cancelled)));
        }
    }
}
