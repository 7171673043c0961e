//! Issue 11, config files: `agent.toml` / `provider.toml` through the real binaries —
//! `config check` naming the key and line of a bad file, the precedence flag >
//! environment > file > default, and `systemctl reload` (SIGHUP) changing the log level
//! of a running agent.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test config`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use siterecovery_tests::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config file");
}

/// A command of `binary` without the environment overrides the test does not set.
fn command(binary: &str) -> Command {
    let mut cmd = Command::new(bin(binary));
    for (k, _) in std::env::vars() {
        if k.starts_with("SITERECOVERY_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn config_check_names_the_key_and_line_of_a_bad_file() {
    let lab = Lab::new("config_check");
    let bad = lab.root.join("agent-bad.toml");
    write(&bad, "# agent\nheartbeat = \"2s\"\n\nnbd-lsten = \"127.0.0.1:1\"\n");
    let o = lab.run(command("agent").args(["config", "check"]).arg(&bad));
    assert_fails(&o, "agent config check of an unknown key");
    assert!(
        stderr(&o).contains(&format!("{}:4: unknown key `nbd-lsten`", bad.display())),
        "agent config check did not name the key and line: {}",
        stderr(&o)
    );
    write(&bad, "heartbeat = \"2s\"\nnbd-max-request-memory = \"lots\"\nnbd-listen = 7\n");
    let o = lab.run(command("agent").args(["config", "check"]).arg(&bad));
    assert_fails(&o, "agent config check of a wrong type");
    assert!(stderr(&o).contains(&format!("{}:3: key `nbd-listen`", bad.display())), "{}", stderr(&o));
    write(&bad, "heartbeat = \"2s\"\nnbd-max-request-memory = \"lots\"\n");
    let o = lab.run(command("agent").args(["config", "check"]).arg(&bad));
    assert_fails(&o, "agent config check of a bad size");
    assert!(stderr(&o).contains(&format!("key `nbd-max-request-memory` ({}:2)", bad.display())), "{}", stderr(&o));
    // `serve` refuses the same file before it starts anything.
    let o = lab.run(command("agent").arg("--config").arg(&bad).args(["--data-dir", "/nonexistent", "serve"]));
    assert_fails_saying(&o, &["nbd-max-request-memory", ":2)"], "agent serve with a bad config file");
    // A named file that does not exist is an error.
    let o = lab.run(command("agent").args(["config", "check", "/nonexistent/agent.toml"]));
    assert_fails_saying(&o, &["/nonexistent/agent.toml"], "agent config check of a missing file");

    let bad = lab.root.join("provider-bad.toml");
    write(&bad, "grace = \"1s\"\ncert-validity = \"1s\"\n");
    let o = lab.run(command("provider").args(["config", "check"]).arg(&bad));
    assert_fails(&o, "provider config check of a validity under the minimum");
    assert!(stderr(&o).contains(&format!("key `cert-validity` ({}:2)", bad.display())), "{}", stderr(&o));
    write(&bad, "\ngrace = \"1s\"\nlisten-addr = \"127.0.0.1:1\"\n");
    let o = lab.run(command("provider").args(["config", "check"]).arg(&bad));
    assert_fails_saying(&o, &[&format!("{}:3: unknown key `listen-addr`", bad.display())], "provider config check");
}

/// The effective value `config check` prints for `key`, with its origin.
fn shown(o: &std::process::Output, key: &str) -> String {
    assert_ok(o, "config check");
    let out = stdout(o);
    out.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_else(|| panic!("no {key} in {out}")).to_owned()
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let lab = Lab::new("config_precedence");
    let file = lab.root.join("agent.toml");
    write(&file, "heartbeat = \"2s\"\nnbd-max-connections = 9\n");
    let check = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = command("agent");
        cmd.args(["config", "check"]).arg(&file);
        if let Some(e) = env {
            cmd.env("SITERECOVERY_HEARTBEAT", e);
        }
        if let Some(f) = flag {
            cmd.args(["--heartbeat", f]);
        }
        lab.run(&mut cmd)
    };
    let file_line = format!("{}:1", file.display());
    assert_eq!(shown(&check(None, None), "heartbeat"), format!("heartbeat = \"2s\"  # {file_line}"));
    assert_eq!(shown(&check(Some("3s"), None), "heartbeat"), "heartbeat = \"3s\"  # flag or environment");
    assert_eq!(shown(&check(Some("3s"), Some("4s")), "heartbeat"), "heartbeat = \"4s\"  # flag or environment");
    let o = check(Some("3s"), Some("4s"));
    assert_eq!(shown(&o, "nbd-max-connections"), format!("nbd-max-connections = 9  # {}:2", file.display()));
    assert_eq!(shown(&o, "nbd-listen"), "nbd-listen = \"127.0.0.1:0\"  # default");
    // The provider's keys too.
    let file = lab.root.join("provider.toml");
    write(&file, "grace = \"3s\"\n");
    let o = lab.run(command("provider").args(["config", "check"]).arg(&file).env("SITERECOVERY_MAX_CONNECTIONS", "7"));
    assert_eq!(shown(&o, "grace"), format!("grace = \"3s\"  # {}:1", file.display()));
    assert_eq!(shown(&o, "max-connections"), "max-connections = 7  # flag or environment");
    assert_eq!(shown(&o, "cert-validity"), "cert-validity = \"365d\"  # default");
}

fn debug_lines(agent: &Proc) -> usize {
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    log.lines().filter(|l| l.contains(" DEBUG ")).count()
}

#[test]
fn sighup_changes_the_log_level_of_a_running_agent() {
    let lab = Lab::new("config_sighup");
    lab.create_vault();
    let pconfig = lab.root.join("provider.toml");
    write(&pconfig, "log-level = \"info\"\n");
    let mut provider = lab.start_provider_with(&["--config", pconfig.to_str().expect("utf-8 path")]);
    lab.operator_cert();
    lab.register_agent("hv1", "primary", "gold-a");
    let config = lab.root.join("agent.toml");
    write(&config, "log-level = \"info\"\n");
    let dir = lab.host_slot("hv1").dir;
    let mut agent = lab.start_agent_with("hv1", &dir, &["--config", config.to_str().expect("utf-8 path")]);
    lab.wait_host_connected("hv1");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&agent.log)
            .is_ok_and(|l| l.contains("agent serving"))),
        "the agent never served"
    );
    assert_eq!(debug_lines(&agent), 0, "debug lines at log-level info");

    // A live key and one that needs a restart.
    write(&config, "log-level = \"debug\"\nnbd-max-connections = 3\n");
    agent.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(20), || debug_lines(&agent) > 0),
        "no debug line after SIGHUP with log-level = \"debug\""
    );
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    assert!(log.contains("needs a restart: nbd-max-connections"), "no restart notice in the log");
    assert!(agent.is_running(), "the agent stopped at SIGHUP");

    // A bad file is refused and the running settings stay.
    write(&config, "log-level = \"debug\"\nbogus = 1\n");
    agent.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&agent.log)
            .is_ok_and(|l| l.contains("configuration not reloaded") && l.contains("unknown key `bogus`"))),
        "a bad file at SIGHUP was not refused with its key"
    );
    assert!(agent.is_running(), "the agent stopped at a bad SIGHUP");
    assert_ok(&lab.cli(&["host", "list"]), "host list after the reloads");

    // The provider too: the log level live, `max-connections` needs a restart (`grace` is a flag here: the file cannot change it).
    assert_eq!(debug_lines(&provider), 0, "provider debug lines at log-level info");
    write(&pconfig, "log-level = \"debug\"\ngrace = \"1s\"\nmax-connections = 5\n");
    provider.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(20), || debug_lines(&provider) > 0),
        "no provider debug line after SIGHUP with log-level = \"debug\""
    );
    let log = std::fs::read_to_string(&provider.log).expect("provider log");
    assert!(log.contains("needs a restart: max-connections"), "no restart notice in the provider log");
    assert!(!log.contains("needs a restart: grace"), "the flag --grace changed by the file");
    assert_ok(&lab.cli(&["host", "list"]), "host list after the provider's reload");
}
