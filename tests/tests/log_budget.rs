//! The log budget end to end: a protected VM on hv-a served with `--log-budget 8M`, the
//! replica agent stopped, then 40 MiB of random 64 KiB writes over the 64 MiB disk with
//! the real `qemu-io`. Every guest write succeeds, the pending HRL logs in the VM folder
//! never pass the budget (the disk runs on its dirty-block bitmap), health is Warning
//! saying so; once the replica agent is back only the dirty blocks travel (at most 1.1×
//! their bytes on the wire, no full resync), the latest point equals the primary, and
//! the disk is back on HRL logs. Also: the budget is the host's (two disks together),
//! it holds while an offline import is awaited (then only the dirty blocks travel),
//! and unprotect removes a disk's bitmap file.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test log_budget`.

use std::collections::BTreeSet;
use std::path::Path;

use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const BUDGET: u64 = 8 * MIB;
const VM: &str = "vm1";

/// Sum of the sizes of the `*.hrl` files in `dir`.
fn hrl_bytes(dir: &Path) -> u64 {
    files_ending(dir, ".hrl").iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

/// splitmix64: the test's writes replay from the printed seed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Waits for the primary's "dirty-block catch-up done" line: its figures (blocks, dirty
/// bytes, wire bytes).
fn caught_up(w: &World) -> (u64, u64, u64) {
    let mut figures = None;
    let caught = wait_until(EVENT_TIMEOUT, || {
        figures = catch_up_figures(&w.a.log);
        figures.is_some()
    });
    if !caught {
        w.dump_logs();
    }
    figures.expect("the agent logged its dirty-block catch-up")
}

/// The figures of the agent's "dirty-block catch-up done" log line, if it was logged.
fn catch_up_figures(log: &Path) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("dirty-block catch-up done"))?;
    let field = |name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some((field("dirty_blocks")?, field("dirty_bytes")?, field("wire_bytes")?))
}

fn reasons(r: &serde_json::Value) -> String {
    r["health_reasons"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
}

#[test]
fn replica_away_past_the_budget_runs_on_the_bitmap_and_sends_only_dirty_blocks() {
    let mut w = World::unpaired("log_budget", &["--log-budget", "8M"], &[]);
    w.pair("fast", &[]);
    w.vm(VM, &["64M"], &[]);
    let uris = w.uris(VM);
    let folder = w.vm_dir("hv-a", VM);
    w.protect_with_point(VM);
    w.b.stop_gracefully();

    let seed = random_u64();
    eprintln!("[log_budget] seed {seed}");
    let mut rng = seed;
    let mut written = BTreeSet::new();
    let mut max_logs = 0;
    // 10 runs of 64 writes of 64 KiB: 40 MiB, five times the budget.
    for _ in 0..10 {
        let cmds: Vec<String> = (0..64)
            .map(|_| {
                let block = next(&mut rng) % (64 * MIB / BLOCK);
                written.insert(block);
                format!("write -P {} {} {BLOCK}", 1 + next(&mut rng) % 255, block * BLOCK)
            })
            .collect();
        w.qio_ok(&uris[0], &cmds); // every guest write succeeds
        let logs = hrl_bytes(&folder);
        max_logs = max_logs.max(logs);
        assert!(logs <= BUDGET, "pending logs {logs} bytes passed the budget {BUDGET}");
    }
    assert_eq!(files_ending(&folder, ".dirty").len(), 1, "one bitmap file in {}", folder.display());
    eprintln!("[log_budget] {} distinct blocks written, logs at most {max_logs} bytes", written.len());
    let r = w.wait_replication(VM, "health Warning: on the bitmap", EVENT_TIMEOUT, |r| {
        r["health"] == "Warning" && reasons(r).contains("dirty-block bitmap")
    });
    eprintln!("[log_budget] while away: {} ({})", r["health"], reasons(&r));

    // The replica is back: the dirty blocks travel, and only they.
    w.b = w.lab.start_agent("hv-b");
    let back = unix_now_ms();
    let (blocks, dirty, wire) = caught_up(&w);
    eprintln!("[log_budget] caught up: {blocks} dirty blocks, {dirty} bytes dirty, {wire} bytes on the wire");
    let distinct = written.len() as u64;
    assert!(blocks >= distinct, "{blocks} dirty blocks, but {distinct} were written");
    assert!(blocks <= distinct + 16, "{blocks} dirty blocks for {distinct} written");
    assert_eq!(dirty, blocks * BLOCK);
    assert!(wire * 10 <= dirty * 11, "{wire} bytes sent for {dirty} dirty bytes (over 1.1×)");
    w.wait_point_after(VM, back, "a point after the replica came back");
    let r = w.wait_replication(VM, "health Normal after the catch-up", EVENT_TIMEOUT, |r| {
        r["health"] == "Normal" && r["state"] == "replicating"
    });
    assert!(files_ending(&folder, ".dirty").is_empty(), "the bitmap is gone once caught up");
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(!log.contains("resynchronising:"), "a full resync ran");
    eprintln!("[log_budget] after: {r}");
    // Back on HRL logs: a new write is logged and replicated.
    w.qio_ok(&uris[0], &["write -P 0x77 0 64k"]);
    let after = unix_now_ms();
    w.wait_point_after(VM, after, "a point of a logged write");
    w.assert_point_matches_primary(VM, "latest");
}

/// Unprotect while the disk runs on its bitmap (the replica agent away): the `.dirty`
/// file goes with the protection (a stale one would be resumed at the next protect).
#[test]
fn unprotect_on_the_bitmap_removes_the_bitmap_file() {
    let mut w = World::unpaired("log_budget_unprotect", &["--log-budget", "8M"], &[]);
    w.pair("fast", &[]);
    w.vm(VM, &["32M"], &[]);
    let uris = w.uris(VM);
    let folder = w.vm_dir("hv-a", VM);
    w.protect_with_point(VM);
    w.b.stop_gracefully();
    // 12 MiB of writes: past the 8 MiB budget.
    w.qio_ok(&uris[0], &["write -P 0x31 0 4M", "write -P 0x32 4M 4M", "write -P 0x33 8M 4M"]);
    assert_eq!(files_ending(&folder, ".dirty").len(), 1, "one bitmap file in {}", folder.display());
    let o = w.cli_long(&["unprotect", VM, "--wait"]);
    eprintln!("[log_budget] unprotect with the replica away: {}", describe(&o));
    let gone = wait_until(EVENT_TIMEOUT, || files_ending(&folder, ".dirty").is_empty());
    assert!(gone, "the bitmap file is left after unprotect: {:?}", files_ending(&folder, ".dirty"));
    // Still serving: a write after it succeeds.
    w.qio_ok(&uris[0], &["write -P 0x34 0 64k"]);
}

/// The budget is the host's, not each disk's: two 64 MiB disks, 6 MiB of writes each
/// (under the 8 MiB budget alone, 12 MiB together) with the replica away: the logs of
/// both together stay under the budget, one disk runs on its bitmap, and when the
/// replica is back the latest point equals the primary on both disks.
#[test]
fn the_budget_caps_the_logs_of_all_disks_together() {
    let mut w = World::unpaired("log_budget_host", &["--log-budget", "8M"], &[]);
    w.pair("fast", &[]);
    w.vm(VM, &["64M", "64M"], &[]);
    let uris = w.uris(VM);
    let folder = w.vm_dir("hv-a", VM);
    w.protect_with_point(VM);
    w.b.stop_gracefully();
    for (i, uri) in uris.iter().enumerate() {
        let cmds: Vec<String> = (0..6).map(|m| format!("write -P {} {}M 1M", 0x41 + i, m * 3)).collect();
        w.qio_ok(uri, &cmds);
        let logs = hrl_bytes(&folder);
        assert!(logs <= BUDGET, "pending logs of both disks {logs} bytes passed the budget {BUDGET}");
    }
    let bitmaps = files_ending(&folder, ".dirty");
    assert_eq!(bitmaps.len(), 1, "one disk on its bitmap: {bitmaps:?}");
    eprintln!("[log_budget] two disks: logs {} bytes, bitmaps {bitmaps:?}", hrl_bytes(&folder));
    w.b = w.lab.start_agent("hv-b");
    let back = unix_now_ms();
    w.wait_point_after(VM, back, "a point after the replica came back");
    let ok = wait_until(EVENT_TIMEOUT, || files_ending(&folder, ".dirty").is_empty());
    assert!(ok, "the bitmap is left after the catch-up");
    w.assert_point_matches_primary(VM, "latest");
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(!log.contains("resynchronising:"), "a full resync ran");
}

/// The budget while an offline import is awaited (policy `--initial offline`, job in
/// "Waiting for import"): the writes made after the export pass the budget and go to
/// the bitmap (logs under it), and after `protect-import` the catch-up sends only the
/// dirty blocks; the replica's latest point equals the primary, without a full resync.
#[test]
fn awaiting_an_offline_import_past_the_budget_sends_only_dirty_blocks() {
    let w = World::unpaired("log_budget_offline", &["--log-budget", "8M"], &[]);
    w.pair("off", &["--initial", "offline"]);
    w.vm(VM, &["64M"], &[]);
    let uri = w.uris(VM)[0].clone();
    let folder = w.vm_dir("hv-a", VM);
    w.qio_ok(&uri, &["write -P 0x11 0 8M"]);
    let exp = w.lab.root.join("exp");
    let v = w.lab.cli_json(&["protect", VM, "--export-dir", exp.to_str().expect("utf-8")]);
    let job = v["id"].as_str().expect("job id").to_owned();
    w.lab.wait_step(&job, "Waiting for import", "running");
    // 12 MiB after the export, in 1 MiB writes: past the 8 MiB budget.
    let cmds: Vec<String> = (0..12).map(|m| format!("write -P {} {}M 1M", 0x21 + m, 20 + m)).collect();
    w.qio_ok(&uri, &cmds);
    let logs = hrl_bytes(&folder);
    assert!(logs <= BUDGET, "pending logs {logs} bytes passed the budget {BUDGET} while awaiting the import");
    assert_eq!(files_ending(&folder, ".dirty").len(), 1, "no bitmap while awaiting the import");

    let o = w.lab.cli_long(&["protect-import", VM, "--dir", exp.to_str().expect("utf-8"), "--wait"]);
    assert_ok(&o, "protect-import");
    let (blocks, dirty, wire) = caught_up(&w);
    eprintln!("[log_budget] offline: caught up {blocks} dirty blocks, {dirty} bytes dirty, {wire} bytes on the wire");
    let written = 12 * MIB / BLOCK;
    assert!(blocks >= written && blocks <= written + 16, "{blocks} dirty blocks for {written} written");
    assert!(wire * 10 <= dirty * 11, "{wire} bytes sent for {dirty} dirty bytes (over 1.1×)");
    w.wait_point_after(VM, unix_now_ms(), "a point after the catch-up");
    w.assert_point_matches_primary(VM, "latest");
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(!log.contains("resynchronising:"), "a full resync ran");
    assert!(files_ending(&folder, ".dirty").is_empty(), "the bitmap is gone once caught up");
}
