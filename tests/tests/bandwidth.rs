//! Bandwidth control end to end, with real processes (a [`World`]: provider, hv-a,
//! hv-b): a policy limit of 20 MiB/s holds within ±10% over 30 s of an initial copy
//! of random data (measured from the sender's wire counter in `vm show`), and a host
//! limit's window edge lifts the limit in the middle of a copy without restarting the
//! agent (its clock shifted with the hidden test variable so the edge comes soon).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test bandwidth`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
const VM: &str = "vm1";
/// `siterecovery_agent::bandwidth::CLOCK_OFFSET_ENV`.
const CLOCK_OFFSET_ENV: &str = "SITERECOVERY_TEST_BANDWIDTH_CLOCK_OFFSET_S";

/// Fills the first `mib` MiB of `uri` with random data through the real `qemu-img`.
fn fill_random(w: &World, uri: &str, mib: u64) {
    let path = w.lab.root.join("random.bin");
    let o = Command::new("head")
        .args(["-c", &(mib * MIB).to_string(), "/dev/urandom"])
        .output()
        .expect("head /dev/urandom");
    assert!(o.status.success(), "head /dev/urandom");
    std::fs::write(&path, &o.stdout).expect("write random.bin");
    drop(o);
    let p = path.display().to_string();
    assert_ok(
        &w.lab.qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", &p, uri]),
        "qemu-img convert of random data",
    );
    std::fs::remove_file(&path).expect("remove random.bin");
}

fn replication(w: &World) -> Value {
    w.show(VM)["replication"].clone()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

#[test]
fn a_20_mib_policy_limit_holds_within_10_percent_over_30_s() {
    let w = World::unpaired("bandwidth_20m", &[], &[]);
    w.pair("limited", &["--bandwidth", "*=20M"]);
    let policies = w.cli_json(&["policy", "list"]);
    assert_eq!(policies[0]["bandwidth"], "*=20M", "{policies}");
    w.vm(VM, &["720M"], &[]);
    let uri = w.uris(VM).remove(0);
    fill_random(&w, &uri, 704);
    w.cli_json(&["protect", VM]);
    // Start measuring once the copy runs (first bytes on the wire).
    let mut start = None;
    assert!(
        wait_until_every(Duration::from_secs(30), Duration::from_millis(50), || {
            let r = replication(&w);
            let b = u(&r, "bytes_replicated");
            if b > 0 {
                start = Some((Instant::now(), b));
            }
            b > 0
        }),
        "the initial copy did not start"
    );
    let (t0, b0) = start.expect("start");
    let mut shown = Vec::new();
    let mut end = (t0, b0);
    let deadline = t0 + Duration::from_secs(30);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now())));
        let r = replication(&w);
        end = (Instant::now(), u(&r, "bytes_replicated"));
        shown.push((u(&r, "bandwidth_limit"), u(&r, "achieved_bytes_per_sec")));
        assert_eq!(
            r["state"], "initial replication in progress",
            "the copy ended within 30 s: the limit did not hold: {r}"
        );
    }
    let secs = end.0.duration_since(t0).as_secs_f64();
    let rate = (end.1 - b0) as f64 / secs;
    eprintln!("[bandwidth] {} bytes in {secs:.2} s: {:.2} MiB/s", end.1 - b0, rate / MIB as f64);
    let want = 20.0 * MIB as f64;
    assert!((rate - want).abs() <= 0.1 * want, "achieved {:.2} MiB/s, limit 20 MiB/s", rate / MIB as f64);
    assert!(shown.iter().all(|(l, _)| *l == 20 * MIB), "vm show's limit: {shown:?}");
    let achieved: Vec<u64> = shown.iter().skip(4).map(|(_, a)| *a).collect();
    let mean = achieved.iter().sum::<u64>() as f64 / achieved.len().max(1) as f64;
    assert!((mean - want).abs() <= 0.15 * want, "vm show's achieved rate: {achieved:?}");
}

/// Seconds since local midnight now, as `date` (same zone as the agents) says.
fn local_second_of_day() -> u32 {
    let o = Command::new("date").arg("+%H %M %S").output().expect("date");
    let s = String::from_utf8_lossy(&o.stdout);
    let f: Vec<u32> = s.split_whitespace().map(|x| x.trim_start_matches('0').parse().unwrap_or(0)).collect();
    f[0] * 3600 + f[1] * 60 + f[2]
}

fn hm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[test]
fn a_window_edge_lifts_the_host_limit_without_a_restart() {
    let mut w = World::unpaired("bandwidth_window", &[], &[]);
    w.pair("plain", &[]);
    w.vm(VM, &["256M"], &[]);
    let uri = w.uris(VM).remove(0);
    fill_random(&w, &uri, 240);
    // hv-a again, its clock shifted so that it reads HH:MM:40 now: the window of this
    // minute (2 MiB/s) ends in 20 s, then the host is unlimited.
    w.a.stop_gracefully();
    let now = local_second_of_day();
    let offset = 40 - (now % 60) as i64;
    let minute = ((now as i64 + offset).rem_euclid(86_400) / 60) as u32;
    let spec = format!("{}-{}=2M,*=0", hm(minute), if minute == 1439 { "24:00".into() } else { hm(minute + 1) });
    let restarted = Instant::now();
    let dir = w.dir("hv-a");
    w.a = w.lab.start_agent_env("hv-a", &dir, &[(CLOCK_OFFSET_ENV, &offset.to_string())], &["--bandwidth", &spec]);
    w.wait_host_connected("hv-a");
    let pid = w.a.pid();
    w.cli_json(&["protect", VM]);
    // In the window: the limit shows, and the copy crawls.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let r = replication(&w);
            u(&r, "bandwidth_limit") == 2 * MIB && u(&r, "done_bytes") > 0
        }),
        "vm show never showed the 2 MiB/s window ({spec}): {}",
        replication(&w)
    );
    let in_window = restarted.elapsed();
    let r = replication(&w);
    assert!(
        in_window < Duration::from_secs(18) && u(&r, "done_bytes") <= 2 * MIB * (in_window.as_secs() + 2),
        "{in_window:?}: {r}"
    );
    // At the edge (20 s after the restart) the limit goes: the rest (≥ 200 MiB, 100 s at
    // 2 MiB/s) is copied in well under that.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let r = replication(&w);
            r["state"] == "replicating"
        }),
        "the copy did not speed up after the window edge: {}",
        replication(&w)
    );
    let took = restarted.elapsed();
    eprintln!("[bandwidth] copy done {took:?} after the restart (edge at 20 s)");
    assert!(took < Duration::from_secs(70), "{took:?}: the limit stayed after the edge");
    assert!(wait_until(Duration::from_secs(10), || u(&replication(&w), "bandwidth_limit") == 0), "{}", replication(&w));
    assert_eq!(w.a.pid(), pid, "the agent was not restarted");
    assert!(w.a.is_running());
}
