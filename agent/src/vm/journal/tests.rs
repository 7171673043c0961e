//! Unit tests of the failover journal: a commit or change-point interrupted after each
//! step's effect (where its failpoint is) is finished from the journal after a restart;
//! a damaged journal is refused, never taken for "no operation".

use std::path::{Path, PathBuf};
use std::sync::Arc;

use siterecovery_proto::model::{FailoverKind, VmName};

use super::*;
use crate::disk::BlockDevice;
use crate::replica::{ExtentData, ReplicaDisk, ReplicaSpec};
use crate::vm::config::{DiskConfig, FailoverConfig, Power, VmConfig};

const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn vm() -> VmName {
    VmName::new("vm1").expect("VM name")
}

/// A replica of vm1 with points p1 (block 0 = 0x01) and p2 (block 0 = 0x02, block 2 =
/// 0x02), and a failed-over VM folder over `point` whose overlay wrote block 1 = 0xAA.
fn setup(root: &Path, point: &str) -> (ReplicaSet, PathBuf) {
    let replicas = ReplicaSet::open(&root.join("replicas")).expect("replicas");
    let spec = ReplicaSpec {
        machine: Default::default(),
        bucket_ms: 1,
        relationship_id: "r-00000001".into(),
        vm: "vm1".into(),
        primary_host_id: "h1".into(),
        disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: SIZE }],
        retention_ms: 24 * 3_600_000,
    };
    let r = replicas.prepare(spec).expect("prepare");
    let disk0 = "disk0".parse().expect("disk id");
    r.ack_initial(&disk0, SIZE, true).expect("ack");
    let now = super::super::now_ms();
    for (seq, writes) in [(1u64, vec![(0u64, 1u8)]), (2, vec![(0, 2), (2 * BLOCK as u64, 2)])] {
        let mut s = r.begin_point(seq, now - 100_000 + seq as i64 * 10, false, false).expect("begin");
        for (off, byte) in writes {
            s.push(&disk0, off, ExtentData::Data(&[byte; BLOCK])).expect("push");
        }
        s.commit().expect("commit");
    }
    let folder = root.join("vms/vm1");
    std::fs::create_dir_all(&folder).expect("folder");
    let config = VmConfig {
        name: "vm1".into(),
        created_unix_ms: now,
        power: Power::Off,
        disks: vec![DiskConfig { id: "disk0".into(), size_bytes: SIZE, file: "disk0.overlay".into(), tracking: false }],
        nics: vec![],
        failover: Some(FailoverConfig {
            relationship_id: "r-00000001".into(),
            point_id: point.into(),
            kind: FailoverKind::Planned,
            committed: false,
            test_of: String::new(),
            started_unix_ms: now,
        }),
        machine: Default::default(),
    };
    save_config(&folder, &config).expect("config");
    {
        let view = r.open_point(point).expect("view");
        let base: Arc<dyn BlockDevice> = view.disks[0].1.clone();
        let ov = Overlay::open(base, &folder.join("disk0.overlay")).expect("overlay");
        ov.write_at(&[0xAA; BLOCK], BLOCK as u64, true).expect("write");
    }
    (replicas, folder)
}

fn commit_plan(replicas: &ReplicaSet) -> CommitPlan {
    let r = replicas.get(&vm()).expect("replica");
    CommitPlan {
        vm: "vm1".into(),
        point_id: "p1".into(),
        disks: vec![CommitDisk {
            id: "disk0".into(),
            size_bytes: SIZE,
            overlay: "disk0.overlay".into(),
            source: r.images()[0].1.clone(),
            target: "disk0.img".into(),
        }],
        done: CommitStep::Planned,
    }
}

const COMMIT_STEPS: [CommitStep; 7] = [
    CommitStep::Planned,
    CommitStep::RolledBack,
    CommitStep::OverlaysFolded,
    CommitStep::ImagesMoved,
    CommitStep::OverlaysRemoved,
    CommitStep::ConfigWritten,
    CommitStep::ReplicaRemoved,
];

/// The VM folder after a finished commit to p1: its own image reads p1 plus the overlay
/// write, the config names it, nothing of the failover is left.
fn assert_committed(root: &Path, folder: &Path) {
    let img = std::fs::read(folder.join("disk0.img")).expect("the VM's own image");
    assert_eq!(img.len() as u64, SIZE);
    assert!(img[..BLOCK].iter().all(|&b| b == 1), "block 0 is p1's");
    assert!(img[BLOCK..2 * BLOCK].iter().all(|&b| b == 0xAA), "block 1 is the overlay write");
    assert!(img[2 * BLOCK..].iter().all(|&b| b == 0), "p2's write to block 2 is rolled back");
    let config = read_config(folder).expect("read").expect("config");
    assert_eq!(config.disks[0].file, "disk0.img");
    assert!(config.failover.as_ref().is_some_and(|f| f.committed));
    for gone in ["disk0.overlay", "disk0.overlay.map", JOURNAL_FILE] {
        assert!(!folder.join(gone).exists(), "{gone} left behind");
    }
    assert!(!root.join("replicas/vm1").exists(), "the replica folder is left behind");
}

#[test]
fn the_commit_step_order_is_total_and_each_has_its_failpoint() {
    let mut step = CommitStep::Planned;
    let mut seen = vec![step];
    while let Some(n) = step.next() {
        assert!(n > step);
        seen.push(n);
        step = n;
    }
    assert_eq!(seen, COMMIT_STEPS);
    let mut c = ChangePointStep::Planned;
    let mut fps = vec![c.failpoint()];
    while let Some(n) = c.next() {
        fps.push(n.failpoint());
        c = n;
    }
    fps.extend(COMMIT_STEPS.iter().map(|s| s.failpoint()));
    for fp in &fps {
        assert!(faults::ALL.contains(fp), "{fp} not in faults::ALL");
    }
    fps.sort();
    fps.dedup();
    assert_eq!(fps.len(), COMMIT_STEPS.len() + 3, "one failpoint per step");
}

#[test]
fn an_uninterrupted_commit_yields_the_point_plus_the_overlay_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let (replicas, folder) = setup(dir.path(), "p1");
    let plan = commit_plan(&replicas);
    assert_eq!(start(&folder, Journal::Commit(plan), &replicas).expect("commit"), Outcome::Committed);
    assert_committed(dir.path(), &folder);
    assert!(replicas.get(&vm()).is_none());
}

#[test]
fn a_commit_removes_a_stale_dirty_bitmap_beside_the_new_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let (replicas, folder) = setup(dir.path(), "p1");
    let plan = commit_plan(&replicas);
    let stale: Vec<PathBuf> = plan
        .disks
        .iter()
        .flat_map(|d| [&d.target, &d.overlay])
        .map(|f| crate::tracker::bitmap::bitmap_path(&folder.join(f)))
        .collect();
    for p in &stale {
        std::fs::write(p, b"stale").expect("write a stale bitmap");
    }
    assert_eq!(start(&folder, Journal::Commit(plan), &replicas).expect("commit"), Outcome::Committed);
    for p in &stale {
        assert!(!p.exists(), "{} is left after the commit", p.display());
    }
}

#[test]
fn a_commit_interrupted_after_any_step_finishes_after_a_restart() {
    for (i, &crashed_in) in COMMIT_STEPS.iter().enumerate() {
        let dir = tempfile::tempdir().expect("tmp");
        let (replicas, folder) = setup(dir.path(), "p1");
        let mut plan = commit_plan(&replicas);
        write(&folder, &Journal::Commit(plan.clone())).expect("journal");
        // Every step up to `crashed_in` took effect; the journal names the one before it
        // (the crash came at the step's failpoint, before the journal was saved).
        for &s in &COMMIT_STEPS[1..=i] {
            commit_step(&folder, &plan, s, &replicas).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
        plan.done = if i == 0 { CommitStep::Planned } else { COMMIT_STEPS[i - 1] };
        write(&folder, &Journal::Commit(plan)).expect("journal");
        drop(replicas);
        // The restart: the replica set reopened (a replica whose images moved away no
        // longer opens), the journal read and run.
        let replicas = ReplicaSet::open(&dir.path().join("replicas")).expect("reopen");
        let j = read(&folder).expect("read").expect("the journal is there");
        assert_eq!(run(&folder, j, &replicas).expect("resume"), Outcome::Committed, "{crashed_in:?}");
        assert_committed(dir.path(), &folder);
        // Running it twice is harmless: there is nothing left to do.
        assert_eq!(read(&folder).expect("read"), None);
    }
}

#[tokio::test]
async fn the_agent_finishes_an_interrupted_commit_when_it_loads_the_vms() {
    let dir = tempfile::tempdir().expect("tmp");
    let (replicas, folder) = setup(dir.path(), "p1");
    let mut plan = commit_plan(&replicas);
    write(&folder, &Journal::Commit(plan.clone())).expect("journal");
    commit_step(&folder, &plan, CommitStep::RolledBack, &replicas).expect("rollback");
    commit_step(&folder, &plan, CommitStep::OverlaysFolded, &replicas).expect("fold");
    commit_step(&folder, &plan, CommitStep::ImagesMoved, &replicas).expect("move");
    plan.done = CommitStep::OverlaysFolded;
    write(&folder, &Journal::Commit(plan)).expect("journal");
    drop(replicas);
    let replicas = Arc::new(ReplicaSet::open(&dir.path().join("replicas")).expect("reopen"));
    let mgr = crate::vm::VmManager::load(
        dir.path().join("vms"),
        replicas,
        Arc::new(crate::nbd::Exports::new()),
        "127.0.0.1:9".parse().expect("addr"),
        crate::files::SocketAccess::default(),
        crate::vm::Hooks::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("load");
    assert_committed(dir.path(), &folder);
    let config = mgr.config(&vm()).await.expect("the VM is loaded");
    assert_eq!(config.disks[0].file, "disk0.img", "the manager holds the config the journal left");
}

#[test]
fn a_torn_or_corrupt_journal_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let (replicas, folder) = setup(dir.path(), "p1");
    write(&folder, &Journal::Commit(commit_plan(&replicas))).expect("journal");
    let path = folder.join(JOURNAL_FILE);
    let good = std::fs::read(&path).expect("journal");
    assert_eq!(&good[..4], &FAILOVER_JOURNAL.magic);
    let mut corrupt = good.clone();
    corrupt[persist::HEADER_LEN + 5] ^= 0x20;
    for (what, bytes) in [("torn", good[..good.len() / 2].to_vec()), ("corrupt", corrupt), ("empty", vec![])] {
        std::fs::write(&path, &bytes).expect("damage");
        let err = read(&folder).expect_err(what);
        assert_eq!(err.path(), path, "{what}");
        assert!(err.is_damage(), "{what}: {err}");
    }
    // A temporary left by an interrupted save is not the journal and is cleaned away.
    std::fs::remove_file(&path).expect("rm");
    let tmp = folder.join(format!("{JOURNAL_FILE}.0123abcd.tmp"));
    std::fs::write(&tmp, &good[..10]).expect("tmp");
    assert_eq!(read(&folder).expect("no journal"), None);
    assert!(!tmp.exists());
}

fn change_plan(to: &str) -> ChangePointPlan {
    ChangePointPlan {
        vm: "vm1".into(),
        replica_of: "vm1".into(),
        from_point: "p2".into(),
        to_point: to.into(),
        overlays: vec!["disk0.overlay".into()],
        done: ChangePointStep::Planned,
    }
}

#[test]
fn a_change_point_interrupted_after_any_step_finishes_or_rolls_back() {
    let steps = [ChangePointStep::Planned, ChangePointStep::OverlaysRemoved, ChangePointStep::ConfigWritten];
    for to in ["p1", "p9"] {
        for i in 0..steps.len() {
            let dir = tempfile::tempdir().expect("tmp");
            let (replicas, folder) = setup(dir.path(), "p2");
            let mut plan = change_plan(to);
            write(&folder, &Journal::ChangePoint(plan.clone())).expect("journal");
            let point = if to == "p1" { "p1" } else { "p2" };
            for &s in &steps[1..=i] {
                change_point_step(&folder, &plan, s, point).expect("step");
            }
            plan.done = if i == 0 { ChangePointStep::Planned } else { steps[i - 1] };
            write(&folder, &Journal::ChangePoint(plan)).expect("journal");
            drop(replicas);
            let replicas = ReplicaSet::open(&dir.path().join("replicas")).expect("reopen");
            let j = read(&folder).expect("read").expect("journal");
            let outcome = run(&folder, j, &replicas).expect("resume");
            let expected =
                if to == "p1" { Outcome::PointChanged("p1".into()) } else { Outcome::ChangeRolledBack("p2".into()) };
            assert_eq!(outcome, expected, "{to} after {:?}", steps[i]);
            let config = read_config(&folder).expect("read").expect("config");
            assert_eq!(config.failover.as_ref().map(|f| f.point_id.as_str()), Some(point));
            for gone in ["disk0.overlay", "disk0.overlay.map", JOURNAL_FILE] {
                assert!(!folder.join(gone).exists(), "{gone} left behind");
            }
            assert_eq!(replicas.get(&vm()).map(|r| r.points().len()), Some(2), "the replica is untouched");
        }
    }
}
