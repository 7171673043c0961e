//! Ghost writes: a write whose image write fails must not stay in the HRL log, so it is
//! neither re-applied to the primary at the next start nor shipped to the replica.
//!
//! 1. The primary's data dir on a small tmpfs the test mounts: `qemu-io` writes into
//!    holes of the disk until ENOSPC; `kill -9` and restart of the primary agent; the
//!    failed range reads as before the failed write on the primary and in the next point.
//! 2. The same window hit for sure: failpoint `tracker.image.write=1*return(enospc)`
//!    fails exactly one image write after its record was logged (the tracker cuts it
//!    from the log's tail; the cancel record, for a failed write with later ones logged
//!    behind it, is covered by the tracker's unit tests), acknowledged writes around it,
//!    then `kill -9` and restart.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test ghost_write`.

use std::time::Duration;

use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
const VM: &str = "vm1";

/// `qemu-io -c 'read -P P OFF LEN'` passes on every URI.
fn reads_pattern(w: &World, uris: &[String], pattern: u8, off: u64, len: u64) -> bool {
    let cmd = format!("read -P {pattern:#04x} {off} {len}");
    uris.iter().all(|u| w.reads(u, &[cmd.as_str()]))
}

/// Kills hv-a with SIGKILL and starts it again (same data dir), connected.
fn crash_and_restart_primary(w: &mut World) {
    w.a.kill9();
    let dir = w.dir("hv-a");
    w.a = w.lab.start_agent_with("hv-a", &dir, &[]);
    w.wait_host_connected("hv-a");
}

/// The primary's disk URI once its export is back after a restart.
fn wait_uri(w: &World) -> String {
    let mut uri = String::new();
    let ok = wait_until(EVENT_TIMEOUT, || {
        uri =
            w.try_show(VM).and_then(|v| v["disks"][0]["nbd_unix_uri"].as_str().map(str::to_owned)).unwrap_or_default();
        !uri.is_empty() && w.reads(&uri, &["read 0 512"])
    });
    assert!(ok, "the primary's export did not come back");
    uri
}

/// The latest point of vm1 created after `after_ms` holds `pattern` at `off..off+len`.
fn latest_point_reads(w: &World, after_ms: i64, pattern: u8, off: u64, len: u64) -> bool {
    w.wait_point_after(VM, after_ms, "a point after the restart");
    let uris = w.export(VM, "latest");
    let ok = reads_pattern(w, &uris, pattern, off, len);
    assert_ok(&w.cli(&["point", "unexport", VM]), "point unexport");
    ok
}

#[test]
fn writes_until_enospc_on_a_full_primary_leave_the_failed_range_as_before() {
    let lab = Lab::new("ghost_enospc");
    let fs = Tmpfs::mount(&lab.host_slot("hv-a").dir, "80m");
    let mut w = World::start(lab, &[], &[]);
    w.pair("fast", &[]);
    w.vm(VM, &["64M"], &[]);
    let uri = w.uris(VM)[0].clone();
    w.qio_ok(&uri, &["write -P 0x11 0 4M"]);
    w.protect_with_point(VM);

    // Leave a few MiB: every 1 MiB write into a hole needs 1 MiB of image and 1 MiB of
    // log (until the log is shipped and deleted), so the writes below run out of space.
    let filler = fs.dir.join("filler");
    fs.fill(&filler, 6 * MIB);
    let mut failed = None;
    for i in 4..64u64 {
        let cmd = format!("write -P 0x22 {} {MIB}", i * MIB);
        let o = w.qio(&uri, &[cmd.as_str()], false);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        if !o.status.success() || text.contains("failed") {
            assert!(text.contains("No space left"), "write {i} failed, but not with ENOSPC: {text}");
            failed = Some(i);
            break;
        }
        // Keep the file system full while logs are shipped and deleted meanwhile.
        fs.fill(&filler, 2 * MIB);
    }
    let failed = failed.expect("no write failed with ENOSPC on a full file system");
    eprintln!("[ghost] write {failed} (at {failed} MiB) failed with ENOSPC");
    let (off, len) = (failed * MIB, MIB);
    assert!(reads_pattern(&w, std::slice::from_ref(&uri), 0, off, len), "the failed range changed before the restart");

    // Crash, free the space (a re-applied ghost would now land), restart.
    std::fs::remove_file(&filler).expect("remove filler");
    crash_and_restart_primary(&mut w);
    let uri = wait_uri(&w);
    assert!(reads_pattern(&w, std::slice::from_ref(&uri), 0, off, len), "the failed write was re-applied at restart");
    assert!(
        reads_pattern(&w, std::slice::from_ref(&uri), 0x22, 4 * MIB, (failed - 4) * MIB),
        "acknowledged writes kept"
    );

    let restarted = unix_now_ms();
    assert!(latest_point_reads(&w, restarted, 0, off, len), "the failed write reached the replica");
    w.assert_point_matches_primary(VM, "latest");
}

/// A protected 32 MiB VM (8 MiB of 0x11) whose primary agent is restarted with
/// `armed`; then a 1 MiB write of 0x33 at 1M fails saying `says`. The world and the URI.
fn armed_write_fails(test: &str, armed: &str, says: &str) -> (World, String) {
    let mut w = World::new(test);
    w.vm(VM, &["32M"], &[]);
    let uri = w.uris(VM)[0].clone();
    w.qio_ok(&uri, &["write -P 0x11 0 8M"]);
    w.protect_with_point(VM);
    w.a.stop_gracefully();
    let dir = w.dir("hv-a");
    w.a = w.lab.start_agent_armed("hv-a", &dir, armed, &[]);
    w.wait_host_connected("hv-a");
    let uri = wait_uri(&w);
    let o = w.qio(&uri, &["write -P 0x33 1M 1M"], false);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains(says), "the armed image write did not fail with {says:?}: {text}");
    (w, uri)
}

#[test]
fn a_failed_image_write_is_taken_out_of_the_log_neither_replayed_nor_shipped() {
    // The next image write (after its record is logged) fails with ENOSPC, once.
    let (mut w, uri) = armed_write_fails("ghost_failpoint", "tracker.image.write=1*return(enospc)", "No space left");
    // Acknowledged writes around it, one overlapping the failed range's end.
    w.qio_ok(&uri, &["write -P 0x44 4M 1M", "write -P 0x55 1920K 256K"]);
    assert!(reads_pattern(&w, std::slice::from_ref(&uri), 0x11, MIB, 896 << 10), "failed range changed");

    crash_and_restart_primary(&mut w);
    let uri = wait_uri(&w);
    let u = [uri.clone()];
    assert!(reads_pattern(&w, &u, 0x11, MIB, 896 << 10), "the failed write was re-applied at restart");
    assert!(reads_pattern(&w, &u, 0x55, 1920 << 10, 256 << 10), "an acknowledged write was lost");
    assert!(reads_pattern(&w, &u, 0x44, 4 * MIB, MIB), "an acknowledged write was lost");

    let restarted = unix_now_ms();
    assert!(latest_point_reads(&w, restarted, 0x11, MIB, 896 << 10), "the failed write reached the replica");
    w.assert_point_matches_primary(VM, "latest");
    // The agent stayed up all along.
    assert!(w.a.is_running() && w.b.is_running(), "an agent exited");
}

#[test]
fn hrl_failpoints_fail_an_append_with_eio_and_crash_after_the_log_sync() {
    use std::os::unix::process::ExitStatusExt;
    let mut w = World::new("ghost_hrl_failpoints");
    w.vm(VM, &["32M"], &[]);
    let uri = w.uris(VM)[0].clone();
    w.qio_ok(&uri, &["write -P 0x11 0 4M"]);
    w.protect_with_point(VM);

    w.a.stop_gracefully();
    let dir = w.dir("hv-a");
    let armed = "hrl.append.before_sync=1*return(eio);hrl.append.after_sync=1*return(crash)";
    w.a = w.lab.start_agent_armed("hv-a", &dir, armed, &[]);
    w.wait_host_connected("hv-a");
    let uri = wait_uri(&w);
    // The first append fails before anything is logged: EIO to the client, image untouched.
    let o = w.qio(&uri, &["write -P 0x22 0 1M"], false);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("Input/output error"), "the armed append did not fail with EIO: {text}");
    assert!(reads_pattern(&w, std::slice::from_ref(&uri), 0x11, 0, MIB), "a failed append reached the image");
    // The next flush crashes the agent right after the log's fdatasync.
    let _ = w.qio(&uri, &["write -P 0x33 1M 1M", "flush"], false);
    let status = w.a.wait_exit(Duration::from_secs(20)).expect("hv-a did not exit at the armed failpoint");
    assert_eq!(status.signal(), Some(nix::libc::SIGABRT), "hv-a exited with {status}, not by the failpoint");
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(log.contains("failpoint hrl.append.after_sync: crash"), "no failpoint line in {}", w.a.log.display());

    w.a = w.lab.start_agent_with("hv-a", &dir, &[]);
    w.wait_host_connected("hv-a");
    let uri = wait_uri(&w);
    let u = std::slice::from_ref(&uri);
    assert!(reads_pattern(&w, u, 0x11, 0, MIB), "the failed append was applied");
    assert!(reads_pattern(&w, u, 0x33, MIB, MIB), "the synced write was lost");
    w.wait_point_after(VM, unix_now_ms(), "a point after the restart");
    w.assert_point_matches_primary(VM, "latest");
}

#[test]
fn a_write_failing_part_way_marks_its_range_dirty_and_the_replica_follows_the_image() {
    // The next image write fails with EIO after its first half reached the image.
    let armed = "tracker.image.write_partial=1*return(eio)";
    let (mut w, uri) = armed_write_fails("ghost_partial", armed, "Input/output error");
    let u = [uri.clone()];
    assert!(reads_pattern(&w, &u, 0x33, MIB, 512 << 10), "the first half of the failed write is not on the image");
    assert!(
        reads_pattern(&w, &u, 0x11, 1536 << 10, 512 << 10),
        "the second half of the failed write reached the image"
    );
    w.qio_ok(&uri, &["write -P 0x44 4M 1M"]);
    // The range went to the bitmap: the catch-up ships what the image holds there.
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(log.contains("marked dirty"), "the torn range was not marked dirty");
    let after = unix_now_ms();
    w.wait_point_after(VM, after, "a point after the torn write");
    let folder = w.vm_dir("hv-a", VM);
    assert!(wait_until(EVENT_TIMEOUT, || files_ending(&folder, ".dirty").is_empty()), "the bitmap is left");
    w.assert_point_matches_primary(VM, "latest");
    assert!(w.a.is_running() && w.b.is_running(), "an agent exited");
}
