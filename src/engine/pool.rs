//! [`Pool`]: the public handle. Builds the engine, takes requests, reports stats,
//! shuts down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;

use crate::config::Config;
use crate::deadline::{Deadlines, Slot};
use crate::dispatch::Dispatcher;
use crate::error::{Error, TimeoutPhase};
use crate::group::GroupGate;
use crate::job::{Answer, Job};
use crate::key::KeyState;
use crate::request::Request;
use crate::routing::Router;
use crate::shared::Shared;
use crate::stats::Stats;
use crate::stream::{ChunkSink, ResponseStream, StreamChunk, StreamState};
use crate::thread_role::{mark_pool_thread, on_pool_thread};
use crate::ticket::{CancelHandle, Reply, RequestResult, Ticket};
use crate::transport::{Transport, TransportFactory, TransportSettings, UreqTransport};
use crate::worker::{self, KeyWorkerCtx};

/// A pool of API keys, each with its own workers, fed by one dispatcher.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`, so any number of threads may submit
/// at once. The pool shuts down when [`close`](Pool::close) is called or the last clone is
/// dropped: in-flight requests finish, queued ones are answered `Cancelled`, and every
/// thread is joined.
///
/// ```
/// use keypool::{Config, Pool, Request};
/// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
/// # let base_url = server.url();
/// let config = Config::builder()
///     .base_url(base_url)            // e.g. "https://openrouter.ai/api/v1"
///     .key("sk-demo-a", 4)
///     .key("sk-demo-b", 4)
///     .build()?;
/// let pool = Pool::new(config)?;
/// let results = pool.batch((0..10).map(|i| Request::chat("m", [("user", &*format!("hi {i}"))])));
/// assert_eq!(results.len(), 10);
/// for r in &results {
///     assert_eq!(r.as_ref().unwrap().status(), 200);
/// }
/// pool.close();
/// # Ok::<(), keypool::Error>(())
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` once closed. `submit` clones it under the lock and sends on the clone, so
    /// a blocked `submit` never holds the lock.
    intake: Mutex<Option<Sender<Job>>>,
    /// Dropped to tell the dispatcher to shut down.
    shutdown: Mutex<Option<Sender<()>>>,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Disconnects when every engine thread has exited (each holds a sender).
    alive: Receiver<()>,
    /// Key events, delivered by the `keypool-events` thread (`events.rs`).
    events: Arc<crate::events::Bus>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field(
                "keys",
                &self
                    .inner
                    .shared
                    .keys
                    .iter()
                    .map(|k| &*k.label)
                    .collect::<Vec<_>>(),
            )
            .field("strategy", &self.inner.shared.config.strategy)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// [`Pool::try_submit`] refused a request: why, and the request itself, unsent.
#[derive(Debug)]
#[non_exhaustive]
pub struct TrySubmitError {
    /// Why: [`Error::Busy`] (the queue is full), [`Error::Closed`], …
    pub error: Error,
    /// The request, unsent.
    pub request: Request,
}

impl TrySubmitError {
    /// Whether the queue was full (try again later).
    pub fn is_busy(&self) -> bool {
        matches!(self.error, Error::Busy)
    }

    /// The request, to submit again.
    pub fn into_request(self) -> Request {
        self.request
    }
}

impl std::fmt::Display for TrySubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for TrySubmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<TrySubmitError> for Error {
    fn from(e: TrySubmitError) -> Error {
        e.error
    }
}

/// How `enqueue` waits for queue space.
enum Mode {
    Block,
    Try,
    Timeout(Duration),
    /// A blocking mode on a keypool thread: send if there is room, otherwise
    /// [`Error::WouldDeadlock`] (waiting there can deadlock the pool).
    NoWait,
}

impl Pool {
    /// Validates `config`, starts one worker pool per key (with a `ureq` agent each) and
    /// the dispatcher, and returns once every worker is waiting for work.
    pub fn new(config: Config) -> Result<Pool, Error> {
        Pool::with_transport(config, |s| {
            Arc::new(UreqTransport::new(s)) as Arc<dyn Transport>
        })
    }

    /// Like [`Pool::new`], with a custom transport built once per key (for tests,
    /// benchmarks, or another HTTP client).
    pub fn with_transport(
        config: Config,
        factory: impl Fn(&TransportSettings) -> Arc<dyn Transport> + Send + Sync + 'static,
    ) -> Result<Pool, Error> {
        Pool::start(config, Arc::new(factory))
    }

    fn start(config: Config, factory: TransportFactory) -> Result<Pool, Error> {
        config.validate()?;
        let tls = crate::transport::TlsTrust::load(&config.tls).map_err(|e| match e {
            Error::Config { field, message } => Error::Config {
                field,
                message: crate::body::Masker::for_config(&config).mask_str(message),
            },
            other => other,
        })?;
        let epoch = Instant::now();
        let (intake_tx, intake_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (retry_tx, retry_rx) = crossbeam_channel::unbounded();
        let (events_tx, events_rx) = crossbeam_channel::bounded(1);
        let (shutdown_tx, shutdown_rx) = crossbeam_channel::bounded::<()>(0);
        let (alive_tx, alive_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
        let groups: Vec<Arc<GroupGate>> = config
            .groups
            .iter()
            .map(|g| Arc::new(GroupGate::new(g, epoch)))
            .collect();
        let mut keys: Vec<KeyState> = (0..config.keys.len())
            .map(|i| KeyState::with_groups(&config, i, epoch, &groups))
            .collect();
        let models = Arc::new(crate::routing::ModelVerdicts::default());
        let limits = crate::shared_limits::start(&config, events_tx.clone(), models.clone())?;
        let bus = crate::events::Bus::new();
        for (i, k) in keys.iter_mut().enumerate() {
            k.gate.attach_events(bus.for_key(i, k.label.clone()));
        }
        if let Some(limits) = &limits {
            for (i, k) in keys.iter_mut().enumerate() {
                k.gate
                    .attach_shared(crate::shared_limits::KeyLink::new(limits.clone(), i));
            }
        }
        let router = Router::for_config(&config);
        let strategy = config.strategy;
        let queue_capacity = config.queue_capacity;
        let spend = crate::spend::Spend::new(&config, limits.clone());
        let shared = Arc::new(Shared {
            spend,
            any_tpm: config.keys.iter().any(|k| k.tpm.is_some()),
            masker: crate::body::Masker::for_config(&config),
            config,
            keys,
            retry_tx,
            backlog: AtomicUsize::new(0),
            events_tx,
            deadlines: Deadlines::new(),
            self_serve: strategy != crate::config::Strategy::RoundRobin,
            wants_idle: AtomicBool::new(false),
            dispatcher_waiting: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            space: crate::queue_space::QueueSpace::new(queue_capacity),
            broken: Mutex::new(None),
            router,
            models,
            limits,
            aside: AtomicUsize::new(0),
            groups,
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            #[cfg(test)]
            test_dispatcher_panics: std::sync::atomic::AtomicU32::new(0),
        });
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            intake: Mutex::new(Some(intake_tx)),
            shutdown: Mutex::new(Some(shutdown_tx)),
            closed: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            alive: alive_rx,
            events: bus,
        });
        let pool = Pool { inner };

        // Start every thread. If one cannot start (thread limit, memory), stop those
        // already running and report it: nothing may be left waiting forever.
        if let Err(e) = pool.spawn_engine(
            &shared,
            &factory,
            &tls,
            intake_rx,
            retry_rx,
            events_rx,
            shutdown_rx,
            alive_tx,
            started_tx,
        ) {
            pool.inner.begin_close();
            // Every started thread ends once its channel disconnects; bounded anyway.
            pool.inner
                .join(Some(Instant::now() + Duration::from_secs(30)));
            return Err(e);
        }
        // Every worker reports once it waits for its first job (a channel, not a poll).
        let workers: usize = shared.config.keys.iter().map(|k| k.max_concurrent).sum();
        for _ in 0..workers {
            if started_rx.recv().is_err() {
                break; // a worker died before starting: its key just has fewer
            }
        }
        Ok(pool)
    }

    /// Starts the workers and the dispatcher. On error the threads already started
    /// exit as soon as the channels this returns without drop.
    #[allow(clippy::too_many_arguments)]
    fn spawn_engine(
        &self,
        shared: &Arc<Shared>,
        factory: &TransportFactory,
        tls: &crate::transport::TlsTrust,
        intake_rx: Receiver<Job>,
        retry_rx: Receiver<Job>,
        events_rx: Receiver<()>,
        shutdown_rx: Receiver<()>,
        alive_tx: Sender<()>,
        started_tx: Sender<()>,
    ) -> Result<(), Error> {
        let cfg = &shared.config;
        let mut senders = Vec::with_capacity(cfg.keys.len());
        let mut ctxs = Vec::with_capacity(cfg.keys.len());
        for (i, k) in cfg.keys.iter().enumerate() {
            let label = shared.keys[i].label.to_string();
            let settings = TransportSettings {
                label: label.clone(),
                max_concurrent: k.max_concurrent,
                timeout: Duration::from_millis(cfg.timeout_ms),
                connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                max_response_bytes: cfg.max_response_bytes,
                tls: tls.clone(),
            };
            let mut headers: BTreeMap<String, (String, String)> = BTreeMap::new();
            for (name, value) in cfg.headers.iter().chain(k.headers.iter()) {
                headers.insert(name.to_ascii_lowercase(), (name.clone(), value.clone()));
            }
            let ctx = Arc::new(KeyWorkerCtx {
                shared: shared.clone(),
                index: i,
                transport: factory(&settings),
                base_url: cfg.key_base_url(i).trim_end_matches('/').to_owned(),
                default_url: format!(
                    "{}{}",
                    cfg.key_base_url(i).trim_end_matches('/'),
                    crate::request::DEFAULT_PATH
                ),
                key: k.key.clone(),
                headers: headers.into_values().collect(),
                attempt_timeout: settings.timeout,
                intake: intake_rx.clone(),
            });
            let (tx, rx) = crossbeam_channel::bounded::<Job>(0);
            senders.push(tx);
            ctxs.push(ctx.clone());
            for n in 0..k.max_concurrent {
                let (ctx, rx, alive) = (ctx.clone(), rx.clone(), alive_tx.clone());
                let started = started_tx.clone();
                self.spawn(
                    format!("keypool-{label}-{n}"),
                    cfg.worker_stack_size,
                    move || {
                        worker::run(ctx, rx, started);
                        drop(alive);
                    },
                )?;
            }
        }
        // Key proofs (`key_proof.rs`): joined at close like every pool thread.
        let proofs = crate::key_proof::start(shared, &ctxs, &alive_tx);
        self.inner.threads.lock().extend(proofs);
        let dispatcher = Dispatcher::new(
            shared.clone(),
            intake_rx,
            retry_rx,
            events_rx,
            shutdown_rx,
            senders,
        );
        self.spawn("keypool-dispatch".to_owned(), 256 * 1024, move || {
            dispatcher.run();
            drop(alive_tx);
        })?;
        // Delivers key events until every engine thread has exited (`alive`), then the
        // rest: `close` returns once every event was handed to the handler.
        let (bus, until) = (self.inner.events.clone(), self.inner.alive.clone());
        self.spawn("keypool-events".to_owned(), 256 * 1024, move || {
            bus.run(until)
        })?;
        Ok(())
    }

    fn spawn(
        &self,
        name: String,
        stack: usize,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), Error> {
        #[cfg(test)]
        if test_spawn_should_fail() {
            return Err(Error::Spawn {
                thread: name,
                message: "test: injected spawn failure".to_owned(),
            });
        }
        let name_for_error = name.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .stack_size(stack)
            .spawn(move || {
                mark_pool_thread();
                f()
            })
            .map_err(|e| Error::Spawn {
                thread: name_for_error,
                message: e.to_string(),
            })?;
        self.inner.threads.lock().push(handle);
        Ok(())
    }

    /// Queues `req`; on refusal the request comes back unsent with the reason.
    #[allow(clippy::result_large_err)] // the request itself comes back: moved, not boxed
    fn enqueue(&self, req: Request, reply: Answer, mode: Mode) -> Result<(), TrySubmitError> {
        self.enqueue_job(req, reply, None, mode)
    }

    #[allow(clippy::result_large_err)] // the request itself comes back: moved, not boxed
    fn enqueue_job(
        &self,
        req: Request,
        reply: Answer,
        stream: Option<Box<StreamState>>,
        mode: Mode,
    ) -> Result<(), TrySubmitError> {
        let shared = &self.inner.shared;
        if let Some(msg) = shared.broken.lock().clone() {
            reply.defuse();
            return Err(TrySubmitError {
                error: Error::Panic(format!("the keypool dispatcher failed: {msg}")),
                request: req,
            });
        }
        if let Some(error) = shared.spend.refusal() {
            reply.defuse();
            return Err(TrySubmitError {
                error,
                request: req,
            });
        }
        let tx = match (!self.inner.closed.load(Relaxed))
            .then(|| self.inner.intake.lock().clone())
            .flatten()
        {
            Some(tx) => tx,
            None => {
                reply.defuse();
                return Err(TrySubmitError {
                    error: Error::Closed,
                    request: req,
                });
            }
        };
        let limit = req.deadline.or_else(|| {
            (shared.config.deadline_ms > 0)
                .then(|| Duration::from_millis(shared.config.deadline_ms))
        });
        // A per-request deadline too far away to represent is no deadline at all.
        let now = Instant::now();
        let deadline = limit.and_then(|d| now.checked_add(d));
        let est = if shared.any_tpm || shared.groups_tpm() {
            req.estimated_tokens()
        } else {
            0
        };
        // Routing by model: read the model once, refuse at once if no key serves it.
        let route = match &shared.router {
            Some(router) => {
                let model = crate::routing::model_of(&req.body);
                let serves = router.serving(&shared.config, model.as_ref());
                // A model no key serves is refused at once — unless it has fallbacks.
                let fallbacks = req.fallbacks.as_ref().is_some_and(|f| !f.is_empty())
                    || model
                        .as_ref()
                        .is_some_and(|m| shared.config.fallback_models.contains_key(&**m));
                if !serves.iter().any(|&s| s) && !fallbacks {
                    reply.defuse();
                    return Err(TrySubmitError {
                        error: Error::ModelNotServed {
                            model: model.map(|m| m.to_string()),
                        },
                        request: req,
                    });
                }
                Some((model, serves))
            }
            None => None,
        };
        // The deadline holds wherever the job waits: the dispatcher answers it on time
        // even while the job sits in the queue (see `deadline.rs`). The slot is
        // registered once the job is in the queue, never before: a refused submit must
        // not have its reply answered (and a callback run) by the registry.
        let affinity = match req.affinity.as_deref() {
            Some(a) => Some(crate::routing::affinity_hash(a)),
            None if shared.config.affinity_from_user => {
                crate::routing::user_of(&req.body).map(|u| crate::routing::affinity_hash(&u))
            }
            None => None,
        };
        let mut registration = None;
        let job = match deadline {
            Some(at) => {
                let slot = reply.into_slot();
                registration = Some((at, slot.clone()));
                Job::with_answer(req, Answer::Shared(slot), deadline, est)
            }
            None => Job::with_answer(req, reply, deadline, est),
        };
        let mut job = job;
        job.stream = stream;
        job.affinity = affinity;
        let fallbacks: Vec<Arc<str>> = match &job.req.fallbacks {
            Some(list) => list.to_vec(),
            None if !shared.config.fallback_models.is_empty() => job
                .model()
                .and_then(|m| shared.config.fallback_models.get(&**m))
                .map(|l| l.iter().map(|m| Arc::from(m.as_str())).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        job.fallbacks = fallbacks.into();
        if let Some((model, serves)) = route {
            job.model = std::sync::OnceLock::from(model);
            job.serves = Some(serves);
        }
        let mode = match mode {
            Mode::Block | Mode::Timeout(_) if on_pool_thread() => Mode::NoWait,
            m => m,
        };
        let sent = match mode {
            Mode::Block => self.send_blocking(&tx, job),
            // A free slot is owed to the first blocked submitter in line, if any.
            Mode::Try if shared.space.has_waiters() => Err((job, Error::Busy)),
            Mode::Try => tx.try_send(job).map_err(|e| match e {
                TrySendError::Full(j) => (j, Error::Busy),
                TrySendError::Disconnected(j) => (j, Error::Closed),
            }),
            // In line with the blocking submitters; any free slot within `d` will do
            // once it is first (no hysteresis, which could time out while slots are
            // free but fewer than an eighth of the queue).
            Mode::Timeout(d) => match Instant::now().checked_add(d) {
                Some(at) => self.send_in_line(&tx, job, Some(at)),
                None => self.send_in_line(&tx, job, None),
            },
            Mode::NoWait => tx.try_send(job).map_err(|e| match e {
                TrySendError::Full(j) => (j, Error::WouldDeadlock("submit on a full queue")),
                TrySendError::Disconnected(j) => (j, Error::Closed),
            }),
        };
        match sent {
            Ok(()) => {
                shared.submitted.fetch_add(1, Relaxed);
                if let Some((at, slot)) = registration {
                    // Already answered (placed and done) by now: the registry drops
                    // it at its instant, a no-op.
                    if shared.deadlines.register(at, slot) {
                        shared.nudge();
                    }
                }
                Ok(())
            }
            Err((job, e)) => Err(TrySubmitError {
                error: e,
                request: job.into_request(),
            }),
        }
    }

    /// Sends `job`, waiting for queue space as long as it takes. Blocked submitters
    /// wait in line, in arrival order (`queue_space.rs`): a full queue is waited out
    /// with hysteresis — the first in line sleeps until an eighth of the queue is
    /// free, not until the next slot is (its job would wait behind the same requests
    /// either way). Once shutdown has begun it waits in crossbeam's `send` as before
    /// (the dispatcher's drain takes the job and answers it `Cancelled`).
    #[allow(clippy::result_large_err)] // the job itself comes back: moved, not boxed
    fn send_blocking(&self, tx: &Sender<Job>, job: Job) -> Result<(), (Job, Error)> {
        // Nobody in line and room now: no line to join.
        let job = if self.inner.shared.space.has_waiters() {
            job
        } else {
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(j)) => return Err((j, Error::Closed)),
                Err(TrySendError::Full(j)) => j,
            }
        };
        self.send_in_line(tx, job, None)
    }

    /// Waits in the submitters' line (`queue_space.rs`) until `job` is in the queue,
    /// the pool closes, or `deadline` (`submit_timeout`: then any free slot will do
    /// once first in line).
    #[allow(clippy::result_large_err)] // the job itself comes back: moved, not boxed
    fn send_in_line(
        &self,
        tx: &Sender<Job>,
        job: Job,
        deadline: Option<Instant>,
    ) -> Result<(), (Job, Error)> {
        let shared = &self.inner.shared;
        let mut held = Some(job);
        let mut closed = false;
        let stopping = || shared.closing.load(std::sync::atomic::Ordering::SeqCst);
        let turn = shared.space.send_in_turn(
            || match tx.try_send(held.take().expect("held until sent")) {
                Ok(()) => true,
                Err(TrySendError::Full(j)) => {
                    held = Some(j);
                    false
                }
                Err(TrySendError::Disconnected(j)) => {
                    held = Some(j);
                    closed = true;
                    true
                }
            },
            || tx.len(),
            stopping,
            deadline,
            deadline.is_some(),
        );
        let job = match (turn, held) {
            (_, None) => return Ok(()),
            (_, Some(j)) if closed => return Err((j, Error::Closed)),
            (crate::queue_space::Turn::TimedOut, Some(j)) => {
                return Err((
                    j,
                    Error::Timeout {
                        phase: TimeoutPhase::Submit,
                        key: None,
                        attempts: 0,
                    },
                ));
            }
            (_, Some(j)) => j,
        };
        // Shutdown began while in line: the drain answers whatever gets in.
        match deadline {
            None => tx.send(job).map_err(|e| (e.into_inner(), Error::Closed)),
            Some(at) => tx.send_deadline(job, at).map_err(|e| match e {
                SendTimeoutError::Timeout(j) => (
                    j,
                    Error::Timeout {
                        phase: TimeoutPhase::Submit,
                        key: None,
                        attempts: 0,
                    },
                ),
                SendTimeoutError::Disconnected(j) => (j, Error::Closed),
            }),
        }
    }

    /// A ticket and its reply, in a slot the ticket can cancel through.
    fn ticket_reply(&self) -> (Answer, Ticket) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let reply = self.counted_fn(move |r| {
            let _ = tx.send(r);
        });
        let slot = Slot::new(reply);
        let ticket = Ticket::new(rx, CancelHandle::new(slot.clone()));
        (Answer::Shared(slot), ticket)
    }

    /// A reply calling `callback` that the pool's `completed` counter sees. The callback
    /// is captured bare (not as an inner `Reply`), so a defused reply drops it without
    /// calling it: a refused `submit_with` never runs its callback.
    fn counted_fn(&self, callback: impl FnOnce(RequestResult) + Send + 'static) -> Reply {
        let shared = self.inner.shared.clone();
        Reply::new(move |r| {
            shared.completed.fetch_add(1, Relaxed);
            callback(r);
        })
    }

    /// Submits a request, blocking while the queue is full. The ticket yields its result.
    ///
    /// Errors: [`Error::Closed`] if the pool is closed; [`Error::WouldDeadlock`] if the
    /// queue is full and this is called on a keypool thread (from a callback): there it
    /// never waits (see [`submit_with`](Pool::submit_with) for what callbacks may call).
    pub fn submit(&self, req: Request) -> Result<Ticket, Error> {
        let (reply, ticket) = self.ticket_reply();
        self.enqueue(req, reply, Mode::Block)
            .map(|()| ticket)
            .map_err(|e| e.error)
    }

    /// Submits without blocking. If the queue is full ([`Error::Busy`]) or the pool is
    /// closed, the request comes back unsent in the error, to retry later without a
    /// clone (as crossbeam's `TrySendError::Full(T)` does).
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let pool = keypool::Pool::new(keypool::Config::builder().base_url(server.url()).key("sk-a", 1).build()?)?;
    /// use keypool::{Error, Request, TrySubmitError};
    /// let mut req = Request::chat("m", [("user", "hi")]);
    /// let ticket = loop {
    ///     match pool.try_submit(req) {
    ///         Ok(t) => break t,
    ///         Err(TrySubmitError { error: Error::Busy, request, .. }) => req = request,
    ///         Err(e) => return Err(e.into()),
    ///     }
    /// };
    /// assert!(ticket.wait().is_ok());
    /// # Ok::<(), keypool::Error>(())
    /// ```
    #[allow(clippy::result_large_err)] // the request itself comes back: moved, not boxed
    pub fn try_submit(&self, req: Request) -> Result<Ticket, TrySubmitError> {
        let (reply, ticket) = self.ticket_reply();
        self.enqueue(req, reply, Mode::Try).map(|()| ticket)
    }

    /// Submits, waiting at most `timeout` for queue space
    /// ([`Error::Timeout`] with phase `Submit` if there was none). On a keypool thread
    /// (from a callback) it never waits: [`Error::WouldDeadlock`] if the queue is full.
    pub fn submit_timeout(&self, req: Request, timeout: Duration) -> Result<Ticket, Error> {
        let (reply, ticket) = self.ticket_reply();
        self.enqueue(req, reply, Mode::Timeout(timeout))
            .map(|()| ticket)
            .map_err(|e| e.error)
    }

    /// Submits with a callback instead of a ticket, blocking while the queue is full.
    ///
    /// If this returns `Ok`, `callback` is called exactly once with the result, on a
    /// keypool thread: the worker that finished the request, or the dispatcher (for a
    /// request it answers without sending: cancelled at shutdown, deadline passed, no
    /// usable key). Never on the thread that calls `submit_with` or `close`. If it returns `Err`, `callback` is
    /// never called. Keep callbacks short: a worker runs no other request meanwhile.
    ///
    /// # What a callback may call
    ///
    /// A callback must never wait for a pool: once every worker waits inside a callback,
    /// nothing is left to serve the queue. So on a keypool thread the calls that would
    /// wait return [`Error::WouldDeadlock`] at once instead:
    /// [`submit`](Pool::submit), [`submit_with`](Pool::submit_with) and
    /// [`submit_timeout`](Pool::submit_timeout) when the queue is full (with room they
    /// succeed), [`batch`](Pool::batch) (every element), [`Ticket::wait`] and
    /// [`Ticket::wait_timeout`] when the result is not ready yet, and
    /// [`close_timeout`](Pool::close_timeout). Always allowed: [`try_submit`](Pool::try_submit),
    /// [`try_submit_with`](Pool::try_submit_with), [`Ticket::try_wait`], a ticket whose
    /// result is ready, [`stats`](Pool::stats) and the other accessors, and
    /// [`close`](Pool::close), which starts the shutdown and returns without waiting.
    /// A [`stream`](Pool::stream) must not be iterated in a callback (it waits for results).
    pub fn submit_with(
        &self,
        req: Request,
        callback: impl FnOnce(RequestResult) + Send + 'static,
    ) -> Result<(), Error> {
        let reply = Answer::Own(Some(self.counted_fn(callback)));
        self.enqueue(req, reply, Mode::Block).map_err(|e| e.error)
    }

    /// Like [`submit_with`](Pool::submit_with) but never blocks: if the queue is full
    /// ([`Error::Busy`]) or the pool is closed, the request comes back unsent in the
    /// error and `callback` is never called.
    #[allow(clippy::result_large_err)] // the request itself comes back: moved, not boxed
    pub fn try_submit_with(
        &self,
        req: Request,
        callback: impl FnOnce(RequestResult) + Send + 'static,
    ) -> Result<(), TrySubmitError> {
        let reply = Answer::Own(Some(self.counted_fn(callback)));
        self.enqueue(req, reply, Mode::Try)
    }

    /// Submits a streamed request (`"stream": true` is set, and usage in the final chunk
    /// is asked for with `stream_options.include_usage` unless the body sets it),
    /// blocking while the queue is full. Iterate the returned [`ResponseStream`] for
    /// each chunk as it arrives, then the final outcome: the assembled
    /// `chat.completion` (full message, `finish_reason`, `usage`) or an error.
    ///
    /// A stream is a request like any other: it counts against its key's
    /// `max_concurrent` for its whole length, honours rate limits, the deadline and
    /// `stream_idle_timeout_ms`, and is retried on another key while no chunk has
    /// reached the caller; after that a failure ends it with [`Error::Stream`] saying
    /// how much was delivered. A server that answers with one JSON body instead of
    /// events gives no chunks and that body as the outcome.
    ///
    /// Errors: [`Error::InvalidRequest`] if the body is not a JSON object; otherwise as
    /// [`submit`](Pool::submit).
    ///
    /// ```
    /// use keypool::{Config, Pool, Request, StreamEvent};
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// let pool = Pool::new(Config::builder().base_url(server.url()).key("sk-a", 2).build()?)?;
    /// let mut text = String::new();
    /// for event in pool.submit_stream(Request::chat("m", [("user", "Say hi")]))? {
    ///     match event {
    ///         StreamEvent::Chunk(c) => text.push_str(c.delta()),
    ///         StreamEvent::Done(result) => {
    ///             let response = result?;
    ///             assert_eq!(response.content().unwrap(), text);
    ///             assert!(response.usage().is_some());
    ///         }
    ///     }
    /// }
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn submit_stream(&self, req: Request) -> Result<ResponseStream, Error> {
        self.stream_with_mode(req, Mode::Block)
    }

    /// Like [`submit_stream`](Pool::submit_stream) but never blocks: [`Error::Busy`] if
    /// the queue is full.
    pub fn try_submit_stream(&self, req: Request) -> Result<ResponseStream, Error> {
        self.stream_with_mode(req, Mode::Try)
    }

    fn stream_with_mode(&self, req: Request, mode: Mode) -> Result<ResponseStream, Error> {
        let req = crate::stream::prepare(req)?;
        let (chunk_tx, chunk_rx) = crossbeam_channel::bounded(crate::stream::CHUNK_BUFFER);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let reply = self.counted_fn(move |r| {
            let _ = tx.send(r);
        });
        let slot = Slot::new(reply);
        let cancel = CancelHandle::new(slot.clone());
        let state = StreamState::new(ChunkSink::Channel(chunk_tx));
        self.enqueue_job(req, Answer::Shared(slot), Some(state), mode)
            .map_err(Error::from)?;
        Ok(ResponseStream::new(chunk_rx, rx, cancel))
    }

    /// Submits a streamed request with callbacks instead of a [`ResponseStream`],
    /// blocking while the queue is full (see [`submit_stream`](Pool::submit_stream)).
    ///
    /// `on_chunk` runs for each chunk, in order, on the keypool worker thread reading the
    /// stream, before the next chunk is read: keep it short. Returning `false` stops the
    /// stream (it ends with [`Error::Stream`] of kind `Abandoned`). `on_done` then runs
    /// exactly once with the final outcome (on that worker, or on the dispatcher for a
    /// request answered without being sent), and never if this returns `Err`. Both
    /// callbacks may call what [`submit_with`](Pool::submit_with)'s may.
    pub fn submit_stream_with(
        &self,
        req: Request,
        mut on_chunk: impl FnMut(&StreamChunk) -> bool + Send + 'static,
        on_done: impl FnOnce(RequestResult) + Send + 'static,
    ) -> Result<(), Error> {
        let req = crate::stream::prepare(req)?;
        let reply = Answer::Own(Some(self.counted_fn(on_done)));
        let state = StreamState::new(ChunkSink::Callback(Box::new(move |c| on_chunk(&c))));
        self.enqueue_job(req, reply, Some(state), Mode::Block)
            .map_err(Error::from)
    }

    /// Sends every request and returns one result per request, in input order. A
    /// failure never hides or cancels another request's result.
    ///
    /// On a keypool thread (from a callback) nothing is sent: every element is
    /// [`Error::WouldDeadlock`], since waiting for the results there can deadlock the pool.
    pub fn batch(&self, requests: impl IntoIterator<Item = Request>) -> Vec<RequestResult> {
        if on_pool_thread() {
            return requests
                .into_iter()
                .map(|_| Err(Error::WouldDeadlock("batch")))
                .collect();
        }
        // Results land in one shared sink (no channel per request). On a full queue the
        // blocking submit sleeps until an eighth of it is free (`queue_space.rs`), and
        // at the end the caller sleeps once for all the results, not for each.
        let sink = Arc::new(BatchSink::default());
        let mut sent = 0;
        for req in requests {
            let i = sink.open();
            let s = sink.clone();
            match self.submit_with(req, move |r| s.put(i, r)) {
                Ok(()) => sent += 1,
                Err(e) => sink.refused(i, e),
            }
        }
        sink.wait_for(sent);
        let mut st = sink.state.lock();
        std::mem::take(&mut st.results)
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Cancelled)))
            .collect()
    }

    /// A snapshot of per-key and pool-wide counters.
    pub fn stats(&self) -> Stats {
        let shared = &self.inner.shared;
        let mut queue = crate::stats::Histogram::new();
        for k in &shared.keys {
            k.merge_queue(&mut queue);
        }
        Stats {
            submitted: shared.submitted.load(Relaxed),
            completed: shared.completed.load(Relaxed),
            queued: self.inner.intake.lock().as_ref().map_or(0, |tx| tx.len()),
            keys: shared.keys.iter().map(KeyState::snapshot).collect(),
            groups: shared.groups.iter().map(|g| g.snapshot()).collect(),
            queue_p50_ms: queue.quantile(0.50) as f64 / 1000.0,
            queue_p99_ms: queue.quantile(0.99) as f64 / 1000.0,
            events_dropped: self.inner.events.dropped(),
        }
    }

    pub(crate) fn event_bus(&self) -> &crate::events::Bus {
        &self.inner.events
    }

    /// The keys' labels, in config order.
    pub fn labels(&self) -> Vec<String> {
        self.inner
            .shared
            .keys
            .iter()
            .map(|k| k.label.to_string())
            .collect()
    }

    /// The validated configuration this pool runs with.
    pub fn config(&self) -> &Config {
        &self.inner.shared.config
    }

    /// `text` with every secret of this pool's configuration replaced — each key (also
    /// JSON-escaped) by `[REDACTED:<label>]`, a base URL's password by `[REDACTED]` —
    /// as the pool's own error messages are; `None` when none occurs. For text a server
    /// sent back (a success body may echo a key) before it is logged or stored.
    pub fn mask_secrets(&self, text: &[u8]) -> Option<Vec<u8>> {
        self.inner.shared.masker.mask_bytes(text)
    }

    /// Total worker threads over all keys.
    pub fn capacity(&self) -> usize {
        self.inner
            .shared
            .keys
            .iter()
            .map(|k| k.max_concurrent)
            .sum()
    }

    /// Whether [`close`](Pool::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Relaxed)
    }

    /// Stops intake, lets in-flight requests finish, answers every queued request
    /// (`Cancelled`), and joins every thread. Idempotent; later submits get
    /// [`Error::Closed`]. Called from a keypool thread (inside a callback) it starts the
    /// shutdown but does not wait (a thread cannot join itself, and waiting for another
    /// pool there could deadlock): it returns at once and the threads exit on their own
    /// once their in-flight requests finish; a later `close` on another thread joins them.
    pub fn close(&self) {
        self.inner.begin_close();
        self.inner.join(None);
    }

    /// Like [`close`](Pool::close) but waits at most `timeout` for the threads; on
    /// timeout returns [`Error::Timeout`] with phase `Shutdown` (the threads finish in
    /// the background; a later `close` joins them). Called from a keypool thread (inside
    /// a callback) it starts the shutdown and returns [`Error::WouldDeadlock`] at once,
    /// without waiting.
    pub fn close_timeout(&self, timeout: Duration) -> Result<(), Error> {
        self.inner.begin_close();
        if on_pool_thread() {
            return Err(Error::WouldDeadlock("waiting for shutdown"));
        }
        if self.inner.join(Some(Instant::now() + timeout)) {
            Ok(())
        } else {
            Err(Error::Timeout {
                phase: TimeoutPhase::Shutdown,
                key: None,
                attempts: 0,
            })
        }
    }
}

impl Inner {
    fn begin_close(&self) {
        self.closed.store(true, Relaxed);
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.space.wake_all();
        drop(self.intake.lock().take());
        drop(self.shutdown.lock().take());
    }

    /// Waits for every engine thread to exit (until `deadline`), then joins them.
    /// Returns false on timeout. Never waits on a keypool thread (a callback may drop
    /// the last `Pool` clone on a worker; it cannot join itself, and waiting for another
    /// pool from a callback could deadlock).
    fn join(&self, deadline: Option<Instant>) -> bool {
        if on_pool_thread() {
            return false;
        }
        let done = match deadline {
            Some(d) => !matches!(self.alive.recv_deadline(d), Err(RecvTimeoutError::Timeout)),
            None => {
                let _ = self.alive.recv();
                true
            }
        };
        if done {
            for h in std::mem::take(&mut *self.threads.lock()) {
                let _ = h.join();
            }
            // Every event was delivered: drop the handler (it may hold a `Pool` clone).
            self.events.release();
        }
        done
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.begin_close();
        self.join(None);
    }
}

#[cfg(test)]
thread_local! {
    /// Test hook: spawns left before `spawn` fails (on the thread building the pool).
    static SPAWNS_BEFORE_FAILURE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn test_spawn_should_fail() -> bool {
    SPAWNS_BEFORE_FAILURE.with(|c| match c.get() {
        Some(0) => true,
        Some(n) => {
            c.set(Some(n - 1));
            false
        }
        None => false,
    })
}

/// Where [`Pool::batch`]'s results land, in input order, and how many have.
#[derive(Default)]
struct BatchSink {
    state: Mutex<BatchState>,
    arrived: parking_lot::Condvar,
}

#[derive(Default)]
struct BatchState {
    results: Vec<Option<RequestResult>>,
    /// Results put by callbacks (not counting refused submissions).
    done: usize,
    /// The waiter wants waking when `done` reaches this.
    wake_at: usize,
}

impl BatchSink {
    /// A slot for the next request; its index.
    fn open(&self) -> usize {
        let mut st = self.state.lock();
        st.results.push(None);
        st.results.len() - 1
    }

    /// A submitted request's result (runs on a pool thread, once per request).
    fn put(&self, i: usize, r: RequestResult) {
        let mut st = self.state.lock();
        st.results[i] = Some(r);
        st.done += 1;
        if st.done == st.wake_at {
            self.arrived.notify_one();
        }
    }

    /// A request the pool refused: its result now, never counted as done.
    fn refused(&self, i: usize, e: Error) {
        self.state.lock().results[i] = Some(Err(e));
    }

    /// Sleeps until `n` submitted requests have their results.
    fn wait_for(&self, n: usize) {
        let mut st = self.state.lock();
        st.wake_at = n;
        while st.done < n {
            self.arrived.wait(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{HttpRequest, HttpResponse, TransportError};

    /// Answers every request 200 with a minimal chat completion, at once.
    struct Instant200;
    impl Transport for Instant200 {
        fn send(&self, _: &HttpRequest<'_>) -> Result<HttpResponse, TransportError> {
            Ok(HttpResponse {
                status: 200,
                headers: Vec::new(),
                body: br#"{"choices":[{"message":{"role":"assistant","content":"ok"}}]}"#.to_vec(),
            })
        }
    }

    fn config(keys: usize, per_key: usize) -> Config {
        let mut b = Config::builder().base_url("http://127.0.0.1:9/v1");
        for i in 0..keys {
            b = b.key(format!("sk-test-{i}"), per_key);
        }
        b.build().unwrap()
    }

    fn pool(c: Config) -> Result<Pool, Error> {
        Pool::with_transport(c, |_| Arc::new(Instant200) as Arc<dyn Transport>)
    }

    /// A thread that cannot start fails `Pool::new` with `Error::Spawn` in bounded time
    /// (it used to hang forever), and the threads already started are stopped.
    #[test]
    fn spawn_failure_is_an_error_not_a_hang() {
        for fail_at in [0, 1, 5, 8] {
            SPAWNS_BEFORE_FAILURE.with(|c| c.set(Some(fail_at)));
            let t0 = Instant::now();
            let r = pool(config(2, 4));
            SPAWNS_BEFORE_FAILURE.with(|c| c.set(None));
            match r {
                Err(Error::Spawn { thread, message }) => {
                    assert!(thread.starts_with("keypool-"), "{thread}");
                    assert!(message.contains("injected"), "{message}");
                }
                other => panic!("fail_at {fail_at}: expected Error::Spawn, got {other:?}"),
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "fail_at {fail_at}");
        }
        // The pool builds normally afterwards.
        let p = pool(config(2, 4)).unwrap();
        assert_eq!(
            p.batch((0..8).map(|_| Request::chat("m", [("user", "x")])))
                .len(),
            8
        );
    }

    /// A panic in the dispatcher answers the job it held with `Error::Panic` (never
    /// `Cancelled`, never nothing) and the dispatcher keeps serving.
    #[test]
    fn dispatcher_survives_a_panic() {
        let p = pool(config(1, 2)).unwrap();
        p.inner
            .shared
            .test_dispatcher_panics
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let r = p
            .submit(Request::chat("m", [("user", "x")]))
            .unwrap()
            .wait();
        assert!(matches!(r, Err(Error::Panic(_))), "{r:?}");
        let rs = p.batch((0..20).map(|_| Request::chat("m", [("user", "x")])));
        assert!(rs.iter().all(|r| r.is_ok()), "{rs:?}");
        p.close();
    }

    /// After repeated panics the dispatcher gives up, but every request still gets an
    /// answer: queued ones an error, later ones a refusal.
    #[test]
    fn failed_dispatcher_answers_everything() {
        let p = pool(config(1, 1)).unwrap();
        p.inner
            .shared
            .test_dispatcher_panics
            .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let tickets: Vec<_> = (0..10)
            .map(|_| p.submit(Request::chat("m", [("user", "x")])))
            .collect();
        for t in tickets {
            match t {
                Ok(t) => assert!(matches!(t.wait(), Err(Error::Panic(_)))),
                Err(e) => assert!(matches!(e, Error::Panic(_)), "{e:?}"),
            }
        }
        // Once broken, submits are refused at once.
        let e = p.submit(Request::chat("m", [("user", "x")])).unwrap_err();
        assert!(matches!(e, Error::Panic(_)), "{e:?}");
        p.close();
    }
}
