//! Protection and replication end to end, with real processes: a provider serving with
//! `--test-intervals`, a primary host `hv-a` (site primary, cloud gold-a) and a replica
//! host `hv-b` (site secondary, cloud gold-b), VM `vm1` on hv-a written by the real
//! `qemu-io` through the agent's NBD export, and recovery points read back through
//! `point export` with the real `qemu-img compare`.
//!
//! What is covered: protecting a VM while it is written; older points keep their data;
//! `kill -9` of the replica agent (caught mid-apply when possible); a connection cut in
//! the middle of the initial copy (resumed, not restarted); resync on demand and after a
//! damaged HRL log (only differing blocks travel); authorisation between hosts; unprotect.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test protection`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
/// The policy interval (the provider runs with `--test-intervals`).
const INTERVAL_MS: i64 = 1000;
/// The resync block size of the agent (`agent/src/resync.rs`).
const RESYNC_BLOCK: u64 = 64 << 10;
/// Second-level resync sub-block: the unit of the "sent" figure.
const SUB_BLOCK: u64 = 4 << 10;

// ---------------------------------------------------------------------------------
// The world: provider + two hosts + a VM, paired clouds and a fast policy.

/// The VM every test here protects.
const VM: &str = "vm1";

/// A [`World`] (hv-b served with `b_extra`) with gold-a paired with gold-b under policy
/// `fast` (1 s), and `vm1` on hv-a with `disks`.
fn world(test: &str, disks: &[&str], b_extra: &[&str]) -> World {
    let w = World::unpaired(test, &[], b_extra);
    w.pair("fast", &[]);
    w.vm(VM, disks, &[]);
    w
}

/// `replica.json` on hv-b, if readable: its JSON after the agent's 16-byte state-file
/// header (`agent/docs/persist-format.md`).
fn replica_state(w: &World) -> Option<Value> {
    let bytes = std::fs::read(w.replica_dir("hv-b", VM).join("replica.json")).ok()?;
    let json = if bytes.starts_with(b"SRRP") { bytes.get(16..)? } else { &bytes[..] };
    serde_json::from_slice(json).ok()
}

/// Allocated bytes of the files (what the initial copy has to send).
fn allocated(paths: &[PathBuf]) -> u64 {
    paths.iter().map(|p| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)).sum()
}

// ---------------------------------------------------------------------------------
// 1. Protect while writing; the latest point equals the primary; older points keep
//    their data.

#[test]
fn protect_while_writing_then_points_match_the_primary() {
    let w = world("protect_while_writing", &["64M", "32M"], &[]);
    let uris = w.uris(VM);
    w.qio_ok(&uris[0], &["write -P 0x11 0 8M"]);
    let writer = Writer::start(uris.clone(), 256 << 10, 32 * MIB, 8, Duration::from_millis(50));
    assert!(wait_until(Duration::from_secs(20), || writer.rounds() >= 1), "the writer made no progress");
    let finished_before = writer.runs().1;
    w.protect(VM);
    // qemu-io runs that overlapped `protect --wait` (see `Writer::runs`).
    let runs_during = writer.runs().0 - finished_before;
    // Keep writing through a few delta cycles after the initial replication.
    let first = w.wait_point_after(VM, 0, "first point").clone();
    w.wait_point_after(
        VM,
        first["created_unix_ms"].as_i64().unwrap_or(0) + 2 * INTERVAL_MS,
        "delta points while writing",
    );
    let writes = writer.stop();
    let stopped = unix_now_ms();
    eprintln!("[protect] {writes} writes of 256 KiB; {runs_during} qemu-io runs overlapped `protect --wait`");
    assert!(runs_during >= 1, "the writer made no write while protection was being enabled");

    let p_a = w.wait_point_after(VM, stopped, "a point holding the last write");
    let p_a_id = p_a["id"].as_str().expect("point id").to_owned();
    w.assert_point_matches_primary(VM, "latest");
    let r = w.show(VM)["replication"].clone();
    assert_eq!(r["state"], "replicating", "{r}");
    assert_eq!(r["health"], "Normal", "{r}");
    assert!(r["bytes_replicated"].as_u64().unwrap_or(0) > 0, "{r}");

    // Keep the primary's disk0 as of p_a, then overwrite 1 MiB in a later retention
    // bucket (buckets are one interval wide with --test-intervals: p_a stays retained).
    let before = w.lab.root.join("disk0-at-pa.img");
    let o = w.lab.qemu_img(&["convert", "-f", "raw", "-O", "raw", &uris[0], &before.display().to_string()]);
    assert_ok(&o, "qemu-img convert of the primary's disk0");
    let p_a_ms = p_a["created_unix_ms"].as_i64().unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || unix_now_ms() > p_a_ms + 2 * INTERVAL_MS + 100));
    w.qio_ok(&uris[0], &["write -P 0xee 0 1M"]);
    let wrote = unix_now_ms();
    let p_b = w.wait_point_after(VM, wrote, "a point after the overwrite");
    assert_ne!(p_b["id"], p_a["id"]);
    w.assert_point_matches_primary(VM, "latest");

    let pts = w.points(VM);
    assert!(pts.iter().any(|p| p["id"] == p_a_id.as_str()), "point {p_a_id} was not retained: {pts:?}");
    let old = w.export(VM, &p_a_id);
    assert!(!w.same_image(&old[0], &uris[0]), "point {p_a_id} of disk0 shows the overwrite it predates");
    assert!(w.same_image(&old[0], &before.display().to_string()), "point {p_a_id} of disk0 lost its data");
    assert!(w.same_image(&old[1], &uris[1]), "point {p_a_id} of disk1 (unchanged since) differs");
    assert!(!w.qio_passes(&old[0], &["read -P 0xee 0 1M"], true), "the old point reads the new data");
    assert_ok(&w.lab.cli(&["point", "unexport", "vm1"]), "point unexport");
    let new = w.export(VM, "latest");
    assert!(w.qio_passes(&new[0], &["read -P 0xee 0 1M"], true), "the latest point lacks the overwrite");
}

// ---------------------------------------------------------------------------------
// 2. kill -9 of the replica agent while it applies a point.

#[test]
fn replica_agent_killed_mid_apply_comes_back_at_one_point() {
    let mut w = world("replica_kill9", &["128M"], &[]);
    let uris = w.uris(VM);
    w.protect(VM);
    // Bigger writes: 4 MiB each, so applying a point takes a moment (~16 MB/s: below
    // what delta replication sustains here, else the 50% pending rule forces resyncs).
    let writer = Writer::start(uris.clone(), 4 * MIB, 128 * MIB, 1, Duration::from_millis(250));
    let first = w.wait_point_after(VM, 0, "first point");
    w.wait_point_after(VM, first["created_unix_ms"].as_i64().unwrap_or(0) + 2 * INTERVAL_MS, "points under writes");
    // Catch an apply in flight (replica.json says "applying"), else kill at a random moment.
    let random_deadline = Instant::now() + Duration::from_millis(500 + random_u64() % 3000);
    let mut caught = false;
    wait_until_every(Duration::from_secs(10), Duration::from_millis(2), || {
        caught = replica_state(&w).is_some_and(|s| !s["applying"].is_null());
        caught || Instant::now() >= random_deadline
    });
    w.b.kill9();
    let killed = unix_now_ms();
    let applying_at_kill = replica_state(&w).map(|s| s["applying"].clone()).unwrap_or_default();
    eprintln!(
        "[kill9] replica agent killed {} (applying at kill: {applying_at_kill})",
        if caught { "mid-apply" } else { "at a random moment" }
    );

    w.b = w.lab.start_agent("hv-b");
    w.lab.wait_host_heartbeat_since("hv-b", killed);
    // The replica is at exactly one point: no apply is left half done.
    let st = replica_state(&w).expect("replica.json readable after restart");
    assert!(st["applying"].is_null(), "replica.json still applying after restart: {}", st["applying"]);
    // Killed after the "applying" mark: the restart rolls that point forward.
    if let Some(seq) = applying_at_kill["seq"].as_u64() {
        let kept = st["points"].as_array().is_some_and(|ps| ps.iter().any(|p| p["info"]["seq"] == seq));
        assert!(kept, "point seq {seq} was being applied at the kill and is not a point after restart: {st}");
    }
    // Replication resumes by itself: new points, health back to Normal (writes still flow).
    let restarted = unix_now_ms();
    w.wait_point_after(VM, restarted, "a point after the replica agent restarted");
    w.wait_replication(VM, "health Normal after the restart", EVENT_TIMEOUT, |r| {
        r["health"] == "Normal" && r["state"] == "replicating"
    });
    let writes = writer.stop();
    let stopped = unix_now_ms();
    eprintln!("[kill9] {writes} writes of 4 MiB");
    w.wait_point_after(VM, stopped, "a point after the writes stopped");
    let st = replica_state(&w).expect("replica.json");
    assert!(st["applying"].is_null(), "{}", st["applying"]);
    w.assert_point_matches_primary(VM, "latest");
}

// ---------------------------------------------------------------------------------
// 3. Connection cut in the middle of the initial copy: resumed, not restarted.

/// A TCP proxy (primary → replica direction counted) that cuts the first connection
/// that carries the total past `cut_after` bytes, once.
struct Proxy {
    forwarded: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn start(listen: u16, target: u16, cut_after: u64) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", listen)).expect("bind the proxy port");
        let p = Self {
            forwarded: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            cut: Arc::new(AtomicBool::new(false)),
        };
        let (fwd, conns, cut) = (p.forwarded.clone(), p.connections.clone(), p.cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let (fwd, cut) = (fwd.clone(), cut.clone());
                // primary → replica, counted; cut once past the threshold.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, server);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let total = fwd.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total >= cut_after && !cut.swap(true, Ordering::SeqCst) {
                            eprintln!("[proxy] cutting the connection after {total} bytes");
                            break;
                        }
                    }
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                });
                // replica → primary.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        });
        p
    }
}

#[test]
fn initial_copy_resumes_after_a_connection_cut() {
    // hv-b registers the proxy's port as its address and listens for peers elsewhere.
    let real_port = free_port();
    let real = format!("127.0.0.1:{real_port}");
    let w = world("copy_resume", &["256M"], &["--peer-listen", &real]);
    let proxy_port = w.lab.host_slot("hv-b").listen_port;
    let uris = w.uris(VM);
    // 128 MiB written (8 MiB pieces every 16 MiB, with different patterns), so the copy
    // is long enough to be cut in the middle.
    let cmds: Vec<String> = (0..16u64).map(|i| format!("write -P {} {} 8M", i + 1, i * 16 * MIB)).collect();
    w.qio_ok(&uris[0], &cmds);
    let alloc = allocated(&[w.vm_dir("hv-a", VM).join("disk0.img")]);
    assert!(alloc >= 128 * MIB, "disk0 should have 128 MiB allocated, has {alloc}");
    // Cut past 3/4 of the copy: a copy restarted from zero would forward > 1.75x.
    let cut_after = alloc * 3 / 4;
    let proxy = Proxy::start(proxy_port, real_port, cut_after);

    let started = Instant::now();
    w.protect(VM);
    let took = started.elapsed();
    let forwarded = proxy.forwarded.load(Ordering::SeqCst);
    let connections = proxy.connections.load(Ordering::SeqCst);
    eprintln!(
        "[copy] allocated {alloc} bytes ({} MiB); forwarded primary→replica {forwarded} bytes ({:.2}× allocated) over {connections} connections; cut at {cut_after}; protect took {took:?}",
        alloc / MIB,
        forwarded as f64 / alloc as f64
    );
    assert!(proxy.cut.load(Ordering::SeqCst), "the proxy never cut the copy (forwarded {forwarded} bytes)");
    assert!(connections >= 2, "the sender did not reconnect after the cut ({connections} connections)");
    assert!(forwarded >= alloc, "less than the allocated bytes went through the proxy: {forwarded} < {alloc}");
    assert!(
        (forwarded as f64) < 1.5 * alloc as f64,
        "the copy restarted instead of resuming: {forwarded} bytes forwarded for {alloc} allocated"
    );
    let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
    assert!(log.contains("resuming the initial copy"), "hv-a's log does not show a resumed copy");
    w.wait_point_after(VM, 0, "the first point");
    w.assert_point_matches_primary(VM, "latest");
}

// ---------------------------------------------------------------------------------
// 4. Resync: on demand after writes the replica missed, and after a damaged HRL log.

/// Writes one 64 KiB block every `stride` bytes, `count` blocks: exactly `count`
/// resync blocks change.
fn scattered_writes(count: u64, stride: u64, pattern: u8) -> Vec<String> {
    (0..count).map(|i| format!("write -P {pattern} {} {RESYNC_BLOCK}", i * stride)).collect()
}

#[test]
fn resync_on_demand_sends_only_the_changed_blocks() {
    let mut w = world("resync_on_demand", &["64M", "32M"], &[]);
    let uris = w.uris(VM);
    w.qio_ok(&uris[0], &["write -P 0x21 0 16M"]);
    w.protect_with_point(VM);
    w.b.stop_gracefully();
    // 20 blocks of disk0 and 5 of disk1 change while the replica host is down.
    w.qio_ok(&uris[0], &scattered_writes(20, 3 * MIB, 0x5c));
    w.qio_ok(&uris[1], &scattered_writes(5, 5 * MIB, 0x6d));
    let changed = 25u64;
    let disk_blocks = (64 + 32) * MIB / RESYNC_BLOCK;
    // Ask for the resync while the replica is down (so the missed writes cannot travel
    // as a delta first), then bring the replica back: the job finishes.
    let lab = &w.lab;
    let job = std::thread::scope(|s| {
        let t = s.spawn(|| lab.cli_long(&["--json", "resync", VM, "--wait"]));
        let r = w.wait_replication(VM, "resync requested", Duration::from_secs(30), |r| {
            r["state"] == "resync required" || r["state"] == "resynchronising"
        });
        eprintln!("[resync] requested: {r}");
        let b = lab.start_agent("hv-b");
        let o = t.join().expect("resync thread");
        (o, b)
    });
    let (o, b) = job;
    w.b = b;
    assert_ok(&o, "resync vm1 --wait");
    let resync = w.last_job("resync");
    let shown = w.job(resync["id"].as_str().expect("job id"));
    assert_eq!(shown["state"], "succeeded", "{shown}");
    let (compared, sent) = job_resync_figures(&shown);
    eprintln!(
        "[resync] on demand: {sent} of {compared} blocks sent (changed {changed}, disk blocks {disk_blocks}); job {shown}"
    );
    assert_eq!(compared, disk_blocks, "every block of both disks is compared");
    // "sent" counts 4 KiB sub-blocks: every one of a rewritten 64 KiB block differs.
    assert_eq!(sent, changed * RESYNC_BLOCK / SUB_BLOCK, "only the changed blocks travel");
    w.assert_point_matches_primary(VM, "latest");
    let r = w.show(VM)["replication"].clone();
    assert_eq!(r["state"], "replicating", "{r}");
}

/// The sealed (not open: the open one has the highest seq) HRL logs of disk0.
fn sealed_logs(dir: &Path, disk: &str) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{disk}.")) && n.ends_with(".hrl"))
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs.pop();
    logs
}

#[test]
fn damaged_log_triggers_a_resync_of_the_changed_blocks() {
    let mut w = world("resync_corrupt_log", &["64M"], &[]);
    let uris = w.uris(VM);
    w.protect_with_point(VM);
    w.b.stop_gracefully();
    let changed = 24u64;
    w.qio_ok(&uris[0], &scattered_writes(changed, 2 * MIB, 0x7e));
    // The next cycle seals the log holding these writes; shipping it fails (hv-b is down).
    let vm_dir = w.vm_dir("hv-a", VM);
    let mut sealed = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        sealed = sealed_logs(&vm_dir, "disk0")
            .into_iter()
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > changed * RESYNC_BLOCK))
            .collect();
        !sealed.is_empty()
    });
    assert!(ok, "no sealed log holding the writes appeared in {}", vm_dir.display());
    let log = sealed[0].clone();
    let mut bytes = std::fs::read(&log).expect("read the sealed log");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&log, &bytes).expect("damage the sealed log");
    eprintln!("[corrupt] flipped 16 bytes at {mid} of {} ({} bytes)", log.display(), bytes.len());
    w.b = w.lab.start_agent("hv-b");

    // The sender finds the damage when it ships the log, resynchronises, and replicates.
    let log_a = w.a.log.clone();
    let mut figures = None;
    let ok = wait_until(EVENT_TIMEOUT, || {
        let text = std::fs::read_to_string(&log_a).unwrap_or_default();
        figures = text.lines().filter(|l| l.contains("resync done:")).find_map(|l| {
            let (_, rest) = l.split_once("resync done:")?;
            let w: Vec<&str> = rest.split_whitespace().collect();
            // "N of M blocks differed, B bytes sent"
            Some((w.first()?.parse::<u64>().ok()?, w.get(2)?.parse::<u64>().ok()?))
        });
        figures.is_some()
    });
    if !ok {
        w.lab.dump_logs();
        panic!("no resync after the damaged log");
    }
    let (sent, compared) = figures.expect("figures");
    eprintln!("[corrupt] automatic resync: {sent} of {compared} blocks sent (changed {changed})");
    assert_eq!(compared, 64 * MIB / RESYNC_BLOCK, "every block is compared");
    assert_eq!(sent, changed, "only the changed blocks travel");
    w.wait_replication(VM, "replicating after the resync", EVENT_TIMEOUT, |r| r["state"] == "replicating");
    w.assert_point_matches_primary(VM, "latest");
}

// ---------------------------------------------------------------------------------
// 5. Authorisation between hosts.

#[test]
fn only_the_primary_may_use_the_replicas_peer_service() {
    let w = world("peer_authz", &["16M"], &[]);
    w.protect(VM);
    let rel = w.show(VM)["replication"]["relationship_id"].as_str().expect("relationship id").to_owned();
    w.lab.register_agent("hv-c", "secondary", "gold-c");
    let b_addr = format!("127.0.0.1:{}", w.lab.host_slot("hv-b").listen_port);
    let call =
        |host: &str, method: &str, data: &str| w.grpcurl_call(&w.host_tls(host), "peer.proto", data, &b_addr, method);
    let req = format!("{{\"relationship_id\":\"{rel}\"}}");
    // Controls: any host of the vault may ping; the primary may ask for copy progress.
    assert_ok(&call("hv-c", "siterecovery.v1.Peer/Ping", "{}"), "hv-c pings hv-b");
    assert_ok(&call("hv-a", "siterecovery.v1.Peer/CopyProgress", &req), "the primary asks for copy progress");
    // Another host of the vault is not the relationship's primary: PermissionDenied.
    let o = call("hv-c", "siterecovery.v1.Peer/CopyProgress", &req);
    assert_exit(&o, 71, "hv-c asks hv-b for the copy progress of hv-a's relationship");
}

#[test]
fn reregistered_primary_is_refused_and_health_goes_critical() {
    let mut w = world("reregistered_primary", &["16M"], &[]);
    let uris = w.uris(VM);
    w.protect_with_point(VM);
    w.a.stop_gracefully();
    let slot = w.lab.host_slot("hv-a");
    // A registered name registers again only after an operator's `host reset`.
    assert_ok(&w.lab.cli(&["host", "reset", "hv-a"]), "host reset hv-a");
    let o = w.lab.register_at("hv-a", &slot.dir, &w.lab.vault_key, "primary", "gold-a", &["--reregister"]);
    assert_ok(&o, "agent register --reregister hv-a");
    let since = unix_now_ms();
    w.a = w.lab.start_agent("hv-a");
    w.lab.wait_host_heartbeat_since("hv-a", since);
    w.qio_ok(&uris[0], &["write -P 0x33 0 1M"]);
    // The replica refuses the new identity (the relationship names the old host id)...
    let b_log = w.b.log.clone();
    let refused = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&b_log).is_ok_and(|t| t.contains("not the primary"))
    });
    assert!(refused, "hv-b did not refuse the re-registered primary");
    // ...and the sender stops on that authorisation failure: health must say so.
    let r = w.wait_replication(VM, "health Critical on an authorisation failure", Duration::from_secs(30), |r| {
        r["health"] == "Critical"
            && r["health_reasons"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    let t = x.as_str().unwrap_or_default().to_lowercase();
                    t.contains("authori") || t.contains("permission") || t.contains("not the primary")
                })
            })
    });
    eprintln!("[reregister] {r}");
}

// ---------------------------------------------------------------------------------
// 6. Unprotect.

#[test]
fn unprotect_removes_the_replica_and_the_protection_files() {
    let w = world("unprotect", &["16M"], &[]);
    let uris = w.uris(VM);
    w.qio_ok(&uris[0], &["write -P 0x42 0 2M"]);
    w.protect_with_point(VM);
    // An unprotected disk keeps one empty open HRL log (header only): its size now.
    let empty_log = std::fs::read_dir(w.vm_dir("hv-a", VM))
        .expect("VM folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".hrl"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .min()
        .expect("an HRL log in the VM folder");
    assert!(w.replica_dir("hv-b", VM).join("replica.json").is_file());
    assert!(w.vm_dir("hv-a", VM).join("protection.json").is_file());
    let o = w.cli_long(&["unprotect", VM, "--wait"]);
    assert_ok(&o, "unprotect vm1 --wait");
    let gone = wait_until(Duration::from_secs(20), || !w.replica_dir("hv-b", VM).exists());
    assert!(gone, "the replica folder {} is still there", w.replica_dir("hv-b", VM).display());
    // No protection record, no sender state, no log holding records.
    let leftovers: Vec<String> = std::fs::read_dir(w.vm_dir("hv-a", VM))
        .expect("the VM folder stays")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n == "protection.json"
                || n == "replication.json"
                || (n.ends_with(".hrl") && e.metadata().map_or(true, |m| m.len() > empty_log))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.is_empty(), "protection files left in the VM folder: {leftovers:?}");
    let vm = w.show(VM);
    assert_eq!(vm["power_state"], "running", "{vm}");
    let state = vm["replication"]["state"].as_str().unwrap_or("not enabled");
    assert_eq!(state, "not enabled", "{vm}");
    assert!(w.vm_dir("hv-a", VM).join("disk0.img").is_file());
    w.qio_ok(&uris[0], &["write -P 0x43 1M 1M"]);
    assert!(w.qio_passes(&uris[0], &["read -P 0x42 0 1M", "read -P 0x43 1M 1M"], false));
    let pts = w.lab.cli(&["points", "vm1"]);
    assert_fails(&pts, "points of an unprotected VM");
}
