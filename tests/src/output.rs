//! What a finished command said: its stdout and stderr as text, and the assertions the
//! tests make on it (success, failure, an exact exit code, a failure naming a cause).
//! Every failed assertion prints the whole output.

use std::process::Output;

/// Stdout of a command as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of a command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code, stdout and stderr, for failure messages.
pub fn describe(o: &Output) -> String {
    format!("exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", o.status.code(), stdout(o), stderr(o))
}

/// Panics (with the output) unless the command succeeded.
#[track_caller]
pub fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: expected success, got {}", describe(o));
}

/// Panics (with the output) unless the command failed.
#[track_caller]
pub fn assert_fails(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}: expected a failure, got {}", describe(o));
}

/// Panics unless the command exited with `code`.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: expected exit {code}, got {}", describe(o));
}

/// Panics unless the command failed and its stderr mentions one of `words` (case-insensitive).
#[track_caller]
pub fn assert_fails_saying(o: &Output, words: &[&str], what: &str) {
    assert_fails(o, what);
    let err = stderr(o).to_lowercase();
    assert!(
        words.iter().any(|w| err.contains(&w.to_lowercase())),
        "{what}: stderr should mention one of {words:?}; got {}",
        describe(o)
    );
}
