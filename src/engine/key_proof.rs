//! Proving a key cheaply (`retry.prove_keys`): as the pool starts, every key on trial
//! (`retry.probe_keys`) is shown to its server with an authenticated `GET` — OpenRouter's
//! `{base_url}/key`, else `{base_url}/models` — in parallel for all keys, one short-lived
//! thread each. A `2xx` opens the key to `max_concurrent` at once instead of after its
//! first completion; the trial request goes out meanwhile all the same, so nothing ever
//! waits for a proof.
//!
//! A `GET` proves a key only where the server checks keys: for each base URL the same
//! path is first asked *without* a key (the control), and only a path whose control is
//! refused with 401/403 is used. OpenRouter's `/models` is public, so it never proves a
//! key there; its `/key` does. Where no path checks keys (Ollama, an open vLLM, a custom
//! transport without [`Transport::get`](crate::Transport::get)), or the answer is
//! anything else (a refusal, a timeout, garbage), the key stays on trial exactly as
//! without proofs: a revoked key still costs one request, never a burst. A proof never
//! disables or blames a key — only a completion's answer does. What a proof cannot see
//! is a key out of quota or rate-limited at start (OpenAI's `/models` lists for a key
//! without quota): such a key, proven, sends its first wave together — at most
//! `max_concurrent` fast refusals, each moved to another key uncharged — and is then
//! parked or cooled like any other.
//!
//! With `credits.check` on, the balance check each key gets at start is its proof (a
//! balance read for the key opens it), and no proof thread runs.
//!
//! A proof (its control requests included) is bounded as a whole by the attempt
//! timeout and by `connect_timeout_ms` clamped to 0.5–2 s (a proof later than that is
//! worth nothing), and sends nothing more once the pool is closing. Its thread holds the
//! pool weakly, and closing the pool joins it like every pool thread: a close waits at
//! most that bound for a proof a server stalls, and no thread outlives the pool.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::config::ApiKey;
use crate::shared::Shared;
use crate::transport::{HttpRequest, Transport};
use crate::worker::KeyWorkerCtx;

/// The paths tried, in order, relative to the base URL.
const PATHS: [&str; 2] = ["/key", "/models"];

/// Largest body read from a proof or control answer, in bytes.
const MAX_BODY: u64 = 64 * 1024;

/// Which of [`PATHS`] check keys at one base URL, found once by the first key to ask.
type Site = Arc<OnceLock<Vec<&'static str>>>;

/// One key's proof: what its thread needs, and nothing that keeps the pool alive.
struct Proof {
    shared: Weak<Shared>,
    index: usize,
    transport: Arc<dyn Transport>,
    base_url: String,
    key: ApiKey,
    headers: Vec<(String, String)>,
    /// The whole proof (control requests included) ends by then.
    deadline: std::time::Instant,
    site: Site,
}

/// Starts one proof per key on trial (probing and proofs on). Called once the workers
/// are up; never blocks. A proof thread that cannot start leaves its key on trial.
pub(crate) fn start(
    shared: &Arc<Shared>,
    ctxs: &[Arc<KeyWorkerCtx>],
    alive: &crossbeam_channel::Sender<()>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    let retry = &shared.config.retry;
    // With credit checks on, each key's balance check (`GET {base_url}/key`, made by its
    // first worker as the pool starts) is its proof: no second request.
    if !retry.probe_keys || !retry.prove_keys || shared.config.credits.check {
        return threads;
    }
    let mut sites: HashMap<&str, Site> = HashMap::new();
    for ctx in ctxs {
        if !shared.keys[ctx.index].gate.unproven() {
            continue;
        }
        let site = sites.entry(ctx.base_url.as_str()).or_default().clone();
        let proof = Proof {
            shared: Arc::downgrade(shared),
            index: ctx.index,
            transport: ctx.transport.clone(),
            base_url: ctx.base_url.clone(),
            key: ctx.key.clone(),
            headers: ctx.headers.clone(),
            deadline: std::time::Instant::now()
                + ctx.attempt_timeout.min(Duration::from_millis(
                    shared.config.connect_timeout_ms.clamp(500, 2000),
                )),
            site,
        };
        // The pool's close waits for this thread (it holds an `alive` sender).
        let alive = alive.clone();
        let spawned = std::thread::Builder::new()
            // Named like the key's workers (`keypool-<label>-<n>`), so a thread list
            // shows whose proof it is.
            .name(format!("keypool-{}-proof", shared.keys[ctx.index].label))
            .stack_size(shared.config.worker_stack_size)
            .spawn(move || {
                proof.run();
                drop(alive);
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => log::debug!(
                "keypool: no proof for key {} (thread: {e}); it stays on trial",
                shared.keys[ctx.index].label
            ),
        }
    }
    threads
}

impl Proof {
    fn run(self) {
        let checked = self.site.get_or_init(|| self.checking_paths());
        let proven = checked.iter().any(|path| {
            let status = self.get(path, &self.key);
            log::debug!("keypool: proof {path} of key #{}: {status:?}", self.index);
            status.is_some_and(|s| (200..300).contains(&s))
        });
        let Some(shared) = self.shared.upgrade() else {
            return; // the pool is gone
        };
        let ks = &shared.keys[self.index];
        if proven && ks.gate.prove() {
            log::debug!(
                "keypool: key {} proven: open before its first answer",
                ks.label
            );
            shared.nudge();
        }
    }

    /// The paths whose answer without a key is a refusal (401/403): there, a `2xx` with
    /// the key means the server accepted the key.
    fn checking_paths(&self) -> Vec<&'static str> {
        let nobody = ApiKey::new("");
        PATHS
            .into_iter()
            .filter(|path| matches!(self.get(path, &nobody), Some(401 | 403)))
            .collect()
    }

    /// `GET {base_url}{path}` with `key` (none when empty): the status, if any answer.
    fn get(&self, path: &str, key: &ApiKey) -> Option<u16> {
        // Out of time, or the pool is closing: no more requests.
        let timeout = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        let closing = self
            .shared
            .upgrade()
            .is_none_or(|sh| sh.closing.load(std::sync::atomic::Ordering::SeqCst));
        if timeout.is_zero() || closing {
            return None;
        }
        let url = format!("{}{path}", self.base_url);
        // Closed after (`connection: close`): the proof's connection never joins the
        // workers' pool. (ureq may lend it an idle one of theirs, which then closes: at
        // most one extra connection per key over a run — tests allow `per_key + 1`.)
        let close = ("connection".to_owned(), "close".to_owned());
        let headers: Vec<(String, String)> = if key.expose().is_empty() {
            vec![close]
        } else {
            self.headers.iter().cloned().chain([close]).collect()
        };
        let req = HttpRequest {
            url: &url,
            key,
            headers: &headers,
            body: b"",
            timeout,
        };
        // A custom transport's panic must not end this thread silently mid-way.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.transport.get(&req, MAX_BODY)
        }));
        match answer {
            Ok(Ok(resp)) => Some(resp.status),
            _ => None,
        }
    }
}
