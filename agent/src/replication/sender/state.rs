//! The sender's persisted progress, `<vm folder>/replication.json` ([`SenderState`]),
//! in the [`persist`] envelope (kind [`persist::SENDER_STATE`]). Only the sender module
//! reads or writes it; the protection handlers go through [`super::seed`] and
//! [`super::SenderHandle::drain_and_stop`].
//!
//! Older files (version 0 for the envelope) are the JSON `{"format", "version",
//! "crc32c", "state"}` written before it, the checksum over the compact JSON of `state`:
//! they load when their own checksum holds, and the next save writes the envelope.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::{DiskId, RelationshipId};

use super::phase::Stage;
use crate::persist::{self, PersistError, SENDER_STATE};

/// Name of the state file in the VM folder.
pub const STATE_FILE: &str = "replication.json";
const LEGACY_FORMAT: &str = "siterecovery-replication-state";
const LEGACY_VERSION: u32 = 1;

/// A point whose seq is assigned and whose logs are fixed, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPoint {
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
    /// Disk id → log seqs, ascending.
    pub logs: BTreeMap<DiskId, Vec<u64>>,
}

/// The last point the replica acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    pub id: String,
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
}

/// `replication.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderState {
    pub relationship_id: String,
    /// Stored as `"phase": {"phase": "<word>", ...}`, as before the state machine.
    pub phase: Stage,
    /// Seq of the next new point (strictly increasing, never reused).
    pub next_seq: u64,
    /// Disk id → highest log seq already in a point (or made obsolete by a resync).
    pub assigned_through: BTreeMap<DiskId, u64>,
    /// Points persisted but not acknowledged, ascending by seq.
    pub pending: Vec<PendingPoint>,
    pub last_point: Option<PointRecord>,
    pub bytes_replicated: u64,
    pub last_app_consistent_unix_ms: i64,
    /// Disk id → log seq up to which a resync covered damaged logs.
    pub resynced_through: BTreeMap<DiskId, u64>,
    /// Offline initial replication: the initial copy was exported to a directory; no
    /// point is shipped until the replica host reports its copy complete (imported).
    /// Absent from the file when false (older files keep their checksum).
    #[serde(default, skip_serializing_if = "is_false")]
    pub awaiting_import: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Deserialize)]
struct LegacyEnvelope {
    format: String,
    version: u32,
    crc32c: u32,
    state: SenderState,
}

/// A legacy file that is not what it claims.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LegacyError(String);

impl SenderState {
    pub(crate) fn fresh(relationship_id: &RelationshipId) -> Self {
        SenderState { relationship_id: relationship_id.to_string(), next_seq: 1, ..Default::default() }
    }

    /// Reads the state file; `Ok(None)` when there is none. A torn, corrupt or foreign
    /// file is an error (the sender then resynchronises: it cannot know what shipped).
    pub fn load(path: &Path) -> Result<Option<Self>, PersistError> {
        persist::load_migrating(path, &SENDER_STATE, |version, payload| {
            if version > 0 {
                return serde_json::from_slice(payload).map_err(Into::into);
            }
            let env: LegacyEnvelope = serde_json::from_slice(payload)?;
            if env.format != LEGACY_FORMAT {
                return Err(Box::new(LegacyError(format!("format {:?}", env.format))));
            }
            if env.version != LEGACY_VERSION {
                return Err(Box::new(LegacyError(format!("unsupported version {}", env.version))));
            }
            let body = serde_json::to_vec(&env.state)?;
            if crc32c::crc32c(&body) != env.crc32c {
                return Err(Box::new(LegacyError("checksum mismatch".into())));
            }
            Ok(env.state)
        })
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        crate::faults::point(crate::faults::SENDER_STATE_SAVE)
            .map_err(|source| PersistError::Io { path: path.to_path_buf(), source })?;
        persist::save(path, &SENDER_STATE, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SenderState {
        let mut st = SenderState::fresh(&"r-0000abcd".parse().expect("relationship id"));
        st.phase = Stage::ResyncRequired { reason: "x".into(), requested: true };
        st.pending.push(PendingPoint {
            seq: 4,
            created_unix_ms: 5,
            app_consistent: true,
            logs: BTreeMap::from([("disk0".parse().expect("disk id"), vec![7, 8])]),
        });
        st
    }

    /// The file as agents before the envelope wrote it.
    fn legacy_bytes(st: &SenderState) -> Vec<u8> {
        let body = serde_json::to_vec(st).expect("encode");
        let env = serde_json::json!({
            "format": LEGACY_FORMAT,
            "version": LEGACY_VERSION,
            "crc32c": crc32c::crc32c(&body),
            "state": st,
        });
        serde_json::to_vec_pretty(&env).expect("encode")
    }

    #[test]
    fn round_trip_keeps_the_phase_word() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(STATE_FILE);
        assert_eq!(SenderState::load(&path).expect("load"), None);
        let st = sample();
        st.save(&path).expect("save");
        assert_eq!(SenderState::load(&path).expect("load"), Some(st));
        let bytes = std::fs::read(&path).expect("read");
        let text = String::from_utf8_lossy(&bytes[persist::HEADER_LEN..]).into_owned();
        assert!(text.contains("\"phase\": \"resync-required\""), "{text}");
    }

    #[test]
    fn a_legacy_file_loads_and_the_next_save_wraps_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(STATE_FILE);
        let st = sample();
        std::fs::write(&path, legacy_bytes(&st)).expect("write");
        assert_eq!(SenderState::load(&path).expect("legacy"), Some(st.clone()));
        st.save(&path).expect("save");
        assert_eq!(&std::fs::read(&path).expect("read")[..4], &SENDER_STATE.magic);
        // A legacy file whose own checksum fails is refused, naming the file.
        let text = String::from_utf8(legacy_bytes(&st)).expect("utf8").replace("\"seq\": 4", "\"seq\": 5");
        std::fs::write(&path, text).expect("write");
        let e = SenderState::load(&path).expect_err("checksum");
        assert!(matches!(e, PersistError::Decode { version: 0, .. }), "{e}");
        assert!(e.to_string().contains(STATE_FILE), "{e}");
    }

    #[test]
    fn torn_and_corrupt_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(STATE_FILE);
        sample().save(&path).expect("save");
        let good = std::fs::read(&path).expect("read");
        std::fs::write(&path, &good[..good.len() - 10]).expect("write");
        assert!(matches!(SenderState::load(&path), Err(PersistError::Torn { .. })));
        let mut bad = good.clone();
        bad[persist::HEADER_LEN + 5] ^= 0x20;
        std::fs::write(&path, &bad).expect("write");
        assert!(matches!(SenderState::load(&path), Err(PersistError::Corrupt { .. })));
        std::fs::write(&path, b"").expect("write");
        assert!(SenderState::load(&path).is_err());
    }
}
