//! Liveness (issue 21.7): random pools — models per key, weights, an account group,
//! trials, cooldowns, slow keys, every strategy — and one invariant judged from the
//! mock's per-key logs alone: **no key that serves a waiting job's model sits idle and
//! admitting for more than 50 ms.**
//!
//! "Waiting" per model is counted from the server's side: requests of that model not yet
//! arrived anywhere, plus attempts answered 429 (each comes back for another key). A key
//! is checked only where its admission is known from outside: after its first answer
//! (its trial is over), never cooled (no 429 rule), with a free worker at the server and,
//! if grouped, a free slot in its group. `KEYPOOL_LIVENESS_SEEDS=N` runs more seeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keypool::{Config, GroupConfig, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer, RequestRecord};
use serde_json::json;

const MODELS: [&str; 3] = ["a", "b", "c"];
const LIMIT: Duration = Duration::from_millis(50);

/// xorshift64*: reproducible scenarios without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

struct KeyPlan {
    secret: String,
    models: Vec<&'static str>,
    cap: usize,
    grouped: bool,
    cools: bool,
    latency: Duration,
}

struct Scenario {
    keys: Vec<KeyPlan>,
    group_cap: usize,
    strategy: Strategy,
    jobs: Vec<&'static str>,
}

fn plan(seed: u64, server: &MockServer) -> Scenario {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = rng.range(3, 6) as usize;
    let mut keys = Vec::new();
    for i in 0..n {
        let models: Vec<&str> = if rng.chance(3) {
            MODELS.to_vec()
        } else {
            let picked: Vec<&str> = MODELS.iter().copied().filter(|_| rng.chance(2)).collect();
            if picked.is_empty() {
                vec![MODELS[i % MODELS.len()]]
            } else {
                picked
            }
        };
        let secret = format!("sk-live-{seed}-{i}");
        let slow = rng.chance(3);
        let cools = rng.chance(4);
        let latency = if slow {
            rng.range(200, 400)
        } else {
            rng.range(20, 60)
        };
        server.set_key_rule(
            &secret,
            KeyRule {
                latency_ms: Some(latency),
                always_status: cools.then_some(429),
                fail_first: if cools { rng.range(1, 2) as u32 } else { 0 },
                retry_after_ms: cools.then(|| rng.range(100, 300)),
                ..KeyRule::default()
            },
        );
        keys.push(KeyPlan {
            secret,
            models,
            cap: rng.range(1, 3) as usize,
            grouped: rng.chance(3),
            cools,
            latency: Duration::from_millis(latency),
        });
    }
    let strategy = [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ][rng.below(3) as usize];
    let served: Vec<&'static str> = MODELS
        .iter()
        .copied()
        .filter(|m| keys.iter().any(|k| k.models.contains(m)))
        .collect();
    let jobs = (0..rng.range(60, 120))
        .map(|_| served[rng.below(served.len() as u64) as usize])
        .collect();
    Scenario {
        keys,
        group_cap: rng.range(2, 4) as usize,
        strategy,
        jobs,
    }
}

fn config(s: &Scenario, url: &str, seed: u64) -> Config {
    let mut b = Config::builder()
        .base_url(url)
        .strategy(s.strategy)
        .queue_capacity(1024)
        .retry(
            keypool::RetryConfig::default()
                .max_attempts(10)
                .base_delay(Duration::from_millis(1))
                .max_delay(Duration::from_millis(1)),
        );
    if s.keys.iter().any(|k| k.grouped) {
        b = b.group(GroupConfig::new("g").max_concurrent(s.group_cap));
    }
    for (i, k) in s.keys.iter().enumerate() {
        let mut kc = KeyConfig::new(k.secret.clone())
            .label(format!("s{seed}k{i}"))
            .models(k.models.iter().copied())
            .max_concurrent(k.cap)
            .weight(1 + (i as u32 % 3));
        if k.grouped {
            kc = kc.group("g");
        }
        b = b.key_config(kc);
    }
    b.build().unwrap()
}

/// Watches this process get the CPU: a thread that sleeps 2 ms at a time and notes every
/// wake-up more than 5 ms late, on the mock's clock (`epoch` taken just before the mock
/// started). On a loaded machine the whole process — mock and dispatcher alike — can
/// wait 100 ms for a core; no dispatcher can act then.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, Duration)>>,
}

impl Heartbeat {
    fn start(epoch: Instant) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut late = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let due = Instant::now() + Duration::from_millis(2);
                std::thread::sleep(Duration::from_millis(2));
                let woke = Instant::now();
                if woke > due + Duration::from_millis(5) {
                    late.push((due - epoch, woke - epoch));
                }
            }
            late
        });
        Heartbeat { stop, thread }
    }

    fn stop(self) -> Vec<(Duration, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Stretches in which the judge itself was late: the process was not scheduled (the
/// heartbeat), or a request was answered more than 5 ms after its key's latency had
/// passed. Idleness inside them is not the dispatcher's, which shares the process.
fn stalls(
    s: &Scenario,
    logs: &[Vec<RequestRecord>],
    beats: &[(Duration, Duration)],
) -> Vec<(Duration, Duration)> {
    let mut out: Vec<(Duration, Duration)> = logs
        .iter()
        .enumerate()
        .flat_map(|(i, log)| {
            let due = s.keys[i].latency + Duration::from_millis(5);
            log.iter()
                .filter(move |r| r.finished > r.arrived + due)
                .map(move |r| (r.arrived + due, r.finished))
        })
        .chain(beats.iter().copied())
        .collect();
    out.sort();
    out
}

/// How much of `from..to` no stall covers.
fn unstalled(from: Duration, to: Duration, stalls: &[(Duration, Duration)]) -> Duration {
    let mut covered = Duration::ZERO;
    let mut upto = from;
    for &(a, b) in stalls {
        let (a, b) = (a.max(upto), b.min(to));
        if b > a {
            covered += b - a;
            upto = b;
        }
    }
    (to - from).saturating_sub(covered)
}

/// The longest stretch (and where) in which a checkable key sat idle and admitting
/// while a job for one of its models waited, not counting the judge's own stalls.
fn longest_idle(
    s: &Scenario,
    logs: &[Vec<RequestRecord>],
    beats: &[(Duration, Duration)],
) -> (Duration, String) {
    let stalls = stalls(s, logs, beats);
    let mut times: Vec<Duration> = logs
        .iter()
        .flatten()
        .flat_map(|r| [r.arrived, r.finished])
        .collect();
    times.sort();
    times.dedup();
    let in_flight = |i: usize, t: Duration| {
        logs[i]
            .iter()
            .filter(|r| r.arrived <= t && t < r.finished)
            .count()
    };
    let waiting = |m: &str, t: Duration| {
        let total = s.jobs.iter().filter(|j| **j == m).count() as i64;
        let of_m = logs
            .iter()
            .flatten()
            .filter(|r| r.model.as_deref() == Some(m));
        let arrived = of_m.clone().filter(|r| r.arrived <= t).count() as i64;
        let back = of_m.filter(|r| r.status != 200 && r.finished <= t).count() as i64;
        total - arrived + back
    };
    let mut worst = (Duration::ZERO, String::new());
    for (i, k) in s.keys.iter().enumerate() {
        let Some(first_answer) = logs[i].iter().map(|r| r.finished).min() else {
            continue;
        };
        if k.cools {
            continue;
        }
        let mut since: Option<Duration> = None;
        for &t in &times {
            let group_free = !k.grouped
                || s.keys
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.grouped)
                    .map(|(j, _)| in_flight(j, t))
                    .sum::<usize>()
                    < s.group_cap;
            let idle_and_wanted = t >= first_answer
                && in_flight(i, t) < k.cap
                && group_free
                && k.models.iter().any(|m| waiting(m, t) > 0);
            match (idle_and_wanted, since) {
                (true, None) => since = Some(t),
                (false, Some(from)) => {
                    let idle = unstalled(from, t, &stalls);
                    if idle > worst.0 {
                        worst = (idle, format!("key {i} idle from {from:?} to {t:?}"));
                    }
                    since = None;
                }
                _ => {}
            }
        }
    }
    worst
}

#[test]
fn no_key_that_could_serve_a_waiting_job_sits_idle() {
    let seeds: u64 = std::env::var("KEYPOOL_LIVENESS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let only: Option<u64> = std::env::var("KEYPOOL_LIVENESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    for seed in (1..=seeds).filter(|s| only.is_none_or(|o| o == *s)) {
        let epoch = Instant::now();
        let server = MockServer::start(MockConfig::default()).unwrap();
        let heartbeat = Heartbeat::start(epoch);
        let s = plan(seed, &server);
        let pool = Pool::new(config(&s, &server.url(), seed)).unwrap();
        let results = pool.batch(
            s.jobs
                .iter()
                .enumerate()
                .map(|(n, m)| Request::new(&json!({"model": m, "messages": [{"role": "user", "content": format!("{seed}-{n}")}]}))),
        );
        assert!(
            results.iter().all(Result::is_ok),
            "seed {seed}: {:?}",
            results.iter().find(|r| r.is_err())
        );
        let beats = heartbeat.stop();
        let stats = server.stats();
        let logs: Vec<Vec<RequestRecord>> = s
            .keys
            .iter()
            .map(|k| {
                stats
                    .keys
                    .get(&k.secret)
                    .map_or(Vec::new(), |r| r.log.clone())
            })
            .collect();
        let per_key: BTreeMap<usize, usize> = logs.iter().map(Vec::len).enumerate().collect();
        if std::env::var_os("KEYPOOL_LIVENESS_DEBUG").is_some() {
            for k in pool.stats().keys {
                eprintln!("{k:?}");
            }
        }
        let (gap, at) = longest_idle(&s, &logs, &beats);
        let stalled: Duration = beats.iter().map(|(a, b)| *b - *a).sum();
        println!(
            "seed {seed}: {:?}, {} keys, {} jobs, attempts per key {per_key:?}, longest idle {gap:?} (process stalls: {} totalling {stalled:?})",
            s.strategy,
            s.keys.len(),
            s.jobs.len(),
            beats.len()
        );
        if gap > LIMIT {
            for (i, k) in s.keys.iter().enumerate() {
                eprintln!(
                    "key {i}: models {:?} cap {} grouped {} cools {}",
                    k.models, k.cap, k.grouped, k.cools
                );
                for r in &logs[i] {
                    eprintln!(
                        "   {:>8.1}..{:>8.1} ms {} {:?}",
                        r.arrived.as_secs_f64() * 1e3,
                        r.finished.as_secs_f64() * 1e3,
                        r.status,
                        r.model
                    );
                }
            }
        }
        assert!(
            gap <= LIMIT,
            "seed {seed} ({:?}): {at} ({gap:?}) while a job it serves waited",
            s.strategy
        );
        // The per-key cap holds at the server throughout.
        for (i, k) in s.keys.iter().enumerate() {
            if let Some(r) = stats.keys.get(&k.secret) {
                assert!(r.max_in_flight <= k.cap, "seed {seed} key {i}");
            }
        }
    }
}
