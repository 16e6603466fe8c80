//! Exact per-key accounting under one mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{KeyRecord, MockStats, RequestRecord};

/// A log entry; `done` is false while the request is in flight.
struct Entry {
    record: RequestRecord,
    done: bool,
}

#[derive(Default)]
struct KeyState {
    requests: u64,
    in_flight: usize,
    max_in_flight: usize,
    first_request: Option<Duration>,
    last_request: Option<Duration>,
    statuses: BTreeMap<u16, u64>,
    log: Vec<Entry>,
}

impl KeyState {
    fn snapshot(&self) -> KeyRecord {
        KeyRecord {
            requests: self.requests,
            in_flight: self.in_flight,
            max_in_flight: self.max_in_flight,
            first_request: self.first_request,
            last_request: self.last_request,
            statuses: self.statuses.clone(),
            log: self
                .log
                .iter()
                .filter(|e| e.done)
                .map(|e| e.record.clone())
                .collect(),
        }
    }
}

#[derive(Default)]
struct State {
    /// Bumped by every reset; guards of older epochs only decrement `in_flight`.
    epoch: u64,
    total_requests: u64,
    in_flight_total: usize,
    max_in_flight_total: usize,
    connections: u64,
    tls_failures: u64,
    keys: HashMap<String, KeyState>,
}

/// The accounting shared by the server and its handle.
pub(crate) struct Accounting {
    start: Instant,
    /// Connection numbers, from 1 (never reset).
    next_connection: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

impl Accounting {
    pub(crate) fn new() -> Self {
        Accounting {
            start: Instant::now(),
            next_connection: std::sync::atomic::AtomicU64::new(1),
            state: Mutex::new(State::default()),
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Counts an accepted connection and returns its number.
    pub(crate) fn connection_opened(&self) -> u64 {
        self.state.lock().connections += 1;
        self.next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a failed TLS handshake.
    pub(crate) fn tls_failed(&self) {
        self.state.lock().tls_failures += 1;
    }

    /// Records the arrival of a request on connection `connection` and returns the
    /// guard that ends it.
    ///
    /// The arrival is stamped under the lock, so stamps follow the order in which
    /// arrivals are recorded: `last_request` is the latest arrival, `first_request` the
    /// earliest, and a key's log is in arrival order. (Stamped before the lock, a thread
    /// preempted in between recorded an earlier arrival after a later one, and
    /// `last_request` went back in time.)
    pub(crate) fn begin(self: &Arc<Self>, key: &str, connection: u64) -> InFlight {
        let mut st = self.state.lock();
        let arrived = self.now();
        st.total_requests += 1;
        st.in_flight_total += 1;
        st.max_in_flight_total = st.max_in_flight_total.max(st.in_flight_total);
        let epoch = st.epoch;
        let ks = st.keys.entry(key.to_owned()).or_default();
        ks.requests += 1;
        ks.in_flight += 1;
        ks.max_in_flight = ks.max_in_flight.max(ks.in_flight);
        ks.first_request.get_or_insert(arrived);
        ks.last_request = Some(arrived);
        ks.log.push(Entry {
            record: RequestRecord {
                arrived,
                finished: arrived,
                status: 0,
                retry_after_ms: None,
                model: None,
                connection,
            },
            done: false,
        });
        let index = ks.log.len() - 1;
        let key_in_flight = ks.in_flight;
        InFlight {
            arrived,
            key_in_flight,
            model: None,
            acc: Arc::clone(self),
            key: key.to_owned(),
            epoch,
            index,
            status: 0,
            retry_after_ms: None,
        }
    }

    pub(crate) fn snapshot(&self) -> MockStats {
        let st = self.state.lock();
        MockStats {
            total_requests: st.total_requests,
            max_in_flight_total: st.max_in_flight_total,
            in_flight_total: st.in_flight_total,
            connections: st.connections,
            tls_failures: st.tls_failures,
            keys: st
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), v.snapshot()))
                .collect(),
        }
    }

    pub(crate) fn key(&self, key: &str) -> Option<KeyRecord> {
        self.state.lock().keys.get(key).map(KeyState::snapshot)
    }

    /// Clears counters and logs; requests in flight stay counted as in flight.
    pub(crate) fn reset(&self) {
        let mut st = self.state.lock();
        st.epoch += 1;
        st.total_requests = 0;
        st.connections = 0;
        st.tls_failures = 0;
        st.max_in_flight_total = st.in_flight_total;
        st.keys.retain(|_, ks| ks.in_flight > 0);
        for ks in st.keys.values_mut() {
            *ks = KeyState {
                in_flight: ks.in_flight,
                max_in_flight: ks.in_flight,
                ..KeyState::default()
            };
        }
    }
}

/// One request in flight; dropping it records the request as finished.
pub(crate) struct InFlight {
    acc: Arc<Accounting>,
    key: String,
    epoch: u64,
    index: usize,
    /// The status to record (0 = dropped).
    pub(crate) status: u16,
    /// The `retry-after-ms` value sent.
    pub(crate) retry_after_ms: Option<u64>,
    /// The request's model, recorded when it finishes.
    pub(crate) model: Option<String>,
    /// This key's requests in flight when this one arrived (itself included).
    pub(crate) key_in_flight: usize,
    /// When its headers were parsed, since server start (as in its log record).
    pub(crate) arrived: Duration,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamped under the lock too, in the same order as the in-flight counts.
        let mut st = self.acc.state.lock();
        let finished = self.acc.now();
        st.in_flight_total = st.in_flight_total.saturating_sub(1);
        let same_epoch = st.epoch == self.epoch;
        let Some(ks) = st.keys.get_mut(&self.key) else {
            return;
        };
        ks.in_flight = ks.in_flight.saturating_sub(1);
        if !same_epoch {
            return;
        }
        *ks.statuses.entry(self.status).or_insert(0) += 1;
        if let Some(e) = ks.log.get_mut(self.index) {
            e.record.finished = finished;
            e.record.status = self.status;
            e.record.retry_after_ms = self.retry_after_ms;
            e.record.model = self.model.take();
            e.done = true;
        }
    }
}
