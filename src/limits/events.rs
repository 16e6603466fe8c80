//! Key events: a key cooled, reopened, disabled, parked, exhausted or rejoined.
//!
//! The key's [`Gate`](crate::admission::Gate) notices each change under its lock and
//! only queues it (a non-blocking `try_send` on a bounded channel, so the order of one
//! key's events is the order of its state changes). One thread per pool,
//! `keypool-events`, takes them off the queue, logs each (`log::info!`/`warn!`) and
//! hands it to the handler set with [`Pool::set_event_handler`](crate::Pool::set_event_handler): never under a gate's
//! lock, never on a worker or the dispatcher, one event at a time, under
//! `catch_unwind` (a panicking handler is logged and called again for the next event).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use serde::Serialize;

/// Events queued and not yet delivered, at most (more are dropped and counted).
const QUEUE: usize = 4096;
/// Events kept for a handler not yet set (the first `set_event_handler` gets them).
const BEFORE_HANDLER: usize = 256;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyEventKind {
    /// A cooldown started (a 429, or the key cooling in another process sharing it):
    /// `duration_ms` is its length. A cooldown lengthened while running is no event.
    Cooled,
    /// After a cooldown, a trial request was answered without a 429: the key takes
    /// requests on all its workers again.
    Reopened,
    /// Out for good: HTTP 401, a 403 proven to be the key's, or disabled by another
    /// process sharing it. `reason` says which.
    Disabled,
    /// Out for its credit (at its floor, a 402, `insufficient_quota`): back when a
    /// credit check finds credit.
    Parked,
    /// Out until its quota resets (a 429 whose reset lies beyond
    /// `max_retry_after_ms`): `duration_ms` until then.
    Exhausted,
    /// Back in rotation after being parked or exhausted (on trial: one request first).
    Rejoined,
}

impl KeyEventKind {
    /// The lowercase name: `"cooled"`, `"reopened"`, `"disabled"`, `"parked"`,
    /// `"exhausted"`, `"rejoined"`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyEventKind::Cooled => "cooled",
            KeyEventKind::Reopened => "reopened",
            KeyEventKind::Disabled => "disabled",
            KeyEventKind::Parked => "parked",
            KeyEventKind::Exhausted => "exhausted",
            KeyEventKind::Rejoined => "rejoined",
        }
    }

    /// The number the C ABI uses (`KEYPOOL_EVENT_*`): cooled 1, reopened 2, disabled 3,
    /// parked 4, exhausted 5, rejoined 6. Never reused.
    pub fn code(self) -> u32 {
        match self {
            KeyEventKind::Cooled => 1,
            KeyEventKind::Reopened => 2,
            KeyEventKind::Disabled => 3,
            KeyEventKind::Parked => 4,
            KeyEventKind::Exhausted => 5,
            KeyEventKind::Rejoined => 6,
        }
    }
}

/// A change of one key's state. Holds the key's label, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyEvent {
    /// The key's position in the config.
    pub index: usize,
    /// The key's label.
    pub label: String,
    /// What happened.
    pub kind: KeyEventKind,
    /// Why, for `Disabled`, `Parked`, `Exhausted` (and `Cooled` when known).
    pub reason: Option<String>,
    /// `Cooled`: the cooldown's length; `Exhausted`: time until the quota resets.
    pub duration_ms: Option<u64>,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl std::fmt::Display for KeyEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} {}", self.label, self.kind.as_str())?;
        if let Some(ms) = self.duration_ms {
            let what = match self.kind {
                KeyEventKind::Exhausted => "until its reset in",
                _ => "for",
            };
            write!(f, " {what} {ms} ms")?;
        }
        if let Some(r) = &self.reason {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

type Handler = Arc<dyn Fn(&KeyEvent) + Send + Sync>;

enum Msg {
    Event(KeyEvent),
    /// A handler was set: hand it the events kept for it.
    HandlerSet,
}

/// One pool's event queue; its gates hold a [`KeyEvents`] each.
pub(crate) struct Bus {
    tx: Sender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    /// The handler; locked while it runs, so once `set` returns the old one is done.
    handler: Mutex<Option<Handler>>,
    /// A handler set from inside the handler (its lock is held): applied after it returns.
    replacement: Mutex<Option<Option<Handler>>>,
    /// The delivery thread, once started.
    thread: Mutex<Option<std::thread::ThreadId>>,
    /// Events dropped because the queue was full.
    dropped: AtomicU64,
}

impl Bus {
    pub(crate) fn new() -> Arc<Bus> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        Arc::new(Bus {
            tx,
            rx: Mutex::new(Some(rx)),
            handler: Mutex::new(None),
            replacement: Mutex::new(None),
            thread: Mutex::new(None),
            dropped: AtomicU64::new(0),
        })
    }

    /// The sender for key `index`'s gate.
    pub(crate) fn for_key(self: &Arc<Bus>, index: usize, label: Arc<str>) -> KeyEvents {
        KeyEvents {
            bus: self.clone(),
            index,
            label,
        }
    }

    /// Events dropped so far (the queue was full).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// The delivery loop, for the `keypool-events` thread: runs until `until` disconnects
    /// (every engine thread has exited), then delivers what is left and returns.
    pub(crate) fn run(self: Arc<Bus>, until: Receiver<()>) {
        let Some(rx) = self.rx.lock().take() else {
            return;
        };
        *self.thread.lock() = Some(std::thread::current().id());
        let mut d = Delivery {
            bus: &self,
            cooled: Vec::new(),
            kept: VecDeque::new(),
            handler_seen: false,
        };
        loop {
            crossbeam_channel::select_biased! {
                recv(rx) -> m => match m {
                    Ok(m) => d.take(m),
                    Err(_) => return,
                },
                recv(until) -> _ => break,
            }
        }
        while let Ok(m) = rx.try_recv() {
            d.take(m);
        }
    }

    /// Drops the handler once the pool has shut down (it may hold a clone of the
    /// pool: the cycle ends here).
    pub(crate) fn release(&self) {
        *self.handler.lock() = None;
        *self.replacement.lock() = None;
    }

    pub(crate) fn set(&self, handler: Option<Handler>) {
        let on_events_thread = *self.thread.lock() == Some(std::thread::current().id());
        if on_events_thread {
            // Inside the handler, whose lock this thread holds: after it returns.
            *self.replacement.lock() = Some(handler);
        } else {
            let had = handler.is_some();
            *self.handler.lock() = handler;
            if had {
                let _ = self.tx.try_send(Msg::HandlerSet);
            }
        }
    }
}

/// The delivery thread's state.
struct Delivery<'a> {
    bus: &'a Bus,
    /// Per key: cooled and not yet reopened (only then is a reopening news).
    cooled: Vec<bool>,
    /// Events from before any handler was set (at most `BEFORE_HANDLER`).
    kept: VecDeque<KeyEvent>,
    handler_seen: bool,
}

impl Delivery<'_> {
    fn take(&mut self, m: Msg) {
        match m {
            Msg::Event(e) => {
                if e.index >= self.cooled.len() {
                    self.cooled.resize(e.index + 1, false);
                }
                let was_cooled =
                    std::mem::replace(&mut self.cooled[e.index], e.kind == KeyEventKind::Cooled);
                if e.kind == KeyEventKind::Reopened && !was_cooled {
                    return; // a first trial answered (key probing): no news
                }
                match e.kind {
                    KeyEventKind::Cooled | KeyEventKind::Reopened | KeyEventKind::Rejoined => {
                        log::info!("keypool: {e}")
                    }
                    _ => log::warn!("keypool: {e}"),
                }
                self.deliver(e);
            }
            Msg::HandlerSet => self.flush_kept(),
        }
    }

    fn deliver(&mut self, e: KeyEvent) {
        if !self.handler_seen {
            if self.bus.handler.lock().is_none() {
                if self.kept.len() == BEFORE_HANDLER {
                    self.kept.pop_front();
                }
                self.kept.push_back(e);
                return;
            }
            self.flush_kept();
        }
        self.call(&e);
    }

    fn flush_kept(&mut self) {
        if self.bus.handler.lock().is_none() {
            return;
        }
        self.handler_seen = true;
        while let Some(e) = self.kept.pop_front() {
            self.call(&e);
        }
    }

    fn call(&self, e: &KeyEvent) {
        {
            let slot = self.bus.handler.lock();
            if let Some(h) = slot.as_ref() {
                let h = h.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(e)));
                if r.is_err() {
                    log::error!("keypool: the key event handler panicked (on: {e})");
                }
            }
        }
        if let Some(new) = self.bus.replacement.lock().take() {
            *self.bus.handler.lock() = new;
        }
    }
}

/// A gate's link to its pool's event queue.
pub(crate) struct KeyEvents {
    bus: Arc<Bus>,
    index: usize,
    label: Arc<str>,
}

impl std::fmt::Debug for KeyEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyEvents({})", self.index)
    }
}

impl KeyEvents {
    /// Queues an event (never blocks: dropped and counted when the queue is full).
    pub(crate) fn emit(&self, kind: KeyEventKind, reason: Option<&str>, duration_ms: Option<u64>) {
        let e = KeyEvent {
            index: self.index,
            label: self.label.to_string(),
            kind,
            reason: reason.map(str::to_owned),
            duration_ms,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        };
        if let Err(TrySendError::Full(_)) = self.bus.tx.try_send(Msg::Event(e)) {
            self.bus.dropped.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopened_only_after_cooled_and_kept_until_a_handler() {
        let bus = Bus::new();
        let k = bus.for_key(0, Arc::from("a"));
        k.emit(KeyEventKind::Reopened, None, None); // a first trial: not news
        k.emit(KeyEventKind::Cooled, Some("HTTP 429"), Some(100));
        k.emit(KeyEventKind::Reopened, None, None);
        k.emit(KeyEventKind::Reopened, None, None); // once only
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.set(Some(Arc::new(move |e: &KeyEvent| s.lock().push(e.kind))));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let t = std::thread::spawn({
            let bus = bus.clone();
            move || bus.run(stop_rx)
        });
        k.emit(KeyEventKind::Disabled, Some("HTTP 401"), None);
        drop(stop_tx);
        t.join().unwrap();
        assert_eq!(
            *seen.lock(),
            [
                KeyEventKind::Cooled,
                KeyEventKind::Reopened,
                KeyEventKind::Disabled
            ]
        );
    }

    #[test]
    fn a_panicking_handler_is_called_again() {
        let bus = Bus::new();
        let k = bus.for_key(0, Arc::from("a"));
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        bus.set(Some(Arc::new(move |_: &KeyEvent| {
            n2.fetch_add(1, Relaxed);
            panic!("handler bug");
        })));
        k.emit(KeyEventKind::Parked, Some("credit"), None);
        k.emit(KeyEventKind::Rejoined, None, None);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        drop(stop_tx);
        bus.clone().run(stop_rx);
        assert_eq!(n.load(Relaxed), 2);
    }
}
