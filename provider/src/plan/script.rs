//! A plan's scripted actions: run on the provider host with a timeout and the plan's
//! environment, their output (stdout, then stderr) kept in the step's detail, at most
//! [`MAX_OUTPUT`] bytes of it.
//!
//! Scripts run only from the provider's scripts directory (`serve --scripts-dir`,
//! default `/etc/siterecovery/scripts`), named relative to it by a [`ScriptName`]: a
//! plan cannot name a program anywhere else on the provider host. The name is checked
//! at `plan create` and again at run time (a plan stored before names were required
//! fails its step instead of running an absolute path); a script missing at run time
//! fails its step saying where it was looked for. Scripts run in that directory.
//!
//! Environment: `SITERECOVERY_PLAN`, `SITERECOVERY_GROUP` (the group it runs after, 0
//! before the first), `SITERECOVERY_FAILOVER_TYPE` (test, planned, unplanned) and
//! `SITERECOVERY_IP_CHANGES` (one line `VM nicN OLD_IP NEW_IP` per static NIC of the
//! VMs failed over so far; `-` for an old address not known).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use siterecovery_proto::model::VmName;

use crate::failover::FailoverType;
use crate::relationship::RelationshipRecord;

/// Script output kept in a step's detail.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// Longest script name, in bytes.
pub const MAX_NAME: usize = 255;
/// Most path components of a script name (`dns/update.sh` has 2).
pub const MAX_DEPTH: usize = 8;

/// A script's name in the scripts directory: a plain relative path of 1 to
/// [`MAX_DEPTH`] components separated by `/`, each of ASCII letters, digits, `.`, `_`,
/// `-` and `+`, none starting with `.` (so never `.`, `..` nor a hidden file); at most
/// [`MAX_NAME`] bytes. Never absolute, never leaves the directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScriptName(String);

/// Why a string is not a [`ScriptName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a script name in the provider's scripts directory: {reason}")]
pub struct ScriptNameError {
    /// The value refused (at most 80 chars of it).
    pub given: String,
    pub reason: &'static str,
}

impl FromStr for ScriptName {
    type Err = ScriptNameError;
    fn from_str(s: &str) -> Result<Self, ScriptNameError> {
        let bad = |reason| ScriptNameError { given: s.chars().take(80).collect(), reason };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_NAME {
            return Err(bad("longer than 255 bytes"));
        }
        if s.starts_with('/') {
            return Err(bad("an absolute path; name the script relative to `serve --scripts-dir`"));
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(bad("more than 8 path components"));
        }
        for p in parts {
            if p.is_empty() {
                return Err(bad("an empty path component"));
            }
            if p == ".." {
                return Err(bad("`..` leaves the scripts directory"));
            }
            if p.starts_with('.') {
                return Err(bad("a path component starts with `.`"));
            }
            if !p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+')) {
                return Err(bad("only letters, digits, `.`, `_`, `-`, `+` and `/` between components"));
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl ScriptName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where the script is in the scripts directory `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(&self.0)
    }
}

impl fmt::Display for ScriptName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a script did not succeed. The text is the step's detail; its first line goes
/// into the plan's error.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The stored command is not a script name (a plan from before names were required).
    #[error("{0}; create the plan again with the script's name in the scripts directory")]
    NotAName(ScriptNameError),
    /// No such script in the scripts directory.
    #[error("script {name} not found in the scripts directory {}", dir.display())]
    Missing { name: ScriptName, dir: PathBuf },
    /// The name is there but is not a file.
    #[error("script {name} in {} is not a file", dir.display())]
    NotAFile { name: ScriptName, dir: PathBuf },
    /// The program could not be started (not executable, a bad interpreter).
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

/// Runs the script `command` names in the scripts directory `dir` (in that
/// directory); the step's detail when it exits 0.
pub async fn run_script(
    dir: &Path,
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<String, ScriptError> {
    let name: ScriptName = command.parse().map_err(ScriptError::NotAName)?;
    let file = name.path_in(dir);
    match tokio::fs::metadata(&file).await {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(ScriptError::NotAFile { name, dir: dir.to_path_buf() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ScriptError::Missing { name, dir: dir.to_path_buf() });
        }
        Err(source) => return Err(ScriptError::Spawn { path: file.display().to_string(), source }),
    }
    let path = file.display().to_string();
    let path = path.as_str();
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&file);
    cmd.current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
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
        let d = dir.path();
        let out = run_script(d, "ok.sh", &env, Duration::from_secs(5)).await.expect("ok");
        assert!(out.contains("plan=dc") && out.contains("[stderr]\noops"), "{out}");
        let e = run_script(d, "slow.sh", &env, Duration::from_millis(200)).await.expect_err("slow");
        assert!(matches!(e, ScriptError::TimedOut { .. }) && e.to_string().contains("timed out"), "{e}");
        let e = run_script(d, "bad.sh", &env, Duration::from_secs(5)).await.expect_err("bad");
        let e = e.to_string();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let e = run_script(d, "x.sh", &env, Duration::from_secs(5)).await.expect_err("missing");
        assert!(matches!(e, ScriptError::Missing { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("x.sh not found") && text.contains(&d.display().to_string()), "{text}");
        std::fs::create_dir(d.join("sub")).expect("mkdir");
        let e = run_script(d, "sub", &env, Duration::from_secs(5)).await.expect_err("a directory");
        assert!(matches!(e, ScriptError::NotAFile { .. }), "{e}");
        // A stored absolute path (a plan from before names) is not run.
        let e = run_script(d, ok.to_str().expect("path"), &env, Duration::from_secs(5)).await.expect_err("absolute");
        assert!(matches!(e, ScriptError::NotAName(_)) && e.to_string().contains("absolute"), "{e}");
        // It runs in the scripts directory.
        let pwd = dir.path().join("pwd.sh");
        std::fs::write(&pwd, "#!/bin/sh\npwd\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pwd, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let out = run_script(d, "pwd.sh", &env, Duration::from_secs(5)).await.expect("pwd");
        let real = std::fs::canonicalize(d).expect("canonical");
        assert!(out.contains(&real.display().to_string()), "{out}");
    }

    #[test]
    fn script_names_are_plain_relative_paths() {
        for good in ["dns.sh", "dns/update.sh", "a+b_c-1.py", "x", "a/b/c/d/e/f/g/h"] {
            assert_eq!(good.parse::<ScriptName>().map(|n| n.to_string()), Ok(good.to_owned()), "{good}");
        }
        let long = "a".repeat(256);
        for (bad, why) in [
            ("", "empty"),
            ("/usr/bin/dns.sh", "absolute"),
            ("../dns.sh", "`..`"),
            ("dns/../../etc/x", "`..`"),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            (".", "starts with `.`"),
            (".hidden", "starts with `.`"),
            ("a/./b", "starts with `.`"),
            ("dns sh", "only letters"),
            ("dns.sh;rm", "only letters"),
            ("a\\b", "only letters"),
            ("a\0b", "only letters"),
            ("é.sh", "only letters"),
            ("a/b/c/d/e/f/g/h/i", "more than 8"),
            (long.as_str(), "longer than 255"),
        ] {
            let e = bad.parse::<ScriptName>().expect_err(bad);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert!(e.given.chars().count() <= 80);
        }
        let n: ScriptName = "dns/update.sh".parse().expect("name");
        assert_eq!(
            n.path_in(Path::new("/etc/siterecovery/scripts")),
            Path::new("/etc/siterecovery/scripts/dns/update.sh")
        );
    }
}
