//! The README's first command: `provider lab --demo` walks the whole journey with real
//! processes (vault, provider, two agents, a VM written through NBD, protected, test
//! failover, planned failover with reverse replication, failback) and checks the data.

use std::process::Command;
use std::time::Duration;

use siterecovery_tests::{Lab, bin, stderr, stdout};

#[test]
fn lab_demo_walks_the_journey_and_keeps_every_write() {
    // A lab for its temp dir, transcript and deadline; `provider lab` starts the rest.
    let lab = Lab::new("lab_demo");
    let lab_dir = lab.root.join("lab");
    // Bounded: the lab exits by itself once the journey is done.
    let out = lab.run_timeout(
        Command::new(bin("provider")).args(["lab", "--exit-when-ready", "--demo", "--dir"]).arg(&lab_dir),
        Duration::from_secs(240),
    );
    let (stdout, stderr) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "lab failed ({}):\n{stdout}\n{stderr}", out.status);
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
