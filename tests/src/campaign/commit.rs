//! After an unplanned failover: `failover change-point` or `failover commit` with the
//! replica host armed to crash at one of their failpoints, the agent restarted, the
//! operation finished (by the restart's roll-forward, or run again), and the VM's disk
//! checked against the point it must now hold.

use serde_json::Value;

use super::plan::Host;
use super::run::{Scenario, VM, image_of, point_image};
use crate::cli::{EVENT_TIMEOUT, JOB_TIMEOUT, job_from};
use crate::output::{assert_ok, stdout};
use crate::wait::unix_now_ms;

/// Runs the operation `failpoint` belongs to with it armed on hv-b (the VM runs there
/// from `current`, not committed); checks the VM's image. True when the failpoint fired.
pub(super) fn crash_after_failover(s: &mut Scenario, failpoint: &str, current: &Value, points: &[Value]) -> bool {
    let change = failpoint.starts_with("change_point.");
    // The point the VM must hold afterwards: another retained point for change-point,
    // the current one for commit.
    let target = if change {
        let others: Vec<&Value> = points.iter().filter(|p| p["id"] != current["id"]).collect();
        if others.is_empty() { current.clone() } else { (*s.rng.pick(&others)).clone() }
    } else {
        current.clone()
    };
    let id = target["id"].as_str().expect("point id").to_owned();
    let want = if change { point_image(&s.w, &target) } else { Vec::new() };
    let before_commit = image_of(&s.w, &s.w.uris(VM)[0], "before-commit");

    s.w.b.stop_gracefully();
    s.start_armed(Host::B, failpoint);
    s.w.lab.wait_host_heartbeat_since("hv-b", unix_now_ms());
    let args: Vec<&str> = if change {
        vec!["--json", "failover", "change-point", VM, "--point", &id]
    } else {
        vec!["--json", "failover", "commit", VM]
    };
    let o = s.w.lab.cli(&args);
    assert_ok(&o, &args.join(" "));
    let job = job_from(&o).unwrap_or_else(|| panic!("{} printed no job: {}", args.join(" "), stdout(&o)));
    let job_id = job["id"].as_str().expect("job id").to_owned();
    let hit = s.wait_crash(Host::B, failpoint);
    s.restart(Host::B);
    let done = s.w.lab.wait_job_done(&job_id, JOB_TIMEOUT);
    // Done before the crash or by the restart (the journal rolled it forward), or not:
    // then run it again.
    let is_done = |vm: &Value| {
        if change { vm["failover"]["point_id"] == id.as_str() } else { vm["failover"]["committed"] == true }
    };
    if done["state"] == "succeeded" {
        s.w.wait_vm(VM, &format!("{} shown after its job succeeded", args[2]), EVENT_TIMEOUT, is_done);
    } else if !is_done(&s.w.show(VM)) {
        eprintln!("[campaign] {failpoint}: the first job ended {} without finishing; again", done["state"]);
        let mut again = args.clone();
        again.retain(|a| *a != "--json");
        s.w.wait_job(&again);
    }
    let got = image_of(&s.w, &s.w.uris(VM)[0], "after-crash");
    if change {
        assert!(got == want, "(d) after change-point to {id} (crash at {failpoint}) the VM differs from the point");
    } else {
        assert!(got == before_commit, "(d) the commit (crash at {failpoint}) changed the VM's disk");
        s.w.wait_vm(VM, &format!("committed after the crash at {failpoint}"), EVENT_TIMEOUT, is_done);
    }
    hit
}
