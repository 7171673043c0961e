//! Host hooks with real processes: `--on-vm-start` / `--on-vm-stop` run when a VM's
//! disks start and stop being served (so a hypervisor can be attached), and
//! `--quiesce-hook` runs before an app-consistent recovery point, which is marked as such.

use std::time::Duration;

use serde_json::Value;
use siterecovery_tests::{Lab, World, wait_until};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn vm_hooks_run_and_quiesce_marks_app_consistent_points() {
    let lab = Lab::new("hooks");
    let events = lab.root.join("events.txt");
    let quiesce = lab.root.join("quiesce.txt");
    let on_start = format!("echo start $SITERECOVERY_VM $SITERECOVERY_NBD_URIS >> {}", events.display());
    let on_stop = format!("echo stop $SITERECOVERY_VM >> {}", events.display());
    let hook = format!("echo quiesce $SITERECOVERY_VM >> {}", quiesce.display());
    let w = World::start(lab, &["--on-vm-start", &on_start, "--on-vm-stop", &on_stop, "--quiesce-hook", &hook], &[]);
    w.vm("vm1", &["16M"], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || read(&events).contains("start vm1 nbd+unix:///vm1-disk0?socket=")),
        "on-vm-start hook did not run with the VM and its NBD URI: {:?}",
        read(&events)
    );

    w.pair("app", &["--app-consistent-every", "2s"]);
    w.protect("vm1");
    let mut points = Value::Null;
    // Every 2 s a point follows the quiesce hook (app-consistent); the 1 s points in
    // between are crash-consistent only.
    let both = wait_until(Duration::from_secs(30), || {
        points = w.cli_json(&["points", "vm1"]);
        let ps = points.as_array().cloned().unwrap_or_default();
        ps.iter().any(|p| p["app_consistent"] == true) && ps.iter().any(|p| p["app_consistent"] == false)
    });
    assert!(both, "want app-consistent and crash-consistent points: {points}");
    assert!(read(&quiesce).contains("quiesce vm1"), "quiesce hook did not run: {:?}", read(&quiesce));

    w.cli_json(&["vm", "stop", "vm1"]);
    assert!(
        wait_until(Duration::from_secs(10), || read(&events).contains("stop vm1")),
        "on-vm-stop hook did not run: {:?}",
        read(&events)
    );
}
