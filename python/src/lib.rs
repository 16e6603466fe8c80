//! `keypool._keypool`: the native half of the `keypool` Python package.
//!
//! Every call that can block (submitting on a full queue, waiting for a result, a
//! stream's next chunk, closing) runs with the interpreter detached (`py.detach`, the
//! GIL released), in slices of at most [`SLICE`]: between slices `check_signals` runs
//! the Python signal handlers, so Ctrl-C raises `KeyboardInterrupt` within a slice.
//! Completion callbacks (`submit_with`, `submit_stream_with`, used by the asyncio
//! layer) run on keypool threads and attach to the interpreter only to call back.
//!
//! Errors become the exception classes of `keypool._errors` (built by its `_make`),
//! so the hierarchy lives in Python where it is documented and typed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use keypool::{
    Config, DEFAULT_PATH, Error, Request, RequestResult, ResponseStream, StreamChunk, StreamEvent,
    Ticket, TimeoutPhase,
};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

/// The longest the GIL stays released before signal handlers get a chance to run.
const SLICE: Duration = Duration::from_millis(50);

/// The exception for a keypool error: an instance of the `keypool._errors` class for
/// its code.
fn exc_value<'py>(py: Python<'py>, e: &Error) -> PyResult<Bound<'py, PyAny>> {
    let response = match e.response() {
        Some(r) => Some(Py::new(py, PyResponse { inner: r.clone() })?),
        None => None,
    };
    let phase = match e {
        Error::Timeout { phase, .. } => Some(phase.as_str()),
        _ => None,
    };
    let make = py.import("keypool._errors")?.getattr("_make")?;
    make.call1((
        e.code(),
        e.to_string(),
        e.http_status(),
        response,
        e.retry_after().map(|d| d.as_secs_f64()),
        e.blame().map(|b| b.as_str()),
        e.attempts(),
        phase,
    ))
}

fn to_pyerr(py: Python<'_>, e: &Error) -> PyErr {
    match exc_value(py, e) {
        Ok(v) => PyErr::from_value(v),
        Err(err) => err,
    }
}

/// A result as a Python value: the `Response`, or the exception instance (not raised).
fn outcome(py: Python<'_>, r: RequestResult) -> PyResult<(bool, Py<PyAny>)> {
    match r {
        Ok(resp) => Ok((true, Py::new(py, PyResponse { inner: resp })?.into_any())),
        Err(e) => Ok((false, exc_value(py, &e)?.unbind())),
    }
}

fn request(body: &str, path: Option<&str>, cancel: &Arc<AtomicBool>) -> Result<Request, Error> {
    Request::from_json(path.unwrap_or(DEFAULT_PATH), body).map(|r| r.with_cancel(cancel.clone()))
}

/// A request's (or a batch's) cancel flag: once set, what has not been sent is
/// answered `Cancelled` instead (`Request::with_cancel`).
#[pyclass(frozen, module = "keypool._keypool", name = "Cancel")]
struct PyCancel {
    flag: Arc<AtomicBool>,
}

#[pymethods]
impl PyCancel {
    /// Gives up what has not been sent yet.
    fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    #[getter]
    fn cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

fn json_loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

fn is_wait_timeout(e: &Error) -> bool {
    matches!(
        e,
        Error::Timeout {
            phase: TimeoutPhase::Wait | TimeoutPhase::Submit,
            ..
        }
    )
}

/// Submits `req`, blocking while the queue is full, interruptibly.
fn submit_blocking(py: Python<'_>, pool: &keypool::Pool, req: Request) -> PyResult<Ticket> {
    loop {
        let r = req.clone(); // an Arc'd body: cheap
        match py.detach(|| pool.submit_timeout(r, SLICE)) {
            Ok(t) => return Ok(t),
            Err(e) if is_wait_timeout(&e) => py.check_signals()?,
            Err(e) => return Err(to_pyerr(py, &e)),
        }
    }
}

/// A pool of API keys (see `keypool.Pool`).
#[pyclass(frozen, module = "keypool._keypool", name = "Pool")]
struct PyPool {
    pool: keypool::Pool,
}

impl Drop for PyPool {
    fn drop(&mut self) {
        // Dropped with the GIL held: closing here could wait for a worker that waits for
        // the GIL in a callback. Close on a thread of its own instead.
        if !self.pool.is_closed() {
            let pool = self.pool.clone();
            let _ = std::thread::Builder::new()
                .name("keypool-py-close".into())
                .spawn(move || pool.close());
        }
    }
}

#[pymethods]
impl PyPool {
    #[new]
    fn new(py: Python<'_>, config: &str) -> PyResult<PyPool> {
        let config = Config::from_json(config).map_err(|e| to_pyerr(py, &e))?;
        let pool = py
            .detach(|| keypool::Pool::new(config))
            .map_err(|e| to_pyerr(py, &e))?;
        Ok(PyPool { pool })
    }

    /// Submits one request (JSON text); blocks while the queue is full.
    #[pyo3(signature = (body, path=None))]
    fn submit(&self, py: Python<'_>, body: &str, path: Option<&str>) -> PyResult<PyTicket> {
        let cancel = Arc::new(AtomicBool::new(false));
        let req = request(body, path, &cancel).map_err(|e| to_pyerr(py, &e))?;
        let ticket = submit_blocking(py, &self.pool, req)?;
        Ok(PyTicket {
            state: Mutex::new(TicketState::Waiting(ticket)),
            cancel,
        })
    }

    /// Submits with `callback(ok, value)` called once on a keypool thread. With
    /// `block=False` returns False (nothing submitted) when the queue is full.
    #[pyo3(signature = (body, callback, block, path=None))]
    fn submit_with(
        &self,
        py: Python<'_>,
        body: &str,
        callback: Py<PyAny>,
        block: bool,
        path: Option<&str>,
    ) -> PyResult<Option<PyCancel>> {
        let flag = Arc::new(AtomicBool::new(false));
        let req = request(body, path, &flag).map_err(|e| to_pyerr(py, &e))?;
        let reply = move |r: RequestResult| {
            Python::attach(|py| {
                let res = outcome(py, r).and_then(|(ok, v)| callback.call1(py, (ok, v)));
                if let Err(e) = res {
                    e.write_unraisable(py, None);
                }
            })
        };
        let sent = if block {
            py.detach(|| self.pool.submit_with(req, reply))
        } else {
            match self.pool.try_submit_with(req, reply) {
                Err(e) if e.is_busy() => return Ok(None),
                other => other.map_err(Error::from),
            }
        };
        sent.map(|()| Some(PyCancel { flag }))
            .map_err(|e| to_pyerr(py, &e))
    }

    /// Submits a streamed request; iterate the result for chunks.
    #[pyo3(signature = (body, path=None))]
    fn submit_stream(&self, py: Python<'_>, body: &str, path: Option<&str>) -> PyResult<PyStream> {
        let cancel = Arc::new(AtomicBool::new(false));
        let req = request(body, path, &cancel).map_err(|e| to_pyerr(py, &e))?;
        let pool = &self.pool;
        let stream = py
            .detach(|| pool.submit_stream(req))
            .map_err(|e| to_pyerr(py, &e))?;
        Ok(PyStream {
            state: Mutex::new(Some(stream)),
            response: Mutex::new(None),
            cancel,
        })
    }

    /// Submits a streamed request with callbacks: `on_chunk(chunk) -> bool` (False
    /// stops the stream) and `on_done(ok, value)`, both on a keypool thread. Blocks while
    /// the queue is full.
    #[pyo3(signature = (body, on_chunk, on_done, path=None))]
    fn submit_stream_with(
        &self,
        py: Python<'_>,
        body: &str,
        on_chunk: Py<PyAny>,
        on_done: Py<PyAny>,
        path: Option<&str>,
    ) -> PyResult<PyCancel> {
        let flag = Arc::new(AtomicBool::new(false));
        let req = request(body, path, &flag).map_err(|e| to_pyerr(py, &e))?;
        let chunk = move |c: &StreamChunk| {
            Python::attach(|py| {
                let res = Py::new(py, PyChunk { inner: c.clone() })
                    .and_then(|c| on_chunk.call1(py, (c,)))
                    .and_then(|v| v.is_truthy(py));
                res.unwrap_or_else(|e| {
                    e.write_unraisable(py, None);
                    false
                })
            })
        };
        let done = move |r: RequestResult| {
            Python::attach(|py| {
                let res = outcome(py, r).and_then(|(ok, v)| on_done.call1(py, (ok, v)));
                if let Err(e) = res {
                    e.write_unraisable(py, None);
                }
            })
        };
        let pool = &self.pool;
        py.detach(|| pool.submit_stream_with(req, chunk, done))
            .map(|()| PyCancel { flag })
            .map_err(|e| to_pyerr(py, &e))
    }

    /// One result per body, in input order: a `Response` or an exception instance.
    #[pyo3(signature = (bodies, path=None))]
    fn batch<'py>(
        &self,
        py: Python<'py>,
        bodies: Vec<String>,
        path: Option<&str>,
    ) -> PyResult<Bound<'py, PyList>> {
        let n = bodies.len();
        let mut driver = Driver::new(&self.pool, None);
        let mut input = bodies.into_iter();
        let mut results: Vec<Option<Py<PyAny>>> = (0..n).map(|_| None).collect();
        let mut done = 0;
        while done < n {
            let cancel = driver.cancel.clone();
            driver.top_up(py, &mut || {
                Ok(input.next().map(|b| request(&b, path, &cancel)))
            })?;
            let (i, r) = driver.next(py)?.expect("a result is owed");
            results[i] = Some(outcome(py, r)?.1);
            done += 1;
        }
        PyList::new(py, results.into_iter().map(|r| r.expect("every result")))
    }

    /// Results as they complete, as `(index, result)`, with at most `window` requests
    /// in flight (default: the pool's capacity plus its queue).
    #[pyo3(signature = (iterable, window=None, path=None))]
    fn imap(
        &self,
        iterable: &Bound<'_, PyAny>,
        window: Option<usize>,
        path: Option<String>,
    ) -> PyResult<PyImap> {
        Ok(PyImap {
            input: iterable.try_iter()?.into_any().unbind(),
            path,
            driver: Mutex::new(Some(Driver::new(&self.pool, window))),
        })
    }

    /// Counters as JSON text (`keypool.Pool.stats` parses it).
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        let stats = py.detach(|| self.pool.stats());
        keypool::serde_json::to_string(&stats).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Stops accepting requests, answers queued ones `Cancelled`, waits for in-flight
    /// ones and joins every thread.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.pool.close());
    }

    #[getter]
    fn closed(&self) -> bool {
        self.pool.is_closed()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.pool.capacity()
    }

    #[getter]
    fn labels(&self) -> Vec<String> {
        self.pool.labels()
    }
}

/// Submits from an input with at most `window` requests outstanding; results come
/// back through a channel, tagged with their input index.
struct Driver {
    pool: keypool::Pool,
    window: usize,
    outstanding: usize,
    next_index: usize,
    pending: Option<Request>,
    input_done: bool,
    tx: Sender<(usize, RequestResult)>,
    rx: Receiver<(usize, RequestResult)>,
    /// Every request of this driver carries it: set on Ctrl-C or when the driver is
    /// dropped, so what is still queued is never sent.
    cancel: Arc<AtomicBool>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

type NextRequest<'a> = dyn FnMut() -> PyResult<Option<Result<Request, Error>>> + 'a;

impl Driver {
    fn new(pool: &keypool::Pool, window: Option<usize>) -> Driver {
        let window = window
            .filter(|&w| w > 0)
            .unwrap_or_else(|| pool.capacity() + pool.config().queue_capacity);
        let (tx, rx) = crossbeam_channel::unbounded();
        Driver {
            pool: pool.clone(),
            window,
            outstanding: 0,
            next_index: 0,
            pending: None,
            input_done: false,
            tx,
            rx,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Ctrl-C: what has not been sent is given up, the caller gets the interrupt.
    fn interrupted(&self, e: PyErr) -> PyErr {
        self.cancel.store(true, Ordering::Relaxed);
        e
    }

    /// Submits input until the window is full or the queue refuses. With nothing
    /// outstanding it waits (interruptibly) for queue space instead of stopping.
    fn top_up(&mut self, py: Python<'_>, next: &mut NextRequest<'_>) -> PyResult<()> {
        while self.outstanding < self.window {
            let req = match self.pending.take() {
                Some(r) => r,
                None if self.input_done => return Ok(()),
                None => match next()? {
                    None => {
                        self.input_done = true;
                        return Ok(());
                    }
                    Some(Ok(r)) => r,
                    Some(Err(e)) => {
                        // An invalid body: its own error result, nothing sent.
                        let _ = self.tx.send((self.next_index, Err(e)));
                        self.next_index += 1;
                        self.outstanding += 1;
                        continue;
                    }
                },
            };
            let i = self.next_index;
            let tx = self.tx.clone();
            match self.pool.try_submit_with(req, move |r| {
                let _ = tx.send((i, r));
            }) {
                Ok(()) => {}
                Err(e) if e.is_busy() => {
                    self.pending = Some(e.into_request());
                    if self.outstanding > 0 {
                        return Ok(()); // a result will come first
                    }
                    // The queue is full of other callers' requests: wait a little.
                    py.detach(|| std::thread::sleep(Duration::from_millis(2)));
                    py.check_signals().map_err(|e| self.interrupted(e))?;
                    continue;
                }
                Err(e) => {
                    let _ = self.tx.send((i, Err(Error::from(e))));
                }
            }
            self.next_index += 1;
            self.outstanding += 1;
        }
        Ok(())
    }

    /// The next result, waiting interruptibly; `None` when nothing is outstanding.
    fn next(&mut self, py: Python<'_>) -> PyResult<Option<(usize, RequestResult)>> {
        if self.outstanding == 0 {
            return Ok(None);
        }
        loop {
            let rx = &self.rx;
            match py.detach(|| rx.recv_timeout(SLICE)) {
                Ok(item) => {
                    self.outstanding -= 1;
                    return Ok(Some(item));
                }
                Err(RecvTimeoutError::Timeout) => {
                    py.check_signals().map_err(|e| self.interrupted(e))?
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the driver holds a sender"),
            }
        }
    }
}

/// The iterator `Pool.imap` returns.
#[pyclass(frozen, module = "keypool._keypool", name = "Imap")]
struct PyImap {
    input: Py<PyAny>,
    path: Option<String>,
    driver: Mutex<Option<Driver>>,
}

#[pymethods]
impl PyImap {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let mut driver = self
            .driver
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("imap is already being iterated"))?;
        let input = self.input.bind(py);
        let path = self.path.as_deref();
        let cancel = driver.cancel.clone();
        let mut next = || -> PyResult<Option<Result<Request, Error>>> {
            match input.call_method0("__next__") {
                Ok(body) => {
                    let text: String = body.extract()?;
                    Ok(Some(request(&text, path, &cancel)))
                }
                Err(e) if e.is_instance_of::<PyStopIteration>(py) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let res = driver.top_up(py, &mut next).and_then(|()| driver.next(py));
        *self.driver.lock().unwrap() = Some(driver);
        match res? {
            Some((i, r)) => {
                let (_, v) = outcome(py, r)?;
                PyTuple::new(py, [i.into_pyobject(py)?.into_any(), v.into_bound(py)])
            }
            None => Err(PyStopIteration::new_err(())),
        }
    }
}

enum TicketState {
    Waiting(Ticket),
    /// Another thread is waiting on it.
    Busy,
    Done(bool, Py<PyAny>),
}

/// A submitted request's handle (see `keypool.Ticket`).
#[pyclass(frozen, module = "keypool._keypool", name = "Ticket")]
struct PyTicket {
    state: Mutex<TicketState>,
    cancel: Arc<AtomicBool>,
}

#[pymethods]
impl PyTicket {
    /// The response, waiting at most `timeout` seconds (`None`: as long as it takes);
    /// raises the request's error. Can be called again: same answer.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "timeout must be a finite number of seconds >= 0",
                ));
            }
            Some(t) => Some(Instant::now() + Duration::from_secs_f64(t)),
            None => None,
        };
        let mut ticket = {
            let mut st = self.state.lock().unwrap();
            match std::mem::replace(&mut *st, TicketState::Busy) {
                TicketState::Waiting(t) => t,
                TicketState::Busy => {
                    return Err(PyRuntimeError::new_err(
                        "another thread is waiting for this ticket",
                    ));
                }
                TicketState::Done(ok, v) => {
                    let v2 = v.clone_ref(py);
                    *st = TicketState::Done(ok, v);
                    return finish(py, ok, v2);
                }
            }
        };
        let put_back = |t: Ticket| *self.state.lock().unwrap() = TicketState::Waiting(t);
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
                None => SLICE,
            };
            let t = &mut ticket;
            match py.detach(|| t.wait_timeout(slice)) {
                Err(e) if is_wait_timeout(&e) => {
                    if let Err(e) = py.check_signals() {
                        // Ctrl-C: give the request up unless it is on the wire already.
                        self.cancel.store(true, Ordering::Relaxed);
                        put_back(ticket);
                        return Err(e);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        put_back(ticket);
                        return Err(to_pyerr(py, &e));
                    }
                }
                r => {
                    let (ok, v) = outcome(py, r)?;
                    *self.state.lock().unwrap() = TicketState::Done(ok, v.clone_ref(py));
                    return finish(py, ok, v);
                }
            }
        }
    }

    /// Gives the request up if it has not been sent yet: it then ends `Cancelled`.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether the result has arrived (never blocks).
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        let mut st = self.state.lock().unwrap();
        match &mut *st {
            TicketState::Done(..) => Ok(true),
            TicketState::Busy => Ok(false),
            TicketState::Waiting(t) => match t.try_wait() {
                None => Ok(false),
                Some(r) => {
                    let (ok, v) = outcome(py, r)?;
                    *st = TicketState::Done(ok, v);
                    Ok(true)
                }
            },
        }
    }
}

fn finish(py: Python<'_>, ok: bool, v: Py<PyAny>) -> PyResult<Py<PyAny>> {
    if ok {
        Ok(v)
    } else {
        Err(PyErr::from_value(v.into_bound(py)))
    }
}

/// The iterator `Pool.stream` returns: chunks, then `StopIteration` with the assembled
/// response in `.response` (or the error raised).
#[pyclass(frozen, module = "keypool._keypool", name = "Stream")]
struct PyStream {
    state: Mutex<Option<ResponseStream>>,
    response: Mutex<Option<Py<PyAny>>>,
    cancel: Arc<AtomicBool>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyChunk>> {
        let Some(mut stream) = self.state.lock().unwrap().take() else {
            return Ok(None); // finished (or iterated on another thread)
        };
        loop {
            let s = &mut stream;
            let ev = py.detach(|| s.next_timeout(Some(SLICE)));
            match ev {
                Err(e) if is_wait_timeout(&e) => {
                    if let Err(e) = py.check_signals() {
                        self.cancel.store(true, Ordering::Relaxed);
                        *self.state.lock().unwrap() = Some(stream);
                        return Err(e);
                    }
                }
                Err(e) => return Err(to_pyerr(py, &e)),
                Ok(None) => return Ok(None),
                Ok(Some(StreamEvent::Chunk(c))) => {
                    *self.state.lock().unwrap() = Some(stream);
                    return Ok(Some(PyChunk { inner: c }));
                }
                Ok(Some(StreamEvent::Done(Ok(resp)))) => {
                    let resp = Py::new(py, PyResponse { inner: resp })?;
                    *self.response.lock().unwrap() = Some(resp.into_any());
                    return Ok(None);
                }
                Ok(Some(StreamEvent::Done(Err(e)))) => return Err(to_pyerr(py, &e)),
            }
        }
    }

    /// The assembled response once the stream has ended, else None.
    #[getter]
    fn response(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.response
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.clone_ref(py))
    }

    /// Stops reading: the worker abandons the stream at its next chunk (or never sends
    /// it, if it is still queued).
    fn close(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.state.lock().unwrap().take();
    }
}

/// One chunk of a streamed response.
#[pyclass(frozen, module = "keypool._keypool", name = "Chunk")]
struct PyChunk {
    inner: StreamChunk,
}

#[pymethods]
impl PyChunk {
    /// The text this chunk adds (`choices[0].delta.content`), "" if none.
    #[getter]
    fn delta(&self) -> &str {
        self.inner.delta()
    }

    #[getter]
    fn seq(&self) -> u64 {
        self.inner.seq()
    }

    #[getter]
    fn finish_reason(&self) -> Option<&str> {
        self.inner.finish_reason()
    }

    #[getter]
    fn id(&self) -> Option<&str> {
        self.inner.id()
    }

    /// The chunk's JSON, parsed.
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.inner.json().to_string())
    }

    fn __repr__(&self) -> String {
        format!(
            "Chunk(seq={}, delta={:?})",
            self.inner.seq(),
            self.inner.delta()
        )
    }
}

/// A response from the API.
#[pyclass(frozen, module = "keypool._keypool", name = "Response")]
struct PyResponse {
    inner: keypool::Response,
}

#[pymethods]
impl PyResponse {
    #[getter]
    fn status(&self) -> u16 {
        self.inner.status()
    }

    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.body())
    }

    #[getter]
    fn text(&self) -> String {
        self.inner.text()
    }

    /// The body, parsed.
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.inner.text())
    }

    /// `choices[0].message.content`, if any.
    #[getter]
    fn content(&self) -> Option<String> {
        self.inner.content()
    }

    #[getter]
    fn finish_reason(&self) -> Option<String> {
        self.inner.finish_reason()
    }

    /// `usage` as a dict, if the body has one.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self.inner.usage() {
            None => Ok(None),
            Some(u) => {
                let text = keypool::serde_json::to_string(&u)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                json_loads(py, &text).map(Some)
            }
        }
    }

    #[getter]
    fn headers(&self) -> Vec<(String, String)> {
        self.inner.headers().to_vec()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.inner.header(name)
    }

    #[getter]
    fn request_id(&self) -> Option<String> {
        self.inner.request_id()
    }

    #[getter]
    fn key_label(&self) -> &str {
        self.inner.key_label()
    }

    /// The fallback model that served (config `fallback_models`), `None` when the
    /// requested model did.
    #[getter]
    fn fallback_model(&self) -> Option<&str> {
        self.inner.fallback_model()
    }

    #[getter]
    fn key_index(&self) -> usize {
        self.inner.key_index()
    }

    #[getter]
    fn attempts(&self) -> u32 {
        self.inner.attempts()
    }

    #[getter]
    fn keys_tried(&self) -> Vec<usize> {
        self.inner.keys_tried().to_vec()
    }

    /// Seconds the last attempt took.
    #[getter]
    fn latency(&self) -> f64 {
        self.inner.latency().as_secs_f64()
    }

    /// Seconds spent queued before the first attempt.
    #[getter]
    fn queue_time(&self) -> f64 {
        self.inner.queue_time().as_secs_f64()
    }

    /// Seconds to the first streamed token, for streams.
    #[getter]
    fn time_to_first_token(&self) -> Option<f64> {
        self.inner.time_to_first_token().map(|d| d.as_secs_f64())
    }

    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.inner.retry_after().map(|d| d.as_secs_f64())
    }

    fn __repr__(&self) -> String {
        format!(
            "Response(status={}, key_label={:?}, attempts={})",
            self.inner.status(),
            self.inner.key_label(),
            self.inner.attempts()
        )
    }
}

#[pymodule]
fn _keypool(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", keypool::VERSION)?;
    m.add_class::<PyPool>()?;
    m.add_class::<PyTicket>()?;
    m.add_class::<PyStream>()?;
    m.add_class::<PyImap>()?;
    m.add_class::<PyChunk>()?;
    m.add_class::<PyResponse>()?;
    m.add_class::<PyCancel>()?;
    Ok(())
}
