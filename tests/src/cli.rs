//! The operator CLI (`provider --connect ADDR --certs OPDIR ...`) as the tests use it,
//! and the JSON it prints read back: hosts, VMs and their replication, recovery points,
//! jobs and their steps. Every wait polls the CLI with a deadline and, when it runs
//! out, prints the logs and the last thing it saw.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::lab::Lab;
use crate::output::{assert_ok, describe, stdout};
use crate::proc::bin;
use crate::wait::wait_until;

/// Longest wait for a replication event (points, health, states, a job's step).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a `--wait` command may run.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(150);

/// The job JSON a `--json ... --wait` printed (after its progress lines).
pub fn job_from(o: &Output) -> Option<Value> {
    let text = stdout(o);
    let start = text.find('{')?;
    serde_json::from_str(&text[start..]).ok()
}

/// A step of a job by name, if the job has it.
pub fn try_step<'a>(job: &'a Value, name: &str) -> Option<&'a Value> {
    job["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name))
}

/// A step of a job by name; panics when the job has none.
#[track_caller]
pub fn step<'a>(job: &'a Value, name: &str) -> &'a Value {
    try_step(job, name).unwrap_or_else(|| panic!("no step {name:?} in {job}"))
}

/// `(compared, sent)` parsed from "... N blocks compared, M sent ...".
pub fn resync_figures(text: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let num = |w: &str| w.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>().ok();
    let i = words.windows(3).position(|w| w[1] == "blocks" && w[2].starts_with("compared"))?;
    Some((num(words[i])?, num(words.get(i + 3)?)?))
}

/// The first `(compared, sent)` figures in the details of a job's steps.
#[track_caller]
pub fn job_resync_figures(job: &Value) -> (u64, u64) {
    job["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["detail"].as_str())
        .find_map(resync_figures)
        .unwrap_or_else(|| panic!("no block figures in {job}"))
}

/// The array a `--json` list command printed; empty when it failed or printed no array.
fn json_list(o: &Output) -> Vec<Value> {
    if !o.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

impl Lab {
    /// Operator CLI: `provider --connect ADDR --certs OPDIR ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.addr(), &self.opdir, args)
    }

    /// Operator CLI against any address with any certs dir.
    pub fn cli_as(&self, addr: &str, certs: &std::path::Path, args: &[&str]) -> Output {
        self.run(Command::new(bin("provider")).args(["--connect", addr]).arg("--certs").arg(certs).args(args))
    }

    /// The operator CLI with [`JOB_TIMEOUT`] (for `--wait`).
    pub fn cli_long(&self, args: &[&str]) -> Output {
        self.run_timeout(
            Command::new(bin("provider")).args(["--connect", &self.addr()]).arg("--certs").arg(&self.opdir).args(args),
            JOB_TIMEOUT,
        )
    }

    /// Operator CLI with `--json`; panics unless it succeeds and prints JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(&a);
        assert_ok(&o, &format!("provider {}", args.join(" ")));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("provider {} printed no JSON ({e}): {}", args.join(" "), describe(&o)))
    }

    // --- hosts -----------------------------------------------------------------------

    /// `host list --json` as an array (empty when the CLI fails, e.g. while restarting).
    pub fn hosts(&self) -> Vec<Value> {
        json_list(&self.cli(&["--json", "host", "list"]))
    }

    /// Host `name` from `host list --json`.
    pub fn host(&self, name: &str) -> Option<Value> {
        self.hosts().into_iter().find(|h| h["name"] == name)
    }

    /// Waits until `pred` holds for host `name` in `host list --json`; panics after `timeout`.
    #[track_caller]
    pub fn wait_host(&self, name: &str, what: &str, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut last = None;
        let ok = wait_until(timeout, || {
            last = self.host(name);
            last.as_ref().is_some_and(&mut pred)
        });
        if !ok {
            self.dump_logs();
            panic!("host {name}: {what} not seen within {timeout:?}; last seen: {last:?}");
        }
        last.unwrap_or_default()
    }

    /// Waits until host `name` shows as connected.
    #[track_caller]
    pub fn wait_host_connected(&self, name: &str) -> Value {
        self.wait_host(name, "connected", Duration::from_secs(30), |h| h["connected"] == true)
    }

    /// Waits until host `name` is connected with a heartbeat at or after `since_ms`.
    #[track_caller]
    pub fn wait_host_heartbeat_since(&self, name: &str, since_ms: i64) -> Value {
        self.wait_host(name, &format!("connected with a heartbeat after {since_ms}"), Duration::from_secs(30), |h| {
            h["connected"] == true && h["last_heartbeat_unix_ms"].as_i64().is_some_and(|t| t >= since_ms)
        })
    }

    // --- VMs -------------------------------------------------------------------------

    /// `vm show V --json`, `None` while the CLI fails.
    pub fn try_show(&self, vm: &str) -> Option<Value> {
        let o = self.cli(&["--json", "vm", "show", vm]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// `vm show V --json`; panics unless it succeeds.
    #[track_caller]
    pub fn show(&self, vm: &str) -> Value {
        self.cli_json(&["vm", "show", vm])
    }

    /// The unix-socket NBD URI of every disk of `vm` (where it runs now).
    #[track_caller]
    pub fn uris(&self, vm: &str) -> Vec<String> {
        let v = self.show(vm);
        let uris: Vec<String> = v["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .map(|d| d["nbd_unix_uri"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert!(!uris.is_empty() && uris.iter().all(|u| !u.is_empty()), "{vm}: disks without NBD URIs: {v}");
        uris
    }

    /// Waits until `vm show V --json` satisfies `pred` (it sees `null` while the CLI
    /// fails); returns it.
    #[track_caller]
    pub fn wait_vm(&self, vm: &str, what: &str, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || {
            last = self.try_show(vm).unwrap_or(Value::Null);
            pred(&last)
        });
        if !ok {
            self.dump_logs();
            panic!("{vm}: {what} not seen within {timeout:?}; last `vm show`: {last}");
        }
        last
    }

    /// The `replication` of `vm show V --json`; `null` while the CLI fails.
    pub fn replication(&self, vm: &str) -> Value {
        self.try_show(vm).map(|v| v["replication"].clone()).unwrap_or_default()
    }

    /// Waits until the replication of `vm` satisfies `pred`; returns it.
    #[track_caller]
    pub fn wait_replication(
        &self,
        vm: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        self.wait_vm(vm, what, timeout, |v| pred(&v["replication"]))["replication"].clone()
    }

    // --- recovery points -------------------------------------------------------------

    /// Recovery points of `vm`, oldest first; empty while the CLI fails.
    pub fn points(&self, vm: &str) -> Vec<Value> {
        let mut v = json_list(&self.cli(&["--json", "points", vm]));
        v.sort_by_key(|p| p["seq"].as_u64().unwrap_or(0));
        v
    }

    /// Waits for a point of `vm` created after `after_ms` (it holds every write
    /// acknowledged before then: a point is stamped after its barrier seal); returns it.
    #[track_caller]
    pub fn wait_point_after(&self, vm: &str, after_ms: i64, what: &str) -> Value {
        let mut last = Vec::new();
        let ok = wait_until(EVENT_TIMEOUT, || {
            last = self.points(vm);
            last.last().is_some_and(|p| p["created_unix_ms"].as_i64().unwrap_or(0) > after_ms)
        });
        if !ok {
            self.dump_logs();
            panic!("{what}: no point of {vm} created after {after_ms} within {EVENT_TIMEOUT:?}; points: {last:?}");
        }
        last.pop().expect("a point")
    }

    /// `point export V --point P`: one read-only NBD URI per disk.
    #[track_caller]
    pub fn export(&self, vm: &str, point: &str) -> Vec<String> {
        let o = self.cli(&["point", "export", vm, "--point", point]);
        assert_ok(&o, &format!("point export {vm} --point {point}"));
        let uris: Vec<String> = stdout(&o).split_whitespace().map(str::to_owned).collect();
        assert!(!uris.is_empty() && uris.iter().all(|u| u.starts_with("nbd")), "point export printed {uris:?}");
        uris
    }

    // --- jobs ------------------------------------------------------------------------

    /// `protect V --wait`, asserting success.
    #[track_caller]
    pub fn protect(&self, vm: &str) {
        let o = self.cli_long(&["protect", vm, "--wait"]);
        assert_ok(&o, &format!("protect {vm} --wait"));
    }

    /// [`Self::protect`], then waits for a first recovery point.
    #[track_caller]
    pub fn protect_with_point(&self, vm: &str) {
        self.protect(vm);
        self.wait_point_after(vm, 0, "first point");
    }

    /// `--json ARGS --wait`, asserting success; the job as printed.
    #[track_caller]
    pub fn wait_job(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        a.push("--wait");
        let o = self.cli_long(&a);
        assert_ok(&o, &args.join(" "));
        job_from(&o).unwrap_or_else(|| panic!("{} printed no job: {}", args.join(" "), stdout(&o)))
    }

    /// `job show ID --json`.
    #[track_caller]
    pub fn job(&self, id: &str) -> Value {
        self.cli_json(&["job", "show", id])
    }

    /// `job show ID --json`, `null` while the CLI fails.
    pub fn try_job(&self, id: &str) -> Value {
        let o = self.cli(&["--json", "job", "show", id]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    /// The newest job whose kind contains `kind` (case-insensitive).
    #[track_caller]
    pub fn last_job(&self, kind: &str) -> Value {
        let jobs = self.cli_json(&["job", "list"]);
        jobs.as_array()
            .expect("jobs")
            .iter()
            .filter(|j| j["kind"].as_str().is_some_and(|k| k.to_lowercase().contains(&kind.to_lowercase())))
            .max_by_key(|j| j["created_unix_ms"].as_i64().unwrap_or(0))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} job in {jobs}"))
    }

    /// Waits until job `id` is no longer running; returns it (whatever it ended as).
    #[track_caller]
    pub fn wait_job_done(&self, id: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let ended = wait_until(timeout, || {
            last = self.try_job(id);
            !last.is_null() && last["state"] != "running"
        });
        if !ended {
            self.dump_logs();
            panic!("job {id} still running after {timeout:?}: {last}");
        }
        last
    }

    /// Waits until job `id`'s step `name` is in `state` (or the job failed); returns the
    /// job, and panics unless the step got there.
    #[track_caller]
    pub fn wait_step(&self, id: &str, name: &str, state: &str) -> Value {
        let mut last = Value::Null;
        let at = |job: &Value| try_step(job, name).is_some_and(|s| s["state"] == state);
        let ok = wait_until(EVENT_TIMEOUT, || {
            last = self.try_job(id);
            at(&last) || last["state"] == "failed"
        });
        if !ok || !at(&last) {
            self.dump_logs();
            panic!("job {id}: step {name:?} not {state} within {EVENT_TIMEOUT:?}: {last:#}");
        }
        last
    }
}
