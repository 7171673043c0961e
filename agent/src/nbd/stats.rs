//! Counters of the NBD data path, per export and operation, for the metrics: operations,
//! bytes, errors and a latency histogram of the device call. Atomics only: an I/O
//! costs a few relaxed increments, no lock. The registry of exports is locked only
//! when an export is added and at scrape time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The operations counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

/// Upper bounds of the latency buckets, microseconds (50 µs to 10 s).
pub const BUCKETS_US: [u64; 14] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 10_000_000];

/// One operation's counters.
#[derive(Debug, Default)]
pub struct OpStats {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Sum of the latencies, nanoseconds.
    pub sum_ns: AtomicU64,
    /// Per bucket (not cumulative); the last one is +Inf.
    pub buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

impl OpStats {
    fn record(&self, bytes: u64, took: Duration, failed: bool) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        let us = ns / 1000;
        let i = BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Buckets (upper bound in seconds, count in that bucket alone) ending with +Inf,
    /// the count and the sum in seconds.
    pub fn histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut out: Vec<(f64, u64)> = BUCKETS_US
            .iter()
            .map(|b| *b as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(le, n)| (le, n.load(Ordering::Relaxed)))
            .collect();
        out.shrink_to_fit();
        let count = out.iter().map(|(_, n)| n).sum();
        (out, count, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// Every operation's counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    ops: [OpStats; 5],
}

impl ExportStats {
    pub fn op(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    pub fn record(&self, op: Op, bytes: u64, took: Duration, failed: bool) {
        self.op(op).record(bytes, took, failed);
    }
}

fn registry() -> &'static Mutex<BTreeMap<String, Arc<ExportStats>>> {
    static R: OnceLock<Mutex<BTreeMap<String, Arc<ExportStats>>>> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

/// The counters of export `name`, shared by every registry serving it (a disk on its
/// VM's socket and on TCP) and kept across a VM restart, so counters only grow.
pub fn for_export(name: &str) -> Arc<ExportStats> {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.entry(name.to_owned()).or_default().clone()
}

/// Every export's counters, by name.
pub fn snapshot() -> Vec<(String, Arc<ExportStats>)> {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_cumulative_buckets() {
        let s = ExportStats::default();
        s.record(Op::Write, 4096, Duration::from_micros(40), false);
        s.record(Op::Write, 4096, Duration::from_micros(700), true);
        s.record(Op::Write, 0, Duration::from_secs(20), false);
        let w = s.op(Op::Write);
        assert_eq!(w.ops.load(Ordering::Relaxed), 3);
        assert_eq!(w.bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(w.errors.load(Ordering::Relaxed), 1);
        let (b, count, sum) = s.op(Op::Write).histogram();
        assert_eq!(count, 3);
        assert_eq!(b[0], (50e-6, 1));
        assert_eq!(b[3], (500e-6, 0));
        assert_eq!(b[4], (1e-3, 1));
        assert_eq!(b[b.len() - 2].1, 0);
        assert_eq!(b[b.len() - 1], (f64::INFINITY, 1));
        assert!((sum - 20.00074).abs() < 1e-6);
        assert_eq!(s.op(Op::Read).ops.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_export_keeps_its_counters() {
        let a = for_export("stats-test-vm-disk0");
        a.record(Op::Read, 512, Duration::from_micros(1), false);
        let b = for_export("stats-test-vm-disk0");
        assert_eq!(b.op(Op::Read).bytes.load(Ordering::Relaxed), 512);
        assert!(snapshot().iter().any(|(n, _)| n == "stats-test-vm-disk0"));
    }
}
