//! [`Binding`]: a control session is bound to the host record and the certificate
//! serial that opened it. Every write the session makes re-reads the record (in the
//! write's own transaction where the write is to the record), so a session that
//! outlived a renewal, a `host reset` or a re-registration can never write an old host
//! record back: its writes are refused and it ends.

use siterecovery_proto::model::{HostId, HostName};

use super::service::ControlError;
use crate::inventory::HostRecord;
use crate::store::{HOSTS, Store};

/// The host record (by name) and certificate serial a session acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub name: HostName,
    pub id: HostId,
    /// Lowercase hex; moves on when the session renews its certificate.
    pub serial: String,
}

impl Binding {
    /// Binds a session opened by host `host_id` with the certificate `serial` (expiring
    /// at `not_after_unix_ms`): the host must be registered and `serial` its current
    /// certificate. A record without a serial (a store from before serials were kept)
    /// adopts this one.
    pub fn open(
        store: &Store,
        host_id: &str,
        serial: &str,
        not_after_unix_ms: i64,
    ) -> Result<(Self, HostRecord), ControlError> {
        let host = store
            .list::<HostRecord>(HOSTS)?
            .into_iter()
            .find(|h| h.id.as_str() == host_id)
            .ok_or_else(|| ControlError::NotRegistered(host_id.to_owned()))?;
        let binding = Self { name: host.name.clone(), id: host.id.clone(), serial: serial.to_owned() };
        if !host.prev_cert_serial.is_empty() && host.prev_cert_serial == serial && host.cert_serial != serial {
            // The renewed certificate never reached the host (or was not saved): the
            // record goes back to the one it still has.
            let host = store.update(HOSTS, &binding.name, |rec: Option<HostRecord>| match rec {
                Some(mut r) if r.id == binding.id && r.prev_cert_serial == binding.serial => {
                    r.cert_serial = std::mem::take(&mut r.prev_cert_serial);
                    r.cert_not_after_unix_ms = not_after_unix_ms;
                    (Some(r.clone()), Ok(r))
                }
                other => (None, binding.check_record(other)),
            })??;
            tracing::warn!(host = %host.name, serial = %binding.serial,
                "host came back with its certificate from before its last renewal (the renewed one never reached it); \
                 the record returns to it");
            return Ok((binding, host));
        }
        if !host.cert_serial.is_empty() {
            let host = binding.check_record(Some(host))?;
            if host.prev_cert_serial.is_empty() {
                return Ok((binding, host));
            }
            // The renewed certificate is in use: the one before is not accepted any more.
            let host = binding.update(store, |h| !std::mem::take(&mut h.prev_cert_serial).is_empty())?;
            return Ok((binding, host));
        }
        let host = binding.update(store, |h| {
            if h.cert_serial.is_empty() {
                h.cert_serial = binding.serial.clone();
                h.cert_not_after_unix_ms = not_after_unix_ms;
                true
            } else {
                false
            }
        })?;
        tracing::info!(host = %host.name, serial = %binding.serial, "host record adopted its certificate serial");
        Ok((binding, host))
    }

    fn check_record(&self, rec: Option<HostRecord>) -> Result<HostRecord, ControlError> {
        let rec = rec.ok_or_else(|| ControlError::NotRegistered(self.id.to_string()))?;
        if rec.id != self.id {
            return Err(ControlError::NotRegistered(self.id.to_string()));
        }
        if rec.cert_serial != self.serial {
            return Err(ControlError::StaleCertificate { host: self.name.to_string(), serial: self.serial.clone() });
        }
        Ok(rec)
    }

    /// The host record as stored now, when it is still this session's.
    pub fn check(&self, store: &Store) -> Result<HostRecord, ControlError> {
        self.check_record(store.get(HOSTS, &self.name)?)
    }

    /// Changes the host record in one transaction, only while it is still this
    /// session's (an empty stored serial counts as ours, for adoption). `f` returns
    /// whether it changed anything; nothing is written otherwise. Returns the record as
    /// it is now.
    pub fn update(&self, store: &Store, f: impl FnOnce(&mut HostRecord) -> bool) -> Result<HostRecord, ControlError> {
        store.update(HOSTS, &self.name, |rec: Option<HostRecord>| {
            let checked = match rec {
                Some(r) if r.cert_serial.is_empty() && r.id == self.id => Ok(r),
                other => self.check_record(other),
            };
            match checked {
                Ok(mut r) => {
                    if f(&mut r) {
                        (Some(r.clone()), Ok(r))
                    } else {
                        (None, Ok(r))
                    }
                }
                Err(e) => (None, Err(e)),
            }
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(serial: &str) -> HostRecord {
        serde_json::from_value(serde_json::json!({
            "id": "hv1-0a0a0a", "name": "hv1", "site": "s", "cloud": "c", "address": "127.0.0.1:7001",
            "agent_version": "0", "registered_unix_ms": 1, "cert_serial": serial,
        }))
        .expect("host")
    }

    #[test]
    fn a_session_writes_only_while_its_serial_is_current() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        store.put(HOSTS, "hv1", &host("")).expect("put");
        // An empty serial is adopted from the first session.
        let (b, rec) = Binding::open(&store, "hv1-0a0a0a", "aa01", 5).expect("adopt");
        assert_eq!((rec.cert_serial.as_str(), rec.cert_not_after_unix_ms), ("aa01", 5));
        // Another certificate of the same host is refused now.
        assert!(matches!(Binding::open(&store, "hv1-0a0a0a", "bb02", 5), Err(ControlError::StaleCertificate { .. })));
        assert!(matches!(Binding::open(&store, "other-0a0a0a", "aa01", 5), Err(ControlError::NotRegistered(_))));
        b.update(&store, |h| {
            h.address = "127.0.0.1:7002".into();
            true
        })
        .expect("write while current");
        // The certificate was renewed elsewhere (or the host reset): the stale session's
        // write is refused and the record keeps the newer state.
        let mut newer = host("cc03");
        newer.address = "127.0.0.1:7003".into();
        store.put(HOSTS, "hv1", &newer).expect("put");
        let writes = store.writes();
        let e = b.update(&store, |h| {
            h.address = "127.0.0.1:7002".into();
            true
        });
        assert!(matches!(e, Err(ControlError::StaleCertificate { .. })), "{e:?}");
        assert!(matches!(b.check(&store), Err(ControlError::StaleCertificate { .. })));
        assert_eq!(store.writes(), writes, "a refused write committed");
        assert_eq!(store.get::<HostRecord>(HOSTS, "hv1").expect("get"), Some(newer));
        // Re-registered: a new id under the same name.
        let mut rereg = host("cc03");
        rereg.id = "hv1-0b0b0b".parse().expect("id");
        store.put(HOSTS, "hv1", &rereg).expect("put");
        let b3 = Binding { serial: "cc03".into(), ..b };
        assert!(matches!(b3.check(&store), Err(ControlError::NotRegistered(_))));
    }

    #[test]
    fn a_host_that_missed_its_renewed_certificate_comes_back_with_the_one_before() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        // Renewed over the control channel: aa01 -> bb02, the push never arrived.
        let mut rec = host("bb02");
        rec.prev_cert_serial = "aa01".into();
        store.put(HOSTS, "hv1", &rec).expect("put");
        let (_, back) = Binding::open(&store, "hv1-0a0a0a", "aa01", 7).expect("the certificate before is accepted");
        assert_eq!((back.cert_serial.as_str(), back.prev_cert_serial.as_str()), ("aa01", ""));
        // Only once: the orphaned renewed one is not current any more.
        assert!(matches!(Binding::open(&store, "hv1-0a0a0a", "bb02", 7), Err(ControlError::StaleCertificate { .. })));
        // Renewed again and the new one arrives: the one before stops being accepted.
        let mut rec = host("cc03");
        rec.prev_cert_serial = "aa01".into();
        store.put(HOSTS, "hv1", &rec).expect("put");
        let (_, now) = Binding::open(&store, "hv1-0a0a0a", "cc03", 7).expect("the renewed one");
        assert_eq!(now.prev_cert_serial, "");
        assert!(matches!(Binding::open(&store, "hv1-0a0a0a", "aa01", 7), Err(ControlError::StaleCertificate { .. })));
    }
}
