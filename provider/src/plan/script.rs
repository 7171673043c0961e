//! A plan's scripted actions: run on the provider host with a timeout and the plan's
//! environment, their output (stdout, then stderr) kept in the step's detail, at most
//! [`MAX_OUTPUT`] bytes of it.
//!
//! Environment: `SITERECOVERY_PLAN`, `SITERECOVERY_GROUP` (the group it runs after, 0
//! before the first), `SITERECOVERY_FAILOVER_TYPE` (test, planned, unplanned) and
//! `SITERECOVERY_IP_CHANGES` (one line `VM nicN OLD_IP NEW_IP` per static NIC of the
//! VMs failed over so far; `-` for an old address not known).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use siterecovery_proto::model::VmName;

use crate::failover::FailoverType;
use crate::relationship::RelationshipRecord;

/// Script output kept in a step's detail.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// Why a script did not succeed. The text is the step's detail; its first line goes
/// into the plan's error.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The program could not be started (missing, not executable).
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Its output could not be read, or waiting for it failed.
    #[error("{path}: {source}")]
    Wait {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// It ran longer than its timeout and was killed.
    #[error("{path} timed out after {secs}s and was killed")]
    TimedOut { path: String, secs: u64 },
    /// It exited non-zero (or on a signal); `output` is what it wrote.
    #[error("{path} failed ({status}) after {took}\n{output}")]
    Failed { path: String, status: std::process::ExitStatus, took: String, output: String },
}

/// The environment of a script that runs after group `group` (0: before the first).
pub fn environment(plan: &str, group: u32, kind: FailoverType, ip_changes: String) -> Vec<(&'static str, String)> {
    vec![
        ("SITERECOVERY_PLAN", plan.to_owned()),
        ("SITERECOVERY_GROUP", group.to_string()),
        ("SITERECOVERY_FAILOVER_TYPE", kind.as_str().to_owned()),
        ("SITERECOVERY_IP_CHANGES", ip_changes),
    ]
}

/// `VM nicN OLD NEW` lines of the static NICs of the VMs in `done`.
pub fn ip_changes(rels: &[RelationshipRecord], done: &HashSet<VmName>) -> String {
    let mut out = String::new();
    for r in rels.iter().filter(|r| done.contains(r.vm.as_str())) {
        for a in r.addresses.iter().filter(|a| !a.dhcp && !a.target_ip.is_empty()) {
            let old = if a.source_ip.is_empty() { "-" } else { &a.source_ip };
            out.push_str(&format!("{} nic{} {old} {}\n", r.vm, a.nic, a.target_ip));
        }
    }
    out
}

/// Truncates to at most `max` bytes on a char boundary, saying so.
pub fn truncate_output(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[output truncated to {} KiB]", &s[..end], max / 1024)
}

/// Runs the script at `path`; the step's detail when it exits 0.
pub async fn run_script(path: &str, env: &[(&str, String)], timeout: Duration) -> Result<String, ScriptError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(path);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // A timed-out script must not outlive its step.
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| ScriptError::Spawn { path: path.to_owned(), source })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(source)) => return Err(ScriptError::Wait { path: path.to_owned(), source }),
        Err(_) => return Err(ScriptError::TimedOut { path: path.to_owned(), secs: timeout.as_secs() }),
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        text.push_str("\n[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let output = truncate_output(&text, MAX_OUTPUT);
    let took = format!("{:.1}s", started.elapsed().as_secs_f64());
    if out.status.success() {
        Ok(format!("exit status 0 after {took}\n{output}"))
    } else {
        Err(ScriptError::Failed { path: path.to_owned(), status: out.status, took, output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(40_000);
        let t = truncate_output(&long, MAX_OUTPUT);
        assert!(t.len() < MAX_OUTPUT + 64 && t.ends_with("[output truncated to 64 KiB]"));
        assert_eq!(truncate_output("short", MAX_OUTPUT), "short");
    }

    #[tokio::test]
    async fn scripts_run_with_env_and_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok.sh");
        std::fs::write(&ok, "#!/bin/sh\necho plan=$SITERECOVERY_PLAN\necho oops >&2\n").expect("write");
        let slow = dir.path().join("slow.sh");
        std::fs::write(&slow, "#!/bin/sh\nsleep 5\n").expect("write");
        let bad = dir.path().join("bad.sh");
        std::fs::write(&bad, "#!/bin/sh\necho broken\nexit 3\n").expect("write");
        for p in [&ok, &slow, &bad] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let env = [("SITERECOVERY_PLAN", "dc".to_string())];
        let out = run_script(ok.to_str().expect("path"), &env, Duration::from_secs(5)).await.expect("ok");
        assert!(out.contains("plan=dc") && out.contains("[stderr]\noops"), "{out}");
        let e = run_script(slow.to_str().expect("path"), &env, Duration::from_millis(200)).await.expect_err("slow");
        assert!(matches!(e, ScriptError::TimedOut { .. }) && e.to_string().contains("timed out"), "{e}");
        let e = run_script(bad.to_str().expect("path"), &env, Duration::from_secs(5)).await.expect_err("bad");
        let e = e.to_string();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let e = run_script("/nonexistent/x.sh", &env, Duration::from_secs(5)).await.expect_err("missing");
        assert!(matches!(e, ScriptError::Spawn { .. }), "{e}");
    }
}
