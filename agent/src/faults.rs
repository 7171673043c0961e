//! Failpoints: named crash-sensitive steps where a test can crash the process, make
//! the step fail with an I/O error, or delay it.
//!
//! Compiled in only with the cargo feature `failpoints` (the workspace's test builds
//! enable it through the `siterecovery-tests` crate; `cargo build --release -p
//! siterecovery-agent` does not). Without the feature [`point`] is an inlined
//! `Ok(())`.
//!
//! A process configures its failpoints from the `FAILPOINTS` environment variable at
//! start (the `fail` crate's syntax, `;`-separated), e.g.
//!
//! ```text
//! FAILPOINTS='hrl.append.after_sync=1*return(crash)' agent serve …
//! FAILPOINTS='replica.spool.write=return(enospc);sender.state.save=sleep(200)' …
//! ```
//!
//! Actions: `return(crash)` aborts the process at once (no destructor, no flush, as a
//! power cut looks to our files); `return(eio)` / `return(enospc)` make the step fail
//! with that I/O error; `sleep(MS)` delays it; `off` disarms. `N*` limits how many
//! times an action fires and `P%` makes it fire with a probability, as in
//! `20%1*return(crash)`.
//!
//! Every failpoint name is in [`ALL`], so a campaign can draw one at random.

use std::io;

/// Every failpoint, by the step it guards. Keep in step with the `point(...)` calls
/// (the unit test below checks the names are unique and well-formed).
pub const ALL: &[&str] = &[
    // HRL change log (tracker / hrl).
    HRL_APPEND_BEFORE_SYNC,
    HRL_APPEND_AFTER_SYNC,
    HRL_SEAL,
    TRACKER_IMAGE_WRITE,
    TRACKER_IMAGE_WRITE_PARTIAL,
    // Sender (primary side).
    SENDER_STATE_SAVE,
    SENDER_LOG_DELETE,
    INITIAL_CHUNK_ACK,
    // Receiver / replica (secondary side).
    RECEIVER_SPOOL_WRITE,
    RECEIVER_SPOOL_FSYNC,
    REPLICA_UNDO_WRITTEN,
    REPLICA_APPLY_MID,
    REPLICA_APPLIED_MARK,
    // Failover commit and change-point (secondary side).
    // In the order of the steps (`vm::journal`).
    COMMIT_JOURNAL_WRITTEN,
    COMMIT_ROLLED_BACK,
    COMMIT_OVERLAY_FOLDED,
    COMMIT_IMAGES_MOVED,
    COMMIT_OVERLAYS_REMOVED,
    COMMIT_CONFIG_WRITTEN,
    COMMIT_REPLICA_REMOVED,
    CHANGE_POINT_JOURNAL_WRITTEN,
    CHANGE_POINT_OVERLAYS_REMOVED,
    CHANGE_POINT_CONFIG_WRITTEN,
    // Reprotect: the old primary adopts its images as the new replica, in the order of
    // the adoption journal's steps (`vm::journal::adopt`).
    REPROTECT_JOURNAL_WRITTEN,
    REPROTECT_IMAGES_MOVED,
    REPROTECT_REPLICA_CREATED,
    REPROTECT_CONFIG_REMOVED,
];

pub const HRL_APPEND_BEFORE_SYNC: &str = "hrl.append.before_sync";
pub const HRL_APPEND_AFTER_SYNC: &str = "hrl.append.after_sync";
pub const HRL_SEAL: &str = "hrl.seal";
/// The tracker's write to the image (after the log append): an injected error fails the
/// write as a full or broken image would, and the tracker must cancel its log record.
pub const TRACKER_IMAGE_WRITE: &str = "tracker.image.write";
/// The same write failing after the first half of its range reached the image (a
/// `pwrite` EIO part-way): the tracker marks the range dirty.
pub const TRACKER_IMAGE_WRITE_PARTIAL: &str = "tracker.image.write_partial";
pub const SENDER_STATE_SAVE: &str = "sender.state.save";
pub const SENDER_LOG_DELETE: &str = "sender.log.delete";
pub const INITIAL_CHUNK_ACK: &str = "initial.chunk.ack";
pub const RECEIVER_SPOOL_WRITE: &str = "replica.spool.write";
pub const RECEIVER_SPOOL_FSYNC: &str = "replica.spool.fsync";
pub const REPLICA_UNDO_WRITTEN: &str = "replica.undo.written";
pub const REPLICA_APPLY_MID: &str = "replica.apply.mid";
pub const REPLICA_APPLIED_MARK: &str = "replica.applied.mark";
pub const COMMIT_JOURNAL_WRITTEN: &str = "commit.journal.written";
pub const COMMIT_ROLLED_BACK: &str = "commit.rolled_back";
pub const COMMIT_OVERLAY_FOLDED: &str = "commit.overlay.folded";
pub const COMMIT_IMAGES_MOVED: &str = "commit.images.moved";
pub const COMMIT_OVERLAYS_REMOVED: &str = "commit.overlays.removed";
pub const COMMIT_CONFIG_WRITTEN: &str = "commit.config.written";
pub const COMMIT_REPLICA_REMOVED: &str = "commit.replica.removed";
pub const CHANGE_POINT_JOURNAL_WRITTEN: &str = "change_point.journal.written";
pub const CHANGE_POINT_OVERLAYS_REMOVED: &str = "change_point.overlays.removed";
pub const CHANGE_POINT_CONFIG_WRITTEN: &str = "change_point.config.written";
pub const REPROTECT_JOURNAL_WRITTEN: &str = "reprotect.journal.written";
pub const REPROTECT_IMAGES_MOVED: &str = "reprotect.images.moved";
pub const REPROTECT_REPLICA_CREATED: &str = "reprotect.replica.created";
pub const REPROTECT_CONFIG_REMOVED: &str = "reprotect.config.removed";

/// Arms the failpoints named in `FAILPOINTS`, for the life of the process. Call once,
/// at the start of `main`. A no-op without the `failpoints` feature.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        if std::env::var_os("FAILPOINTS").is_some() {
            tracing::warn!(failpoints = ?fail::list(), "failpoints armed from FAILPOINTS (test build)");
        }
        // The scenario's drop would disarm every failpoint; it lives as long as the process.
        std::mem::forget(scenario);
    }
}

/// The failpoint `name`: `Ok(())` unless a test armed it. May not return (crash), may
/// sleep, or returns the injected I/O error for the caller to handle as the real one.
#[cfg(feature = "failpoints")]
pub fn point(name: &'static str) -> io::Result<()> {
    match fail::eval(name, |arg| arg) {
        None => Ok(()),
        Some(arg) => injected(name, arg.as_deref()),
    }
}

/// The failpoint `name`: compiled out without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn point(_name: &'static str) -> io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
fn injected(name: &'static str, arg: Option<&str>) -> io::Result<()> {
    match arg.unwrap_or("crash") {
        "crash" => {
            // stderr is unbuffered: the line reaches the test's log before the abort.
            eprintln!("failpoint {name}: crash");
            std::process::abort()
        }
        // Said on stderr too, so a test can tell the injected error fired.
        "eio" => {
            eprintln!("failpoint {name}: eio");
            Err(io::Error::from_raw_os_error(nix::libc::EIO))
        }
        "enospc" => {
            eprintln!("failpoint {name}: enospc");
            Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
        }
        other => Err(io::Error::other(format!("failpoint {name}: unknown action argument {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_dotted_lowercase() {
        let mut seen = std::collections::BTreeSet::new();
        for name in ALL {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(name.contains('.'), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'), "{name}");
        }
    }

    #[test]
    fn an_unarmed_point_passes() {
        for name in ALL {
            assert!(point(name).is_ok());
        }
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn an_armed_point_returns_the_injected_error_then_disarms() {
        let _scenario = fail::FailScenario::setup();
        fail::cfg(HRL_SEAL, "1*return(enospc)").expect("valid action");
        let err = point(HRL_SEAL).expect_err("armed");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC));
        assert!(point(HRL_SEAL).is_ok(), "1* fires once");
    }
}
