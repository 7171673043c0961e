//! Issue 11, point 2: the Debian packages as an operator gets them. `dist/package.sh`
//! builds both with `cargo deb`; `dpkg -i` installs them on this machine (the tests run
//! as root): binaries, units, config, the system user `siterecovery` (in group kvm for
//! the agent), `/var/lib/siterecovery` 0700; `systemd-analyze verify` accepts both
//! units; each unit's `ExecStart` line, run as the service user, starts a provider and
//! two agents that register and replicate (READY=1 on a notify socket, health SERVING);
//! `dpkg --purge` leaves the machine as it was (the test also removes the user and the
//! data dir when it made them: the packages keep both, they hold the vault).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test packages`
//! (needs cargo-deb and root; the first run makes the release build).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use siterecovery_tests::*;

const PROVIDER_UNIT: &str = "/lib/systemd/system/siterecovery-provider.service";
const AGENT_UNIT: &str = "/lib/systemd/system/siterecovery-agent.service";
const DATA: &str = "/var/lib/siterecovery";
const USER: &str = "siterecovery";

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

fn uid_gid(name: &str) -> (u32, u32) {
    let o = Command::new("getent").args(["passwd", name]).output().expect("getent");
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    assert!(f.len() >= 7, "no user {name}: {line:?}");
    (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
}

/// Puts the machine back: purges both packages; removes the user and the data dir when
/// this test created them.
struct Cleanup {
    user_before: bool,
    data_before: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "siterecovery-agent", "siterecovery-provider"]).status();
        if !self.data_before {
            let _ = std::fs::remove_dir_all(DATA);
        }
        if !self.user_before {
            let _ = Command::new("deluser").args(["--quiet", "--system", USER]).status();
            let _ = Command::new("delgroup").args(["--quiet", "--system", USER]).status();
        }
    }
}

#[track_caller]
fn assert_file(path: &str, mode: u32, uid: u32, gid: u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(m.permissions().mode() & 0o7777, mode, "{path}: mode {:o}", m.permissions().mode());
    assert_eq!((m.uid(), m.gid()), (uid, gid), "{path}: owner");
}

/// The `ExecStart=` line of `unit`, split on spaces (our units quote nothing).
fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap_or_else(|e| panic!("{unit}: {e}"));
    let line =
        text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap_or_else(|| panic!("{unit}: no ExecStart"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// `setpriv` to the service user (with its groups, as `User=`/`SupplementaryGroups=`
/// would), then `argv`. setpriv execs (runuser forks): the PID a test stops is the
/// daemon's own.
fn as_service_user(argv: &[String]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", USER, "--regid", USER, "--init-groups", "--"]).args(argv);
    c
}

/// The unit's ExecStart (with the shipped config, `--config /etc/siterecovery/…`) and
/// this test's settings as flags: they win over the file.
fn with_flags(exec: &[String], flags: &[String]) -> Vec<String> {
    let mut argv = exec.to_vec();
    argv.extend_from_slice(flags);
    argv
}

fn s(v: &[&str]) -> Vec<String> {
    strings(v)
}

#[test]
fn packages_install_run_their_units_as_the_service_user_and_purge() {
    assert!(ok(Command::new("sh").args(["-c", "test \"$(id -u)\" = 0"])), "this test installs packages: run as root");
    let lab = Lab::new("packages");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built =
        lab.run_timeout(Command::new(repo.join("dist/package.sh")).env("SR_DEB_FAST", "1"), Duration::from_secs(1800));
    assert_ok(&built, "dist/package.sh (cargo deb)");
    let debs: Vec<PathBuf> =
        stdout(&built).lines().filter(|l| l.trim().ends_with(".deb")).map(|l| PathBuf::from(l.trim())).collect();
    let deb = |name: &str| {
        debs.iter()
            .find(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}_"))))
            .unwrap_or_else(|| panic!("no {name} package in {debs:?}"))
            .clone()
    };
    let (pdeb, adeb) = (deb("siterecovery-provider"), deb("siterecovery-agent"));

    let _cleanup = Cleanup {
        user_before: ok(Command::new("getent").args(["passwd", USER])),
        data_before: Path::new(DATA).exists(),
    };
    assert_ok(&lab.run(Command::new("dpkg").arg("-i").arg(&pdeb).arg(&adeb)), "dpkg -i");

    // Files, modes, the user.
    let (uid, gid) = uid_gid(USER);
    assert_file("/usr/bin/provider", 0o755, 0, 0);
    assert_file("/usr/bin/agent", 0o755, 0, 0);
    assert_file(PROVIDER_UNIT, 0o644, 0, 0);
    assert_file(AGENT_UNIT, 0o644, 0, 0);
    assert_file("/etc/siterecovery/provider.toml", 0o640, 0, gid);
    assert_file("/etc/siterecovery/agent.toml", 0o640, 0, gid);
    assert_file(DATA, 0o700, uid, gid);
    let passwd = Command::new("getent").args(["passwd", USER]).output().expect("getent");
    let passwd = String::from_utf8_lossy(&passwd.stdout).into_owned();
    assert!(passwd.trim().ends_with(&format!(":{DATA}:/usr/sbin/nologin")), "{passwd}");
    assert!(uid < 1000, "not a system user: {passwd}");
    if ok(Command::new("getent").args(["group", "kvm"])) {
        let groups = lab.run(Command::new("id").args(["-nG", USER]));
        assert!(stdout(&groups).split_whitespace().any(|g| g == "kvm"), "{USER} not in kvm: {}", stdout(&groups));
    }
    for (pkg, conf) in [("siterecovery-provider", "provider.toml"), ("siterecovery-agent", "agent.toml")] {
        let c = lab.run(Command::new("dpkg-query").args(["--control-show", pkg, "conffiles"]));
        assert!(stdout(&c).contains(&format!("/etc/siterecovery/{conf}")), "{pkg} conffiles: {}", stdout(&c));
    }
    for unit in [PROVIDER_UNIT, AGENT_UNIT] {
        let v = lab.run(Command::new("systemd-analyze").args(["verify", unit]));
        assert_ok(&v, &format!("systemd-analyze verify {unit}"));
        assert!(!stderr(&v).contains("siterecovery-"), "systemd-analyze verify {unit} warns: {}", stderr(&v));
    }

    // The units' ExecStart, as the service user: register and replicate.
    let exec_p = exec_start(PROVIDER_UNIT);
    let exec_a = exec_start(AGENT_UNIT);
    assert_eq!(exec_p[..4], s(&["/usr/bin/provider", "serve", "--config", "/etc/siterecovery/provider.toml"]));
    assert_eq!(exec_a[..4], s(&["/usr/bin/agent", "serve", "--config", "/etc/siterecovery/agent.toml"]));
    assert_ok(&lab.run(Command::new("chown").arg("-R").arg(format!("{USER}:{USER}")).arg(&lab.root)), "chown lab");
    let mut vault = as_service_user(&s(&[
        "/usr/bin/provider",
        "vault",
        "create",
        "--name",
        "contoso",
        "--data-dir",
        &lab.provider_dir.display().to_string(),
        "--address",
        &lab.addr(),
        "--out",
        &lab.vault_key.display().to_string(),
    ]));
    assert_ok(&lab.run(&mut vault), "vault create as the service user");
    let mut pnotify = NotifySocket::bind(&lab.root.join("notify-provider"));
    let pflags =
        s(&["--data-dir", &lab.provider_dir.display().to_string(), "--listen", &lab.addr(), "--test-intervals"]);
    let mut cmd = as_service_user(&with_flags(&exec_p, &pflags));
    cmd.env("NOTIFY_SOCKET", &pnotify.path);
    let provider = lab.spawn("provider", &mut cmd);
    assert!(pnotify.wait_line("READY=1", Duration::from_secs(20)), "provider: no READY=1: {:?}", pnotify.received);
    let mut op = as_service_user(&s(&[
        "/usr/bin/provider",
        "operator-cert",
        "--data-dir",
        &lab.provider_dir.display().to_string(),
        "--out",
        &lab.opdir.display().to_string(),
    ]));
    assert_ok(&lab.run(&mut op), "operator-cert");
    assert_eq!(lab.health(&tls_args(&lab.opdir.join("ca.pem"), None), &lab.addr()), Ok("SERVING".to_owned()));

    let mut agents = Vec::new();
    for (host, site, cloud) in [("hv-a", "primary", "gold-a"), ("hv-b", "secondary", "gold-b")] {
        let slot = lab.host_slot(host);
        let listen = format!("127.0.0.1:{}", slot.listen_port);
        let dir = slot.dir.display().to_string();
        let mut reg = as_service_user(&s(&[
            "/usr/bin/agent",
            "--data-dir",
            &dir,
            "register",
            "--vault-key",
            &lab.vault_key.display().to_string(),
            "--host",
            host,
            "--site",
            site,
            "--cloud",
            cloud,
            "--listen",
            &listen,
        ]));
        assert_ok(&lab.run(&mut reg), &format!("agent register {host} as the service user"));
        let mut notify = NotifySocket::bind(&lab.root.join(format!("notify-{host}")));
        let nbd = format!("127.0.0.1:{}", slot.nbd_port);
        let aflags = s(&["--data-dir", &dir, "--heartbeat", HEARTBEAT, "--nbd-listen", &nbd, "--nbd-insecure-tcp"]);
        let mut cmd = as_service_user(&with_flags(&exec_a, &aflags));
        cmd.env("NOTIFY_SOCKET", &notify.path);
        let p = lab.spawn(&format!("agent-{host}"), &mut cmd);
        assert!(notify.wait_line("READY=1", Duration::from_secs(20)), "{host}: no READY=1: {:?}", notify.received);
        assert_eq!(lab.health(&lab.op_tls(), &listen), Ok("SERVING".to_owned()), "{host} peer health");
        agents.push((p, notify));
    }
    lab.cli_json(&["policy", "create", "--name", "gold", "--interval", "1s", "--retention", "1h"]);
    lab.cli_json(&["cloud", "pair", "--source", "gold-a", "--target", "gold-b", "--policy", "gold"]);
    lab.cli_json(&["vm", "create", "--host", "hv-a", "--name", "vm1", "--disk", "16M"]);
    let uris = lab.uris("vm1");
    lab.qio_ok(&uris[0], &["write -P 0x5a 0 4M"]);
    lab.protect("vm1");
    let wrote = unix_now_ms();
    lab.qio_ok(&uris[0], &["write -P 0xa5 4M 1M"]);
    lab.wait_point_after("vm1", wrote, "a point after the write");
    lab.assert_point_matches_primary("vm1", "latest");
    // The data path ran as the service user: the replica's files are its own.
    let replicas = lab.host_slot("hv-b").dir.join("replicas").join("vm1");
    let m = std::fs::metadata(&replicas).unwrap_or_else(|e| panic!("{}: {e}", replicas.display()));
    assert_eq!(m.uid(), uid, "the replica was not written by the service user");
    drop(agents);
    drop(provider);

    // Removal: binaries and units go, the data stays (until the operator deletes it).
    assert_ok(&lab.run(Command::new("dpkg").args(["-r", "siterecovery-agent", "siterecovery-provider"])), "dpkg -r");
    for f in ["/usr/bin/provider", "/usr/bin/agent", PROVIDER_UNIT, AGENT_UNIT] {
        assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
    }
    assert!(Path::new(DATA).is_dir(), "dpkg -r removed the data dir (it holds the vault)");
    assert_ok(&lab.run(Command::new("dpkg").args(["--purge", "siterecovery-agent", "siterecovery-provider"])), "purge");
    assert!(!Path::new("/etc/siterecovery/provider.toml").exists(), "conffile left after purge");
}
