//! The pool's side of key events: setting the handler the events bus
//! (`limits/events.rs`) delivers to.

use std::sync::Arc;

use crate::events::KeyEvent;
use crate::pool::Pool;

impl Pool {
    /// Sets the function called with every key event (a key cooled, reopened,
    /// disabled, parked, exhausted or rejoined), replacing any earlier one.
    ///
    /// It runs on the pool's own `keypool-events` thread, one event at a time, in the
    /// order the keys changed — never on a worker, never while the engine holds a lock,
    /// so a slow handler delays only later events (at most 4,096 wait; beyond that
    /// they are dropped, and counted in `keypool_events_dropped_total`). A panic in it
    /// is caught and logged. Once this returns, the previous handler is not running and
    /// is never called again (set from inside the handler, the change applies when it
    /// returns). The first handler set also receives the events from before it was
    /// set (the last 256), e.g. keys parked by the credit check in `Pool::new`. Every
    /// event is also logged (`log::info!` for cooled, reopened, rejoined; `log::warn!`
    /// for the others) whether or not a handler is set. Events carry the key's label,
    /// never the key.
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let config = keypool::Config::builder().base_url(server.url()).key("sk-a", 2).build()?;
    /// let pool = keypool::Pool::new(config)?;
    /// pool.set_event_handler(|e: &keypool::KeyEvent| eprintln!("{e}"));
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn set_event_handler(&self, handler: impl Fn(&KeyEvent) + Send + Sync + 'static) {
        self.event_bus().set(Some(Arc::new(handler)));
    }

    /// Removes the event handler (events are still logged). Once this returns the
    /// handler is not running and is never called again.
    pub fn clear_event_handler(&self) {
        self.event_bus().set(None);
    }
}
