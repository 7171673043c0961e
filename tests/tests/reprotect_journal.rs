//! Reprotect's adoption crashed at every step, end to end: after an unplanned failover
//! (hv-a killed; the VMs run on hv-b, their former disks stay on hv-a), hv-a is started with one
//! adoption step's failpoint armed (`return(crash)`), `reprotect` is run, hv-a must die
//! by SIGABRT at that failpoint; after a restart without failpoints the adoption is
//! rolled back (a crash before `vm.json` is removed) or finished (after), `reprotect` is
//! run again if the first job failed, and the VM must replicate hv-b → hv-a with a
//! resync that sends only the blocks written on hv-b since the failover — never a full
//! copy — and hv-a's latest point must equal the VM's disk.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test reprotect_journal`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use siterecovery_agent::faults;
use siterecovery_tests::*;

/// Every adoption step, in order.
const ADOPT_POINTS: [&str; 4] = [
    faults::REPROTECT_JOURNAL_WRITTEN,
    faults::REPROTECT_IMAGES_MOVED,
    faults::REPROTECT_REPLICA_CREATED,
    faults::REPROTECT_CONFIG_REMOVED,
];
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const SUB_BLOCK: u64 = 4 << 10;

fn start_a(w: &mut World, failpoints: Option<&str>) {
    let since = unix_now_ms();
    let dir = w.dir("hv-a");
    w.a = match failpoints {
        Some(fp) => w.lab.start_agent_armed("hv-a", &dir, fp, &[]),
        None => w.lab.start_agent_with("hv-a", &dir, &[]),
    };
    w.wait_host_heartbeat_since("hv-a", since);
}

#[test]
fn a_reprotect_crashed_at_any_adoption_step_is_settled_at_restart() {
    let mut w = World::new("reprotect_journal");
    let vms: Vec<String> = (0..ADOPT_POINTS.len()).map(|i| format!("r{i}")).collect();
    for vm in &vms {
        w.vm(vm, &["4M"], &[]);
        w.protect_with_point(vm);
        w.qio_ok(&w.uris(vm)[0], &["write -P 0xa1 0 1M"]);
    }
    let t = unix_now_ms();
    for vm in &vms {
        w.wait_point_after(vm, t, "a point with the writes");
    }
    w.a.kill9();
    w.lab.wait_host("hv-a", "disconnected", Duration::from_secs(30), |h| h["connected"] == false);
    for vm in &vms {
        w.wait_job(&["failover", "unplanned", vm, "--point", "latest"]);
        // One 64 KiB block written on hv-b: the one block the resync must send.
        let uri_b = w.uris(vm)[0].clone();
        assert!(uri_b.contains(&w.dir("hv-b").display().to_string()), "{vm} is not on hv-b: {uri_b}");
        w.qio_ok(&uri_b, &["write -P 0xc3 2M 64k"]);
    }

    for (i, (vm, fp)) in vms.iter().zip(ADOPT_POINTS).enumerate() {
        if i > 0 {
            w.a.stop_gracefully();
        }
        start_a(&mut w, Some(&format!("{fp}=1*return(crash)")));
        let o = w.lab.cli(&["--json", "reprotect", vm]);
        assert_ok(&o, &format!("reprotect {vm}"));
        let job = job_from(&o).unwrap_or_else(|| panic!("reprotect {vm} printed no job: {}", stdout(&o)));
        let job_id = job["id"].as_str().expect("job id").to_owned();
        let status = w.a.wait_exit(Duration::from_secs(30));
        let log = std::fs::read_to_string(&w.a.log).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.signal() == Some(nix::libc::SIGABRT)),
            "{fp}: hv-a did not abort at the failpoint ({status:?})"
        );
        assert!(log.contains(&format!("failpoint {fp}: crash")), "{fp}: the crash was not at the failpoint");
        start_a(&mut w, None);
        let a_folder = w.vm_dir("hv-a", vm);
        let r_folder = w.replica_dir("hv-a", vm);
        let done = w.lab.wait_job_done(&job_id, JOB_TIMEOUT);
        // Settled at the restart: rolled back (the VM's folder and images are back, no
        // replica) or finished (no VM folder, a replica holding every image).
        let rolled_back = a_folder.join("vm.json").exists();
        if rolled_back {
            assert!(!r_folder.exists(), "{fp}: rolled back but the replica folder {} is left", r_folder.display());
        } else {
            assert!(!a_folder.exists(), "{fp}: finished but the VM folder {} is left", a_folder.display());
            assert!(r_folder.join("replica.json").exists(), "{fp}: finished, but the replica has no state");
        }
        eprintln!(
            "[reprotect] {fp}: adoption {} at restart; first job {}",
            if rolled_back { "rolled back" } else { "finished" },
            done["state"]
        );
        let job = if done["state"] == "succeeded" { done } else { w.wait_job(&["reprotect", vm]) };
        let (compared, sent) = job_resync_figures(&job);
        eprintln!("[reprotect] {fp}: resync {sent} sub-blocks sent of {compared} blocks compared");
        assert_eq!(compared, 4 * MIB / BLOCK, "{fp}: every block is compared");
        assert_eq!(sent, BLOCK / SUB_BLOCK, "{fp}: only the block written on hv-b travels (no full copy)");
        w.wait_vm(vm, "replicating from hv-b to hv-a", EVENT_TIMEOUT, |v| {
            v["host"] == "hv-b"
                && v["replication"]["state"] == "replicating"
                && v["replication"]["replica_host"] == "hv-a"
        });
        w.wait_point_after(vm, unix_now_ms(), "a point on hv-a");
        let exported = w.export(vm, "latest");
        assert!(w.same_image(&exported[0], &w.uris(vm)[0]), "{fp}: hv-a's replica of {vm} differs from the VM");
        assert_ok(&w.lab.cli(&["point", "unexport", vm]), "point unexport");
    }
}
