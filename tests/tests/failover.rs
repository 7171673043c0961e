//! The failover lifecycle end to end, with real processes: a provider serving with
//! `--test-intervals`, a primary host `hv-a` (site primary, cloud gold-a) and a replica
//! host `hv-b` (site secondary, cloud gold-b), a 1 s policy, VMs written and read by the
//! real `qemu-io` through the agents' NBD exports, and `qemu-img compare`.
//!
//! What is covered: planned failover while `qemu-io` writes until the stop (no
//! acknowledged write lost, then reverse replication); unplanned failover with the
//! primary agent killed, change-point and commit; test failover (replication goes on,
//! writes stay in the test VM, cleanup leaves nothing behind); the bytes reverse
//! replication sends and failback; IP addresses after failover and in a plan script;
//! recovery plan order, script output and a failing script; local failover on the agent
//! with the provider down; reprotect after an unplanned failover (only the differing
//! blocks travel back to the former primary).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test failover`.

use std::time::{Duration, Instant};

use serde_json::Value;
use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
/// Write size of the tests ([`AckWriter`]'s), and the agent's resync block size
/// (`agent/src/resync.rs`).
const BLOCK: u64 = ACK_BLOCK;
/// Second-level resync sub-block: the unit of the "sent" figure.
const SUB_BLOCK: u64 = 4 << 10;
/// The policy interval (the provider runs with `--test-intervals`).
const INTERVAL_MS: i64 = 1000;

/// Writes 1 MiB of 0xa1 at 0 and waits for point A; then, in a later retention bucket
/// (so A is retained), 1 MiB of 0xb2 at 0 and waits for point B. Returns (A, B).
#[track_caller]
fn point_a_then_b(w: &World, vm: &str, uri: &str) -> (Value, Value) {
    w.qio_ok(uri, &["write -P 0xa1 0 1M"]);
    let p_a = w.wait_point_after(vm, unix_now_ms(), "point A");
    // Buckets are one interval wide with --test-intervals.
    let p_a_ms = p_a["created_unix_ms"].as_i64().unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || unix_now_ms() > p_a_ms + 2 * INTERVAL_MS + 100));
    w.qio_ok(uri, &["write -P 0xb2 0 1M"]);
    let p_b = w.wait_point_after(vm, unix_now_ms(), "point B");
    (p_a, p_b)
}

// ---------------------------------------------------------------------------------
// 1. Planned failover while qemu-io writes until the stop.

#[test]
fn planned_failover_while_writing_loses_no_acknowledged_write() {
    let w = World::new("planned_while_writing");
    w.vm("vm1", &["64M"], &[]);
    let uri_a = w.uris("vm1")[0].clone();
    w.protect_with_point("vm1");
    let writer = AckWriter::start(uri_a.clone(), 64 * MIB, 2, Duration::from_millis(10));
    assert!(wait_until(Duration::from_secs(30), || writer.acked() >= 100), "the writer made no progress");
    let before = writer.acked();
    let started = Instant::now();
    let started_ms = unix_now_ms();
    let job = w.wait_job(&["failover", "planned", "vm1"]);
    let took = started.elapsed();
    // Once the primary VM is stopped its writes are refused: the writer ends on a failure.
    let ended = wait_until(Duration::from_secs(20), || writer.finished());
    let last_call = writer.last_call_ms() - started_ms;
    let (acked, err) = writer.stop();
    eprintln!(
        "[planned] {} writes acknowledged ({before} before the failover started); failover took {took:?}; the writer's last run ended {last_call} ms after the failover started, with {err:?}",
        acked.len()
    );
    assert!(ended, "the writer still writes to hv-a 20 s after the planned failover");
    // It was still writing when the primary stopped (it ends on a refused write, not
    // for lack of free slots).
    assert!(err.is_some(), "the writer ended without a refused write ({} writes)", acked.len());
    assert!(acked.len() as u64 >= before, "acknowledged writes were lost by the writer's bookkeeping");
    assert!(!w.qio_passes(&uri_a, &["write -P 0x99 0 64k"], false), "hv-a still accepts writes to vm1");
    assert_eq!(step(&job, "Commit")["state"], "succeeded", "{job}");

    // Every acknowledged write is on hv-b, read back through vm1's export there.
    let vm = w.show("vm1");
    assert_eq!(vm["host"], "hv-b", "{vm}");
    let uri_b = w.uris("vm1")[0].clone();
    assert!(uri_b.contains(&w.dir("hv-b").display().to_string()), "vm1's disk is not served by hv-b: {uri_b}");
    let mut missing = Vec::new();
    for chunk in acked.chunks(200) {
        let cmds: Vec<String> = chunk.iter().map(|off| format!("read -P {} {off} {BLOCK}", pattern_at(*off))).collect();
        if !w.qio_passes(&uri_b, &cmds, true) {
            // Find which ones (rare path: only on failure).
            for (off, c) in chunk.iter().zip(&cmds) {
                if !w.qio_passes(&uri_b, std::slice::from_ref(c), true) {
                    missing.push(*off);
                }
            }
        }
    }
    assert!(missing.is_empty(), "{} acknowledged writes are not on hv-b, offsets {missing:?}", missing.len());

    // Reverse replication: vm1 replicates hv-b → hv-a.
    let vm = w.wait_vm("vm1", "replicating from hv-b to hv-a", EVENT_TIMEOUT, |v| {
        v["host"] == "hv-b" && v["replication"]["state"] == "replicating" && v["replication"]["replica_host"] == "hv-a"
    });
    eprintln!("[planned] reverse replication: {}", vm["replication"]);
}

// ---------------------------------------------------------------------------------
// 2. Unplanned failover with the primary agent killed; change-point; commit.

#[test]
fn unplanned_failover_change_point_and_commit() {
    let mut w = World::new("unplanned");
    w.vm("vm1", &["16M"], &[]);
    let uri = w.uris("vm1")[0].clone();
    w.protect_with_point("vm1");
    let (p_a, p_b) = point_a_then_b(&w, "vm1", &uri);
    let p_a_id = p_a["id"].as_str().expect("point id").to_owned();
    assert_ne!(p_b["id"], p_a["id"]);
    assert!(w.points("vm1").iter().any(|p| p["id"] == p_a_id.as_str()), "point A was not retained");

    w.a.kill9();
    w.lab.wait_host("hv-a", "disconnected", Duration::from_secs(30), |h| h["connected"] == false);
    let job = w.wait_job(&["failover", "unplanned", "vm1"]);
    eprintln!("[unplanned] {}", step(&job, "Start the VM on the replica host")["detail"]);
    let vm = w.show("vm1");
    assert_eq!(vm["host"], "hv-b", "{vm}");
    assert_eq!(vm["failover"]["kind"], "unplanned", "{vm}");
    assert_eq!(vm["failover"]["committed"], false, "{vm}");
    assert_eq!(vm["replication"]["state"], "failed over (waiting for commit)", "{vm}");
    let uri_b = w.uris("vm1")[0].clone();
    assert!(w.reads(&uri_b, &["read -P 0xb2 0 1M"]), "vm1 on hv-b does not start from the latest point (B)");

    w.wait_job(&["failover", "change-point", "vm1", "--point", &p_a_id]);
    let vm = w.show("vm1");
    assert_eq!(vm["failover"]["point_id"], p_a_id.as_str(), "{vm}");
    let uri_b = w.uris("vm1")[0].clone();
    assert!(w.reads(&uri_b, &["read -P 0xa1 0 1M"]), "after change-point, vm1 does not read point A");
    assert!(!w.reads(&uri_b, &["read -P 0xb2 0 64k"]), "after change-point, vm1 still reads B");
    // Written before the commit: kept by it.
    w.qio_ok(&uri_b, &["write -P 0xc3 2M 1M"]);

    w.wait_job(&["failover", "commit", "vm1"]);
    let vm = w.show("vm1");
    assert_eq!(vm["host"], "hv-b", "{vm}");
    assert_eq!(vm["failover"]["committed"], true, "{vm}");
    assert_eq!(vm["replication"]["state"], "committed", "{vm}");
    let uri_b = w.uris("vm1")[0].clone();
    assert!(w.reads(&uri_b, &["read -P 0xa1 0 1M", "read -P 0xc3 2M 1M"]), "data changed by the commit");
    w.qio_ok(&uri_b, &["write -P 0xd4 4M 1M"]);
    assert!(w.reads(&uri_b, &["read -P 0xd4 4M 1M", "read -P 0xa1 0 1M"]), "vm1 is not writable after commit");
    let pts = w.lab.cli(&["--json", "points", "vm1"]);
    if pts.status.success() {
        let list: Value = serde_json::from_slice(&pts.stdout).expect("points JSON");
        let others: Vec<&Value> =
            list.as_array().map(|a| a.iter().filter(|p| p["id"] != p_a_id.as_str()).collect()).unwrap_or_default();
        assert!(others.is_empty(), "other points still listed after commit: {list}");
    }
    // Refusals after commit.
    let o = w.lab.cli(&["failover", "change-point", "vm1", "--point", &p_a_id]);
    assert_fails_saying(&o, &["commit"], "change-point after commit");
    assert_fails(&w.lab.cli(&["failover", "commit", "vm1"]), "a second commit");
}

// ---------------------------------------------------------------------------------
// 3. Test failover: replication goes on; writes stay in the test VM; cleanup.

#[test]
fn test_failover_keeps_replicating_and_cleans_up() {
    let w = World::new("test_failover");
    w.vm("vm1", &["64M"], &[]);
    let uri = w.uris("vm1")[0].clone();
    w.qio_ok(&uri, &["write -P 0x31 0 4M"]);
    w.protect_with_point("vm1");
    let writer = AckWriter::start(uri.clone(), 32 * MIB, 1, Duration::from_millis(100));
    assert!(wait_until(Duration::from_secs(30), || writer.acked() >= 2), "the writer made no progress");

    let job = w.wait_job(&["failover", "test", "vm1"]);
    eprintln!("[test] {}", step(&job, "Start the test VM on the replica host")["detail"]);
    let test = w.show("vm1-test");
    assert_eq!(test["host"], "hv-b", "{test}");
    assert_eq!(test["failover"]["kind"], "test", "{test}");
    let test_uri = w.uris("vm1-test")[0].clone();
    assert!(w.reads(&test_uri, &["read -P 0x31 0 4M"]), "the test VM does not read the point's data");
    w.qio_ok(&test_uri, &["write -P 0xee 48M 1M"]);
    assert!(w.reads(&test_uri, &["read -P 0xee 48M 1M"]), "the test VM lost its write");
    // One test failover per VM.
    let o = w.lab.cli(&["failover", "test", "vm1"]);
    assert_fails_saying(&o, &["test failover", "cleanup"], "a second test failover");

    // Replication goes on while the writer runs: new points, health Normal.
    let t = unix_now_ms();
    let p1 = w.wait_point_after("vm1", t, "a point during the test failover");
    let p2 = w.wait_point_after("vm1", p1["created_unix_ms"].as_i64().unwrap_or(0), "a second point");
    let r = w.show("vm1")["replication"].clone();
    eprintln!("[test] during the test failover: points {} and {}; replication {r}", p1["id"], p2["id"]);
    assert_eq!(r["state"], "replicating", "{r}");
    assert_eq!(r["health"], "Normal", "{r}");
    assert_eq!(r["test_failover_vm"], "vm1-test", "{r}");
    let lag = r["rpo_lag_ms"].as_i64().unwrap_or(i64::MAX);
    assert!(lag < 10_000, "RPO lag {lag} ms during the test failover");
    let (acked, err) = writer.stop();
    assert!(err.is_none(), "the primary refused writes during a test failover: {err:?}");
    assert!(acked.len() >= 4, "the writer barely wrote: {}", acked.len());

    // The test VM's write reached neither the primary nor the replica.
    let p = w.wait_point_after("vm1", unix_now_ms(), "a point after the writer");
    let exported = w.export("vm1", p["id"].as_str().expect("id"));
    assert!(w.reads(&exported[0], &["read -P 0 48M 1M"]), "the test VM's write is in the replica's point");
    assert!(w.same_image(&exported[0], &uri), "the replica's latest point differs from the primary");
    assert_ok(&w.lab.cli(&["point", "unexport", "vm1"]), "point unexport");
    assert!(w.reads(&uri, &["read -P 0 48M 1M"]), "the test VM's write reached the primary");

    w.wait_job(&["failover", "cleanup", "vm1"]);
    let list = w.lab.cli_json(&["vm", "list"]);
    assert!(
        !list.as_array().expect("vm list").iter().any(|v| v["name"] == "vm1-test"),
        "vm1-test still listed: {list}"
    );
    let b = w.dir("hv-b");
    assert!(!b.join("vms").join("vm1-test").exists(), "the test VM's folder is left on hv-b");
    let overlays = files_ending(&b, ".overlay");
    let maps = files_ending(&b, ".overlay.map");
    assert!(overlays.is_empty() && maps.is_empty(), "overlay files left on hv-b: {overlays:?} {maps:?}");
    let r = w.show("vm1")["replication"].clone();
    assert_eq!(r["state"], "replicating", "{r}");
    assert_eq!(r["test_failover_vm"], "", "{r}");
    // A new test failover is allowed again.
    w.wait_job(&["failover", "test", "vm1"]);
    w.wait_job(&["failover", "cleanup", "vm1"]);
}

// ---------------------------------------------------------------------------------
// 4. Reverse replication sends only what the secondary wrote; failback.

#[test]
fn reverse_replication_sends_only_new_blocks_and_failback_matches() {
    let w = World::new("reverse_and_failback");
    let disk = 64 * MIB;
    w.vm("vm1", &["64M"], &[]);
    let uri_a = w.uris("vm1")[0].clone();
    w.qio_ok(&uri_a, &["write -P 0x41 0 8M", "write -P 0x42 40M 2M"]);
    w.protect_with_point("vm1");
    w.wait_point_after("vm1", unix_now_ms(), "a point with the data");

    let job = w.wait_job(&["failover", "planned", "vm1"]);
    let detail = step(&job, "Start reverse replication")["detail"].as_str().unwrap_or_default().to_owned();
    let rev_id = detail
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap_or_else(|| panic!("no reverse replication job in {detail:?}"))
        .to_owned();
    w.wait_vm("vm1", "replicating from hv-b to hv-a", EVENT_TIMEOUT, |v| {
        v["host"] == "hv-b" && v["replication"]["state"] == "replicating" && v["replication"]["replica_host"] == "hv-a"
    });
    let rev = w.wait_job_done(&rev_id, EVENT_TIMEOUT);
    assert_eq!(rev["state"], "succeeded", "reverse replication job: {rev}");
    let (compared, sent) = job_resync_figures(&rev);
    eprintln!(
        "[reverse] initial reverse resync: {sent} sub-blocks of {compared} blocks sent ({} of {} bytes)",
        sent * SUB_BLOCK,
        disk
    );
    assert_eq!(compared, disk / BLOCK, "every block is compared");
    assert!(
        sent * SUB_BLOCK <= disk / 64,
        "the reverse resync sent {sent} sub-blocks: nothing was written since the failover"
    );

    // 10 blocks written on hv-b travel back as a delta.
    let uri_b = w.uris("vm1")[0].clone();
    let before = w.show("vm1")["replication"]["bytes_replicated"].as_u64().unwrap_or(0);
    let cmds: Vec<String> =
        (0..10u64).map(|i| format!("write -P {} {} {BLOCK}", 0x60 + i, (i * 5 + 1) * MIB)).collect();
    assert!(w.qio_passes(&uri_b, &cmds, false), "writes on hv-b");
    let wrote = unix_now_ms();
    w.wait_point_after("vm1", wrote, "a point on hv-a with the writes made on hv-b");
    let written = 10 * BLOCK;
    let mut after = before;
    let counted = wait_until(Duration::from_secs(20), || {
        after = w.show("vm1")["replication"]["bytes_replicated"].as_u64().unwrap_or(0);
        after >= before + written
    });
    let delta = after - before;
    eprintln!("[reverse] {written} bytes written on hv-b; bytes_replicated {before} → {after} (+{delta}); disk {disk}");
    assert!(counted, "bytes_replicated grew by {delta} only, for {written} bytes written");
    assert!(delta < 2 * written, "reverse replication sent {delta} bytes for {written} written");

    // Failback: hv-a ends up identical to hv-b.
    let saved = w.lab.root.join("hv-b-disk0.img");
    let o = w.lab.qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri_b, &saved.display().to_string()]);
    assert_ok(&o, "qemu-img convert of hv-b's disk");
    w.wait_job(&["failover", "planned", "vm1"]);
    let vm = w.wait_vm("vm1", "back on hv-a, replicating to hv-b", EVENT_TIMEOUT, |v| {
        v["host"] == "hv-a" && v["replication"]["state"] == "replicating" && v["replication"]["replica_host"] == "hv-b"
    });
    let uri_a = vm["disks"][0]["nbd_unix_uri"].as_str().expect("uri").to_owned();
    assert!(uri_a.contains(&w.dir("hv-a").display().to_string()), "vm1's disk is not served by hv-a: {uri_a}");
    assert!(w.same_image(&uri_a, &saved.display().to_string()), "after failback hv-a differs from what hv-b had");
    assert!(
        w.reads(&uri_a, &["read -P 0x41 0 1M", "read -P 0x60 1M 64k", "read -P 0x42 40M 1M", "read -P 0x69 46M 64k"]),
        "hv-a lacks data written at either site"
    );
}

// ---------------------------------------------------------------------------------
// 5. IP addresses after failover, and in a plan script.

fn in_dr_pool(ip: &str) -> bool {
    ip.strip_prefix("10.0.0.").and_then(|h| h.parse::<u8>().ok()).is_some_and(|h| (20..=60).contains(&h))
}

#[test]
fn failover_addresses_follow_the_target_pool() {
    let w = World::new("ip_addresses");
    let net = |args: &[&str]| {
        let mut a = vec!["network"];
        a.extend_from_slice(args);
        w.lab.cli_json(&a);
    };
    net(&["create", "--site", "primary", "--name", "prod", "--subnet", "10.0.0.0/24", "--pool", "10.0.0.10-10.0.0.50"]);
    net(&["create", "--site", "secondary", "--name", "dr", "--subnet", "10.0.0.0/24", "--pool", "10.0.0.20-10.0.0.60"]);
    net(&["map", "--source", "prod", "--target", "dr"]);
    w.vm("vmA", &["8M"], &["prod=10.0.0.25", "prod=10.0.0.12", "prod=dhcp"]);
    w.vm("vmB", &["8M"], &["prod=10.0.0.25"]);
    w.protect_with_point("vmA");
    w.protect_with_point("vmB");
    let res_a = w.show("vmA")["replication"]["addresses"].clone();
    let res_b = w.show("vmB")["replication"]["addresses"].clone();
    eprintln!("[ip] reservations vmA {res_a}\n[ip] reservations vmB {res_b}");

    let out = w.lab.root.join("ip-changes.txt");
    let script = w.lab.scripts_dir.join("dns.sh");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$SITERECOVERY_IP_CHANGES\" > {out}\necho \"dns update after group $SITERECOVERY_GROUP\"\n",
            out = out.display()
        ),
    );
    w.lab.cli_json(&["plan", "create", "ips", "--group", "1:vmA,vmB", "--script", "1=dns.sh"]);
    let job = w.wait_job(&["plan", "failover", "ips", "--type", "planned"]);
    assert_eq!(job["state"], "succeeded", "{job}");

    let a = w.show("vmA");
    let b = w.show("vmB");
    eprintln!("[ip] after failover vmA nics {}\n[ip] vmB nics {}", a["nics"], b["nics"]);
    assert_eq!(a["host"], "hv-b", "{a}");
    assert_eq!(b["host"], "hv-b", "{b}");
    let ip = |v: &Value, i: usize| v["nics"][i]["ip"].as_str().unwrap_or_default().to_owned();
    assert_eq!(ip(&a, 0), "10.0.0.25", "kept: inside the target pool and free: {}", a["nics"]);
    let a1 = ip(&a, 1);
    assert!(in_dr_pool(&a1) && a1 != "10.0.0.12", "10.0.0.12 is outside dr's pool: another one, got {a1:?}");
    assert_eq!(a["nics"][2]["dhcp"], true, "DHCP NIC untouched: {}", a["nics"]);
    assert_eq!(ip(&a, 2), "", "DHCP NIC got an address: {}", a["nics"]);
    let b0 = ip(&b, 0);
    assert!(
        in_dr_pool(&b0) && b0 != "10.0.0.25" && b0 != a1,
        "10.0.0.25 is taken by vmA: another free one, got {b0:?}"
    );

    let changes = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("the plan script did not run ({e}): {job}"));
    eprintln!("[ip] SITERECOVERY_IP_CHANGES:\n{changes}");
    let lines: Vec<&str> = changes.lines().filter(|l| !l.trim().is_empty()).collect();
    for want in [
        "vmA nic0 10.0.0.25 10.0.0.25".to_string(),
        format!("vmA nic1 10.0.0.12 {a1}"),
        format!("vmB nic0 10.0.0.25 {b0}"),
    ] {
        assert!(lines.contains(&want.as_str()), "the script did not see {want:?}: {lines:?}");
    }
    assert!(!lines.iter().any(|l| l.contains("nic2")), "a DHCP NIC in the IP changes: {lines:?}");
    let s = step(&job, "After group 1, action 1: script dns.sh");
    assert!(s["detail"].as_str().unwrap_or_default().contains("dns update after group 1"), "{s}");
}

// ---------------------------------------------------------------------------------
// 6. Recovery plan: group order, script output, a failing script.

#[test]
fn recovery_plan_runs_groups_in_order_and_reports_a_failing_script() {
    let w = World::new("recovery_plan");
    for vm in ["v1", "v2", "v3"] {
        w.vm(vm, &["8M"], &[]);
    }
    for vm in ["v1", "v2", "v3"] {
        w.protect_with_point(vm);
    }
    let stamp = w.lab.root.join("stamp.txt");
    let script = w.lab.scripts_dir.join("after1.sh");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\nt=$(date +%s%3N)\necho \"$t $SITERECOVERY_GROUP\" > {}\necho \"group=$SITERECOVERY_GROUP at=$t\"\n",
            stamp.display()
        ),
    );
    w.lab.cli_json(&["plan", "create", "dc", "--group", "1:v1,v2", "--group", "2:v3", "--script", "1=after1.sh"]);
    let job = w.wait_job(&["plan", "failover", "dc", "--type", "test"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let t = |name: &str, field: &str| step(&job, name)[field].as_i64().unwrap_or(0);
    let g1_end = t("Group 1: v1", "ended_unix_ms").max(t("Group 1: v2", "ended_unix_ms"));
    let g2_start = t("Group 2: v3", "started_unix_ms");
    let script_step = "After group 1, action 1: script after1.sh".to_owned();
    eprintln!(
        "[plan] group 1: v1 {}..{}, v2 {}..{}; script {}..{}; group 2: v3 {}..{}",
        t("Group 1: v1", "started_unix_ms"),
        t("Group 1: v1", "ended_unix_ms"),
        t("Group 1: v2", "started_unix_ms"),
        t("Group 1: v2", "ended_unix_ms"),
        t(&script_step, "started_unix_ms"),
        t(&script_step, "ended_unix_ms"),
        g2_start,
        t("Group 2: v3", "ended_unix_ms")
    );
    assert!(g1_end > 0 && g2_start >= g1_end, "group 2 started ({g2_start}) before group 1 ended ({g1_end})");
    let recorded = std::fs::read_to_string(&stamp).expect("the script ran");
    let mut it = recorded.split_whitespace();
    let at: i64 = it.next().and_then(|s| s.parse().ok()).expect("timestamp");
    assert_eq!(it.next(), Some("1"), "SITERECOVERY_GROUP: {recorded}");
    assert!(
        at >= g1_end && at <= g2_start,
        "the script ran at {at}, not between group 1 ({g1_end}) and group 2 ({g2_start})"
    );
    let detail = step(&job, &script_step)["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains(&format!("group=1 at={at}")), "script output not in the job: {detail:?}");
    for vm in ["v1", "v2", "v3"] {
        let v = w.show(&format!("{vm}-test"));
        assert_eq!(v["host"], "hv-b", "{v}");
        w.wait_job(&["failover", "cleanup", vm]);
    }

    // A failing script fails the plan, and the report says so.
    let bad = w.lab.scripts_dir.join("bad.sh");
    write_script(&bad, "#!/bin/sh\necho 'dns server unreachable' >&2\nexit 1\n");
    // A script outside the provider's scripts directory is refused at plan create.
    for outside in [bad.display().to_string(), "../bad.sh".into()] {
        let o = w.cli(&["plan", "create", "outside", "--group", "1:v1", "--script", &format!("1={outside}")]);
        assert_fails_saying(&o, &["create_plan.actions[0].command"], &format!("plan create --script 1={outside}"));
    }
    w.lab.cli_json(&["plan", "create", "bad", "--group", "1:v1", "--script", "1=bad.sh"]);
    let o = w.cli_long(&["--json", "plan", "failover", "bad", "--type", "test", "--wait"]);
    assert_fails(&o, "plan failover with a failing script");
    let job = job_from(&o).unwrap_or_else(|| w.last_job("plan"));
    let job = w.job(job["id"].as_str().expect("job id"));
    eprintln!("[plan] failing script: error {}", job["error"]);
    assert_eq!(job["state"], "failed", "{job}");
    let err = job["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(err.contains("script") && err.contains("bad.sh"), "the plan's error does not name the script: {err}");
    let s = step(&job, "After group 1, action 1: script bad.sh");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["detail"].as_str().unwrap_or_default().contains("dns server unreachable"), "{s}");
    w.wait_job(&["failover", "cleanup", "v1"]);
}

// ---------------------------------------------------------------------------------
// 7. Local failover on the agent with the provider down.

#[test]
fn local_failover_with_the_provider_down() {
    let mut w = World::new("local_failover");
    w.vm("vm1", &["16M"], &[]);
    let uri = w.uris("vm1")[0].clone();
    w.protect_with_point("vm1");
    w.qio_ok(&uri, &["write -P 0x71 0 2M", "write -P 0x72 8M 1M"]);
    let p = w.wait_point_after("vm1", unix_now_ms(), "a point with the data");

    w.stop_provider();
    w.a.kill9();
    let b = w.dir("hv-b");
    let o = w.lab.agent(&["--data-dir", &b.display().to_string(), "failover", "vm1"]);
    assert_ok(&o, "agent failover vm1");
    let text = stdout(&o);
    eprintln!("[local] {text}");
    assert!(text.contains("vm1"), "{text}");
    let uris: Vec<&str> = text.split_whitespace().filter(|w| w.starts_with("nbd")).collect();
    assert!(!uris.is_empty(), "agent failover printed no URI: {text}");
    assert!(w.reads(uris[0], &["read -P 0x71 0 2M", "read -P 0x72 8M 1M"]), "the latest point's data");

    w.start_provider();
    w.lab.wait_host_connected("hv-b");
    let vm = w.wait_vm("vm1", "failed over locally on hv-b", EVENT_TIMEOUT, |v| {
        v["host"] == "hv-b" && v["failover"]["kind"] == "local"
    });
    eprintln!("[local] after the provider's restart: {}", vm["replication"]);
    assert_eq!(vm["replication"]["state"], "failed over (waiting for commit)", "{vm}");
    assert_eq!(vm["failover"]["committed"], false, "{vm}");
    let seq = |id: &str| id.trim_start_matches('p').parse::<u64>().unwrap_or(0);
    let pid = vm["failover"]["point_id"].as_str().unwrap_or_default();
    let p_id = p["id"].as_str().unwrap_or_default();
    assert!(seq(pid) >= seq(p_id), "local failover from point {pid}, older than {p_id} (the latest when it ran): {vm}");
    let job = w.last_job("local");
    assert_eq!(job["state"], "succeeded", "{job}");
    // The provider can finish it: commit keeps the data.
    w.wait_job(&["failover", "commit", "vm1"]);
    let vm = w.show("vm1");
    assert_eq!(vm["replication"]["state"], "committed", "{vm}");
    let uri_b = w.uris("vm1")[0].clone();
    assert!(w.reads(&uri_b, &["read -P 0x71 0 2M", "read -P 0x72 8M 1M"]), "data lost by the commit");
}

// ---------------------------------------------------------------------------------
// 8. Reprotect after an unplanned failover: the former primary comes back, and only
//    the blocks that differ travel (its writes after the chosen point, and the writes
//    made at the secondary).

#[test]
fn reprotect_after_unplanned_failover_sends_only_differing_blocks() {
    let mut w = World::new("reprotect_unplanned");
    let disk = 16 * MIB;
    w.vm("vm1", &["16M"], &[]);
    let uri = w.uris("vm1")[0].clone();
    w.protect_with_point("vm1");
    // Point B has 16 blocks (0xb2) the chosen point A (0xa1) does not.
    let (p_a, _) = point_a_then_b(&w, "vm1", &uri);
    let p_a_id = p_a["id"].as_str().expect("point id").to_owned();
    w.a.kill9();
    w.wait_job(&["failover", "unplanned", "vm1", "--point", &p_a_id]);
    let uri_b = w.uris("vm1")[0].clone();
    assert!(w.reads(&uri_b, &["read -P 0xa1 0 1M"]), "vm1 on hv-b does not read point A");
    // 8 blocks written at the secondary.
    w.qio_ok(&uri_b, &["write -P 0xc3 4M 512k"]);
    w.wait_job(&["failover", "commit", "vm1"]);
    let uri_b = w.uris("vm1")[0].clone();

    let since = unix_now_ms();
    w.a = w.lab.start_agent("hv-a");
    w.lab.wait_host_heartbeat_since("hv-a", since);
    let job = w.wait_job(&["reprotect", "vm1"]);
    let (compared, sent) = job_resync_figures(&job);
    eprintln!(
        "[reprotect] resync of the former primary: {sent} 4 KiB sub-blocks of {compared} blocks sent (expected (16 + 8) × 16)"
    );
    assert_eq!(compared, disk / BLOCK, "every block is compared");
    assert_eq!(sent, (16 + 8) * BLOCK / SUB_BLOCK, "only the blocks that differ travel");
    let vm = w.wait_vm("vm1", "replicating from hv-b to hv-a", EVENT_TIMEOUT, |v| {
        v["host"] == "hv-b" && v["replication"]["state"] == "replicating" && v["replication"]["replica_host"] == "hv-a"
    });
    eprintln!("[reprotect] {}", vm["replication"]);
    w.wait_point_after("vm1", unix_now_ms(), "a point on hv-a");
    let exported = w.export("vm1", "latest");
    assert!(w.same_image(&exported[0], &uri_b), "hv-a's replica differs from vm1 on hv-b after reprotect");
}

#[test]
fn recovery_plan_waits_for_a_manual_action_until_confirmed() {
    let w = World::new("plan_manual");
    for vm in ["m1", "m2"] {
        w.vm(vm, &["8M"], &[]);
        w.protect_with_point(vm);
    }
    w.lab.cli_json(&["plan", "create", "mp", "--group", "1:m1", "--group", "2:m2", "--manual", "1=check the database"]);
    let started = w.lab.cli_json(&["plan", "failover", "mp", "--type", "test"]);
    let id = started["id"].as_str().unwrap_or_else(|| panic!("no job id: {started}")).to_owned();
    let manual = "After group 1, action 1: manual action";
    // The job stops at the manual action: group 2 does not start until it is confirmed.
    let mut job = Value::Null;
    let waiting = wait_until(Duration::from_secs(60), || {
        job = w.lab.cli_json(&["job", "show", &id]);
        step(&job, manual)["state"] == "running"
    });
    assert!(waiting, "the plan never reached its manual action: {job}");
    // A while at the action: nothing may move on by itself.
    let held = holds_for(Duration::from_millis(1500), || {
        job = w.lab.cli_json(&["job", "show", &id]);
        step(&job, manual)["state"] == "running"
            && step(&job, "Group 2: m2")["started_unix_ms"].as_i64().unwrap_or(0) == 0
    });
    assert!(held, "the plan moved on from its manual action before confirm (group 2 ran?): {job}");
    let confirmed_at = unix_now_ms();
    w.lab.cli_json(&["plan", "confirm", &id]);
    let done = w.wait_job_done(&id, Duration::from_secs(60));
    assert_eq!(done["state"], "succeeded", "plan after confirm: {done}");
    let g2 = step(&done, "Group 2: m2")["started_unix_ms"].as_i64().unwrap_or(0);
    assert!(g2 >= confirmed_at - 1000, "group 2 started at {g2}, before the confirmation at {confirmed_at}");
    // A job that is not waiting for anything cannot be confirmed.
    assert_fails(&w.lab.cli(&["plan", "confirm", &id]), "confirm a finished job");
    for vm in ["m1", "m2"] {
        w.wait_job(&["failover", "cleanup", vm]);
    }
}
