//! The vault's revoked certificates: kept in the store (table `revoked`), held in
//! memory as the [`RevocationList`] every handshake of the provider reads, and
//! announced to control sessions (which push it to agents and end themselves when
//! their own certificate is revoked).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use siterecovery_certs::live::RevocationList;
use siterecovery_proto::model::{HostId, HostName};
use tokio::sync::watch;

use crate::store::{REVOKED, Store, StoreError};

/// One revoked certificate, keyed by its serial (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedRecord {
    pub serial: String,
    pub host_id: HostId,
    pub host_name: HostName,
    pub revoked_unix_ms: i64,
    /// `host reset`, `host remove`, ...
    pub reason: String,
}

/// The revocation registry of a running provider.
pub struct Revocations {
    list: Arc<RevocationList>,
    changed: watch::Sender<u64>,
}

impl Revocations {
    /// Loads every revoked serial from the store.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let list = RevocationList::new();
        let records: Vec<RevokedRecord> = store.list(REVOKED)?;
        let version = records.len() as u64;
        list.replace(version, records.into_iter().map(|r| r.serial));
        Ok(Self { list, changed: watch::channel(version).0 })
    }

    /// What the provider's TLS verifiers read.
    pub fn list(&self) -> &Arc<RevocationList> {
        &self.list
    }

    /// Records `record` durably, then refuses its serial at every new handshake and
    /// tells the control sessions. Revoking a serial twice is harmless.
    pub fn revoke(&self, store: &Store, record: RevokedRecord) -> Result<(), StoreError> {
        let serial = record.serial.to_ascii_lowercase();
        store.put(REVOKED, &serial, &RevokedRecord { serial: serial.clone(), ..record })?;
        self.list.insert(&serial);
        let version = self.list.snapshot().0;
        self.changed.send_replace(version);
        Ok(())
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.list.is_revoked(serial)
    }

    /// Every revoked record (for `host revoked`).
    pub fn records(&self, store: &Store) -> Result<Vec<RevokedRecord>, StoreError> {
        store.list(REVOKED)
    }

    /// (version, serials): what a `RevocationList` push carries.
    pub fn snapshot(&self) -> (u64, Vec<String>) {
        self.list.snapshot()
    }

    /// Changes as versions; a session pushes the list again when this moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_survive_a_restart_and_notify() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let r = Revocations::load(&store).expect("load");
        let rx = r.subscribe();
        let rec = RevokedRecord {
            serial: "0AB1".into(),
            host_id: "hv1-abc123".parse().expect("id"),
            host_name: "hv1".parse().expect("name"),
            revoked_unix_ms: 1,
            reason: "host remove".into(),
        };
        r.revoke(&store, rec).expect("revoke");
        assert!(r.is_revoked("0ab1"));
        assert!(rx.has_changed().expect("watch"));
        drop(r);
        let again = Revocations::load(&store).expect("reload");
        assert!(again.is_revoked("0ab1"));
        assert_eq!(again.records(&store).expect("records").len(), 1);
    }
}
