//! Background writers: `qemu-io` in a loop on its own thread, writing through a VM's
//! NBD export while a test protects or fails the VM over. [`AckWriter`] records every
//! write qemu-io acknowledged (to check none is lost); [`Writer`] writes random
//! patterns at random offsets until stopped. Both are stopped, and their thread joined,
//! when dropped.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wait::unix_now_ms;

/// Write size of [`AckWriter`].
pub const ACK_BLOCK: u64 = 64 << 10;

/// A thread looping until its stop flag is set.
struct Background<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Background<T> {
    fn spawn(f: impl FnOnce(Arc<AtomicBool>) -> T + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        Self { stop, handle: Some(std::thread::spawn(move || f(s))) }
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Sets the stop flag and joins: the thread's result.
    fn stop(&mut self) -> T {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().expect("running").join().expect("writer thread panicked")
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The pattern [`AckWriter`] writes in the block at `off` (never 0, neighbours differ).
pub fn pattern_at(off: u64) -> u8 {
    ((off / ACK_BLOCK * 37) % 251) as u8 + 1
}

/// Writes 64 KiB blocks, each with its own pattern ([`pattern_at`]) at its own offset,
/// through one NBD URI, `per_call` writes per `qemu-io` run, recording the offset of
/// every write `qemu-io` reports as done ("wrote ... at offset N"). Ends at the first
/// failure (the VM stopped), when stopped, or when the slots run out.
pub struct AckWriter {
    acked: Arc<AtomicU64>,
    /// When the last `qemu-io` run ended (ms since the epoch).
    last_call_ms: Arc<AtomicU64>,
    thread: Background<(Vec<u64>, Option<String>)>,
}

impl AckWriter {
    /// Starts writing the first `span` bytes; `pace` between runs.
    pub fn start(uri: String, span: u64, per_call: u64, pace: Duration) -> Self {
        let acked = Arc::new(AtomicU64::new(0));
        let last_call_ms = Arc::new(AtomicU64::new(0));
        let (a, a_ms) = (acked.clone(), last_call_ms.clone());
        let thread = Background::spawn(move |stop| {
            let mut done = Vec::new();
            let slots = span / ACK_BLOCK;
            let mut next = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if next >= slots {
                    return (done, None);
                }
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for _ in 0..per_call.min(slots - next) {
                    let off = next * ACK_BLOCK;
                    cmd.args(["-c", &format!("write -P {} {off} {ACK_BLOCK}", pattern_at(off))]);
                    next += 1;
                }
                let o = match cmd.arg(&uri).stdin(Stdio::null()).output() {
                    Ok(o) => o,
                    Err(e) => return (done, Some(e.to_string())),
                };
                let out = String::from_utf8_lossy(&o.stdout);
                a_ms.store(unix_now_ms() as u64, Ordering::SeqCst);
                for l in out.lines().filter(|l| l.starts_with("wrote ")) {
                    if let Some(off) = l.rsplit(' ').next().and_then(|w| w.parse::<u64>().ok()) {
                        done.push(off);
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if !o.status.success() || out.contains("failed") {
                    let err = format!("{} {out} {}", o.status, String::from_utf8_lossy(&o.stderr));
                    return (done, Some(err));
                }
                // Pacing the writes, not synchronising anything.
                std::thread::sleep(pace);
            }
            (done, None)
        });
        Self { acked, last_call_ms, thread }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// When the last `qemu-io` run ended (ms since the epoch; 0 before the first).
    pub fn last_call_ms(&self) -> i64 {
        self.last_call_ms.load(Ordering::SeqCst) as i64
    }

    /// The writer ended by itself (a failure, or no slot left).
    pub fn finished(&self) -> bool {
        self.thread.finished()
    }

    /// Stops and joins: the acknowledged offsets and the error that ended it, if any.
    pub fn stop(mut self) -> (Vec<u64>, Option<String>) {
        self.thread.stop()
    }
}

/// A pseudo-random number (no extra crates): clock nanoseconds through splitmix64.
pub fn random_u64() -> u64 {
    let mut z = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        as u64
        ^ u64::from(std::process::id()).rotate_left(32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes random patterns at random offsets through several NBD URIs until stopped.
pub struct Writer {
    rounds: Arc<AtomicU64>,
    /// `qemu-io` runs started, and finished (they run one after the other).
    runs: Arc<(AtomicU64, AtomicU64)>,
    thread: Background<Result<u64, String>>,
}

impl Writer {
    /// Writes `chunk`-byte patterns at pseudo-random `chunk`-aligned offsets below `span`
    /// to every URI, `per_call` writes per `qemu-io` run, until stopped; `pace` between
    /// rounds keeps the write rate below what replication sustains (a pacing delay, not
    /// a synchronisation).
    pub fn start(uris: Vec<String>, chunk: u64, span: u64, per_call: usize, pace: Duration) -> Self {
        let rounds = Arc::new(AtomicU64::new(0));
        let runs = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let (r, n_runs) = (rounds.clone(), runs.clone());
        let thread = Background::spawn(move |stop| {
            let mut seed = random_u64();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for uri in &uris {
                    let mut cmd = Command::new("qemu-io");
                    cmd.args(["-f", "raw"]);
                    for _ in 0..per_call {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = ((seed >> 20) % (span / chunk)) * chunk;
                        let pattern = (seed >> 56) as u8 | 1;
                        cmd.args(["-c", &format!("write -P {pattern} {off} {chunk}")]);
                    }
                    n_runs.0.fetch_add(1, Ordering::SeqCst);
                    let o = cmd.arg(uri).stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
                    n_runs.1.fetch_add(1, Ordering::SeqCst);
                    let out = String::from_utf8_lossy(&o.stdout);
                    if !o.status.success() || out.contains("failed") {
                        return Err(format!(
                            "qemu-io on {uri}: {} {out} {}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr)
                        ));
                    }
                    n += per_call as u64;
                }
                r.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(pace);
            }
            Ok(n)
        });
        Self { rounds, runs, thread }
    }

    /// Rounds (one `qemu-io` run per URI) done so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// `qemu-io` runs (started, finished) so far. A run overlapped a window that began
    /// when `finished` was `f0` and ended when `started` was `s1` exactly when `s1 > f0`
    /// (the runs are sequential: run `k` ended after the start iff `k >= f0`, and began
    /// before the end iff `k < s1`).
    pub fn runs(&self) -> (u64, u64) {
        (self.runs.0.load(Ordering::SeqCst), self.runs.1.load(Ordering::SeqCst))
    }

    /// Stops the loop and waits for the running `qemu-io` to finish: every write it made
    /// is acknowledged when this returns. Returns the number of writes.
    #[track_caller]
    pub fn stop(mut self) -> u64 {
        let r = self.thread.stop();
        r.unwrap_or_else(|e| panic!("background writer failed: {e}"))
    }
}
