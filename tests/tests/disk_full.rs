//! Disk full on the replica host: hv-b's data dir on a small tmpfs the test mounts,
//! filled so the next point does not fit. Health must go Critical naming the lack of
//! space, the replica agent must stay up, the latest point must still read as before
//! (no torn point), and once space is freed replication resumes by itself and the
//! replica equals the primary.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test disk_full`.

use siterecovery_tests::*;

const MIB: u64 = 1 << 20;
const VM: &str = "vm1";

fn names_no_space(r: &serde_json::Value) -> bool {
    r["health_reasons"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or_default().to_lowercase().contains("no space")))
}

#[test]
fn a_point_that_does_not_fit_on_the_replica_is_critical_then_resumes_when_space_is_freed() {
    let lab = Lab::new("disk_full");
    let fs = Tmpfs::mount(&lab.host_slot("hv-b").dir, "160m");
    let mut w = World::start(lab, &[], &[]);
    w.pair("fast", &[]);
    w.vm(VM, &["64M"], &[]);
    let uri = w.uris(VM)[0].clone();
    w.qio_ok(&uri, &["write -P 0x11 0 8M"]);
    w.protect_with_point(VM);
    let before = w.points(VM).last().cloned().expect("a point");

    // Leave 4 MiB on hv-b; the next interval carries 16 MiB of new data.
    let filler = fs.dir.join("filler");
    fs.fill(&filler, 4 * MIB);
    w.qio_ok(&uri, &["write -P 0x22 8M 16M"]);
    let r = w.wait_replication(VM, "health Critical naming no space", EVENT_TIMEOUT, |r| {
        r["health"] == "Critical" && names_no_space(r)
    });
    eprintln!("[disk_full] {r}");
    assert!(w.b.is_running(), "the replica agent exited on a full disk");

    // No torn point: the latest point is still the one before, and reads as before.
    let latest = w.points(VM).last().cloned().expect("a point");
    assert_eq!(latest["seq"], before["seq"], "a point was made that cannot have fit: {latest}");
    let exported = w.export(VM, "latest");
    assert!(w.reads(&exported[0], &["read -P 0x11 0 8M", "read -P 0 8M 16M"]), "the latest point changed");
    assert_ok(&w.cli(&["point", "unexport", VM]), "point unexport");

    // Space freed: replication resumes by itself (the retry backoff), replica = primary.
    std::fs::remove_file(&filler).expect("remove filler");
    let freed = unix_now_ms();
    w.wait_point_after(VM, freed, "a point after space was freed");
    w.wait_replication(VM, "health back from Critical", EVENT_TIMEOUT, |r| r["health"] != "Critical");
    w.assert_point_matches_primary(VM, "latest");
    assert!(w.b.is_running(), "the replica agent exited");
    w.b.stop_gracefully();
}
