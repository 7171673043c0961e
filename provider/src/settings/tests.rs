//! The settings layers: file, flags and defaults merged, every refusal named with its key and line.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use siterecovery_proto::settings::{FileLayer, Layers, SettingsError, to_table};

use super::*;

fn file(text: &str) -> Result<FileLayer<ProviderSettings>, SettingsError> {
    FileLayer::parse(Path::new("/etc/siterecovery/provider.toml"), true, text)
}

fn run(text: &str, cli: ProviderSettings) -> Result<ProviderRuntime, SettingsError> {
    Layers { defaults: defaults(None), file: file(text).expect("accepted"), cli }.validate(validate)
}

#[derive(Parser)]
struct Line {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    settings: ProviderSettings,
}

fn flags(args: &[&str]) -> ProviderSettings {
    let l = Line::try_parse_from(std::iter::once("provider").chain(args.iter().copied())).expect("accepted");
    l.settings.with_globals(&l.global)
}

#[test]
fn the_defaults_run() {
    let r = run("", ProviderSettings::default()).expect("accepted");
    assert_eq!(r.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(r.grace, Duration::from_secs(10));
    assert_eq!(r.cert_validity, siterecovery_certs::ca::LEAF_VALIDITY);
    assert_eq!((r.max_connections, r.test_intervals, r.listen), (1024, false, None));
    assert_eq!(r.scripts_dir, Path::new(DEFAULT_SCRIPTS_DIR));
}

#[test]
fn flag_beats_file_beats_default() {
    let text = "grace = \"3s\"\nmax-connections = 10\nlisten = \"127.0.0.1:7443\"\n";
    let r = run(text, flags(&["--max-connections", "20", "--log-json", "--test-intervals"])).expect("accepted");
    assert_eq!(r.max_connections, 20, "the flag beats the file");
    assert_eq!(r.grace, Duration::from_secs(3), "the file beats the default");
    assert_eq!(r.listen.map(|a| a.to_string()).as_deref(), Some("127.0.0.1:7443"));
    assert_eq!(r.cert_validity, siterecovery_certs::ca::LEAF_VALIDITY, "the default");
    assert!(r.log_json && r.test_intervals);
}

#[test]
fn invalid_values_are_refused_with_key_and_line() {
    let at = |line: usize, key: &str| format!("key `{key}` (/etc/siterecovery/provider.toml:{line})");
    let cases = [
        ("\ngrace = \"forever\"\n", 2, "grace", "duration"),
        ("cert-validity = \"10s\"\n", 1, "cert-validity", "out of range"),
        ("max-connections = 0\n", 1, "max-connections", "out of range"),
        ("listen = \"provider:7443\"\n", 1, "listen", "address"),
        ("log-level = \"=\"\n", 1, "log-level", "log filter"),
    ];
    for (text, line, key, what) in cases {
        let e = run(text, ProviderSettings::default()).expect_err("refused").to_string();
        assert!(e.contains(&at(line, key)) && e.contains(what), "{text:?}: {e}");
    }
    let e = file("grace = \"1s\"\nlisten-address = \"x\"\n").expect_err("refused");
    assert_eq!(e.to_string(), "/etc/siterecovery/provider.toml:2: unknown key `listen-address`");
    let e = file("max-connections = \"all\"\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::WrongType { line: 1, key, .. } if key == "max-connections"), "{e}");
}

#[test]
fn the_example_file_parses_lists_every_key_and_its_defaults() {
    let text = include_str!("../../../dist/etc/provider.toml");
    assert_eq!(file(text).expect("accepted").value, ProviderSettings::default(), "the shipped file sets nothing");
    let uncommented: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# ").filter(|r| r.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))))
        .map(|l| format!("{l}\n"))
        .collect();
    let example = file(&uncommented).expect("accepted");
    for key in keys() {
        assert!(example.line(&key).is_some(), "key {key} is missing from dist/etc/provider.toml");
    }
    let shown = to_table(&example.value).expect("accepted");
    for (k, v) in &to_table(&defaults(None)).expect("accepted") {
        assert_eq!(shown.get(k), Some(v), "dist/etc/provider.toml shows another default for {k}");
    }
    Layers { defaults: defaults(None), file: example, cli: ProviderSettings::default() }
        .validate(validate)
        .expect("accepted");
}

#[test]
fn keys_are_flags_and_env_names() {
    let cmd = <Line as clap::CommandFactory>::command();
    for key in keys() {
        let arg = cmd.get_arguments().find(|a| a.get_long() == Some(key.as_str()));
        let env = arg.and_then(|a| a.get_env()).and_then(|e| e.to_str()).map(str::to_owned);
        assert_eq!(env, Some(siterecovery_proto::settings::env_name(&key)), "--{key}");
    }
}
