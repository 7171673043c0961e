//! The campaign's write stream, built so that every prefix of it can be recognised in an
//! image: write `k` (from 0) fills block `k % BLOCKS` of the stream's region with the
//! byte [`pattern`]`(k / BLOCKS)` (its generation). After a prefix of `k` writes the
//! region reads `[gen g+1] * j ++ [gen g] * (BLOCKS - j)` with `k = (g + 1) * BLOCKS + j`
//! (generation −1 is the zeros of a fresh disk), so [`prefix_of`] finds the one `k` an
//! image holds, or says it holds none (a torn image).
//!
//! [`StreamWriter`] writes the stream through an NBD URI with `qemu-io`, a few writes
//! per run, recording how many writes were acknowledged and how many were issued. A
//! failed run (the agent crashed, the export is gone) is retried from the first write
//! it did not acknowledge: rewriting a write that did land is idempotent, so the image
//! stays at a prefix of one stream. qemu-io goes on after a failed write, so a run
//! whose writes may fail one by one (an injected I/O error) must be of one write, or
//! the writes after the failed one land before it and the image is, for a while, at
//! no prefix ([`super::plan::Plan`] draws `per_call` 1 for those).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Block size of the stream (qemu-io writes of this size).
pub const BLOCK: u64 = 64 << 10;
/// Blocks in the stream's region (the first `BLOCKS * BLOCK` bytes of the disk).
pub const BLOCKS: u64 = 64;

/// The byte generation `g` writes (never 0: 0 is "never written").
pub fn pattern(g: u64) -> u8 {
    (g % 250) as u8 + 1
}

fn generation_of(byte: u8, g_hint: u64) -> Option<i64> {
    // Generations are known mod 250; `g_hint` (the newest generation issued) picks the
    // most recent one with that byte.
    if byte == 0 {
        return Some(-1);
    }
    let r = u64::from(byte - 1);
    let base = g_hint - g_hint % 250;
    let g = if base + r <= g_hint { base + r } else { base.checked_sub(250)? + r };
    Some(g as i64)
}

/// What an image of the stream's region holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefix {
    /// Exactly the first `k` writes.
    At(u64),
    /// No prefix: why (which block breaks it).
    Torn(String),
}

/// The prefix of the stream `image` (at least `BLOCKS * BLOCK` bytes of a disk) holds,
/// given that at most `issued` writes were ever issued.
pub fn prefix_of(image: &[u8], issued: u64) -> Prefix {
    if (image.len() as u64) < BLOCKS * BLOCK {
        return Prefix::Torn(format!("image of {} bytes is shorter than the stream", image.len()));
    }
    let g_hint = issued / BLOCKS;
    let mut gens = Vec::with_capacity(BLOCKS as usize);
    for b in 0..BLOCKS {
        let blk = &image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        let first = blk[0];
        if let Some(at) = blk.iter().position(|&x| x != first) {
            return Prefix::Torn(format!("block {b} is mixed: byte {at} is {:#x}, byte 0 {first:#x}", blk[at]));
        }
        match generation_of(first, g_hint) {
            Some(g) => gens.push(g),
            None => return Prefix::Torn(format!("block {b} holds {first:#x}, never written")),
        }
    }
    // [g+1]*j ++ [g]*(BLOCKS-j), 0 <= j < BLOCKS.
    let last = gens[BLOCKS as usize - 1];
    let j = gens.iter().take_while(|&&g| g == last + 1).count();
    if gens[j..].iter().any(|&g| g != last) {
        return Prefix::Torn(format!("generations per block are not a prefix: {gens:?}"));
    }
    let k = (last + 1) as u64 * BLOCKS + j as u64;
    if k > issued {
        return Prefix::Torn(format!("holds {k} writes but only {issued} were issued"));
    }
    Prefix::At(k)
}

/// Counters the writer thread shares.
#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    issued: AtomicU64,
    failures: AtomicU64,
    paused: AtomicBool,
    stop: AtomicBool,
}

/// Writes the stream in the background; see the module documentation.
pub struct StreamWriter {
    c: Arc<Counts>,
    handle: Option<JoinHandle<Option<String>>>,
}

impl StreamWriter {
    /// Starts writing through `uri`, `per_call` writes per `qemu-io` run, `pace` between
    /// runs (and between retries after a failed run).
    pub fn start(uri: String, per_call: u64, pace: Duration) -> Self {
        let c = Arc::new(Counts::default());
        let t = c.clone();
        let handle = std::thread::spawn(move || {
            let mut last_err = None;
            while !t.stop.load(Ordering::SeqCst) {
                if t.paused.load(Ordering::SeqCst) {
                    std::thread::sleep(pace);
                    continue;
                }
                let next = t.acked.load(Ordering::SeqCst);
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for k in next..next + per_call {
                    let off = (k % BLOCKS) * BLOCK;
                    cmd.args(["-c", &format!("write -P {} {off} {BLOCK}", pattern(k / BLOCKS))]);
                }
                t.issued.fetch_max(next + per_call, Ordering::SeqCst);
                let o = match cmd.arg(&uri).stdin(Stdio::null()).output() {
                    Ok(o) => o,
                    Err(e) => return Some(format!("cannot run qemu-io: {e}")),
                };
                let out = String::from_utf8_lossy(&o.stdout);
                // qemu-io runs its commands in order and goes on past a failed one: the
                // acknowledged prefix ends at the first failure.
                let done = out.lines().take_while(|l| !l.contains("failed")).filter(|l| l.starts_with("wrote ")).count()
                    as u64;
                t.acked.store(next + done.min(per_call), Ordering::SeqCst);
                if !o.status.success() || out.contains("failed") || done < per_call {
                    t.failures.fetch_add(1, Ordering::SeqCst);
                    last_err =
                        Some(format!("{} {} {}", o.status, out.trim(), String::from_utf8_lossy(&o.stderr).trim()));
                }
                // Pacing the writes, not synchronising anything.
                std::thread::sleep(pace);
            }
            last_err
        });
        Self { c, handle: Some(handle) }
    }

    /// Writes acknowledged so far: the image holds at least this prefix.
    pub fn acked(&self) -> u64 {
        self.c.acked.load(Ordering::SeqCst)
    }

    /// Writes ever issued: no image holds more.
    pub fn issued(&self) -> u64 {
        self.c.issued.load(Ordering::SeqCst)
    }

    /// Failed `qemu-io` runs (each retried).
    pub fn failures(&self) -> u64 {
        self.c.failures.load(Ordering::SeqCst)
    }

    /// Stops issuing new runs (the one running finishes) until [`Self::resume`].
    pub fn pause(&self) {
        self.c.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.c.paused.store(false, Ordering::SeqCst);
    }

    /// Stops and joins: (acked, issued, the last failure if any).
    pub fn stop(mut self) -> (u64, u64, Option<String>) {
        self.c.stop.store(true, Ordering::SeqCst);
        let err = self.handle.take().and_then(|h| h.join().ok()).flatten();
        (self.acked(), self.issued(), err)
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.c.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_after(k: u64) -> Vec<u8> {
        let mut img = vec![0u8; (BLOCKS * BLOCK) as usize];
        for w in 0..k {
            let b = (w % BLOCKS) as usize * BLOCK as usize;
            img[b..b + BLOCK as usize].fill(pattern(w / BLOCKS));
        }
        img
    }

    #[test]
    fn every_prefix_is_recognised() {
        for k in [0, 1, 5, 63, 64, 65, 200, 250 * 64 + 3, 251 * 64 + 7] {
            assert_eq!(prefix_of(&image_after(k), k + 10), Prefix::At(k), "k={k}");
        }
    }

    #[test]
    fn torn_images_are_refused() {
        let mut img = image_after(100);
        img[(70 % BLOCKS * BLOCK) as usize + 5] = 0x77;
        assert!(matches!(prefix_of(&img, 200), Prefix::Torn(_)));
        let mut img = image_after(100);
        // Block 40 one generation ahead of its neighbours: not a prefix.
        img[(40 * BLOCK) as usize..(41 * BLOCK) as usize].fill(pattern(1));
        assert!(matches!(prefix_of(&img, 200), Prefix::Torn(_)));
        assert!(matches!(prefix_of(&image_after(100), 90), Prefix::Torn(_)));
    }
}
