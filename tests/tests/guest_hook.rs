//! The QEMU hook with a real Linux guest (`siterecovery_tests::guest`): the agent's
//! `--on-vm-start/--on-vm-stop` run `siterecovery-qemu-hook`, which boots the guest
//! (TCG) on the VM's NBD export; planned failover powers it down over QMP (ACPI) at
//! the primary and boots it at the secondary, where its files are intact and its ext4
//! is clean.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test guest_hook`.

use std::time::{Duration, Instant};

use siterecovery_tests::guest::{Guest, QemuReaper, Serial, e2fsck, qemu_pid};
use siterecovery_tests::*;

const BOOT: Duration = Duration::from_secs(120);

/// `-m` and `-smp` of the QEMU running in a VM folder.
fn qemu_machine(folder: &std::path::Path) -> (String, String) {
    let pid = qemu_pid(folder).unwrap_or_else(|| panic!("no QEMU runs in {}", folder.display()));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let after =
        |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
    (after("-m"), after("-smp"))
}

#[test]
fn hook_boots_the_guest_and_planned_failover_moves_it_cleanly() {
    let g = Guest::get();
    let lab = Lab::new("guest_hook");
    let (start, stop) = (g.on_start(5), Guest::on_stop(30));
    let flags = ["--on-vm-start", start.as_str(), "--on-vm-stop", stop.as_str()];
    let w = World::start(lab, &flags, &flags);
    let (dir_a, dir_b) = (w.vm_dir("hv-a", "vm1"), w.vm_dir("hv-b", "vm1"));
    let _reaper = QemuReaper::new(&[dir_a.clone(), dir_b.clone()]);
    w.pair("fast", &[]);
    let t = Instant::now();
    w.cli_json(&[
        "vm", "create", "--host", "hv-a", "--name", "vm1", "--disk", "64M", "--memory", "192M", "--cpus", "2",
    ]);
    let (serial_a, serial_b) = (Serial::of(&dir_a), Serial::of(&dir_b));
    serial_a.wait_for("WROTE 5", BOOT);
    eprintln!("[guest] booted at hv-a, formatted, wrote 5 files in {:?}", t.elapsed());
    let reports = serial_a.reports();
    assert!(reports.iter().any(|r| r == "FORMATTED"), "{reports:?}");
    assert!(
        reports.iter().any(|r| r.starts_with("POWERBUTTON-WATCHED")),
        "no ACPI power button in the guest: {reports:?}"
    );
    assert_eq!(qemu_machine(&dir_a), ("192M".into(), "2".into()), "QEMU at hv-a");

    w.protect_with_point("vm1");
    let t = Instant::now();
    let job = w.wait_job(&["failover", "planned", "vm1"]);
    eprintln!("[guest] planned failover took {:?}", t.elapsed());
    assert_eq!(step(&job, "Commit")["state"], "succeeded", "{job}");
    // The guest at hv-a powered off on the ACPI request, its file system unmounted.
    let reports = serial_a.reports();
    assert!(reports.iter().any(|r| r == "UNMOUNTED"), "the guest at hv-a did not unmount cleanly: {reports:?}");
    assert!(qemu_pid(&dir_a).is_none(), "QEMU of vm1 still runs at hv-a");

    // At hv-b: booted by the hook, clean file system, every file there.
    let t = Instant::now();
    serial_b.wait_for("WROTE 5", BOOT);
    eprintln!("[guest] booted at hv-b, checked and wrote 5 more in {:?}", t.elapsed());
    let reports = serial_b.reports();
    assert!(reports.iter().any(|r| r == "BOOT 2"), "{reports:?}");
    assert!(reports.iter().any(|r| r == "FSCK 0"), "e2fsck -fn in the guest at hv-b: {reports:?}");
    // The machine settings travelled with the replica.
    assert_eq!(qemu_machine(&dir_b), ("192M".into(), "2".into()), "QEMU at hv-b");
    let checked = serial_b.checked();
    for i in 1..=5 {
        assert_eq!(checked.get(&format!("b1-{i}")), Some(&true), "file b1-{i} at hv-b: {checked:?}");
    }

    // Stopped at hv-b (ACPI again), its committed image passes e2fsck on the host.
    w.cli_json(&["vm", "stop", "vm1"]);
    assert!(
        serial_b.reports().iter().any(|r| r == "UNMOUNTED"),
        "the guest at hv-b did not unmount: {:?}",
        serial_b.reports()
    );
    assert!(qemu_pid(&dir_b).is_none(), "QEMU of vm1 still runs at hv-b after vm stop");
    let (rc, out) = e2fsck(&dir_b.join("disk0.img"));
    assert_eq!(rc, 0, "e2fsck -fn of vm1's disk at hv-b:\n{out}");
    let vm = w.show("vm1");
    assert_eq!(vm["machine"]["memory_bytes"], 192u64 << 20, "{vm}");
    assert_eq!(vm["machine"]["cpus"], 2, "{vm}");
}

/// The hook's refusals: their exit codes and messages on stderr (no guest needed).
#[test]
fn hook_errors_have_clear_messages_and_exit_codes() {
    let w = World::new("hook_errors");
    w.vm("vm1", &["16M"], &[]);
    let folder = w.vm_dir("hv-a", "vm1");
    let hook = bin("siterecovery-qemu-hook");
    let run = |args: &[&str], folder: &std::path::Path| {
        let mut c = std::process::Command::new(&hook);
        c.args(args)
            .env("SITERECOVERY_VM_FOLDER", folder)
            .env("SITERECOVERY_VM", "vm1")
            .env_remove("SITERECOVERY_NBD_URIS");
        w.lab.run(&mut c)
    };
    let o = run(&["start", "--qemu", "/nonexistent/qemu-system-x86_64"], &folder);
    assert_exit(&o, 3, "start with QEMU missing");
    assert!(stderr(&o).contains("QEMU not found"), "{}", stderr(&o));
    let o = run(&["start", "--vm", "vm2"], &folder);
    assert_exit(&o, 2, "start naming another VM");
    let o = run(&["start"], &w.lab.root.join("no-such-folder"));
    assert_exit(&o, 2, "start without vm.json");
    // Nothing runs: stop has nothing to do.
    let o = run(&["stop", "--grace", "1"], &folder);
    assert_exit(&o, 0, "stop without QEMU");
    assert!(stdout(&o).contains("NotRunning"), "{}", stdout(&o));
}
