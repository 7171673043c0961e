//! `failover commit` and change-point crashed at every step, end to end: the replica host's
//! agent is restarted with one step's failpoint armed (`return(crash)`), the operation
//! is run, the agent must die by SIGABRT at that failpoint, and after a restart without
//! failpoints the VM must be served again with its disks reading exactly the chosen
//! point plus the writes made to it since the failover (commit), or exactly the new
//! point (change-point) — the agent finished the journaled operation before serving.
//!
//! One world for every step: one VM per step (4 MiB disks), all failed over at once.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test commit_journal`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use siterecovery_agent::faults;
use siterecovery_tests::*;

/// The policy interval (the provider runs with `--test-intervals`).
const INTERVAL_MS: i64 = 1000;

/// Every commit step, in order.
const COMMIT_POINTS: [&str; 7] = [
    faults::COMMIT_JOURNAL_WRITTEN,
    faults::COMMIT_ROLLED_BACK,
    faults::COMMIT_OVERLAY_FOLDED,
    faults::COMMIT_IMAGES_MOVED,
    faults::COMMIT_OVERLAYS_REMOVED,
    faults::COMMIT_CONFIG_WRITTEN,
    faults::COMMIT_REPLICA_REMOVED,
];
/// Every change-point step, in order.
const CHANGE_POINTS: [&str; 3] =
    [faults::CHANGE_POINT_JOURNAL_WRITTEN, faults::CHANGE_POINT_OVERLAYS_REMOVED, faults::CHANGE_POINT_CONFIG_WRITTEN];

/// Point A: 1 MiB of 0xa1 at 0. Point B (later, another bucket): 1 MiB of 0xb2 at 1M.
const READS_A: [&str; 2] = ["read -P 0xa1 0 1M", "read -P 0 1M 3M"];
/// A plus the writes made after the failover: 64 KiB of 0xc4 over A, 1 MiB 0xc3 at 2M.
const READS_A_PLUS_WRITES: [&str; 5] =
    ["read -P 0xc4 0 64k", "read -P 0xa1 64k 960k", "read -P 0 1M 1M", "read -P 0xc3 2M 1M", "read -P 0 3M 1M"];
const WRITES_AFTER_FAILOVER: [&str; 2] = ["write -P 0xc4 0 64k", "write -P 0xc3 2M 1M"];

/// A retained point of `vm` holding A and not B: created after the A writes were
/// acknowledged (`t_a`) and before the B writes began (`t_b`). Read when it is used: retention merges
/// the points of one bucket, so an id seen earlier may be gone.
#[track_caller]
fn point_a(w: &World, vm: &str, t_a: i64, t_b: i64) -> String {
    let points = w.points(vm);
    let p = points
        .iter()
        .rev()
        .find(|p| p["created_unix_ms"].as_i64().is_some_and(|c| c > t_a && c < t_b))
        .unwrap_or_else(|| panic!("{vm}: no point between A and B in {points:?}"));
    p["id"].as_str().expect("point id").to_owned()
}

/// Restarts hv-b (graceful stop) with `failpoints` armed, or none.
fn restart_b(w: &mut World, failpoints: Option<&str>) {
    w.b.stop_gracefully();
    start_b(w, failpoints);
}

fn start_b(w: &mut World, failpoints: Option<&str>) {
    let since = unix_now_ms();
    let dir = w.dir("hv-b");
    w.b = match failpoints {
        Some(fp) => w.lab.start_agent_armed("hv-b", &dir, fp, &[]),
        None => w.lab.start_agent_with("hv-b", &dir, &[]),
    };
    w.wait_host_heartbeat_since("hv-b", since);
}

/// Runs `args` (a job with `--wait`) and asserts hv-b dies by SIGABRT at failpoint `fp`.
fn crash_b_at(w: &mut World, fp: &str, args: &[&str]) {
    let o = w.lab.cli_long(args);
    let status = w.b.wait_exit(Duration::from_secs(30));
    let log = std::fs::read_to_string(&w.b.log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.signal() == Some(nix::libc::SIGABRT)),
        "{fp}: hv-b did not abort at the failpoint ({status:?}); `{}` said {}",
        args.join(" "),
        describe(&o)
    );
    assert!(log.contains(&format!("failpoint {fp}: crash")), "{fp}: the crash was not at the failpoint");
}

/// The unix-socket NBD URI of `vm`'s disk on hv-b; `None` while the inventory does not
/// show it there (right after a failover `vm show` can miss the VM for a moment).
fn uri_on_b(w: &World, vm: &str) -> Option<String> {
    let v = w.try_show(vm)?;
    let uri = v["disks"][0]["nbd_unix_uri"].as_str()?;
    (v["host"] == "hv-b" && !uri.is_empty()).then(|| uri.to_owned())
}

/// [`uri_on_b`], waited for.
#[track_caller]
fn wait_uri_on_b(w: &World, vm: &str) -> String {
    let mut uri = None;
    let ok = wait_until(EVENT_TIMEOUT, || {
        uri = uri_on_b(w, vm);
        uri.is_some()
    });
    assert!(ok, "{vm} is not shown on hv-b");
    uri.unwrap_or_default()
}

/// Polls until `vm`'s disk on hv-b reads `cmds`.
fn serves(w: &World, vm: &str, cmds: &[&str]) -> bool {
    wait_until(Duration::from_secs(20), || uri_on_b(w, vm).is_some_and(|u| w.reads(&u, cmds)))
}

#[test]
fn a_commit_or_change_point_crashed_at_any_step_is_finished_at_restart() {
    let mut w = World::new("commit_journal");
    let commits: Vec<String> = (0..COMMIT_POINTS.len()).map(|i| format!("c{i}")).collect();
    let changes: Vec<String> = (0..CHANGE_POINTS.len()).map(|i| format!("p{i}")).collect();
    let all: Vec<&String> = commits.iter().chain(&changes).collect();
    for vm in &all {
        w.vm(vm, &["4M"], &[]);
        w.protect_with_point(vm);
    }
    // Point A on every VM, then point B in a later retention bucket.
    let t = unix_now_ms();
    for vm in &all {
        w.qio_ok(&w.uris(vm)[0], &["write -P 0xa1 0 1M"]);
    }
    let t_a = unix_now_ms();
    let mut a_last_ms = 0;
    for vm in &all {
        let p = w.wait_point_after(vm, t.max(t_a), "point A");
        a_last_ms = a_last_ms.max(p["created_unix_ms"].as_i64().unwrap_or(0));
    }
    assert!(wait_until(Duration::from_secs(10), || unix_now_ms() > a_last_ms + 2 * INTERVAL_MS + 100));
    let t_b = unix_now_ms();
    for vm in &all {
        w.qio_ok(&w.uris(vm)[0], &["write -P 0xb2 1M 1M"]);
    }
    let t = unix_now_ms();
    for vm in &all {
        w.wait_point_after(vm, t, "point B");
    }
    w.a.kill9();
    w.lab.wait_host("hv-a", "disconnected", Duration::from_secs(30), |h| h["connected"] == false);
    // Commit VMs run from A (the commit rolls the replica back past B); change-point VMs
    // from B (they change to A).
    for (i, vm) in all.iter().enumerate() {
        let point = if i < commits.len() { point_a(&w, vm, t_a, t_b) } else { "latest".into() };
        w.wait_job(&["failover", "unplanned", vm, "--point", &point]);
        w.qio_ok(&wait_uri_on_b(&w, vm), &WRITES_AFTER_FAILOVER);
    }

    for (vm, fp) in commits.iter().zip(COMMIT_POINTS) {
        restart_b(&mut w, Some(&format!("{fp}=1*return(crash)")));
        crash_b_at(&mut w, fp, &["--json", "failover", "commit", vm, "--wait"]);
        start_b(&mut w, None);
        assert!(!w.vm_dir("hv-b", vm).join("failover.journal").exists(), "{fp}: the journal is left");
        assert!(!w.replica_dir("hv-b", vm).exists(), "{fp}: the replica folder of {vm} is left");
        assert!(serves(&w, vm, &READS_A_PLUS_WRITES), "{fp}: {vm} does not read point A plus its writes");
        // The provider learns of the commit from the agent's inventory report.
        w.wait_vm(vm, "committed", EVENT_TIMEOUT, |v| {
            v["failover"]["committed"] == true && v["replication"]["state"] == "committed"
        });
        let uri = wait_uri_on_b(&w, vm);
        assert!(w.reads(&uri, &READS_A_PLUS_WRITES), "{fp}: data changed after the restart");
        w.qio_ok(&uri, &["write -P 0xd5 3M 64k"]);
        eprintln!("[commit_journal] crash at {fp}: {vm} committed after the restart");
    }

    for (vm, fp) in changes.iter().zip(CHANGE_POINTS) {
        let a_id = &point_a(&w, vm, t_a, t_b);
        restart_b(&mut w, Some(&format!("{fp}=1*return(crash)")));
        crash_b_at(&mut w, fp, &["--json", "failover", "change-point", vm, "--point", a_id, "--wait"]);
        start_b(&mut w, None);
        assert!(!w.vm_dir("hv-b", vm).join("failover.journal").exists(), "{fp}: the journal is left");
        assert!(serves(&w, vm, &READS_A), "{fp}: {vm} does not read exactly point A");
        w.wait_job(&["failover", "change-point", vm, "--point", a_id]);
        assert!(serves(&w, vm, &READS_A), "{fp}: {vm} does not read point A after the change-point is run again");
        eprintln!("[commit_journal] crash at {fp}: {vm} runs from point A after the restart");
    }
}
