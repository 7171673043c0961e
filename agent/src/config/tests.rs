//! The data dir's credentials: replaced as one set (a crash at any step leaves the old
//! set or the new one), the live identity swapped by a renewal, the revocation list
//! kept on disk and applied by version.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use siterecovery_certs::live::LiveIdentity;

use super::credentials::{self, COMMIT_MARKER, CredentialFile, HOST_CERT, HOST_KEY};
use super::revoked::{self, Revoked};
use super::testkit::{host_id, issue, registered};
use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect("read")
}

#[test]
fn a_registration_loads_into_a_live_trust() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = registered(tmp.path(), "hv1-abc", "127.0.0.1:7443", DAY);
    assert_eq!(r.files.trust.vault, *r.ca.vault_id());
    assert_eq!(r.files.identity().cert_pem, read(tmp.path(), HOST_CERT));
    assert_eq!(mode(&tmp.path().join(HOST_KEY)), 0o600);
    assert_eq!(r.files.trust.revoked.snapshot(), (0, vec![]));
    // Nothing of the staging is left behind.
    for e in std::fs::read_dir(tmp.path()).expect("ls") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".new") && name != COMMIT_MARKER && !name.contains(".tmp"), "{name} left behind");
    }
}

#[test]
fn a_key_that_does_not_go_with_the_certificate_is_refused_at_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = registered(tmp.path(), "hv1-abc", "127.0.0.1:7443", DAY);
    let other = issue(&r.ca, &host_id(&r.ca, "hv1-abc"), DAY);
    std::fs::write(tmp.path().join(HOST_KEY), other.key_pem).expect("write");
    assert!(matches!(AgentFiles::load(tmp.path()), Err(ConfigError::Cert(_))), "a mismatched pair loaded");
}

#[test]
fn a_renewal_replaces_the_pair_and_the_live_identity() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = registered(tmp.path(), "hv1-abc", "127.0.0.1:7443", DAY);
    let old_serial = r.files.trust.identity.serial().expect("serial");
    let new = issue(&r.ca, &host_id(&r.ca, "hv1-abc"), DAY);
    // A certificate with another key is refused and changes nothing.
    let crossed = PemIdentity { cert_pem: new.cert_pem.clone(), key_pem: r.files.identity().key_pem };
    assert!(r.files.renewed(&crossed).is_err(), "a certificate for another key was taken");
    assert_eq!(r.files.trust.identity.serial().expect("serial"), old_serial);
    assert_ne!(read(tmp.path(), HOST_CERT), new.cert_pem);
    r.files.renewed(&new).expect("renew");
    assert_ne!(r.files.trust.identity.serial().expect("serial"), old_serial);
    assert_eq!(read(tmp.path(), HOST_CERT), new.cert_pem);
    assert_eq!(read(tmp.path(), HOST_KEY), new.key_pem);
    assert_eq!(mode(&tmp.path().join(HOST_KEY)), 0o600);
    let again = AgentFiles::load(tmp.path()).expect("load");
    assert_eq!(again.trust.identity.serial().expect("serial"), r.files.trust.identity.serial().expect("serial"));
}

/// The files of a registration and their content.
fn set(dir: &Path) -> Vec<(String, String)> {
    ["agent.json", "ca.pem", HOST_CERT, HOST_KEY].iter().map(|n| (n.to_string(), read(dir, n))).collect()
}

#[test]
fn a_crash_before_the_commit_keeps_the_old_set() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let r = registered(dir, "hv1-abc", "127.0.0.1:7443", DAY);
    let before = set(dir);
    let new = issue(&r.ca, &host_id(&r.ca, "hv1-abc"), DAY);
    // Step 1 done for both files (or only the first), no marker: the crash came before
    // the commit.
    for staged in [vec![HOST_KEY, HOST_CERT], vec![HOST_KEY]] {
        for name in &staged {
            let data = if *name == HOST_KEY { &new.key_pem } else { &new.cert_pem };
            std::fs::write(dir.join(format!("{name}.new")), data).expect("stage");
        }
        let loaded = AgentFiles::load(dir).expect("load");
        assert_eq!(set(dir), before, "an uncommitted replacement changed the set");
        assert_eq!(loaded.trust.identity.serial().ok(), r.files.trust.identity.serial().ok());
        assert!(!dir.join("host.key.new").exists() && !dir.join("host.pem.new").exists(), "staged files kept");
    }
}

#[test]
fn a_crash_after_the_commit_finishes_the_new_set() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let r = registered(dir, "hv1-abc", "127.0.0.1:7443", DAY);
    let new = issue(&r.ca, &host_id(&r.ca, "hv1-abc"), DAY);
    let new_serial = LiveIdentity::new(&new).expect("live").serial().expect("serial");
    // Marker written; then the crash came before any rename, or after the key's.
    for renamed_key in [false, true] {
        std::fs::write(dir.join("host.key.new"), &new.key_pem).expect("stage");
        std::fs::write(dir.join("host.pem.new"), &new.cert_pem).expect("stage");
        std::fs::write(dir.join(COMMIT_MARKER), "host.key\nhost.pem").expect("marker");
        if renamed_key {
            std::fs::rename(dir.join("host.key.new"), dir.join(HOST_KEY)).expect("rename");
        }
        let loaded = AgentFiles::load(dir).expect("load after the crash");
        assert_eq!(loaded.trust.identity.serial().expect("serial"), new_serial);
        assert_eq!(read(dir, HOST_KEY), new.key_pem);
        assert!(!dir.join(COMMIT_MARKER).exists(), "marker kept");
        // Back to the old pair for the next round.
        r.files.renewed(&r.files.identity()).expect("restore");
    }
}

#[test]
fn only_credential_files_can_be_replaced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = credentials::replace(tmp.path(), &[CredentialFile::public("vms", b"x")]);
    assert!(r.is_err(), "a replacement wrote a file that is not a credential");
    assert!(!tmp.path().join("vms").exists() && !tmp.path().join("vms.new").exists());
}

#[test]
fn the_revocation_list_is_applied_by_version_and_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let r = registered(dir, "hv1-abc", "127.0.0.1:7443", DAY);
    assert!(r.files.apply_revocations(3, vec!["AB01".into(), "cd02".into()]).expect("apply"));
    assert!(r.files.trust.revoked.is_revoked("ab01"));
    assert_eq!(mode(&revoked::path(dir)), 0o600);
    assert_eq!(
        revoked::load(dir).expect("load"),
        Some(Revoked { version: 3, serials: vec!["ab01".into(), "cd02".into()] })
    );
    // The same list again writes nothing; an older one is ignored.
    assert!(!r.files.apply_revocations(3, vec!["cd02".into(), "ab01".into()]).expect("same"));
    assert!(!r.files.apply_revocations(2, vec![]).expect("older"));
    assert!(r.files.trust.revoked.is_revoked("ab01"), "an older list undid a newer one");
    // A newer one replaces it, on disk too; a restart starts from it.
    assert!(r.files.apply_revocations(4, vec!["ef03".into()]).expect("newer"));
    let again = AgentFiles::load(dir).expect("load");
    assert!(again.trust.revoked.is_revoked("ef03") && !again.trust.revoked.is_revoked("ab01"));
    assert_eq!(again.trust.revoked.snapshot().0, 4);
}

#[test]
fn a_damaged_revocation_list_is_refused_not_ignored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let _r = registered(dir, "hv1-abc", "127.0.0.1:7443", DAY);
    revoked::save(dir, &Revoked { version: 1, serials: vec!["../x".into()] }).expect("save");
    assert!(matches!(AgentFiles::load(dir), Err(ConfigError::State(_))), "a bad serial loaded");
    let mut bytes = std::fs::read(revoked::path(dir)).expect("read");
    bytes.truncate(bytes.len() - 3);
    std::fs::write(revoked::path(dir), bytes).expect("write");
    assert!(matches!(AgentFiles::load(dir), Err(ConfigError::State(_))), "a torn list loaded");
}

#[test]
fn a_reload_presents_a_certificate_replaced_in_the_data_dir() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = registered(tmp.path(), "hv1-abc", "127.0.0.1:7443", DAY);
    assert!(!r.files.reload_identity().expect("reload"), "nothing changed on disk");
    let old_serial = r.files.trust.identity.serial().expect("serial");
    // A half-written pair (new certificate, old key) is refused and changes nothing.
    let new = issue(&r.ca, &host_id(&r.ca, "hv1-abc"), DAY);
    std::fs::write(tmp.path().join(HOST_CERT), &new.cert_pem).expect("write");
    assert!(r.files.reload_identity().is_err(), "a certificate for another key was taken");
    assert_eq!(r.files.trust.identity.serial().expect("serial"), old_serial);
    std::fs::write(tmp.path().join(HOST_KEY), &new.key_pem).expect("write");
    assert!(r.files.reload_identity().expect("reload"), "the new pair was not taken");
    assert_ne!(r.files.trust.identity.serial().expect("serial"), old_serial);
    assert_eq!(r.files.identity().cert_pem, new.cert_pem);
}
