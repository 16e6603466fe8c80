//! CPU per request: keypool (`Pool::batch`) against an async reference client, same
//! mock, same run. A program that prints figures and ratios; it never fails on timing.
//!
//! Run: `cargo bench --bench cpu` (release profile). Options:
//! `--requests N` (default 40000), `--callgrind N` (runs only keypool for N requests,
//! for `valgrind --tool=callgrind`, after a warm-up it announces; with `--tls` over
//! TLS; with `CPU_BENCH_CALLGRIND=floor` or `=minimal` and `--tls`, the transport floor
//! or the minimal blocking rustls client instead), `--quick N` (only `Pool::batch` and the async
//! reference, for A/B runs of a change), `--https N` (only the https lines),
//! `--https-quick N [--rounds R] [--favoured]` (keypool over TLS and hyper + rustls
//! alternating R times, then the median ratios: A/B runs of a change to the https
//! path; `--favoured`: against a mock at nice -10, as in the last https lines),
//! `--memory` (resident memory over TLS at 64 keys × 32 in flight; `--plain` for
//! plain http).
//!
//! The https lines (after the plain ones): the same scenario against the mock serving
//! TLS (a child process, its generated CA trusted through `tls.ca_file`), keypool
//! against the hyper client over tokio-rustls (ring), connections reused.
//!
//! Scenario (issue 14): 16 keys × 16 workers, mock latency 20 ms. The mock runs in a
//! child process (this program re-executed with `KEYPOOL_BENCH_ROLE=mock`), so the
//! figures are this process's own: `getrusage(RUSAGE_SELF)` deltas (user and system
//! CPU, voluntary + involuntary context switches, minor + major page faults), summed
//! over every thread including exited ones.
//!
//! The C ABI line runs `examples/c/bench_batch.c` (the same scenario through
//! `keypool_batch`), compiled here with `cc -O2` against `target/release/libkeypool.a`
//! (`cargo build --release --locked -p keypool-capi` first; `KEYPOOL_LIB_DIR` picks
//! another directory); without the library or `cc` the line is skipped.
//!
//! The reference: one tokio thread (current-thread runtime), 256 keep-alive
//! connections, a minimal HTTP/1.1 client (request written in one buffer, response
//! read by `Content-Length` into a per-connection buffer), the same bodies and keys.

#[path = "common/mod.rs"]
mod common;
use common::{MockProcess, process_cpu_us, run_mock};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keypool::{Config, Pool, Request, Strategy, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `--callgrind` with `CPU_BENCH_CALLGRIND` set: the transport-alone runs announce
/// their warm-up's end as the keypool run does.
static CALLGRIND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const KEYS: usize = 16;
const PER_KEY: usize = 16;
const LATENCY_MS: u64 = 20;

fn main() {
    if std::env::var("KEYPOOL_BENCH_ROLE").as_deref() == Ok("mock") {
        return run_mock();
    }
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse::<usize>().ok())
    };
    if let Some(n) = opt("--https") {
        // The https lines only.
        https_lines(n);
        return;
    }
    if let Some(n) = opt("--https-quick") {
        // keypool and hyper + rustls over TLS only, alternating `--rounds` times (default
        // 2), for A/B runs of a change to the https path.
        https_quick(
            n,
            opt("--rounds").unwrap_or(2),
            args.iter().any(|a| a == "--favoured"),
        );
        return;
    }
    if args.iter().any(|a| a == "--memory") {
        memory_over_tls(!args.iter().any(|a| a == "--plain"));
        return;
    }
    let tls = args.iter().any(|a| a == "--tls");
    let mock = if tls {
        MockProcess::start_tls(LATENCY_MS, 2)
    } else {
        MockProcess::start(LATENCY_MS, 2)
    };
    if let (Some(n), Ok(what)) = (opt("--callgrind"), std::env::var("CPU_BENCH_CALLGRIND")) {
        // The same for a transport alone over TLS: `floor` (256 threads calling
        // `UreqTransport::send`) or `minimal` (the minimal blocking rustls client).
        let ca = mock.ca_file.clone().expect("--callgrind N --tls");
        CALLGRIND.store(true, Ordering::Relaxed);
        let (f, fail) = if what == "floor" {
            let trust =
                keypool::TlsTrust::load(&keypool::TlsConfig::default().ca_file(&*ca)).unwrap();
            transport_alone_tls(&mock.url, trust, n, |s| {
                Box::new(keypool::UreqTransport::new(s))
            })
        } else {
            transport_alone_tls(&mock.url, keypool::TlsTrust::default(), n, |_| {
                Box::new(MinimalBlockingTls::new(&mock.url, &ca))
            })
        };
        f.print(&what, fail);
        println!("callgrind run: {what}, {n} requests, failures {fail}");
        return;
    }
    if let Some(n) = opt("--callgrind") {
        let pool = Pool::new(config_with(
            &mock.url,
            mock.ca_file.as_deref(),
            KEYS,
            PER_KEY,
        ))
        .unwrap();
        // Connections opened (and TLS handshakes done) first: under
        // `valgrind --tool=callgrind --instr-atstart=no`, run `callgrind_control -i on`
        // when this line appears to profile the steady state alone.
        let _ = pool.batch((0..2 * KEYS * PER_KEY).map(prompt));
        println!("callgrind run: warmed up; measuring in 2 s");
        std::thread::sleep(Duration::from_secs(2));
        let failures = pool
            .batch((0..n).map(prompt))
            .iter()
            .filter(|r| r.is_err())
            .count();
        println!("callgrind run: keypool, {n} requests, failures {failures}");
        return;
    }
    if let Some(n) = opt("--quick") {
        // Pool::batch and the async reference only, for A/B comparisons of a change.
        let kp = measured_batch(&mock.url, n, 2 * KEYS * PER_KEY);
        let (asy, afail) = async_reference::<Conn>(&mock.url, n);
        asy.print("async ref (tokio, 1 thread, 256 conns)", afail);
        let (hy, hfail) = async_reference::<HyperConn>(&mock.url, n);
        hy.print("async ref: hyper client (1 thread)", hfail);
        println!(
            "ratio CPU {:.3} (hyper {:.3})",
            kp.cpu_us() / asy.cpu_us(),
            kp.cpu_us() / hy.cpu_us()
        );
        return;
    }
    let n = opt("--requests").unwrap_or(40_000);
    println!(
        "CPU per request: {KEYS} keys x {PER_KEY} workers, mock latency {LATENCY_MS} ms, {n} requests, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Warm-up for both (connections, allocator), not measured.
    {
        let pool = Pool::new(config(&mock.url)).unwrap();
        let _ = pool.batch((0..2 * KEYS * PER_KEY).map(prompt));
    }

    let kp = measured_batch(&mock.url, n, KEYS * PER_KEY);

    // The same requests, results dropped as they arrive (as the reference does): what
    // remains is per-request cost, not the 40,000 results `batch` keeps.
    let pool = Pool::new(config(&mock.url)).unwrap();
    let _ = pool.batch((0..KEYS * PER_KEY).map(prompt));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<bool>();
    let u0 = Usage::now();
    let t0 = Instant::now();
    for i in 0..n {
        let tx = done_tx.clone();
        pool.submit_with(prompt(i), move |r| {
            let _ = tx.send(r.is_err());
        })
        .unwrap();
    }
    let dfail = done_rx.iter().take(n).filter(|&e| e).count();
    let kd = Usage::now().minus(&u0, t0.elapsed(), n);
    drop(pool);
    kd.print("keypool  submit_with, results dropped", dfail);

    // The floor of a blocking design on the default transport: 256 threads each
    // looping `UreqTransport::send` (one transport per key; plain http:// goes through
    // its lean HTTP/1.1 client), no pool around them.
    let (fl, ffail) = transport_alone(&mock.url, n, |s| Box::new(keypool::UreqTransport::new(s)));
    fl.print("floor: 256 threads x UreqTransport::send", ffail);
    // The same with ureq alone (the default transport before the lean client): the
    // before/after of the transport in one run.
    let (ur, ufail) = transport_alone(&mock.url, n, |s| Box::new(UreqOnly::new(s)));
    ur.print("256 threads x ureq 3 (the old transport)", ufail);

    let (asy, afail) = async_reference::<Conn>(&mock.url, n);
    asy.print("async ref (tokio, 1 thread, 256 conns)", afail);
    let (hy, hfail) = async_reference::<HyperConn>(&mock.url, n);
    hy.print("async ref: hyper client (1 thread)", hfail);

    println!(
        "ratios keypool batch/async: CPU {:.2}x (target <= 2), throughput {:.3} (target >= 0.98); keypool ctx switches {:.2}/req (target <= 1.1), page faults {:.3}/req (target <= 0.05)",
        kp.cpu_us() / asy.cpu_us(),
        kp.rps / asy.rps,
        kp.csw,
        kp.faults
    );
    println!(
        "ratios keypool batch/hyper client (the reference issue 14 names): CPU {:.2}x (target <= 2), throughput {:.3} (target >= 0.98); minimal async client/hyper: CPU {:.2}x",
        kp.cpu_us() / hy.cpu_us(),
        kp.rps / hy.rps,
        asy.cpu_us() / hy.cpu_us()
    );
    println!(
        "ratios keypool submit_with/async: CPU {:.2}x, throughput {:.3}; ctx switches {:.2}/req, page faults {:.3}/req",
        kd.cpu_us() / asy.cpu_us(),
        kd.rps / asy.rps,
        kd.csw,
        kd.faults
    );
    println!(
        "ratios transport floor/async: CPU {:.2}x, throughput {:.3}; keypool batch/floor: CPU {:.2}x; ureq alone/floor: CPU {:.2}x",
        fl.cpu_us() / asy.cpu_us(),
        fl.rps / asy.rps,
        kp.cpu_us() / fl.cpu_us(),
        ur.cpu_us() / fl.cpu_us()
    );

    // The C ABI: examples/c/bench_batch.c (the same scenario through `keypool_batch`),
    // built here against the release static library and run against the same mock.
    match c_abi_batch(&mock.url, n) {
        Ok((c, cfail)) => {
            c.print("keypool  keypool_batch (C ABI)", cfail);
            println!(
                "ratios keypool_batch (C ABI)/async: CPU {:.2}x (hyper client: {:.2}x), throughput {:.3}; ctx switches {:.2}/req, page faults {:.3}/req; C ABI/Pool::batch: CPU {:.2}x",
                c.cpu_us() / asy.cpu_us(),
                c.cpu_us() / hy.cpu_us(),
                c.rps / asy.rps,
                c.csw,
                c.faults,
                c.cpu_us() / kp.cpu_us()
            );
        }
        Err(why) => println!("  keypool  keypool_batch (C ABI): skipped: {why}"),
    }
    drop(mock);
    https_lines(n);
}

/// The production path (every hosted API is `https://`): keypool over TLS against the
/// hyper client over tokio-rustls, the same TLS mock (its generated CA trusted), the
/// same run, connections reused; and the old https path (ureq with per-phase
/// timeouts, 256 threads) for the before/after.
fn https_lines(n: usize) {
    let mock = MockProcess::start_tls(LATENCY_MS, 2);
    let ca = mock.ca_file.clone().expect("a TLS mock");
    println!("https: the same scenario over TLS (TLS 1.3, ring), {n} requests");
    {
        let pool = Pool::new(config_with(&mock.url, Some(&ca), KEYS, PER_KEY)).unwrap();
        let _ = pool.batch((0..2 * KEYS * PER_KEY).map(prompt));
    }
    MOCK_PID.store(mock.pid(), Ordering::Relaxed);
    let kp = measured_batch_on(
        &mock.url,
        Some(&ca),
        n,
        KEYS * PER_KEY,
        "keypool  Pool::batch over TLS",
    );
    let ca_pem = std::fs::read(&ca).unwrap();
    let trust = keypool::TlsTrust::load(&keypool::TlsConfig::default().ca_file(&*ca)).unwrap();
    let (fl, ffail) = transport_alone_tls(&mock.url, trust, n, |s| {
        Box::new(keypool::UreqTransport::new(s))
    });
    fl.print("floor over TLS: 256 x UreqTransport::send", ffail);
    let (ur, ufail) = transport_alone_tls(&mock.url, keypool::TlsTrust::default(), n, |s| {
        Box::new(UreqOnly::with_ca(s, Some(&ca_pem)))
    });
    ur.print("256 x ureq per-phase (old https path)", ufail);
    let (mb, mfail) = transport_alone_tls(&mock.url, keypool::TlsTrust::default(), n, |_| {
        Box::new(MinimalBlockingTls::new(&mock.url, &ca))
    });
    mb.print("floor: 256 x minimal blocking rustls", mfail);
    let (hy, hfail) = hyper_tls_reference(&mock.url, &ca, n);
    hy.print("async ref: hyper + rustls over TLS", hfail);
    print_machine(&kp, &hy);
    println!(
        "ratios https keypool batch/hyper+rustls: CPU {:.2}x (target <= 2), throughput {:.3} (target >= 0.95); transport floor/hyper+rustls: CPU {:.2}x; old https path/hyper+rustls: CPU {:.2}x",
        kp.cpu_us() / hy.cpu_us(),
        kp.rps / hy.rps,
        fl.cpu_us() / hy.cpu_us(),
        ur.cpu_us() / hy.cpu_us()
    );
    drop(mock);
    // The same two clients against a mock the scheduler serves first: here client and
    // server share two cores, and keypool's threads (one per request in flight, woken
    // as answers arrive) take a share of them per thread, delaying the mock's next
    // answers; a remote server's answers do not wait for the client's machine.
    let mock = MockProcess::start_tls_favoured(LATENCY_MS, 2);
    let ca = mock.ca_file.clone().expect("a TLS mock");
    if mock.favoured != Some(true) {
        println!("https, mock favoured: skipped (nice -10 needs CAP_SYS_NICE)");
        return;
    }
    println!("https, mock favoured (nice -10, as a server elsewhere is not slowed by the client):");
    let (kp, hy) = keypool_and_hyper_tls(&mock, &ca, n, KEYS * PER_KEY);
    println!(
        "ratios https keypool batch/hyper+rustls, mock favoured: CPU {:.2}x, throughput {:.3} (target >= 0.95)",
        kp.cpu_us() / hy.cpu_us(),
        kp.rps / hy.rps
    );
}

/// Keypool's `Pool::batch` over TLS (after `warm` requests) and hyper + rustls,
/// one after the other against `mock`: both lines and the machine's.
fn keypool_and_hyper_tls(
    mock: &MockProcess,
    ca: &str,
    n: usize,
    warm: usize,
) -> (Figures, Figures) {
    MOCK_PID.store(mock.pid(), Ordering::Relaxed);
    let kp = measured_batch_on(
        &mock.url,
        Some(ca),
        n,
        warm,
        "keypool  Pool::batch over TLS",
    );
    let (hy, hfail) = hyper_tls_reference(&mock.url, ca, n);
    hy.print("async ref: hyper + rustls over TLS", hfail);
    print_machine(&kp, &hy);
    (kp, hy)
}

/// The mock's CPU per request over keypool's measured requests and over the
/// reference's (from `/proc`), and how busy each pair kept the machine: client and mock
/// CPU per request times requests per second, in cores. On a small machine the mock
/// competes with the client for the same cores.
fn print_machine(kp: &Figures, reference: &Figures) {
    let busy = |f: &Figures| (f.mock_us + f.cpu_us()) * f.rps / 1e6;
    println!(
        "  mock CPU {:.1} µs/req serving keypool, {:.1} serving the reference; client + mock busy {:.2} and {:.2} of {} cores",
        kp.mock_us,
        reference.mock_us,
        busy(kp),
        busy(reference),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// `--https-quick N`: keypool over TLS and hyper + rustls, alternating, `rounds` times
/// each, then the median ratio (`favoured`: against a mock at nice -10).
fn https_quick(n: usize, rounds: usize, favoured: bool) {
    let mock = if favoured {
        MockProcess::start_tls_favoured(LATENCY_MS, 2)
    } else {
        MockProcess::start_tls(LATENCY_MS, 2)
    };
    if favoured && mock.favoured != Some(true) {
        println!("--favoured: the mock could not be favoured (nice -10 needs CAP_SYS_NICE)");
        return;
    }
    let ca = mock.ca_file.clone().expect("a TLS mock");
    let mut ratios = Vec::new();
    for _ in 0..rounds.max(1) {
        let (kp, hy) = keypool_and_hyper_tls(&mock, &ca, n, 2 * KEYS * PER_KEY);
        ratios.push((kp.cpu_us() / hy.cpu_us(), kp.rps / hy.rps));
    }
    let cpu = median(ratios.iter().map(|r| r.0).collect());
    let rps = median(ratios.iter().map(|r| r.1).collect());
    println!(
        "median of {} rounds: CPU {cpu:.2}x hyper + rustls, throughput {rps:.3}{}",
        ratios.len(),
        if favoured { " (mock favoured)" } else { "" }
    );
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Resident memory over TLS at 64 keys × 32 in flight (mock latency 200 ms, so every
/// worker holds a request): the peak of this process's RSS during the run, over its RSS
/// before the pool was built, per request in flight (target: at most 64 KiB).
fn memory_over_tls(tls: bool) {
    const K: usize = 64;
    const C: usize = 32;
    let mock = if tls {
        MockProcess::start_tls(200, 4)
    } else {
        MockProcess::start(200, 4)
    };
    let ca = mock.ca_file.clone();
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let base = rss();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let n = K * C * 4;
    let t0 = Instant::now();
    let pool = Pool::new(config_with(&mock.url, ca.as_deref(), K, C)).unwrap();
    let failures = pool
        .batch((0..n).map(prompt))
        .iter()
        .filter(|r| r.is_err())
        .count();
    let max_in_flight: usize = pool.stats().keys.iter().map(|k| k.max_in_flight).sum();
    let wall = t0.elapsed();
    if std::env::var_os("CPU_BENCH_SMAPS").is_some() {
        // Resident memory by mapping size (thread stacks are the 256 KiB ones).
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut by_size = std::collections::BTreeMap::<u64, (u64, u64)>::new();
        let mut size = 0;
        for l in smaps.lines() {
            if let Some(v) = l.strip_prefix("Size:") {
                size = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("Rss:") {
                let rss: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                let e = by_size.entry(size).or_default();
                e.0 += 1;
                e.1 += rss;
            }
        }
        let mut v: Vec<_> = by_size.into_iter().collect();
        v.sort_by_key(|(_, (_, rss))| std::cmp::Reverse(*rss));
        for (size, (n, rss)) in v.into_iter().take(6) {
            println!(
                "  mappings of {size} KiB: {n}, resident {:.1} MiB",
                rss as f64 / 1024.0
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    drop(pool);
    let peak_kib = peak.load(Ordering::Relaxed).saturating_sub(base);
    println!(
        "memory over {}: {K} keys x {C} workers, {n} requests in {:.1} s, failures {failures}, max in flight {max_in_flight}: peak RSS {:.1} MiB over the {:.1} MiB before the pool, {:.1} KiB per request in flight (target <= 64)",
        if tls { "TLS" } else { "plain http" },
        wall.as_secs_f64(),
        peak_kib as f64 / 1024.0,
        base as f64 / 1024.0,
        peak_kib as f64 / (K * C) as f64
    );
}

/// Builds `examples/c/bench_batch.c` with `cc -O2` against `libkeypool.a` (from
/// `KEYPOOL_LIB_DIR`, else the release profile of this target directory), runs it for
/// `n` requests against the mock at `url` and reads its figures. `Err` says why the
/// line is skipped; nothing here fails the bench.
fn c_abi_batch(url: &str, n: usize) -> Result<(Figures, usize), String> {
    use std::process::Command;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // This program is <target>/release/deps/cpu-<hash>.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or("cannot find the target directory")?
        .to_path_buf();
    let lib_dir = std::env::var_os("KEYPOOL_LIB_DIR")
        .map_or_else(|| target.join("release"), std::path::PathBuf::from);
    let lib = lib_dir.join("libkeypool.a");
    let how =
        "build it with `cargo build --release --locked -p keypool-capi` (or set KEYPOOL_LIB_DIR)";
    let lib_time = std::fs::metadata(&lib)
        .and_then(|m| m.modified())
        .map_err(|_| format!("no {}; {how}", lib.display()))?;
    if Command::new("cc").arg("--version").output().is_err() {
        return Err("no C compiler (`cc`) on PATH".into());
    }
    // A library older than the sources measures old code: say so (the line still runs).
    let newest_source = ["src", "capi/src", "capi/src/ffi"]
        .iter()
        .filter_map(|d| std::fs::read_dir(root.join(d)).ok())
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    if newest_source.is_some_and(|t| t > lib_time) {
        println!("  note: {} is older than the sources; {how}", lib.display());
    }
    let bin = target.join("bench_batch");
    let cc = Command::new("cc")
        .args(["-std=c11", "-O2", "-I"])
        .arg(root.join("include"))
        .arg(root.join("examples/c/bench_batch.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&bin)
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !cc.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&cc.stderr).trim()
        ));
    }
    let run = Command::new(&bin)
        .arg(url)
        .arg(n.to_string())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("bench_batch "))
        .ok_or_else(|| {
            format!(
                "bench_batch printed no figures ({}): {}",
                run.status,
                String::from_utf8_lossy(&run.stderr).trim()
            )
        })?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("bench_batch: no {name} in {line:?}"))
    };
    let (wall, per) = (field("wall_s")?, field("requests")?);
    let figures = Figures {
        rps: per / wall,
        user_us: field("user_us")? / per,
        sys_us: field("sys_us")? / per,
        csw: field("csw")? / per,
        faults: field("faults")? / per,
        mock_us: f64::NAN,
    };
    Ok((figures, field("failures")? as usize))
}

fn transport_alone(
    url: &str,
    n: usize,
    make: impl Fn(&keypool::TransportSettings) -> Box<dyn Transport>,
) -> (Figures, usize) {
    transport_alone_tls(url, keypool::TlsTrust::default(), n, make)
}

/// [`transport_alone`] with transports built to trust `tls`.
fn transport_alone_tls(
    url: &str,
    tls: keypool::TlsTrust,
    n: usize,
    make: impl Fn(&keypool::TransportSettings) -> Box<dyn Transport>,
) -> (Figures, usize) {
    let settings = keypool::TransportSettings {
        label: "floor".into(),
        max_concurrent: PER_KEY,
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(10),
        max_response_bytes: 1 << 24,
        tls,
    };
    let transports: Vec<Box<dyn Transport>> = (0..KEYS).map(|_| make(&settings)).collect();
    let keys: Vec<keypool::ApiKey> = (0..KEYS)
        .map(|i| keypool::ApiKey::new(format!("sk-bench-{i}")))
        .collect();
    let url = format!("{url}/chat/completions");
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(KEYS * PER_KEY + 1);
    let mut figures = None;
    std::thread::scope(|s| {
        let mut threads = Vec::new();
        for (t, key) in transports.iter().zip(&keys) {
            for _ in 0..PER_KEY {
                let (url, next, failures, barrier) = (&url, &next, &failures, &barrier);
                threads.push(s.spawn(move || {
                    let send = |i: usize| {
                        let req = prompt(i);
                        let r = keypool::HttpRequest {
                            url,
                            key,
                            headers: &[],
                            body: req.body(),
                            timeout: Duration::from_secs(60),
                        };
                        matches!(t.send(&r), Ok(resp) if resp.status == 200)
                    };
                    send(0); // connection open
                    barrier.wait();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        if !send(i) {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        if CALLGRIND.load(Ordering::Relaxed) {
            println!("callgrind run: warmed up; measuring in 2 s");
            std::thread::sleep(Duration::from_secs(2));
        }
        barrier.wait();
        let u0 = Usage::now();
        let t0 = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        figures = Some(Usage::now().minus(&u0, t0.elapsed(), n));
    });
    (figures.unwrap(), failures.load(Ordering::Relaxed))
}

/// `UreqTransport::send` as it was before this round (the https path then, and plain
/// http before the lean client): one `ureq::Agent` per key, per-phase timeouts,
/// configured the same way otherwise (buffers, pool size).
struct UreqOnly {
    agent: ureq::Agent,
    limit: u64,
}

impl UreqOnly {
    fn new(s: &keypool::TransportSettings) -> UreqOnly {
        Self::with_ca(s, None)
    }

    /// Trusting exactly the PEM CA `ca` when given (a TLS mock).
    fn with_ca(s: &keypool::TransportSettings, ca: Option<&[u8]>) -> UreqOnly {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = ca {
            let cert = ureq::tls::Certificate::from_pem(ca).unwrap();
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]));
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_connect(Some(s.connect_timeout))
            .timeout_send_request(Some(s.timeout))
            .timeout_send_body(Some(s.timeout))
            .timeout_recv_response(Some(s.timeout))
            .timeout_recv_body(Some(s.timeout))
            .max_idle_connections_per_host(s.max_concurrent.max(1))
            .max_idle_connections(s.max_concurrent.max(1) * 2)
            .input_buffer_size(64 * 1024)
            .max_response_header_size(64 * 1024)
            .output_buffer_size(16 * 1024)
            .build();
        UreqOnly {
            agent: config.into(),
            limit: s.max_response_bytes,
        }
    }
}

impl Transport for UreqOnly {
    fn send(
        &self,
        req: &keypool::HttpRequest<'_>,
    ) -> Result<keypool::HttpResponse, keypool::TransportError> {
        let fail = |e: ureq::Error| keypool::TransportError::Failed(e.to_string());
        let mut resp = self
            .agent
            .post(req.url)
            .header("authorization", format!("Bearer {}", req.key.expose()))
            .header("content-type", "application/json")
            .send(req.body)
            .map_err(fail)?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(self.limit)
            .read_to_vec()
            .map_err(fail)?;
        Ok(keypool::HttpResponse {
            status,
            headers: Vec::new(),
            body,
        })
    }
}

// ---------------------------------------------------------------------------------
// measurement

/// The mock whose CPU each measurement also takes (`MockProcess::pid`; 0: none), so
/// its figures cover exactly the measured requests.
static MOCK_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[derive(Clone, Copy)]
struct Usage {
    user: Duration,
    sys: Duration,
    csw: f64,
    faults: f64,
    /// The mock's CPU so far (µs), when `MOCK_PID` is set.
    mock_us: f64,
}

impl Usage {
    fn now() -> Usage {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF is a valid target.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        assert_eq!(rc, 0, "getrusage");
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Usage {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
            csw: (ru.ru_nvcsw + ru.ru_nivcsw) as f64,
            faults: (ru.ru_minflt + ru.ru_majflt) as f64,
            mock_us: match MOCK_PID.load(Ordering::Relaxed) {
                0 => f64::NAN,
                pid => process_cpu_us(pid),
            },
        }
    }

    fn minus(&self, before: &Usage, wall: Duration, n: usize) -> Figures {
        let n = n as f64;
        Figures {
            rps: n / wall.as_secs_f64(),
            user_us: (self.user - before.user).as_secs_f64() * 1e6 / n,
            sys_us: (self.sys - before.sys).as_secs_f64() * 1e6 / n,
            csw: (self.csw - before.csw) / n,
            faults: (self.faults - before.faults) / n,
            mock_us: (self.mock_us - before.mock_us) / n,
        }
    }
}

struct Figures {
    rps: f64,
    user_us: f64,
    sys_us: f64,
    csw: f64,
    faults: f64,
    /// The mock's CPU per request over the same requests (NaN: not measured).
    mock_us: f64,
}

impl Figures {
    fn cpu_us(&self) -> f64 {
        self.user_us + self.sys_us
    }

    fn print(&self, name: &str, failures: usize) {
        println!(
            "  {name:<40} {:>7.0} req/s  CPU {:>5.1} µs/req (user {:.1}, sys {:.1})  ctx switches {:.2}/req  page faults {:.3}/req  failures {failures}",
            self.rps,
            self.cpu_us(),
            self.user_us,
            self.sys_us,
            self.csw,
            self.faults
        );
    }
}

/// Context switches by thread kind, since each thread started (`CPU_BENCH_THREADS=1`).
fn thread_switches() {
    let mut by_kind = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap_or(0))
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let kind = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let e = by_kind.entry(kind.to_owned()).or_default();
        e.0 += field("voluntary_ctxt_switches:");
        e.1 += field("nonvoluntary_ctxt_switches:");
    }
    for (k, (v, nv)) in by_kind {
        println!("    thread {k:<24} voluntary {v:>8}  involuntary {nv:>8}");
    }
}

// ---------------------------------------------------------------------------------
// keypool

/// One `Pool::batch` of `n` requests on a new pool, after `warm` unmeasured ones (its
/// connections open): prints its line and returns its figures. With
/// `CPU_BENCH_THREADS` set, also each kind of thread's context switches.
fn measured_batch(url: &str, n: usize, warm: usize) -> Figures {
    measured_batch_on(url, None, n, warm, "keypool  Pool::batch")
}

/// [`measured_batch`] trusting `ca_file` (a TLS mock), printed as `name`.
fn measured_batch_on(
    url: &str,
    ca_file: Option<&str>,
    n: usize,
    warm: usize,
    name: &str,
) -> Figures {
    let pool = Pool::new(config_with(url, ca_file, KEYS, PER_KEY)).unwrap();
    let _ = pool.batch((0..warm).map(prompt));
    let u0 = Usage::now();
    let t0 = Instant::now();
    let failures = pool
        .batch((0..n).map(prompt))
        .iter()
        .filter(|r| r.is_err())
        .count();
    let kp = Usage::now().minus(&u0, t0.elapsed(), n);
    if std::env::var_os("CPU_BENCH_THREADS").is_some() {
        thread_switches();
    }
    drop(pool);
    kp.print(name, failures);
    kp
}

/// The pool under test: `first_available` (the default), or the strategy named by
/// `CPU_BENCH_STRATEGY` (`round_robin`, `least_loaded`).
fn config(url: &str) -> Config {
    config_with(url, None, KEYS, PER_KEY)
}

/// [`config`] with `keys` × `per_key` workers, trusting the CA in `ca_file` (a TLS mock).
fn config_with(url: &str, ca_file: Option<&str>, keys: usize, per_key: usize) -> Config {
    let strategy = match std::env::var("CPU_BENCH_STRATEGY").as_deref() {
        Ok("round_robin") => Strategy::RoundRobin,
        Ok("least_loaded") => Strategy::LeastLoaded,
        _ => Strategy::FirstAvailable,
    };
    let mut b = Config::builder()
        .base_url(url)
        .strategy(strategy)
        .queue_capacity(4096)
        .max_attempts(1);
    if let Some(ca) = ca_file {
        b = b.tls(keypool::TlsConfig::default().ca_file(ca));
    }
    for i in 0..keys {
        b = b.key(format!("sk-bench-{i}"), per_key);
    }
    b.build().unwrap()
}

fn prompt(i: usize) -> Request {
    Request::chat(
        "bench",
        [("user", &*format!("benchmark prompt number {i}"))],
    )
}

// ---------------------------------------------------------------------------------
// the async reference

/// `n` requests through an async reference client `C`: one tokio thread, 256
/// keep-alive connections each driven by its own task, each warmed up with one
/// request first; only the `n` are measured.
fn async_reference<C: RefClient>(url: &str, n: usize) -> (Figures, usize) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (addr, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = addr.to_owned();
    let path = format!("{prefix}/chat/completions");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let conns = KEYS * PER_KEY;
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            clients.push(C::open(s, &addr, &path).await);
        }
        drive(clients, n).await
    })
}

/// The hyper client over TLS (tokio-rustls, ring, the mock's CA as the only root): the
/// async reference for the https line, same shape as [`async_reference`].
/// A rustls client configuration (ring) trusting exactly the PEM CA in `ca_file`, for
/// the reference clients over TLS.
fn client_config(ca_file: &str) -> tokio_rustls::rustls::ClientConfig {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn hyper_tls_reference(url: &str, ca_file: &str, n: usize) -> (Figures, usize) {
    use tokio_rustls::rustls;
    let rest = url.strip_prefix("https://").expect("https URL");
    let (addr, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = addr.to_owned();
    let host = addr.rsplit_once(':').map_or(&*addr, |(h, _)| h).to_owned();
    let path = format!("{prefix}/chat/completions");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_file)));
    let name = rustls::pki_types::ServerName::try_from(host).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let conns = KEYS * PER_KEY;
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let tls = connector.connect(name.clone(), s).await.unwrap();
            clients.push(HyperConn::over(tls, &addr, &path).await);
        }
        drive(clients, n).await
    })
}

/// Runs `n` requests over `clients` (each warmed up with one request first, not
/// measured), one task per connection.
async fn drive<C: RefClient>(mut clients: Vec<C>, n: usize) -> (Figures, usize) {
    for (i, c) in clients.iter_mut().enumerate() {
        c.call(i % KEYS, i).await.unwrap();
    }
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let u0 = Usage::now();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for (ci, mut c) in clients.into_iter().enumerate() {
        let (next, failures) = (next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if c.call(ci % KEYS, i).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let f = Usage::now().minus(&u0, t0.elapsed(), n);
    (f, failures.load(Ordering::Relaxed))
}

/// An async reference client on one keep-alive connection.
trait RefClient: Sized + Send + 'static {
    /// Takes the connected socket (to `host`, requests to `path`).
    fn open(
        s: tokio::net::TcpStream,
        host: &str,
        path: &str,
    ) -> impl std::future::Future<Output = Self>;
    /// One request: status 200 and the whole body read.
    fn call(
        &mut self,
        key: usize,
        i: usize,
    ) -> impl std::future::Future<Output = Result<(), ()>> + Send;
}

/// The same body from the same inputs as `prompt(i)`, serialised straight to bytes as
/// keypool's `Request::chat` does (no `serde_json::Value` tree).
fn chat_body(i: usize) -> Vec<u8> {
    let content = format!("benchmark prompt number {i}");
    serde_json::to_vec(&ChatBody {
        model: "bench",
        messages: [Message {
            role: "user",
            content: &content,
        }],
    })
    .unwrap()
}

#[derive(serde::Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
}

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// A response head's `Content-Length`, for the hand-written reference clients.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })
}

/// The minimal hand-written client.
struct Conn {
    s: tokio::net::TcpStream,
    host: String,
    path: String,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl RefClient for Conn {
    async fn open(s: tokio::net::TcpStream, host: &str, path: &str) -> Conn {
        Conn {
            s,
            host: host.to_owned(),
            path: path.to_owned(),
            out: Vec::with_capacity(1024),
            buf: Vec::with_capacity(8192),
        }
    }

    async fn call(&mut self, key: usize, i: usize) -> Result<(), ()> {
        let (host, path) = (&self.host, &self.path);
        let body = chat_body(i);
        self.out.clear();
        write!(
            self.out,
            "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer sk-bench-{key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        self.out.extend_from_slice(&body);
        self.s.write_all(&self.out).await.map_err(|_| ())?;
        self.buf.clear();
        let (head_end, len) = loop {
            let mut chunk = [0u8; 4096];
            let r = self.s.read(&mut chunk).await.map_err(|_| ())?;
            if r == 0 {
                return Err(());
            }
            self.buf.extend_from_slice(&chunk[..r]);
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..p]).map_err(|_| ())?;
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(());
                }
                let len = content_length(head).ok_or(())?;
                break (p + 4, len);
            }
        };
        while self.buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let r = self.s.read(&mut chunk).await.map_err(|_| ())?;
            if r == 0 {
                return Err(());
            }
            self.buf.extend_from_slice(&chunk[..r]);
        }
        Ok(())
    }
}

/// The async reference issue 14 names: a hyper 1 client (`client::conn::http1`), each
/// request a `hyper::Request` with the same headers and body, the body collected.
struct HyperConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: String,
    uri: hyper::Uri,
}

impl HyperConn {
    /// A hyper client connection over `io` (a TCP or TLS stream).
    async fn over<I>(io: I, host: &str, path: &str) -> HyperConn
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        HyperConn {
            sender,
            host: host.to_owned(),
            uri: path.parse().unwrap(),
        }
    }
}

impl RefClient for HyperConn {
    async fn open(s: tokio::net::TcpStream, host: &str, path: &str) -> HyperConn {
        HyperConn::over(s, host, path).await
    }

    async fn call(&mut self, key: usize, i: usize) -> Result<(), ()> {
        use http_body_util::BodyExt;
        let body = chat_body(i);
        let req = hyper::Request::post(self.uri.clone())
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer sk-bench-{key}"),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|_| ())?;
        self.sender.ready().await.map_err(|_| ())?;
        let resp = self.sender.send_request(req).await.map_err(|_| ())?;
        if resp.status() != 200 {
            return Err(());
        }
        let body = resp.into_body().collect().await.map_err(|_| ())?.to_bytes();
        if body.is_empty() { Err(()) } else { Ok(()) }
    }
}

// ---------------------------------------------------------------------------------
// the mock, in a child process

/// The floor of any blocking design over TLS: a minimal hand-written blocking client
/// (rustls `StreamOwned` over a `TcpStream`, request written in one buffer, response
/// read by `Content-Length`), one connection per thread, no pool, no timeouts. Not a
/// client to ship (no framing checks): the yardstick for what thread-per-request costs
/// before any HTTP library runs.
struct MinimalBlockingTls {
    cfg: Arc<tokio_rustls::rustls::ClientConfig>,
    addr: String,
    host: String,
    idle: parking_lot::Mutex<
        Vec<
            tokio_rustls::rustls::StreamOwned<
                tokio_rustls::rustls::ClientConnection,
                std::net::TcpStream,
            >,
        >,
    >,
}

impl MinimalBlockingTls {
    fn new(url: &str, ca_file: &str) -> MinimalBlockingTls {
        let rest = url.strip_prefix("https://").expect("https URL");
        let addr = rest[..rest.find('/').unwrap_or(rest.len())].to_owned();
        let host = addr.rsplit_once(':').map_or(&*addr, |(h, _)| h).to_owned();
        MinimalBlockingTls {
            cfg: Arc::new(client_config(ca_file)),
            addr,
            host,
            idle: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl Transport for MinimalBlockingTls {
    fn send(
        &self,
        req: &keypool::HttpRequest<'_>,
    ) -> Result<keypool::HttpResponse, keypool::TransportError> {
        use std::io::Read;
        use tokio_rustls::rustls;
        let fail = |m: &str| keypool::TransportError::Failed(m.to_owned());
        let mut s = match self.idle.lock().pop() {
            Some(s) => s,
            None => {
                let tcp = std::net::TcpStream::connect(&self.addr).map_err(|_| fail("connect"))?;
                tcp.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from(self.host.clone()).unwrap();
                let c = rustls::ClientConnection::new(self.cfg.clone(), name).unwrap();
                rustls::StreamOwned::new(c, tcp)
            }
        };
        let path = req
            .url
            .split_once("://")
            .map_or("/", |(_, r)| &r[r.find('/').unwrap_or(0)..]);
        let mut out = Vec::with_capacity(512 + req.body.len());
        write!(
            out,
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.addr,
            req.key.expose(),
            req.body.len()
        )
        .unwrap();
        out.extend_from_slice(req.body);
        s.write_all(&out).map_err(|_| fail("write"))?;
        let mut buf = Vec::with_capacity(4096);
        let (head_end, len) = loop {
            let mut chunk = [0u8; 4096];
            let r = s.read(&mut chunk).map_err(|_| fail("read"))?;
            if r == 0 {
                return Err(fail("eof"));
            }
            buf.extend_from_slice(&chunk[..r]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..p]).map_err(|_| fail("utf8"))?;
                let len = content_length(head).ok_or(fail("no length"))?;
                break (p + 4, len);
            }
        };
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let r = s.read(&mut chunk).map_err(|_| fail("read"))?;
            if r == 0 {
                return Err(fail("eof"));
            }
            buf.extend_from_slice(&chunk[..r]);
        }
        self.idle.lock().push(s);
        Ok(keypool::HttpResponse {
            status: 200,
            headers: Vec::new(),
            body: buf[head_end..].to_vec(),
        })
    }
}
