//! The settings layers: file, flags and defaults merged, every refusal named with its key and line.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use siterecovery_proto::settings::{FileLayer, Layers, SettingsError};

use super::*;

fn file(text: &str) -> Result<FileLayer<AgentSettings>, SettingsError> {
    FileLayer::parse(Path::new("/etc/siterecovery/agent.toml"), true, text)
}

fn layers(text: &str, cli: AgentSettings) -> Layers<AgentSettings> {
    Layers { defaults: defaults(None), file: file(text).expect("accepted"), cli }
}

fn run(text: &str, cli: AgentSettings) -> Result<AgentRuntime, SettingsError> {
    layers(text, cli).validate(validate)
}

/// `agent [GLOBAL] serve [FLAGS]` as the binary parses them.
#[derive(Parser)]
struct Line {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    settings: AgentSettings,
}

fn flags(args: &[&str]) -> AgentSettings {
    let l = Line::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).expect("accepted");
    l.settings.with_globals(&l.global)
}

#[test]
fn the_defaults_run() {
    let r = run("", AgentSettings::default()).expect("accepted");
    assert_eq!(r.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(r.nbd.listen.to_string(), "127.0.0.1:0");
    assert_eq!(r.heartbeat, Duration::from_secs(5));
    assert_eq!(r.nbd.limits.max_connections, nbd::DEFAULT_MAX_CONNECTIONS);
    assert_eq!(r.nbd.limits.max_request_bytes, 64 << 20);
    assert_eq!(r.log_level.as_str(), "info");
    assert!(!r.log_json && !r.nbd.insecure_tcp);
    assert!(r.peer_listen.is_none() && r.log_budget.is_none() && r.hooks.on_start.is_none());
}

#[test]
fn flag_beats_file_beats_default() {
    let text = "heartbeat = \"2s\"\nnbd-listen = \"127.0.0.1:7001\"\nlog-json = true\n";
    let cli = flags(&["--nbd-listen", "127.0.0.1:7002", "--data-dir", "/srv/a"]);
    let r = run(text, cli).expect("accepted");
    assert_eq!(r.nbd.listen.to_string(), "127.0.0.1:7002", "the flag beats the file");
    assert_eq!(r.heartbeat, Duration::from_secs(2), "the file beats the default");
    assert!(r.log_json, "the file's bool");
    assert_eq!(r.data_dir, Path::new("/srv/a"), "a global flag is a key too");
    assert_eq!(r.nbd.limits.max_export_connections, nbd::DEFAULT_MAX_EXPORT_CONNECTIONS, "the default");
    // A bool flag set to false beats a file's true.
    let r = run(text, flags(&["--log-json=false"])).expect("accepted");
    assert!(!r.log_json);
    assert!(run("", flags(&["--log-json"])).expect("accepted").log_json, "a bare bool flag is true");
}

#[test]
fn an_unknown_key_is_refused_with_its_line() {
    let e = file("heartbeat = \"2s\"\nnbd-lsten = \"127.0.0.1:1\"\n").expect_err("refused");
    assert_eq!(e.to_string(), "/etc/siterecovery/agent.toml:2: unknown key `nbd-lsten`");
}

#[test]
fn a_wrong_type_is_refused_with_key_and_line() {
    let e = file("\n\nnbd-max-connections = \"many\"\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::WrongType { line: 3, key, .. } if key == "nbd-max-connections"), "{e}");
    let e = file("heartbeat = 5\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::WrongType { line: 1, key, .. } if key == "heartbeat"), "{e}");
}

/// The message of refusing `text`, with the key and line it must name.
fn refused(text: &str) -> String {
    run(text, AgentSettings::default()).expect_err("refused").to_string()
}

#[test]
fn bad_values_are_refused_with_key_and_line() {
    let at = |line: usize, key: &str| format!("key `{key}` (/etc/siterecovery/agent.toml:{line})");
    let cases = [
        ("\nnbd-max-request-memory = \"lots\"\n", 2, "nbd-max-request-memory", "size"),
        ("heartbeat = \"soon\"\n", 1, "heartbeat", "duration"),
        ("nbd-listen = \"localhost\"\n", 1, "nbd-listen", "address"),
        ("peer-listen = \"1.2.3.4:99999\"\n", 1, "peer-listen", "address"),
        ("heartbeat = \"0s\"\n", 1, "heartbeat", "out of range"),
        ("heartbeat = \"2h\"\n", 1, "heartbeat", "out of range"),
        ("nbd-max-connections = 0\n", 1, "nbd-max-connections", "out of range"),
        ("nbd-max-request-memory = \"1M\"\n", 1, "nbd-max-request-memory", "at least"),
        ("log-budget = \"0\"\n", 1, "log-budget", "out of range"),
        ("log-level = \"info,=\"\n", 1, "log-level", "log filter"),
        ("nbd-group = \"-rf\"\n", 1, "nbd-group", "group name"),
        ("on-vm-start = \" \"\n", 1, "on-vm-start", "empty command"),
        ("data-dir = \"\"\n", 1, "data-dir", "empty path"),
    ];
    for (text, line, key, what) in cases {
        let e = refused(text);
        assert!(e.contains(&at(line, key)) && e.contains(what), "{text:?}: {e}");
    }
    // A negative count does not even fit the type.
    assert!(matches!(file("nbd-max-connections = -1\n"), Err(SettingsError::WrongType { .. })));
}

#[test]
fn every_refused_key_is_reported() {
    let e = refused("heartbeat = \"x\"\nnbd-listen = \"y\"\n");
    assert!(e.contains("`heartbeat`") && e.contains("`nbd-listen`"), "{e}");
}

#[test]
fn a_bad_flag_value_names_the_command_line() {
    let e = run("", flags(&["--heartbeat", "x"])).expect_err("refused").to_string();
    assert!(e.starts_with("key `heartbeat` (flag or environment)"), "{e}");
}

/// `key = value` of a commented line `# key = value`.
fn key_line(l: &str) -> Option<&str> {
    l.strip_prefix("# ").filter(|rest| rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
}

/// The example file with every commented key line uncommented.
fn example_uncommented() -> String {
    let text = include_str!("../../../dist/etc/agent.toml");
    text.lines().filter_map(key_line).map(|l| format!("{l}\n")).collect()
}

#[test]
fn the_example_file_parses_lists_every_key_and_its_defaults() {
    let shipped = file(include_str!("../../../dist/etc/agent.toml")).expect("accepted");
    assert_eq!(shipped.value, AgentSettings::default(), "the shipped file sets nothing");
    let text = example_uncommented();
    let example = file(&text).expect("accepted");
    for key in keys() {
        assert!(example.line(&key).is_some(), "key {key} is missing from dist/etc/agent.toml");
    }
    // Where a key has a default, the example shows it.
    let defaults = siterecovery_proto::settings::to_table(&defaults(None)).expect("accepted");
    let shown = siterecovery_proto::settings::to_table(&example.value).expect("accepted");
    for (k, v) in &defaults {
        assert_eq!(shown.get(k), Some(v), "dist/etc/agent.toml shows another default for {k}");
    }
    Layers { defaults: defaults_of(), file: example, cli: AgentSettings::default() }
        .validate(validate)
        .expect("accepted");
}

fn defaults_of() -> AgentSettings {
    defaults(None)
}

#[test]
fn keys_are_flags_and_env_names() {
    let cmd = <Line as clap::CommandFactory>::command();
    for key in keys() {
        let arg = cmd.get_arguments().find(|a| a.get_long() == Some(key.as_str()));
        let arg = arg.unwrap_or_else(|| panic!("no flag --{key}"));
        let env = arg.get_env().and_then(|e| e.to_str()).map(str::to_owned);
        assert_eq!(env, Some(siterecovery_proto::settings::env_name(&key)), "--{key}");
    }
}
