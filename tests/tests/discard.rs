//! TRIM and WRITE_ZEROES end to end, with real processes: a thin 1 GiB disk of `vm1` on
//! hv-a holding 64 MiB of data, protected to hv-b; the real `qemu-io` discards or zeroes
//! through the agent's NBD export. The primary's image and the replica's image do not
//! grow (holes are punched, no zero bytes written), the point after it reads zeros, the
//! replication sends next to nothing for it, and the replica's undo record holds the
//! discarded data only (no before-image of the holes).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test discard`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
const VM: &str = "vm1";

/// Allocated bytes of a file (`du`).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn one(paths: Vec<PathBuf>, what: &str) -> PathBuf {
    assert_eq!(paths.len(), 1, "{what}: {paths:?}");
    paths.into_iter().next().expect("one")
}

fn bytes_replicated(w: &World) -> u64 {
    w.replication(VM)["bytes_replicated"].as_u64().unwrap_or(0)
}

fn undo_bytes(dir: &Path) -> u64 {
    files_ending(dir, ".undo").iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

/// A protected `vm1` with a 1 GiB disk holding 64 MiB of 0x5a, replicated; returns the
/// world, the primary's image, the replica's image and the disk's NBD URI.
fn protected_thin_vm(test: &str) -> (World, PathBuf, PathBuf, String) {
    let w = World::new(test);
    w.vm(VM, &["1G"], &[]);
    let uri = w.uris(VM).remove(0);
    w.qio_ok(&uri, &["write -P 0x5a 0 64M"]);
    w.protect(VM);
    let wrote = unix_now_ms();
    w.wait_point_after(VM, wrote, "a point holding the 64 MiB");
    let primary = one(files_ending(&w.vm_dir("hv-a", VM), ".img"), "primary images");
    let replica = one(files_ending(&w.replica_dir("hv-b", VM), ".img"), "replica images");
    (w, primary, replica, uri)
}

/// A 4 KiB write in the disk's last block after each command: its point comes after the
/// command's, so once the sender's byte count (data bytes sent, `bytes_replicated`) has
/// moved past it the count covers the command's point too.
const MARKER: &str = "write -P 0x77 1073737728 4k";

/// Runs `cmd` through qemu-io, waits for the point after it, then for the point of
/// [`MARKER`] and the byte count reported with it; returns (the command's point, bytes
/// sent for it and the marker, undo bytes added on the replica).
fn run_and_wait_point(w: &World, uri: &str, cmd: &str) -> (serde_json::Value, u64, u64) {
    let sent0 = bytes_replicated(w);
    let undo0 = undo_bytes(&w.replica_dir("hv-b", VM));
    w.qio_ok(uri, &[cmd]);
    let done = unix_now_ms();
    let p = w.wait_point_after(VM, done, cmd);
    let p_ms = p["created_unix_ms"].as_i64().unwrap_or(0);
    w.qio_ok(uri, &[MARKER]);
    w.wait_point_after(VM, p_ms.max(unix_now_ms()), "the marker's point");
    let mut sent = sent0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            sent = bytes_replicated(w);
            sent > sent0
        }),
        "{cmd}: the replication's byte count never moved past {sent0}"
    );
    let undo = undo_bytes(&w.replica_dir("hv-b", VM)).saturating_sub(undo0);
    (p, sent - sent0, undo)
}

#[test]
fn discard_of_a_thin_disk_punches_holes_on_primary_and_replica() {
    let (w, primary, replica, uri) = protected_thin_vm("discard_thin");
    let (a0, b0) = (allocated(&primary), allocated(&replica));
    eprintln!("[discard] before: primary {a0} B allocated, replica {b0} B");
    assert!((64 * MIB..80 * MIB).contains(&a0), "the primary holds the data, thin: {a0}");
    assert!((64 * MIB..80 * MIB).contains(&b0), "the replica holds the data, thin: {b0}");
    let before_id = w.points(VM).last().expect("a point")["id"].as_str().expect("id").to_owned();

    let (_, sent, undo) = run_and_wait_point(&w, &uri, "discard 0 1G");
    let (a1, b1) = (allocated(&primary), allocated(&replica));
    eprintln!("[discard] after discard 0 1G: primary {a1} B, replica {b1} B, {sent} B sent, undo +{undo} B");
    assert!(a1 <= MIB, "the primary was not punched: {a1} B allocated (was {a0})");
    assert!(
        wait_until(Duration::from_secs(10), || allocated(&replica) <= MIB),
        "the replica was not punched: {} B allocated (was {b0})",
        allocated(&replica)
    );
    assert!(sent < 64 << 10, "the discard (and the 4 KiB marker) sent {sent} B");
    // The undo keeps the discarded 64 MiB (the earlier point still reads it), not 1 GiB.
    assert!((64 * MIB..65 * MIB).contains(&undo), "undo of the discard is {undo} B");

    // The latest point (the marker's): the discard's own point may be pruned already,
    // as retention keeps the newest point of each interval-long bucket.
    let latest = w.export(VM, "latest");
    assert!(w.reads(&latest[0], &["read -P 0 0 1023M"]), "the point after the discard does not read zeros");
    assert_ok(&w.cli(&["point", "unexport", VM]), "point unexport");
    let older = w.export(VM, &before_id);
    assert!(w.reads(&older[0], &["read -P 0x5a 0 64M", "read -P 0 64M 960M"]), "the point before lost its data");
    assert_ok(&w.cli(&["point", "unexport", VM]), "point unexport");
    assert!(w.reads(&uri, &["read -P 0 0 1023M"]), "the primary does not read zeros");
}

#[test]
fn write_zeroes_punches_unless_no_hole_and_sends_no_zero_bytes() {
    let (w, primary, replica, uri) = protected_thin_vm("write_zeroes_thin");
    let (a0, b0) = (allocated(&primary), allocated(&replica));

    // `write -z -u`: WRITE_ZEROES without NO_HOLE: a hole on both sides.
    let (_, sent, undo) = run_and_wait_point(&w, &uri, "write -z -u 0 32M");
    let (a1, b1) = (allocated(&primary), allocated(&replica));
    eprintln!(
        "[zeroes] write -z -u 0 32M: primary {a0} -> {a1} B, replica {b0} -> {b1} B, {sent} B sent, undo +{undo} B"
    );
    // (31 MiB: the marker's block is allocated now.)
    assert!(a1 <= a0 - 31 * MIB, "the primary was not punched: {a1} B (was {a0})");
    assert!(
        wait_until(Duration::from_secs(10), || allocated(&replica) <= b0 - 31 * MIB),
        "the replica was not punched: {} B (was {b0})",
        allocated(&replica)
    );
    assert!(sent < 64 << 10, "write -z -u (and the marker) sent {sent} B");
    assert!(undo < 33 * MIB, "undo of 32 MiB zeroed is {undo} B");

    // `write -z`: NO_HOLE: the primary zeroes in place (never grows); the replica only
    // needs zeroes and punches.
    let (_, sent, undo) = run_and_wait_point(&w, &uri, "write -z 32M 32M");
    let (a2, b2) = (allocated(&primary), allocated(&replica));
    eprintln!(
        "[zeroes] write -z 32M 32M: primary {a1} -> {a2} B, replica {b1} -> {b2} B, {sent} B sent, undo +{undo} B"
    );
    assert!(a2 <= a1, "the primary grew: {a2} B (was {a1})");
    assert!(b2 <= b1, "the replica grew: {b2} B (was {b1})");
    assert!(sent < 64 << 10, "write -z (and the marker) sent {sent} B");
    assert!(undo < 33 * MIB, "undo of 32 MiB zeroed is {undo} B");

    let latest = w.export(VM, "latest");
    assert!(w.reads(&latest[0], &["read -P 0 0 1023M"]), "the point after the zeroes does not read zeros");
    assert_ok(&w.cli(&["point", "unexport", VM]), "point unexport");
}
