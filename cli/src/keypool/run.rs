//! `keypool run`: streams a JSONL file of requests through a pool and appends one
//! output record per request.
//!
//! Threads: a reader (parses lines lazily, skips what the output already answers,
//! submits with `Pool::submit_with`) and the calling thread (writes records, draws
//! progress, handles Ctrl-C). A window of permits bounds the requests between "read"
//! and "written", so memory stays flat whatever the input size, and in `--ordered`
//! mode it also bounds the reorder buffer.
//!
//! Accounting: every line taken from the window is entered in a ledger (sequence
//! number → line and `custom_id`) and leaves it only when its record is written. A line
//! that leaves without a record (its result was `Cancelled`: the pool shut down before
//! sending it) or never leaves (a result that never came) is *unrecorded*: the run
//! names it and does not exit 0, whatever the cause. An unrecorded line has no record,
//! so a resumed run sends it again.
//!
//! Input checks: an input file is read once before anything is sent
//! ([`crate::input::prescan`]) to refuse duplicate `custom_id`s and to count what is left to do; stdin cannot be read twice, so there duplicates are
//! caught as they are read (one 128-bit fingerprint per id) and stop the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use keypool::Pool;

use crate::input::{InputItem, Lines, parse_line, prescan};
use crate::output::{Outcome, RecordWriter};
use crate::progress::Progress;
use crate::resume::{Prior, ScanError, fingerprint, scan};

/// How many unrecorded `custom_id`s the summary lists.
const LIST_MAX: usize = 20;

/// Lines taken from the window and not yet written: sequence number → (line, custom_id).
type Ledger = Arc<Mutex<HashMap<u64, (u64, String)>>>;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Input JSONL file (`-` for stdin).
    pub input: PathBuf,
    /// Output JSONL file (`-` for stdout, which disables resuming).
    pub output: PathBuf,
    /// Write records in input order.
    pub ordered: bool,
    /// No progress bar, notes or summary.
    pub quiet: bool,
    /// Re-run requests whose last record in the output is a failure.
    pub retry_failed: bool,
    /// Replace an existing output file instead of resuming it.
    pub overwrite: bool,
    /// Without a terminal (and not quiet): a progress line on stderr at most this
    /// often.
    pub progress_every: Duration,
}

/// How a run was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// It was not.
    No,
    /// One Ctrl-C: nothing more was sent; in-flight requests finished and were written.
    Stopped,
    /// Two: in-flight requests were abandoned.
    Cancelled,
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// Successful records written.
    pub ok: u64,
    /// Failed records written (HTTP errors, transport errors, malformed lines).
    pub failed: u64,
    /// Of `failed`: lines not sent because the spend cap (`max_cost`) was reached.
    pub budget_exhausted: u64,
    /// Lines skipped because the output already answers them successfully.
    pub skipped_ok: u64,
    /// Lines skipped because their last record is a failure (no `--retry-failed`).
    pub skipped_failed: u64,
    /// Lines read whose request has no record (cancelled, abandoned, or lost).
    pub unrecorded: u64,
    /// The first [`LIST_MAX`] of them, `(line, custom_id)`, by line.
    pub unrecorded_ids: Vec<(u64, String)>,
    /// Whether Ctrl-C cut it short.
    pub interrupted: Interrupted,
    /// Wall time.
    pub elapsed: Duration,
    /// The pool's counters at the end.
    pub stats: keypool::Stats,
}

impl RunReport {
    /// Whether every input line now has a successful last record.
    pub fn all_ok(&self) -> bool {
        self.failed == 0 && self.skipped_failed == 0 && self.unrecorded == 0
    }

    /// The lines without a record, as printed whatever `--quiet` says (`None` when
    /// every line read has one).
    pub fn unrecorded_note(&self) -> Option<String> {
        if self.unrecorded == 0 {
            return None;
        }
        let ids: Vec<String> = self
            .unrecorded_ids
            .iter()
            .map(|(line, id)| format!("{id} (line {line})"))
            .collect();
        let more = if self.unrecorded > ids.len() as u64 {
            ", …"
        } else {
            ""
        };
        let what = if self.interrupted == Interrupted::No {
            "keypool: error: "
        } else {
            "keypool: "
        };
        Some(format!(
            "{what}{} line(s) read have no record (not sent, cancelled or lost): {}{more}; \
             run the same command again to send them\n",
            self.unrecorded,
            ids.join(", ")
        ))
    }

    /// The summary printed at the end: totals, then the per-key table.
    /// The run's outcome as one JSON document (`--stats-json`): the record counts, the
    /// elapsed time, and the pool's [`keypool::Stats`] (labels, never keys).
    pub fn stats_json(&self) -> String {
        let v = serde_json::json!({
            "records": {
                "ok": self.ok,
                "failed": self.failed,
                "skipped_ok": self.skipped_ok,
                "skipped_failed": self.skipped_failed,
                "unrecorded": self.unrecorded,
            },
            "interrupted": !matches!(self.interrupted, Interrupted::No),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "stats": self.stats,
        });
        let mut text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        text
    }

    pub fn summary(&self, output: &Path) -> String {
        let written = self.ok + self.failed;
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            written as f64 / secs
        } else {
            0.0
        };
        let mut s = format!(
            "keypool: {written} records written to {}: {} ok, {} failed, in {secs:.1} s ({rate:.0}/s)\n",
            output.display(),
            self.ok,
            self.failed
        );
        let (attempts, failed_attempts, retries) =
            self.stats.keys.iter().fold((0, 0, 0), |(a, f, r), k| {
                (a + k.sent, f + k.failed, r + k.retries)
            });
        s += &format!(
            "keypool: {attempts} HTTP attempts: {} ok, {failed_attempts} failed ({retries} retried)\n",
            attempts - failed_attempts.min(attempts)
        );
        if self.skipped_ok + self.skipped_failed > 0 {
            s += &format!(
                "keypool: skipped {} lines already in the output ({} ok, {} failed{})\n",
                self.skipped_ok + self.skipped_failed,
                self.skipped_ok,
                self.skipped_failed,
                if self.skipped_failed > 0 {
                    "; rerun with --retry-failed to retry them"
                } else {
                    ""
                }
            );
        }
        if self.budget_exhausted > 0 {
            s += &format!(
                "keypool: spend cap reached (max_cost): {} line(s) not sent, recorded as \
                 budget_exhausted; run again with --retry-failed (and a higher --max-cost) \
                 to send them\n",
                self.budget_exhausted
            );
        }
        match self.interrupted {
            Interrupted::No => {}
            Interrupted::Stopped | Interrupted::Cancelled => {
                s += "keypool: interrupted; run the same command again to resume\n"
            }
        }
        s += &crate::progress::key_table(&self.stats);
        s += &crate::progress::key_capacity(&self.stats);
        s += &crate::progress::key_states(&self.stats);
        s
    }
}

/// One finished line on its way to the output.
struct Done {
    seq: u64,
    line: u64,
    custom_id: String,
    outcome: Outcome,
    elapsed: Duration,
}

#[derive(Default)]
struct ReaderReport {
    skipped_ok: u64,
    skipped_failed: u64,
    error: Option<String>,
}

fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// Runs the file. `interrupts` delivers one message per Ctrl-C.
pub fn run(pool: &Pool, opts: &RunOptions, interrupts: &Receiver<()>) -> Result<RunReport, String> {
    let start = Instant::now();
    if !is_stdio(&opts.input) && !is_stdio(&opts.output) {
        if let (Ok(a), Ok(b)) = (opts.input.canonicalize(), opts.output.canonicalize()) {
            if a == b {
                return Err("--input and --output are the same file".into());
            }
        }
    }
    let reader: Box<dyn BufRead + Send> = if is_stdio(&opts.input) {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f = File::open(&opts.input)
            .map_err(|e| format!("cannot open --input {}: {e}", opts.input.display()))?;
        Box::new(BufReader::with_capacity(1 << 16, f))
    };
    let input_is_file =
        !is_stdio(&opts.input) && std::fs::metadata(&opts.input).is_ok_and(|m| m.is_file());
    let name = opts.output.display();
    let prior = if is_stdio(&opts.output) || opts.overwrite || !opts.output.exists() {
        Prior::default()
    } else {
        match scan(&opts.output) {
            Ok(p) => p,
            Err(ScanError::Io(e)) => return Err(format!("cannot read --output {name}: {e}")),
            Err(ScanError::NotOutput { line }) => {
                return Err(format!(
                    "--output {name} exists and is not keypool output (line {line} is not an \
                     output record); it was not touched. Choose another file, or pass \
                     --overwrite to replace it"
                ));
            }
        }
    };
    let retry_failed = opts.retry_failed;
    let is_done = |id: &str| match prior.get(id) {
        Some(true) => true,
        Some(false) => !retry_failed,
        None => false,
    };
    let pre = if input_is_file {
        let pre = prescan(&opts.input, is_done)
            .map_err(|e| format!("cannot read --input {}: {e}", opts.input.display()))?;
        if let Some(why) = pre.refused {
            return Err(why);
        }
        Some((pre.lines, pre.done))
    } else {
        None
    };
    let mut progress = Progress::new(pre.map(|(lines, _)| lines), opts.quiet, opts.progress_every);
    progress.expect(pre.map(|(lines, done)| lines.saturating_sub(done)));
    if let Some(what) = prior.repaired {
        progress.note(&format!("keypool: repaired {name}: {what}"));
    }
    if prior.records > 0 {
        progress.note(&match pre {
            Some((lines, done)) => format!(
                "keypool: resuming {name}: {done} done, {} to go",
                lines - done
            ),
            None => format!(
                "keypool: resuming {name}: {} records already there",
                prior.records
            ),
        });
    }
    let out: Box<dyn Write + Send> = if is_stdio(&opts.output) {
        Box::new(std::io::stdout())
    } else {
        let f = OpenOptions::new()
            .create(true)
            .append(!opts.overwrite)
            .write(true)
            .truncate(opts.overwrite)
            .open(&opts.output)
            .map_err(|e| format!("cannot open --output {name}: {e}"))?;
        Box::new(f)
    };

    let capacity = pool.capacity();
    let window = (2 * capacity)
        .min(capacity + pool.config().queue_capacity)
        .max(1);
    let (permit_tx, permit_rx) = crossbeam_channel::bounded::<()>(window);
    for _ in 0..window {
        let _ = permit_tx.try_send(());
    }
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    // Lines taken from the window and not yet through the sink. After a stop, the run
    // is over when it drops to zero, even if the reader is still blocked reading input.
    let outstanding = Arc::new(AtomicU64::new(0));
    let ledger: Ledger = Arc::default();
    let strip_v1 = pool
        .config()
        .base_url
        .trim_end_matches('/')
        .ends_with("/v1");

    let reader_thread = {
        let pool = pool.clone();
        let bar = progress.bar();
        let outstanding = outstanding.clone();
        let ledger = ledger.clone();
        let check_dups = !input_is_file;
        std::thread::Builder::new()
            .name("keypool-reader".into())
            .spawn(move || {
                let ctx = ReaderCtx {
                    pool,
                    prior,
                    retry_failed,
                    strip_v1,
                    tx: done_tx,
                    permits: permit_rx,
                    stop: stop_rx,
                    outstanding,
                    ledger,
                    seen: check_dups.then(HashSet::new),
                };
                let mut report = ReaderReport::default();
                ctx.read(Lines::new(reader), &mut report, || bar.dec_length(1));
                report
            })
            .map_err(|e| format!("cannot start the reader thread: {e}"))?
    };

    let mut sink = Sink {
        writer: RecordWriter::new(out).with_mask({
            let pool = pool.clone();
            Box::new(move |record: &[u8]| pool.mask_secrets(record))
        }),
        progress,
        ordered: opts.ordered,
        pending: BTreeMap::new(),
        next_seq: 0,
        permits: permit_tx,
        ok: 0,
        failed: 0,
        budget_exhausted: 0,
        pool: pool.clone(),
        outstanding: outstanding.clone(),
        ledger: ledger.clone(),
        unrecorded: Vec::new(),
    };
    let mut stop = Some(stop_tx);
    let mut interrupted = Interrupted::No;
    loop {
        if interrupted == Interrupted::Stopped && outstanding.load(SeqCst) == 0 {
            break;
        }
        crossbeam_channel::select! {
            recv(done_rx) -> msg => match msg {
                Ok(done) => sink.accept(done)?,
                Err(_) => break,
            },
            recv(interrupts) -> sig => {
                if sig.is_err() {
                    // No signal source: nothing more will come from it; keep draining.
                    continue;
                }
                if interrupted == Interrupted::No {
                    interrupted = Interrupted::Stopped;
                    drop(stop.take());
                    // Stop spending at once: closing the pool answers every request not
                    // yet on the wire `Cancelled` (queued ones, retries waiting for their
                    // backoff) and lets only the attempts in flight finish. In the
                    // background, so a second Ctrl-C is still heard.
                    let closer = pool.clone();
                    let _ = std::thread::Builder::new()
                        .name("keypool-close".into())
                        .spawn(move || closer.close());
                    sink.progress.note(
                        "keypool: interrupted: nothing more is sent; waiting for the requests \
                         in flight (Ctrl-C again to abandon them)",
                    );
                } else {
                    interrupted = Interrupted::Cancelled;
                    sink.progress.note("keypool: cancelling the requests in flight");
                    break;
                }
            }
        }
    }
    let mut reader_report = ReaderReport::default();
    if interrupted == Interrupted::Cancelled {
        // Requests in flight are abandoned (no record: a resumed run sends them again).
        // Whatever has arrived is written.
        while let Ok(done) = done_rx.try_recv() {
            sink.accept(done)?;
        }
        sink.flush_pending()?;
        if reader_thread.is_finished() {
            reader_report = reader_thread.join().unwrap_or_default();
        }
    } else {
        if interrupted == Interrupted::No || reader_thread.is_finished() {
            reader_report = reader_thread.join().unwrap_or_default();
        }
        sink.flush_pending()?;
    }
    sink.progress.finish();
    if let Some(e) = reader_report.error {
        return Err(e);
    }
    // Whatever is still in the ledger never got a result.
    let mut unrecorded = std::mem::take(&mut sink.unrecorded);
    unrecorded.extend(
        ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v),
    );
    unrecorded.sort_unstable();
    let count = unrecorded.len() as u64;
    unrecorded.truncate(LIST_MAX);
    Ok(RunReport {
        ok: sink.ok,
        failed: sink.failed,
        budget_exhausted: sink.budget_exhausted,
        skipped_ok: reader_report.skipped_ok,
        skipped_failed: reader_report.skipped_failed,
        unrecorded: count,
        unrecorded_ids: unrecorded,
        interrupted,
        elapsed: start.elapsed(),
        stats: pool.stats(),
    })
}

struct ReaderCtx {
    pool: Pool,
    prior: Prior,
    retry_failed: bool,
    strip_v1: bool,
    tx: Sender<Done>,
    permits: Receiver<()>,
    stop: Receiver<()>,
    outstanding: Arc<AtomicU64>,
    ledger: Ledger,
    /// Fingerprints of the ids read so far, when duplicates are caught while reading
    /// (stdin); `None` when the input file was checked before the run.
    seen: Option<HashSet<u128>>,
}

impl ReaderCtx {
    fn stopped(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Waits for a free slot in the window and counts the line as outstanding; false
    /// when told to stop. Counting before the last stop check means that once the
    /// stop is visible and `outstanding` is zero, nothing more will be sent.
    fn acquire(&self) -> bool {
        if self.stopped() {
            return false;
        }
        let got = crossbeam_channel::select! {
            recv(self.permits) -> p => p.is_ok(),
            recv(self.stop) -> _ => false,
        };
        if !got {
            return false;
        }
        self.outstanding.fetch_add(1, SeqCst);
        if self.stopped() {
            self.outstanding.fetch_sub(1, SeqCst);
            return false;
        }
        true
    }

    fn read<R: BufRead>(
        mut self,
        lines: Lines<R>,
        report: &mut ReaderReport,
        mut skipped: impl FnMut(),
    ) {
        let mut seq = 0u64;
        for next in lines {
            let (line, text) = match next {
                Ok(l) => l,
                Err(e) => {
                    report.error = Some(format!("reading --input: {e}"));
                    return;
                }
            };
            let InputItem {
                line,
                custom_id,
                request,
                stream,
            } = parse_line(line, text, self.strip_v1);
            if let Some(seen) = &mut self.seen {
                if !seen.insert(fingerprint(&custom_id)) {
                    report.error = Some(format!(
                        "--input line {line}: custom_id {custom_id:?} was already used by an \
                         earlier line (each line needs its own id); the run stopped here"
                    ));
                    return;
                }
            }
            match self.prior.get(&custom_id) {
                Some(true) => {
                    report.skipped_ok += 1;
                    skipped();
                    continue;
                }
                Some(false) if !self.retry_failed => {
                    report.skipped_failed += 1;
                    skipped();
                    continue;
                }
                _ => {}
            }
            if !self.acquire() {
                return;
            }
            let this = seq;
            seq += 1;
            self.ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(this, (line, custom_id.clone()));
            let request = match request {
                Ok(r) => r,
                Err(msg) => {
                    let _ = self.tx.send(Done {
                        seq: this,
                        line,
                        custom_id,
                        outcome: Outcome::Invalid(msg),
                        elapsed: Duration::ZERO,
                    });
                    continue;
                }
            };
            let tx = self.tx.clone();
            let t0 = Instant::now();
            let done = move |r| {
                let _ = tx.send(Done {
                    seq: this,
                    line,
                    custom_id,
                    outcome: Outcome::Result(r),
                    elapsed: t0.elapsed(),
                });
            };
            // A streamed line is recorded like any other: its record holds the
            // assembled `chat.completion` (with usage), or the error that ended it.
            let submitted = if stream {
                self.pool.submit_stream_with(request, |_| true, done)
            } else {
                self.pool.submit_with(request, done)
            };
            if let Err(e) = submitted {
                let closed = matches!(e, keypool::Error::Closed);
                // Closed: the run is being cancelled; the line stays unanswered (it
                // is not written) and a resumed run sends it.
                let _ = self.tx.send(Done {
                    seq: this,
                    line,
                    custom_id: String::new(), // the ledger has it
                    outcome: Outcome::Result(Err(if closed {
                        keypool::Error::Cancelled
                    } else {
                        e
                    })),
                    elapsed: Duration::ZERO,
                });
                if closed {
                    return;
                }
            }
        }
    }
}

/// Receives finished lines, reorders them if asked, writes them.
struct Sink {
    writer: RecordWriter,
    progress: Progress,
    ordered: bool,
    pending: BTreeMap<u64, Done>,
    next_seq: u64,
    permits: Sender<()>,
    ok: u64,
    failed: u64,
    budget_exhausted: u64,
    pool: Pool,
    outstanding: Arc<AtomicU64>,
    ledger: Ledger,
    /// Lines whose result came back without a record to write: `(line, custom_id)`.
    unrecorded: Vec<(u64, String)>,
}

impl Sink {
    fn accept(&mut self, done: Done) -> Result<(), String> {
        if !self.ordered {
            return self.write(done);
        }
        self.pending.insert(done.seq, done);
        while let Some(d) = self.pending.remove(&self.next_seq) {
            self.next_seq += 1;
            self.write(d)?;
        }
        Ok(())
    }

    /// Writes whatever is still held back (after a cancelled run leaves gaps).
    fn flush_pending(&mut self) -> Result<(), String> {
        while let Some((_, d)) = self.pending.pop_first() {
            self.write(d)?;
        }
        Ok(())
    }

    fn write(&mut self, d: Done) -> Result<(), String> {
        // The slot is free again whatever happens to the record.
        let _ = self.permits.try_send(());
        let entry = self
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&d.seq);
        if d.outcome.is_cancelled() {
            // Never sent (the pool shut down first): no record, so a resumed run sends
            // it; counted and named in the report.
            self.unrecorded
                .push(entry.unwrap_or_else(|| (d.line, d.custom_id.clone())));
            self.outstanding.fetch_sub(1, SeqCst);
            return Ok(());
        }
        // The ledger holds the line's id (a refused submit's `Done` carries none).
        let custom_id = entry.as_ref().map_or(d.custom_id.as_str(), |(_, id)| id);
        self.writer
            .write(custom_id, d.line, &d.outcome, d.elapsed)
            .map_err(|e| format!("writing --output: {e}"))?;
        self.outstanding.fetch_sub(1, SeqCst);
        if d.outcome.is_ok() {
            self.ok += 1;
        } else {
            self.failed += 1;
            if matches!(
                d.outcome,
                Outcome::Result(Err(keypool::Error::BudgetExhausted { .. }))
            ) {
                self.budget_exhausted += 1;
            }
        }
        let (failed, pool) = (self.failed, &self.pool);
        self.progress.inc(|| {
            let retries = pool.stats().keys.iter().map(|k| k.retries).sum();
            (failed, retries)
        });
        Ok(())
    }
}
