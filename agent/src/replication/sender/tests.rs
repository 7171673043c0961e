//! The sender against a fake replica in memory ([`FakePeer`]): resume of the initial
//! copy, a point acknowledged then its logs deleted, a resync after a lost log, and
//! the error classes. Real tracked disks in a temporary directory; no network.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use siterecovery_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::transport::{Answers, PeerTransport};
use super::*;
use crate::disk::BlockDevice;
use crate::replication::resync;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const REL: &str = "r-0000beef";

fn rel() -> siterecovery_proto::model::RelationshipId {
    REL.parse().expect("relationship id")
}

#[derive(Default)]
struct Replica {
    image: Vec<u8>,
    acked: u64,
    complete: bool,
    /// Offset of the first chunk of each initial-copy stream.
    copy_starts: Vec<u64>,
    /// Acknowledged point seqs, and whether each was a resync.
    points: Vec<(u64, bool)>,
    /// The next `ShipPoint` calls fail with this code.
    fail_ship: Option<tonic::Code>,
}

/// A replica host in memory holding one disk, `disk0`.
#[derive(Clone, Default)]
struct FakePeer(Arc<Mutex<Replica>>);

impl FakePeer {
    fn new() -> Self {
        let p = FakePeer::default();
        p.with(|r| r.image = vec![0; SIZE as usize]);
        p
    }
    fn with<R>(&self, f: impl FnOnce(&mut Replica) -> R) -> R {
        f(&mut self.0.lock().expect("fake replica lock"))
    }
}

fn raw(data: &[u8], zstd: bool, len: usize) -> Vec<u8> {
    if zstd { zstd::bulk::decompress(data, len).expect("zstd") } else { data.to_vec() }
}

impl PeerTransport for FakePeer {
    fn reset(&mut self) {}

    async fn copy_progress(
        &mut self,
        _: v1::CopyProgressRequest,
    ) -> Result<v1::CopyProgressResponse, ReplicationError> {
        let (acked_offset, complete) = self.with(|r| (r.acked, r.complete));
        Ok(v1::CopyProgressResponse {
            disks: vec![v1::DiskProgress { disk_id: "disk0".into(), acked_offset, complete }],
        })
    }

    async fn initial_copy(
        &mut self,
        mut chunks: mpsc::Receiver<v1::CopyChunk>,
    ) -> Result<Answers<v1::CopyAck>, ReplicationError> {
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Some(c) = chunks.recv().await {
                let ack = me.with(|r| {
                    if first {
                        r.copy_starts.push(c.offset);
                        first = false;
                    }
                    if c.done {
                        r.complete = true;
                        r.acked = c.offset;
                    } else {
                        let data = raw(&c.data, c.zstd, c.raw_len as usize);
                        r.image[c.offset as usize..c.offset as usize + data.len()].copy_from_slice(&data);
                        r.acked = c.offset + data.len() as u64;
                    }
                    v1::CopyAck { disk_id: c.disk_id.clone(), acked_offset: r.acked, complete: r.complete }
                });
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn ship_point(
        &mut self,
        mut chunks: mpsc::Receiver<v1::PointChunk>,
    ) -> Result<v1::PointAck, ReplicationError> {
        if let Some(code) = self.with(|r| r.fail_ship) {
            return Err(tonic::Status::new(code, "injected").into());
        }
        let mut extents = Vec::new();
        while let Some(c) = chunks.recv().await {
            extents.extend(c.extents);
            if c.commit {
                self.with(|r| {
                    for e in &extents {
                        let at = e.offset as usize;
                        let data = if e.kind == v1::ExtentKind::Zeroes as i32 {
                            vec![0; e.length as usize]
                        } else {
                            raw(&e.data, e.zstd, e.length as usize)
                        };
                        r.image[at..at + data.len()].copy_from_slice(&data);
                    }
                    r.points.push((c.seq, c.resync));
                });
                return Ok(v1::PointAck { seq: c.seq, point_id: format!("p{}", c.seq) });
            }
        }
        Err(tonic::Status::aborted("the point ended before its commit").into())
    }

    async fn block_hashes(
        &mut self,
        req: v1::BlockHashesRequest,
    ) -> Result<Answers<v1::BlockHashesChunk>, ReplicationError> {
        let image = self.with(|r| r.image.clone());
        let size = image.len() as u64;
        let bs = req.block_size;
        let hashes: Vec<u8> = if req.blocks.is_empty() {
            (0..resync::block_count(size, bs))
                .flat_map(|b| {
                    let (o, l) = resync::block_range(b, size, bs);
                    resync::block_hash(&image[o as usize..(o + l) as usize])
                })
                .collect()
        } else {
            req.blocks
                .iter()
                .flat_map(|&b| {
                    let (o, l) = resync::block_range(b, size, bs);
                    image[o as usize..(o + l) as usize]
                        .chunks(req.sub_block_size as usize)
                        .flat_map(resync::block_hash)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let chunk = v1::BlockHashesChunk { first_block: 0, hashes };
        Ok(Box::pin(tokio_stream::iter([Ok(chunk)])))
    }
}

struct TestVm(Mutex<Option<Disks>>);
impl VmDisks for TestVm {
    fn disks(&self) -> Option<Disks> {
        self.0.lock().ok().and_then(|d| d.clone())
    }
}

struct Env {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    disk: Arc<TrackedDisk>,
    vm: Arc<TestVm>,
    peer: FakePeer,
    shutdown: CancellationToken,
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8).collect()
}

fn env() -> Env {
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().to_owned();
    let image = dir.join("disk0.img");
    let f = std::fs::File::create(&image).expect("image");
    f.set_len(SIZE).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&f, &fill(1, 3 * MIB as usize), MIB).expect("write");
    drop(f);
    let id = DiskId::new("disk0").expect("id");
    let disk = Arc::new(TrackedDisk::open(&image, id.clone(), true).expect("tracked"));
    let vm = Arc::new(TestVm(Mutex::new(Some(vec![(id, disk.clone())]))));
    Env { _dir: d, dir, disk, vm, peer: FakePeer::new(), shutdown: CancellationToken::new() }
}

impl Env {
    fn start(&self) -> SenderHandle {
        let params = SenderParams {
            relationship_id: rel(),
            vm: "vm1".parse().expect("vm name"),
            replica_host_id: "host-b".parse().expect("host id"),
            replica_address: "fake".into(),
            settings: v1::ReplicationSettings {
                interval_ms: 100,
                retention_ms: 3_600_000,
                retry_unit_ms: 10,
                ..Default::default()
            },
            state_dir: self.dir.clone(),
            quiesce_hook: None,
        };
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        spawn_with(params, self.vm.clone(), self.peer.clone(), tx, self.shutdown.clone())
    }

    fn primary(&self) -> Vec<u8> {
        let mut buf = vec![0; SIZE as usize];
        self.disk.read_at(&mut buf, 0).expect("read");
        buf
    }

    /// Polls `cond` for up to 20 s.
    async fn until(&self, what: &str, mut cond: impl FnMut(&Env) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn converged(&self) -> bool {
        let image = self.peer.with(|r| r.image.clone());
        self.disk.sealed_logs().is_empty() && image == self.primary()
    }
}

#[tokio::test]
async fn the_initial_copy_resumes_from_the_acknowledged_offset() {
    let env = env();
    // A previous run got 2 MiB across.
    let primary = env.primary();
    env.peer.with(|r| {
        r.image[..2 * MIB as usize].copy_from_slice(&primary[..2 * MIB as usize]);
        r.acked = 2 * MIB;
    });
    let h = env.start();
    env.until("the copy and a first point", |e| e.peer.with(|r| r.complete && !r.points.is_empty())).await;
    assert_eq!(env.peer.with(|r| r.copy_starts.clone()), vec![2 * MIB]);
    env.until("the replica equal to the primary", Env::converged).await;
    assert!(matches!(h.phase(), Phase::Replicating), "{:?}", h.phase());
    let st = h.stop().await.expect("state");
    assert_eq!(st.phase, Stage::Replicating);
    assert!(st.last_point.is_some());
}

#[tokio::test]
async fn a_point_is_acknowledged_then_its_logs_deleted() {
    let env = env();
    let h = env.start();
    env.until("the first point", |e| e.peer.with(|r| !r.points.is_empty())).await;
    env.disk.write_at(&fill(9, 70_000), 5 * MIB + 13, false).expect("write");
    env.disk.write_zeroes(MIB, 4096, false, false).expect("zeroes");
    env.until("the writes on the replica, logs deleted", Env::converged).await;
    let st = h.stop().await.expect("state");
    assert!(st.pending.is_empty(), "{st:?}");
    let seqs: Vec<u64> = env.peer.with(|r| r.points.iter().map(|p| p.0).collect());
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(st.last_point.map(|p| p.seq), seqs.last().copied());
}

#[tokio::test]
async fn a_lost_log_is_repaired_by_a_resync_after_recoverable_failures() {
    let env = env();
    let h = env.start();
    env.until("the first point", |e| e.peer.with(|r| !r.points.is_empty())).await;
    // The replica is unreachable: the writes' points pile up (recoverable, retried).
    env.peer.with(|r| r.fail_ship = Some(tonic::Code::Unavailable));
    env.disk.write_at(&fill(5, 200_000), 6 * MIB, false).expect("write");
    env.until("a sealed log", |e| !e.disk.sealed_logs().is_empty()).await;
    assert!(matches!(h.phase(), Phase::Replicating), "{:?}", h.phase());
    let lost = env.disk.sealed_logs()[0].clone();
    let path = env.dir.join(crate::hrl::log_file_name(&DiskId::new("disk0").expect("id"), lost.seq));
    std::fs::remove_file(&path).expect("lose the log");
    env.peer.with(|r| r.fail_ship = None);
    env.until("a resync point", |e| e.peer.with(|r| r.points.iter().any(|p| p.1))).await;
    env.until("the replica equal to the primary", Env::converged).await;
    assert!(matches!(h.phase(), Phase::Replicating), "{:?}", h.phase());
    let st = h.stop().await.expect("state");
    assert_eq!(st.phase, Stage::Replicating);
}

#[tokio::test]
async fn a_fatal_error_waits_for_an_operator_resync() {
    let env = env();
    env.peer.with(|r| r.fail_ship = Some(tonic::Code::PermissionDenied));
    let h = env.start();
    env.until("the copy", |e| e.peer.with(|r| r.complete)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !matches!(h.phase(), Phase::Failed { .. }) {
        assert!(tokio::time::Instant::now() < deadline, "never failed: {:?}", h.phase());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.phase().reported(), siterecovery_proto::model::SenderState::Error);
    env.peer.with(|r| r.fail_ship = None);
    h.request_resync();
    env.until("a resync point", |e| e.peer.with(|r| r.points.iter().any(|p| p.1))).await;
    env.until("the replica equal to the primary", Env::converged).await;
    h.stop().await;
}

#[tokio::test]
async fn seeds_and_a_damaged_state_file() {
    let env = env();
    let through = std::collections::BTreeMap::from([("disk0".parse().expect("disk id"), 4)]);
    seed(&env.dir, &rel(), Seed::AwaitImport { through: through.clone() }).expect("seed");
    let st = SenderState::load(&env.dir.join(STATE_FILE)).expect("load").expect("seeded");
    assert!(st.awaiting_import && st.assigned_through == through);
    assert_eq!(Phase::from_stored(&st.phase, st.awaiting_import), Phase::WaitingForImport);
    seed(&env.dir, &rel(), Seed::Resync { reason: "why".into() }).expect("seed");
    let st = SenderState::load(&env.dir.join(STATE_FILE)).expect("load").expect("seeded");
    assert_eq!(st.phase, Stage::ResyncRequired { reason: "why".into(), requested: true });
    // A state file that cannot be read: the sender resynchronises (it cannot know what
    // shipped) and persists a sound file again.
    std::fs::write(env.dir.join(STATE_FILE), b"SRSS\x01\x00\x00\x00garbage").expect("write");
    let h = env.start();
    env.until("a resync point", |e| e.peer.with(|r| r.points.iter().any(|p| p.1))).await;
    h.stop().await;
    assert!(SenderState::load(&env.dir.join(STATE_FILE)).expect("sound again").is_some());
    forget(&env.dir);
    assert!(!env.dir.join(STATE_FILE).exists());
}

#[tokio::test]
async fn past_the_budget_before_the_first_point_the_dirty_blocks_make_it() {
    let env = env();
    env.disk.set_log_budget(MIB);
    // Writes before and while the copy runs pass the budget: the disk goes on its bitmap.
    for i in 0..4u64 {
        env.disk.write_at(&fill(20 + i, 400_000), i * 2 * MIB + 7, false).expect("write");
    }
    assert!(env.disk.bitmap_state().is_some(), "on the bitmap");
    assert!(env.disk.pending_log_bytes() <= MIB);
    let h = env.start();
    env.until("a catch-up point", |e| e.peer.with(|r| r.points.iter().any(|p| p.1))).await;
    env.until("the replica equal to the primary, off the bitmap", |e| e.converged() && e.disk.bitmap_state().is_none())
        .await;
    // Back on logs: a later write travels as a delta point.
    let before = env.peer.with(|r| r.points.len());
    env.disk.write_at(&fill(30, 5000), 3 * MIB, false).expect("write");
    env.until("a delta point", |e| e.peer.with(|r| r.points.len() > before && !r.points.last().is_some_and(|p| p.1)))
        .await;
    env.until("the replica equal to the primary", Env::converged).await;
    assert!(matches!(h.phase(), Phase::Replicating), "{:?}", h.phase());
    h.stop().await;
}

#[tokio::test]
async fn replica_away_past_the_budget_catches_up_from_the_bitmap() {
    let env = env();
    env.disk.set_log_budget(MIB);
    let h = env.start();
    env.until("the first point", |e| e.peer.with(|r| !r.points.is_empty())).await;
    env.peer.with(|r| r.fail_ship = Some(tonic::Code::Unavailable));
    for i in 0..6u64 {
        env.disk.write_at(&fill(40 + i, 300_000), i * MIB + 100, false).expect("write while away");
        assert!(env.disk.pending_log_bytes() <= MIB, "logs under the budget");
    }
    assert!(env.disk.bitmap_state().is_some(), "on the bitmap");
    // A few failed catch-ups: the blocks are taken again each time, writes between
    // them are logged and collapsed in again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.disk.write_at(&fill(50, 4096), 7 * MIB, false).expect("write between tries");
    assert!(matches!(h.phase(), Phase::Replicating), "no resync: {:?}", h.phase());
    env.peer.with(|r| r.fail_ship = None);
    env.until("the replica equal to the primary, off the bitmap", |e| e.converged() && e.disk.bitmap_state().is_none())
        .await;
    assert!(env.peer.with(|r| r.points.iter().any(|p| p.1)), "a catch-up point");
    let st = h.stop().await.expect("state");
    assert_eq!(st.phase, Stage::Replicating);
}
