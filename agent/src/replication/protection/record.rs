//! `<vm folder>/protection.json` ([`ProtectionRecord`]): what the provider asked when it
//! enabled protection, enough to restart the sender after an agent restart. Only this
//! module reads or writes it, in the [`persist`] envelope (kind
//! [`persist::PROTECTION_STATE`]); a plain JSON file of an older agent loads as is.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::bandwidth::{BandwidthError, BandwidthSpec};
use siterecovery_proto::model::{HostId, RelationshipId};
use siterecovery_proto::v1;

use super::ProtectionError;
use crate::persist::{self, PROTECTION_STATE, PersistError};

/// File in a protected VM's folder.
pub const PROTECTION_FILE: &str = "protection.json";

/// `protection.json`: what the provider asked, enough to restart the sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ProtectionRecord {
    pub relationship_id: RelationshipId,
    pub replica_host_id: HostId,
    pub replica_address: String,
    interval_ms: u64,
    retention_ms: u64,
    app_consistent_every_ms: u64,
    compression: bool,
    retry_unit_ms: u64,
    resync_window_start_hour: u32,
    resync_window_end_hour: u32,
    /// The policy's rate limits (`None` = unlimited / the same as `bandwidth`); records
    /// of older agents read as unlimited.
    #[serde(default)]
    bandwidth: Option<BandwidthSpec>,
    #[serde(default)]
    resync_bandwidth: Option<BandwidthSpec>,
}

/// An optional bandwidth spec of the provider's settings: empty = unset.
fn spec(field: &str, s: &str) -> Result<Option<BandwidthSpec>, ProtectionError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e: BandwidthError| ProtectionError::Invalid(format!("{field}: {e}")))
}

pub(crate) fn record_path(folder: &Path) -> PathBuf {
    folder.join(PROTECTION_FILE)
}

impl ProtectionRecord {
    pub fn new(
        relationship_id: RelationshipId,
        replica_host_id: HostId,
        replica_address: String,
        s: v1::ReplicationSettings,
    ) -> Result<Self, ProtectionError> {
        if s.interval_ms == 0 {
            return Err(ProtectionError::Invalid("replication interval must be positive".into()));
        }
        Ok(ProtectionRecord {
            relationship_id,
            replica_host_id,
            replica_address,
            interval_ms: s.interval_ms,
            retention_ms: s.retention_ms,
            app_consistent_every_ms: s.app_consistent_every_ms,
            compression: s.compression,
            retry_unit_ms: s.retry_unit_ms,
            resync_window_start_hour: s.resync_window_start_hour,
            resync_window_end_hour: s.resync_window_end_hour,
            bandwidth: spec("bandwidth", &s.bandwidth)?,
            resync_bandwidth: spec("resync bandwidth", &s.resync_bandwidth)?,
        })
    }

    pub fn settings(&self) -> v1::ReplicationSettings {
        v1::ReplicationSettings {
            interval_ms: self.interval_ms,
            retention_ms: self.retention_ms,
            app_consistent_every_ms: self.app_consistent_every_ms,
            compression: self.compression,
            retry_unit_ms: self.retry_unit_ms,
            resync_window_start_hour: self.resync_window_start_hour,
            resync_window_end_hour: self.resync_window_end_hour,
            bandwidth: self.bandwidth.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            resync_bandwidth: self.resync_bandwidth.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        }
    }

    /// The record of the VM in `folder`; `Ok(None)` when it is not protected.
    pub fn load(folder: &Path) -> Result<Option<Self>, PersistError> {
        persist::load(&record_path(folder), &PROTECTION_STATE)
    }

    pub fn save(&self, folder: &Path) -> Result<(), PersistError> {
        persist::save(&record_path(folder), &PROTECTION_STATE, self)
    }

    pub fn exists(folder: &Path) -> bool {
        record_path(folder).exists()
    }

    /// Removes the record: the VM no longer replicates.
    pub fn remove(folder: &Path) {
        let path = record_path(folder);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<T: std::str::FromStr<Err = siterecovery_proto::model::NameError>>(s: &str) -> T {
        s.parse().expect("a valid id")
    }

    fn record() -> ProtectionRecord {
        let s = v1::ReplicationSettings { interval_ms: 300, retention_ms: 5, compression: true, ..Default::default() };
        ProtectionRecord::new(id("r-0000abcd"), id("host-b"), "127.0.0.1:7".into(), s).expect("record")
    }

    #[test]
    fn round_trip_and_a_legacy_plain_json_file() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(ProtectionRecord::load(dir.path()).expect("none"), None);
        let r = record();
        r.save(dir.path()).expect("save");
        assert_eq!(ProtectionRecord::load(dir.path()).expect("load"), Some(r.clone()));
        assert_eq!(r.settings().interval_ms, 300);
        // What agents before the envelope wrote: plain JSON.
        std::fs::write(record_path(dir.path()), serde_json::to_vec_pretty(&r).expect("json")).expect("write");
        assert_eq!(ProtectionRecord::load(dir.path()).expect("legacy"), Some(r));
    }

    #[test]
    fn torn_and_corrupt_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        record().save(dir.path()).expect("save");
        let path = record_path(dir.path());
        let good = std::fs::read(&path).expect("read");
        std::fs::write(&path, &good[..persist::HEADER_LEN + 3]).expect("write");
        assert!(matches!(ProtectionRecord::load(dir.path()), Err(PersistError::Torn { .. })));
        let mut bad = good;
        let last = bad.len() - 2;
        bad[last] ^= 0x01;
        std::fs::write(&path, &bad).expect("write");
        assert!(matches!(ProtectionRecord::load(dir.path()), Err(PersistError::Corrupt { .. })));
        std::fs::write(&path, b"{\"relationship_id\": 3}").expect("write");
        assert!(matches!(ProtectionRecord::load(dir.path()), Err(PersistError::Decode { version: 0, .. })));
    }

    #[test]
    fn a_zero_interval_is_refused() {
        let s = v1::ReplicationSettings::default();
        assert!(matches!(
            ProtectionRecord::new(id("r-00000001"), id("h"), "a".into(), s),
            Err(ProtectionError::Invalid(_))
        ));
    }
}
