//! The settings layers: file, flags and defaults merged, every refusal named with its key and line.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct S {
    name: Option<String>,
    count: Option<u32>,
    on: Option<bool>,
}

fn layer(text: &str) -> Result<FileLayer<S>, SettingsError> {
    FileLayer::parse(Path::new("/etc/x.toml"), true, text)
}

#[test]
fn a_file_gives_values_and_lines() {
    let f = layer("# comment\nname = \"a\"\n\ncount = 3\n").expect("accepted");
    assert_eq!(f.value, S { name: Some("a".into()), count: Some(3), on: None });
    assert_eq!((f.line("name"), f.line("count"), f.line("on")), (Some(2), Some(4), None));
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let e = layer("name = \"a\"\n\nbogus-key = 1\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::UnknownKey { line: 3, key, .. } if key == "bogus-key"), "{e}");
    assert_eq!(e.to_string(), "/etc/x.toml:3: unknown key `bogus-key`");
}

#[test]
fn a_wrong_type_is_named_with_its_line() {
    let e = layer("name = \"a\"\ncount = \"three\"\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::WrongType { line: 2, key, .. } if key == "count"), "{e}");
    let e = layer("on = 1\n").expect_err("refused");
    assert!(matches!(&e, SettingsError::WrongType { line: 1, key, .. } if key == "on"), "{e}");
}

#[test]
fn bad_toml_is_a_syntax_error_with_its_line() {
    let e = layer("name = \"a\"\ncount = = 3\n").expect_err("refused");
    assert!(matches!(e, SettingsError::Syntax { line: 2, .. }), "{e}");
}

#[test]
fn a_missing_file_is_empty_unless_named() {
    let p = Path::new("/nonexistent/siterecovery-test.toml");
    let f = FileLayer::<S>::read(p, false).expect("accepted");
    assert!(!f.found);
    assert_eq!(f.value, S::default());
    assert!(matches!(FileLayer::<S>::read(p, true), Err(SettingsError::Read { .. })));
}

#[test]
fn flag_beats_file_beats_default_key_by_key() {
    let layers = Layers {
        defaults: S { name: Some("default".into()), count: Some(1), on: Some(false) },
        file: layer("name = \"file\"\ncount = 2\n").expect("accepted"),
        cli: S { name: Some("flag".into()), ..S::default() },
    };
    let m = layers.merged().expect("accepted");
    assert_eq!(m, S { name: Some("flag".into()), count: Some(2), on: Some(false) });
    assert_eq!(layers.origin("name"), Origin::CommandLine);
    assert_eq!(layers.origin("count"), Origin::File { path: "/etc/x.toml".into(), line: 2 });
    assert_eq!(layers.origin("on"), Origin::Default);
}

#[test]
fn validation_errors_name_key_and_origin() {
    let layers = Layers { defaults: S::default(), file: layer("\ncount = 0\n").expect("accepted"), cli: S::default() };
    let e = layers
        .validate(
            |s: &S| if s.count == Some(0) { Err(vec![KeyError::new("count", "must be at least 1")]) } else { Ok(()) },
        )
        .expect_err("refused");
    assert_eq!(e.to_string(), "key `count` (/etc/x.toml:2): must be at least 1");
}

#[test]
fn changed_keys_lists_set_unset_and_changed() {
    let a = S { name: Some("a".into()), count: Some(1), on: None };
    let b = S { name: Some("b".into()), count: None, on: Some(true) };
    assert_eq!(changed_keys(&a, &b).expect("accepted"), ["count", "name", "on"]);
    assert!(changed_keys(&a, &a).expect("accepted").is_empty());
}

#[test]
fn env_names() {
    assert_eq!(env_name("nbd-max-connections"), "SITERECOVERY_NBD_MAX_CONNECTIONS");
}

/// A config file of this test process (no tempfile dependency in proto).
fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("sr-settings-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, text).expect("write");
    p
}

fn keep(s: &S) -> Result<S, Vec<KeyError>> {
    if s.count == Some(0) { Err(vec![KeyError::new("count", "must be at least 1")]) } else { Ok(s.clone()) }
}

#[test]
fn a_reload_applies_live_keys_only_and_refuses_a_bad_file() {
    let path = temp_file("reload", "name = \"a\"\ncount = 1\n");
    let layers =
        Layers { defaults: S::default(), file: FileLayer::read(&path, true).expect("read"), cli: S::default() };
    let start = layers.validate(keep).expect("valid");
    let mut r = reload::Reloader::new(layers, start, keep, &["name"]).expect("reloader");
    let rx = r.subscribe();
    std::fs::write(&path, "name = \"b\"\ncount = 2\n").expect("write");
    let (now, changed) = r.reload().expect("reloaded");
    assert_eq!(changed, ["count", "name"]);
    assert_eq!(*now, S { name: Some("b".into()), count: Some(1), on: None }, "count needs a restart");
    assert_eq!(**rx.borrow(), *now, "subscribers see the running settings");
    std::fs::write(&path, "name = \"c\"\ncount = 0\n").expect("write");
    let e = r.reload().expect_err("a bad value is refused");
    assert!(e.to_string().contains(":2): must be at least 1"), "{e}");
    assert_eq!(rx.borrow().name.as_deref(), Some("b"), "the running settings stay");
    let _ = std::fs::remove_file(&path);
}
