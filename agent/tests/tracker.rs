//! Integration tests of the replication tracker: writes through a [`TrackedDisk`] are in
//! the image and in the HRL logs exactly, seals cut logs at write boundaries, tracking
//! switches without losing a racing write, and a `kill -9` of a writing process loses no
//! acknowledged write.
//!
//! Seeded tests print their seed; rerun one with `TRACKER_SEED=<seed>`.
//!
//! The kill -9 test re-executes this test binary as the writing process (the
//! `crash_child` test, inert unless `TRACKER_CRASH_DIR` is set), so it needs no extra
//! binary to be built.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use siterecovery_agent::disk::BlockDevice;
use siterecovery_agent::hrl::{self, Coalesced, DiskId, HrlReader, LogSeq, RecordKind, ScanEnd};
use siterecovery_agent::tracker::TrackedDisk;

/// A small deterministic generator (splitmix64): the tests need reproducible streams,
/// not statistical quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("TRACKER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("{test}: seed {seed} (rerun with TRACKER_SEED={seed})");
    seed
}

fn disk_id() -> DiskId {
    DiskId::new("disk0").expect("disk id")
}

fn new_image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("disk0.img");
    File::create(&img).and_then(|f| f.set_len(size)).expect("create image");
    img
}

/// One operation on the disk, as the tests generate and expect it in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
}

impl Op {
    fn apply_to(&self, img: &mut [u8]) {
        match self {
            Op::Write { offset, data } => img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data),
            Op::Zeroes { offset, len } | Op::Trim { offset, len } => {
                img[*offset as usize..(*offset + *len) as usize].fill(0)
            }
        }
    }
    fn run(&self, d: &dyn BlockDevice, fua: bool) {
        match self {
            Op::Write { offset, data } => d.write_at(data, *offset, fua),
            Op::Zeroes { offset, len } => d.write_zeroes(*offset, *len, fua, offset % 2 == 1),
            Op::Trim { offset, len } => d.trim(*offset, *len),
        }
        .expect("disk op");
    }
}

/// Operation `i` of the stream `seed` on a disk of `size` bytes (deterministic, so a
/// process that crashed can be checked against a regenerated stream).
fn gen_op(seed: u64, i: u64, size: u64) -> Op {
    let mut r = Rng(seed ^ i.wrapping_mul(0xA076_1D64_78BD_642F));
    let len = 512 * (1 + r.below(128)); // 512 B .. 64 KiB
    let offset = 512 * r.below((size - len) / 512 + 1);
    match r.below(20) {
        0 => Op::Zeroes { offset, len },
        1 => Op::Trim { offset, len },
        _ => {
            let mut data = vec![0u8; len as usize];
            for (k, chunk) in data.chunks_mut(8).enumerate() {
                let v = (seed ^ i.rotate_left(32) ^ k as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
                chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
            }
            Op::Write { offset, data }
        }
    }
}

/// Every record of a log, in order, as operations.
fn log_ops(path: &Path) -> (Vec<Op>, ScanEnd) {
    let mut r = HrlReader::open(path).expect("open log");
    let mut data = Vec::new();
    let mut ops = Vec::new();
    loop {
        match r.next_record(&mut data) {
            Ok(Some(rec)) => ops.push(match rec.kind {
                RecordKind::Write => Op::Write { offset: rec.offset, data: data.clone() },
                RecordKind::Zeroes => Op::Zeroes { offset: rec.offset, len: rec.length },
                RecordKind::Trim => Op::Trim { offset: rec.offset, len: rec.length },
                RecordKind::Cancel => panic!("a cancel record at {}, yet no image write failed here", rec.pos),
            }),
            Ok(None) => return (ops, r.footer().map_or(ScanEnd::Open, ScanEnd::Sealed)),
            Err(e) => return (ops, ScanEnd::Torn(e)),
        }
    }
}

/// All records of a disk: sealed logs (each verified) then the open log.
fn all_logged_ops(d: &TrackedDisk) -> Vec<Op> {
    let mut ops = Vec::new();
    for log in d.sealed_logs() {
        hrl::verify_sealed(&log.path).expect("sealed log verifies");
        ops.extend(log_ops(&log.path).0);
    }
    if let Some((_, path)) = d.current_log() {
        let (open, end) = log_ops(&path);
        assert!(matches!(end, ScanEnd::Open), "open log must end cleanly: {end:?}");
        ops.extend(open);
    }
    ops
}

fn read_image(d: &TrackedDisk) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).expect("read image");
    buf
}

#[test]
fn writes_land_in_image_and_log_exactly() {
    let seed = seed("writes_land_in_image_and_log_exactly");
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 << 20;
    let img = new_image(dir.path(), size);
    let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
    let ops: Vec<Op> = (0..300).map(|i| gen_op(seed, i, size)).collect();
    let mut expect = vec![0u8; size as usize];
    for (i, op) in ops.iter().enumerate() {
        op.run(&d, i % 17 == 0);
        op.apply_to(&mut expect);
    }
    assert_eq!(all_logged_ops(&d), ops);
    assert!(read_image(&d) == expect, "image differs from the writes");
    // The file on disk agrees too (no hidden cache in the tracker).
    assert!(std::fs::read(&img).expect("read") == expect);
}

#[test]
fn seal_starts_a_new_log_and_acknowledged_logs_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), 1 << 20);
    let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
    let (first, first_path) = d.current_log().expect("open log");
    assert_eq!(d.seal().expect("seal empty"), None, "an empty log is not sealed");
    let header_only = d.pending_log_bytes();

    d.write_at(&[1; 4096], 0, false).expect("write");
    assert_eq!(d.pending_log_bytes(), header_only + 32 + 4096);
    assert_eq!(d.seal().expect("seal"), Some(first));
    let (second, _) = d.current_log().expect("next log");
    assert_eq!(second, first.next());
    d.write_at(&[2; 4096], 4096, false).expect("write");
    assert_eq!(d.seal().expect("seal"), Some(second));
    d.write_at(&[3; 100], 0, false).expect("write");

    let sealed = d.sealed_logs();
    assert_eq!(sealed.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![first, second]);
    assert_eq!(sealed[0].path, first_path);
    let sealed_bytes: u64 = sealed.iter().map(|l| l.bytes).sum();
    assert_eq!(sealed_bytes, 2 * (128 + 32 + 4096 + 48));
    assert_eq!(d.pending_log_bytes(), sealed_bytes + 128 + 32 + 100);
    assert_eq!(log_ops(&sealed[1].path).0, vec![Op::Write { offset: 4096, data: vec![2; 4096] }]);

    d.delete_logs_through(first).expect("delete");
    assert!(!first_path.exists());
    assert_eq!(d.sealed_logs().iter().map(|l| l.seq).collect::<Vec<_>>(), vec![second]);
    d.delete_logs_through(LogSeq(u64::MAX - 1)).expect("delete all");
    assert!(d.sealed_logs().is_empty());
    assert_eq!(d.pending_log_bytes(), 128 + 32 + 100, "the open log is never deleted");
    assert!(d.current_log().expect("open").1.exists());
}

#[test]
fn coalescing_ships_each_block_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), 1 << 20);
    let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
    for i in 0..100u8 {
        d.write_at(&[i; 4096], 8192, false).expect("write");
    }
    d.write_at(&[200; 8192], 4096, false).expect("overlapping write"); // covers 4096..12288
    d.write_zeroes(6000, 1000, false, false).expect("zeroes");
    let seq = d.seal().expect("seal").expect("sealed");
    let path = d.sealed_logs().into_iter().find(|l| l.seq == seq).expect("listed").path;
    let mut c = Coalesced::open(&path).expect("coalesce");
    let extents: Vec<_> = c.extents().iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        extents,
        vec![(4096, 1904, RecordKind::Write), (6000, 1000, RecordKind::Zeroes), (7000, 5288, RecordKind::Write),]
    );
    assert_eq!(c.footer().data_bytes, 100 * 4096 + 8192);
    assert_eq!(c.write_bytes(), 1904 + 5288, "101 writes of 4096..12288 ship 8 KiB minus the zeroes");
    // The coalesced log applied to the state before the interval (zeroes) is the image.
    let mut replica = vec![0u8; 1 << 20];
    for item in c.items() {
        match item.expect("item") {
            hrl::CoalescedItem::Write { offset, data } => {
                replica[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
            }
            hrl::CoalescedItem::Zeroes { offset, len } | hrl::CoalescedItem::Trim { offset, len } => {
                replica[offset as usize..(offset + len) as usize].fill(0)
            }
        }
    }
    assert!(replica == read_image(&d));
}

/// Concurrent overlapping writes: replaying the log in order gives exactly the image, so
/// log order and image order agree.
#[test]
fn concurrent_overlapping_writes_keep_log_and_image_in_the_same_order() {
    let seed = seed("concurrent_overlapping_writes");
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 256 << 10; // small, so writes collide often
    let img = new_image(dir.path(), size);
    let d = Arc::new(TrackedDisk::open(&img, disk_id(), true).expect("open"));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                for i in 0..150 {
                    gen_op(seed.wrapping_add(t), i, size).run(&*d, false);
                    if t == 0 && i % 50 == 49 {
                        d.seal().expect("seal");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let ops = all_logged_ops(&d);
    assert_eq!(ops.len(), 600);
    let mut replay = vec![0u8; size as usize];
    for op in &ops {
        op.apply_to(&mut replay);
    }
    assert!(replay == read_image(&d), "log order differs from image order");
}

/// Writer threads hammer the disk while tracking is switched on. Each thread's writes
/// are numbered; the log must hold, per thread, exactly a suffix of its writes in order,
/// and that suffix must include every write that started after `set_tracking` returned.
#[test]
fn switching_tracking_on_loses_no_racing_write() {
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 16;
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), THREADS * BLOCKS * 4096);
    let d = Arc::new(TrackedDisk::open(&img, disk_id(), false).expect("open"));
    let switched = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(THREADS as usize + 1));
    let (progress_tx, progress_rx) = mpsc::channel::<u64>();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (d, switched, start, progress) =
                (Arc::clone(&d), Arc::clone(&switched), Arc::clone(&start), progress_tx.clone());
            std::thread::spawn(move || {
                start.wait();
                // Index of the first write that started after the switch was visible.
                let mut first_after = None;
                let mut i = 0u64;
                // Keep writing until 200 writes after the switch (bounded by a deadline).
                let deadline = Instant::now() + Duration::from_secs(10);
                while first_after.is_none_or(|f| i < f + 200) && Instant::now() < deadline {
                    if first_after.is_none() && switched.load(Ordering::SeqCst) {
                        first_after = Some(i);
                    }
                    let mut block = [0u8; 4096];
                    block[..8].copy_from_slice(&t.to_le_bytes());
                    block[8..16].copy_from_slice(&i.to_le_bytes());
                    d.write_at(&block, (t * BLOCKS + i % BLOCKS) * 4096, false).expect("write");
                    if i == 100 {
                        let _ = progress.send(t);
                    }
                    i += 1;
                }
                (first_after.expect("switch seen before the deadline"), i)
            })
        })
        .collect();
    start.wait();
    // Switch while every thread is known to be mid-stream.
    for _ in 0..THREADS {
        progress_rx.recv_timeout(Duration::from_secs(10)).expect("writers running");
    }
    d.set_tracking(true).expect("tracking on");
    switched.store(true, Ordering::SeqCst);
    let results: Vec<(u64, u64)> = writers.into_iter().map(|w| w.join().expect("writer")).collect();

    let mut logged: Vec<Vec<u64>> = vec![Vec::new(); THREADS as usize];
    for op in all_logged_ops(&d) {
        let Op::Write { data, .. } = op else { panic!("unexpected op {op:?}") };
        let t = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let i = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        logged[t as usize].push(i);
    }
    for (t, &(first_after, total)) in results.iter().enumerate() {
        let l = &logged[t];
        let k = *l.first().expect("thread has logged writes");
        assert_eq!(*l, (k..total).collect::<Vec<_>>(), "thread {t}: log is not a contiguous suffix");
        assert!(k <= first_after, "thread {t}: write {first_after} started after the switch but only {k}.. is logged");
        assert!(k > 100, "thread {t}: writes before the switch were logged");
    }
}

#[test]
fn freeze_blocks_writes_until_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), 1 << 20);
    let d = Arc::new(TrackedDisk::open(&img, disk_id(), true).expect("open"));
    d.write_at(&[1; 512], 0, false).expect("write");
    let mut guard = d.freeze();
    let (about_tx, about_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let d2 = Arc::clone(&d);
    let writer = std::thread::spawn(move || {
        about_tx.send(()).expect("send");
        d2.write_at(&[2; 512], 512, false).expect("write");
        done_tx.send(()).expect("send");
    });
    about_rx.recv_timeout(Duration::from_secs(5)).expect("writer started");
    assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err(), "a write completed while frozen");
    let sealed = guard.seal().expect("seal").expect("sealed");
    drop(guard);
    done_rx.recv_timeout(Duration::from_secs(5)).expect("write resumed");
    writer.join().expect("writer");
    let logs = d.sealed_logs();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].seq, sealed);
    assert_eq!(log_ops(&logs[0].path).0, vec![Op::Write { offset: 0, data: vec![1; 512] }]);
    let (_, open) = d.current_log().expect("open log");
    assert_eq!(log_ops(&open).0, vec![Op::Write { offset: 512, data: vec![2; 512] }]);
}

#[test]
fn reopen_keeps_sealed_logs_and_reports_a_corrupt_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), 1 << 20);
    let (s1, s2) = {
        let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
        d.write_at(&[1; 4096], 0, false).expect("write");
        let s1 = d.seal().expect("seal").expect("sealed");
        d.write_at(&[2; 4096], 0, false).expect("write");
        let s2 = d.seal().expect("seal").expect("sealed");
        d.write_at(&[3; 4096], 4096, false).expect("write");
        d.stop().expect("stop");
        (s1, s2)
    };
    let d = TrackedDisk::open(&img, disk_id(), true).expect("reopen");
    assert!(d.corrupt_logs().is_empty());
    assert_eq!(d.sealed_logs().len(), 3);
    let (cur, _) = d.current_log().expect("open log");
    assert_eq!(cur, LogSeq(s2.0 + 2));
    drop(d);

    // Flip a data byte of the first sealed log: reported at open, kept on disk.
    let bad = dir.path().join(hrl::log_file_name(&disk_id(), s1));
    let mut bytes = std::fs::read(&bad).expect("read");
    bytes[128 + 32 + 10] ^= 1;
    std::fs::write(&bad, &bytes).expect("write");
    let d = TrackedDisk::open(&img, disk_id(), true).expect("reopen with a damaged log");
    assert_eq!(d.corrupt_logs().len(), 1);
    assert_eq!(d.corrupt_logs()[0].seq, s1);
    assert!(bad.exists());
    assert_eq!(d.sealed_logs().iter().map(|l| l.seq).collect::<Vec<_>>(), vec![s2, LogSeq(s2.0 + 1)]);
    d.delete_logs_through(s2).expect("delete");
    assert!(bad.exists(), "a damaged log is never deleted by acknowledgement");
}

#[test]
fn torn_open_log_is_cut_and_reapplied_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = new_image(dir.path(), 1 << 20);
    let open_path = {
        let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
        d.write_at(&[5; 4096], 0, false).expect("write");
        d.write_at(&[6; 4096], 4096, false).expect("write");
        d.current_log().expect("open").1
    };
    // Simulate what a crash can leave: the second record torn, and the image missing
    // the first write (a lost page-cache write on power loss).
    let len = std::fs::metadata(&open_path).expect("meta").len();
    File::options().write(true).open(&open_path).and_then(|f| f.set_len(len - 100)).expect("chop");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("zero image");
    let d = TrackedDisk::open(&img, disk_id(), true).expect("recover");
    assert_eq!(std::fs::metadata(&open_path).expect("meta").len(), 128 + 32 + 4096);
    let image = read_image(&d);
    assert!(image[..4096].iter().all(|&b| b == 5), "logged write re-applied");
    assert_eq!(all_logged_ops(&d), vec![Op::Write { offset: 0, data: vec![5; 4096] }]);
}

/// The writing process of the kill -9 test (inert in a normal test run).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("TRACKER_CRASH_DIR") else { return };
    let seed: u64 = std::env::var("TRACKER_CRASH_SEED").ok().and_then(|s| s.parse().ok()).expect("seed");
    let img = Path::new(&dir).join("disk0.img");
    let d = TrackedDisk::open(&img, disk_id(), true).expect("open");
    let size = d.size();
    let mut out = std::io::stdout().lock();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..1_000_000u64 {
        if Instant::now() > deadline {
            break;
        }
        gen_op(seed, i, size).run(&d, i % 13 == 0);
        if i % 97 == 96 {
            d.seal().expect("seal");
        }
        writeln!(out, "ACK {i}").and_then(|()| out.flush()).expect("stdout");
    }
}

#[test]
fn kill_9_while_writing_loses_no_acknowledged_write() {
    for round in 0..2u64 {
        let seed = seed("kill_9_while_writing");
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 2 << 20;
        new_image(dir.path(), size);
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("TRACKER_CRASH_DIR", dir.path())
            .env("TRACKER_CRASH_SEED", seed.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.split("ACK ").nth(1).and_then(|s| s.trim().parse::<u64>().ok())
                    && tx.send(n).is_err()
                {
                    break;
                }
            }
        });
        let target = 300 + Rng(seed).below(300) + round * 200;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut acked = None;
        while acked.is_none_or(|a| a < target) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => acked = Some(n),
                Err(e) => {
                    let _ = child.kill();
                    panic!("writer gave {acked:?} acks of {target} before {e:?}");
                }
            }
        }
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        // Later acks may sit in the pipe: the highest one printed counts.
        while let Ok(n) = rx.recv_timeout(Duration::from_millis(100)) {
            acked = Some(n);
        }
        let acked = acked.expect("acks");

        let d = TrackedDisk::open(&dir.path().join("disk0.img"), disk_id(), true).expect("recover");
        assert!(d.corrupt_logs().is_empty(), "corrupt logs: {:?}", d.corrupt_logs());
        assert!(d.sealed_logs().len() as u64 >= (acked + 1) / 97, "sealed logs missing");
        let logged = all_logged_ops(&d); // verifies sealed logs, checks the open log ends cleanly
        let m = logged.len() as u64;
        assert!(m > acked, "round {round}: {m} records logged, but write {acked} was acknowledged");
        let mut expect = vec![0u8; size as usize];
        for (i, op) in logged.iter().enumerate() {
            assert_eq!(*op, gen_op(seed, i as u64, size), "round {round}: record {i} is not write {i}");
            op.apply_to(&mut expect);
        }
        assert!(read_image(&d) == expect, "round {round}: image differs from the logged writes");
        println!("round {round}: {acked} acknowledged, {m} logged, {} sealed logs", d.sealed_logs().len());
    }
}
