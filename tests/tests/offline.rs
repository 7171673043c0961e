//! Offline initial replication end to end, with real processes: a provider serving with
//! `--test-intervals`, primary host `hv-a` (gold-a) and replica host `hv-b` (gold-b)
//! paired with a 1 s policy created with `--initial offline`.
//!
//! `protect vm1 --export-dir DIR` exports the initial copy on hv-a and the job waits in
//! "Waiting for import" (also across a provider restart); importing the export of
//! another relationship or a damaged export is refused; `protect-import vm1 --dir DIR`
//! imports it on hv-b, then only the writes made after the export travel over the
//! network, and the replica's latest point equals the primary (`qemu-img compare`).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test offline`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use siterecovery_tests::*;

const MIB: u64 = 1 << 20;

/// `protect VM --export-dir DIR` (no --wait): the job id.
fn protect_offline(lab: &Lab, vm: &str, dir: &Path) -> String {
    let v = lab.cli_json(&["protect", vm, "--export-dir", dir.to_str().expect("utf-8")]);
    v["id"].as_str().expect("job id").to_owned()
}

/// `protect-import VM --dir DIR --wait`.
fn import(lab: &Lab, vm: &str, dir: &Path) -> std::process::Output {
    lab.cli_long(&["protect-import", vm, "--dir", dir.to_str().expect("utf-8"), "--wait"])
}

#[test]
fn offline_export_import_then_only_later_writes_travel() {
    let mut w = World::unpaired("offline_export_import", &[], &[]);
    w.pair("off", &["--initial", "offline"]);
    w.vm("vm1", &["64M"], &[]);
    w.vm("vm2", &["16M"], &[]);
    let lab = &w.lab;
    let uri1 = lab.uris("vm1")[0].clone();
    let uri2 = lab.uris("vm2")[0].clone();

    // 16 MiB before the export: it travels on "disk", not over the network.
    let before = 16 * MIB;
    lab.qio_ok(&uri1, &["write -P 0x11 0 16M"]);
    lab.qio_ok(&uri2, &["write -P 0x44 1M 2M"]);

    // Offline policy: --export-dir is required.
    let o = lab.cli(&["protect", "vm1"]);
    assert_fails_saying(&o, &["--export-dir", "offline"], "protect without --export-dir");

    let exp1 = lab.root.join("exp1");
    let exp2 = lab.root.join("exp2");
    let job1 = protect_offline(lab, "vm1", &exp1);
    let job2 = protect_offline(lab, "vm2", &exp2);
    let j = lab.wait_step(&job1, "Waiting for import", "running");
    assert_eq!(j["state"], "running", "{j:#}");
    let detail = step(&j, "Export the initial copy")["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains(exp1.to_str().expect("utf-8")) && detail.contains("16"), "export detail: {detail}");
    lab.wait_step(&job2, "Waiting for import", "running");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(exp1.join("manifest.json")).expect("manifest")).expect("json");
    let exported = manifest["disks"][0]["copied_bytes"].as_u64().expect("copied_bytes");
    assert!(exported >= before, "exported {exported} bytes, wrote {before}");
    assert!(std::fs::metadata(exp1.join("disk0.img")).expect("image").len() == 64 * MIB);

    // Writes after the export: these, and only these, go over the network.
    lab.qio_ok(&uri1, &["write -P 0x22 40M 1M"]);
    lab.qio_ok(&uri1, &["write -P 0x33 0 256K"]);

    // Nothing is shipped before the import; the replica waits (for a while, it stays so).
    let mut r = Value::Null;
    let waits = holds_for(Duration::from_secs(3), || {
        r = lab.replication("vm1");
        r["state"].as_str().unwrap_or_default().contains("waiting")
            && r["last_point_id"].as_str().unwrap_or_default().is_empty()
    });
    assert!(waits, "before import, not waiting or a point already: {r}");

    // A provider restart keeps the job waiting (resumed, not failed).
    w.stop_provider();
    w.start_provider();
    let lab = &w.lab;
    lab.wait_host_connected("hv-a");
    lab.wait_host_connected("hv-b");
    let j = lab.job(&job1);
    assert_eq!(j["state"], "running", "after a provider restart: {j:#}");
    assert_eq!(step(&j, "Waiting for import")["state"], "running", "{j:#}");

    // The export of another relationship is refused.
    let o = import(lab, "vm1", &exp2);
    assert_fails_saying(&o, &["refusing to import"], "import of vm2's export for vm1");
    // A damaged export is refused (checksum), then imports once repaired.
    let img2 = exp2.join("disk0.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img2).expect("open export");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 2 * MIB).expect("read");
    f.write_all_at(&[b[0] ^ 0xff], 2 * MIB).expect("damage");
    let o = import(lab, "vm2", &exp2);
    assert_fails_saying(&o, &["checksum mismatch"], "import of a damaged export");
    f.write_all_at(&b, 2 * MIB).expect("repair");
    assert_ok(&import(lab, "vm2", &exp2), "protect-import vm2 (repaired)");

    // The import: the job goes on and initial replication completes.
    let o = import(lab, "vm1", &exp1);
    assert_ok(&o, "protect-import vm1");
    let j = lab.job(&job1);
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert!(step(&j, "Waiting for import")["detail"].as_str().unwrap_or_default().contains("imported"), "{j:#}");

    let mut r = Value::Null;
    let ok = wait_until(EVENT_TIMEOUT, || {
        r = lab.replication("vm1");
        r["state"] == "replicating" && !r["last_point_id"].as_str().unwrap_or_default().is_empty()
    });
    if !ok {
        lab.dump_logs();
        panic!("vm1 not replicating with a point after the import: {r}");
    }
    // A point after the last write holds everything: the replica equals the primary.
    let done = unix_now_ms();
    assert!(
        wait_until(EVENT_TIMEOUT, || lab.replication("vm1")["last_point_unix_ms"].as_i64().unwrap_or(0) > done),
        "no point after the writes"
    );
    let o = lab.cli(&["point", "export", "vm1", "--point", "latest"]);
    assert_ok(&o, "point export");
    let point = stdout(&o).split_whitespace().next().expect("uri").to_owned();
    assert!(lab.same_image(&point, &uri1), "the replica's latest point differs from the primary");
    assert_ok(&lab.cli(&["point", "unexport", "vm1"]), "point unexport");

    let wire = lab.replication("vm1")["bytes_replicated"].as_u64().unwrap_or(u64::MAX);
    eprintln!("[offline] exported {exported} bytes (wrote {before} before the export); {wire} bytes over the network");
    assert!(wire < 4 * MIB, "{wire} bytes over the network: the initial copy travelled?");
    assert!(wire * 4 < before, "network bytes {wire} not far below the {before} bytes written before the export");

    // vm2 replicates too, with its export.
    let ok = wait_until(EVENT_TIMEOUT, || lab.replication("vm2")["state"] == "replicating");
    assert!(ok, "vm2 not replicating: {}", lab.replication("vm2"));
}
