//! The README's first command: `provider lab --demo` walks the whole journey with real
//! processes (vault, provider, two agents, a VM written through NBD, protected, test
//! failover, planned failover with reverse replication, failback) and checks the data.

use std::process::Command;
use std::time::Duration;

use siterecovery_tests::bin;

#[test]
fn lab_demo_walks_the_journey_and_keeps_every_write() {
    let dir = tempfile::Builder::new().prefix("srlab").tempdir().expect("tempdir");
    let lab_dir = dir.path().join("lab");
    let mut child = Command::new(bin("provider"))
        .args(["lab", "--exit-when-ready", "--demo", "--dir"])
        .arg(&lab_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the lab");
    // Bounded wait: the lab exits by itself once the journey is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the lab did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "lab failed ({status}):\n{stdout}\n{stderr}");
    for line in [
        "both hosts connected",
        "is identical to the primary",
        "vm1-test runs on hv-b",
        "vm1 on hv-b, replicating to hv-a",
        "vm1 on hv-a, replicating to hv-b",
        "the writes made at both sites are all there",
        "provider stopped (exit status: 0)",
    ] {
        assert!(stdout.contains(line), "lab output lacks {line:?}:\n{stdout}\n{stderr}");
    }
}
