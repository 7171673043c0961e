//! Micro-benchmark: tracked (`TrackedDisk`, every write logged) vs untracked (`RawFile`)
//! write throughput, 64 KiB sequential and 4 KiB random writes from several threads.
//!
//! ```text
//! cargo run --release -p siterecovery-agent --example tracker_bench [-- MIB [DIR]]
//! ```
//!
//! Each run writes MIB MiB (default 1024) of 64 KiB writes, or MIB/4 MiB of 4 KiB
//! writes, to a fresh image: a fixed amount that stays below the kernel's dirty-page
//! throttling on these machines, so the figures compare the write paths' CPU cost rather
//! than the disk's write-back speed. Deleting the files between runs drops their dirty
//! pages, so one run's write-back does not slow the next.
//!
//! Writes go to the page cache (no FUA), as a guest's do between flushes. Modes: `raw`
//! (`RawFile`), `tracked` (`TrackedDisk`, no seal during the run: page cache against page
//! cache) and `tracked+seal/1s` (a thread seals and deletes the log every second, as a
//! short replication interval would: includes the write-back of image and log to disk).
//! The image is a sparse 1 GiB file in DIR (default: the system temp dir).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use siterecovery_agent::disk::{BlockDevice, RawFile};
use siterecovery_agent::hrl::DiskId;
use siterecovery_agent::tracker::TrackedDisk;

const SIZE: u64 = 1 << 30;

#[derive(Clone, Copy)]
enum Pattern {
    Seq64k,
    Rand4k,
}

/// Writes `total` bytes with `pattern` from `threads` threads; returns (MB/s, IOPS).
fn run(dev: Arc<dyn BlockDevice>, pattern: Pattern, threads: u64, total: u64) -> (f64, f64) {
    let len: u64 = match pattern {
        Pattern::Seq64k => 64 << 10,
        Pattern::Rand4k => 4 << 10,
    };
    let per_thread = total / len / threads;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let region = SIZE / threads;
                let buf = vec![t as u8 ^ 0x5a; len as usize];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                for i in 0..per_thread {
                    let offset = match pattern {
                        Pattern::Seq64k => t * region + (i * len) % region,
                        Pattern::Rand4k => {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % (SIZE / len)) * len
                        }
                    };
                    dev.write_at(&buf, offset, false).expect("write");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let el = start.elapsed().as_secs_f64();
    let ops = per_thread * threads;
    ((ops * len) as f64 / el / 1e6, ops as f64 / el)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let base = args.get(2).map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base)?;
    let img = dir.path().join("bench.img");
    println!("{:<16} {:<8} {:>7} {:>10} {:>10}", "mode", "pattern", "threads", "MB/s", "IOPS");
    for (pattern, name, total) in [(Pattern::Seq64k, "seq64k", mib << 20), (Pattern::Rand4k, "rand4k", mib << 18)] {
        for threads in [4u64, 16] {
            for (tracked, seal_every_second) in [(false, false), (true, false), (true, true)] {
                // A fresh image and logs each run.
                for e in std::fs::read_dir(dir.path())? {
                    std::fs::remove_file(e?.path())?;
                }
                File::create(&img)?.set_len(SIZE)?;
                let (mbs, iops) = if tracked {
                    let disk = Arc::new(TrackedDisk::open(&img, DiskId::new("bench")?, true)?);
                    let done = Arc::new(AtomicBool::new(false));
                    let sealer = seal_every_second.then(|| spawn_sealer(Arc::clone(&disk), Arc::clone(&done)));
                    let r = run(disk.clone(), pattern, threads, total);
                    done.store(true, Ordering::Relaxed);
                    if let Some(s) = sealer {
                        s.join().expect("sealer");
                    }
                    r
                } else {
                    run(Arc::new(RawFile::open(&img, false)?), pattern, threads, total)
                };
                let mode = match (tracked, seal_every_second) {
                    (false, _) => "raw",
                    (true, false) => "tracked",
                    (true, true) => "tracked+seal/1s",
                };
                println!("{mode:<16} {name:<8} {threads:>7} {mbs:>10.0} {iops:>10.0}");
            }
        }
    }
    Ok(())
}

/// Seals and deletes the log every second (what replication does each interval).
fn spawn_sealer(disk: Arc<TrackedDisk>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut next = Instant::now();
        while !done.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                if let Some(seq) = disk.seal().expect("seal") {
                    disk.delete_logs_through(seq).expect("delete");
                }
                next += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}
