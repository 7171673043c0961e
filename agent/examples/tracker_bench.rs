//! Micro-benchmark: tracked (`TrackedDisk`, every write logged) vs untracked (`RawFile`)
//! write throughput, 64 KiB sequential and 4 KiB random writes from several threads.
//!
//! ```text
//! cargo run --release -p siterecovery-agent --example tracker_bench [-- SECONDS [DIR]]
//! ```
//!
//! Writes go to the page cache (no FUA), as a guest's do between flushes. Modes: `raw`
//! (`RawFile`), `tracked` (`TrackedDisk`, no seal during the run: page cache against page
//! cache) and `tracked+seal/1s` (a thread seals and deletes the log every second, as a
//! short replication interval would: includes the write-back of image and log to disk).
//! The image is a sparse 1 GiB file in DIR (default: the system temp dir).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

fn run(dev: Arc<dyn BlockDevice>, pattern: Pattern, threads: u64, secs: f64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (dev, stop, ops, bytes) = (Arc::clone(&dev), Arc::clone(&stop), Arc::clone(&ops), Arc::clone(&bytes));
            std::thread::spawn(move || {
                let (len, region) = match pattern {
                    Pattern::Seq64k => (64 << 10, SIZE / threads),
                    Pattern::Rand4k => (4 << 10, SIZE),
                };
                let buf = vec![t as u8 ^ 0x5a; len as usize];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut i = 0u64;
                let (mut n, mut b) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
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
                    i += 1;
                    n += 1;
                    b += len;
                }
                ops.fetch_add(n, Ordering::Relaxed);
                bytes.fetch_add(b, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs)); // the measured interval, not a synchronisation
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let el = start.elapsed().as_secs_f64();
    (bytes.load(Ordering::Relaxed) as f64 / el / 1e6, ops.load(Ordering::Relaxed) as f64 / el)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).map_or(Ok(3.0), |s| s.parse())?;
    let base = args.get(2).map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base)?;
    let img = dir.path().join("bench.img");
    println!("{:<16} {:<8} {:>7} {:>10} {:>10}", "mode", "pattern", "threads", "MB/s", "IOPS");
    for (pattern, name) in [(Pattern::Seq64k, "seq64k"), (Pattern::Rand4k, "rand4k")] {
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
                    let r = run(disk.clone(), pattern, threads, secs);
                    done.store(true, Ordering::Relaxed);
                    if let Some(s) = sealer {
                        s.join().expect("sealer");
                    }
                    r
                } else {
                    run(Arc::new(RawFile::open(&img, false)?), pattern, threads, secs)
                };
                let mode = match (tracked, seal_every_second) {
                    (false, _) => "raw",
                    (true, false) => "tracked",
                    (true, true) => "tracked+seal/1s",
                };
                println!("{mode:<16} {name:<8} {threads:>7} {mbs:>10.0} {iops:>10.0}");
                drop_caches_hint(&img);
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

/// Writes back the image so the next run does not start behind a wall of dirty pages.
fn drop_caches_hint(img: &Path) {
    if let Ok(f) = File::open(img) {
        let _ = f.sync_all();
    }
}
