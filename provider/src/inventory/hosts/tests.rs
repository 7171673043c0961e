//! Host commands on a real store: reset flags and revokes, remove refuses a host in
//! use and otherwise deletes the host and only its VMs, move changes only what it is
//! given, and every request field is checked.

use serde_json::json;

use super::*;

struct Env {
    _tmp: tempfile::TempDir,
    store: Store,
    revocations: Revocations,
}

fn host(name: &str, serial: &str) -> HostRecord {
    serde_json::from_value(json!({
        "id": format!("{name}-0a0a0a"), "name": name, "site": "primary", "cloud": "gold-a",
        "address": "127.0.0.1:7001", "agent_version": "0", "registered_unix_ms": 1,
        "cert_serial": serial, "cert_not_after_unix_ms": 5,
    }))
    .expect("host")
}

fn vm(name: &str, host_id: &str) -> VmRecord {
    serde_json::from_value(json!({
        "name": name, "host_id": host_id, "folder": "", "power_state": "running", "created_unix_ms": 1,
        "disks": [], "nics": [],
    }))
    .expect("vm")
}

fn env() -> Env {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::open(tmp.path()).expect("store");
    let revocations = Revocations::load(&store).expect("revocations");
    for (name, serial) in [("hv-a", "0a01"), ("hv-b", "0b01"), ("hv-old", "")] {
        store.put(HOSTS, name, &host(name, serial)).expect("put host");
    }
    store.put(VMS, "vm1", &vm("vm1", "hv-b-0a0a0a")).expect("vm1");
    store.put(VMS, "vm2", &vm("vm2", "hv-b-0a0a0a")).expect("vm2");
    store.put(VMS, "vm3", &vm("vm3", "hv-a-0a0a0a")).expect("vm3");
    Env { _tmp: tmp, store, revocations }
}

fn name(s: &str) -> HostName {
    s.parse().expect("host name")
}

fn get(e: &Env, n: &str) -> Option<HostRecord> {
    e.store.get(HOSTS, n).expect("store")
}

#[test]
fn reset_flags_the_host_and_revokes_its_certificate() {
    let e = env();
    let h = reset(&e.store, &e.revocations, &name("hv-b")).expect("reset");
    assert!(h.reset_pending);
    assert_eq!(get(&e, "hv-b"), Some(h.clone()));
    assert!(e.revocations.is_revoked("0b01"));
    assert!(!e.revocations.is_revoked("0a01"));
    let listed = revoked(&e.store, &e.revocations).expect("revoked");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].serial.as_str(),
            listed[0].host_name.as_str(),
            listed[0].host_id.as_str(),
            listed[0].reason.as_str()
        ),
        ("0b01", "hv-b", "hv-b-0a0a0a", "host reset")
    );
    // The same id and VMs: only the next registration changes them.
    assert_eq!(h.id.as_str(), "hv-b-0a0a0a");
    assert!(e.store.get::<VmRecord>(VMS, "vm1").expect("store").is_some());
    // A record without a serial is flagged; nothing to revoke.
    let old = reset(&e.store, &e.revocations, &name("hv-old")).expect("reset old");
    assert!(old.reset_pending);
    assert_eq!(revoked(&e.store, &e.revocations).expect("revoked").len(), 1);
    let err = reset(&e.store, &e.revocations, &name("hv-x")).expect_err("unknown");
    assert!(matches!(err, InventoryError::UnknownHost(_)), "{err}");
}

#[test]
fn remove_refuses_a_host_in_use_then_deletes_it_and_its_vms() {
    let e = env();
    // The stored form of a relationship (a JSON document), written without the
    // relationship module: inventory sits below it.
    let rel = json!({
        "id": "r-00000001", "vm": "vm3", "primary_host_id": "hv-a-0a0a0a", "replica_host_id": "hv-b-0a0a0a",
        "policy": "gold", "interval_ms": 1000, "state": "replicating", "created_unix_ms": 1, "total_bytes": 512,
    });
    e.store.put(RELATIONSHIPS, "r-00000001", &rel).expect("relationship");
    for (n, role) in [("hv-a", "primary"), ("hv-b", "replica")] {
        let err = remove(&e.store, &e.revocations, &name(n)).expect_err(role);
        assert!(matches!(&err, InventoryError::HostInUse { vms, .. } if vms == &["vm3".to_string()]), "{err}");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("vm3") && status.message().contains("unprotect"), "{}", status.message());
        assert!(get(&e, n).is_some(), "a refused remove deleted {n}");
    }
    assert!(revoked(&e.store, &e.revocations).expect("revoked").is_empty());

    e.store.delete(RELATIONSHIPS, "r-00000001").expect("unprotect");
    let serial = remove(&e.store, &e.revocations, &name("hv-b")).expect("remove");
    assert_eq!(serial.as_deref(), Some("0b01"));
    assert_eq!(get(&e, "hv-b"), None);
    assert!(e.revocations.is_revoked("0b01"));
    assert_eq!(revoked(&e.store, &e.revocations).expect("revoked")[0].reason, "host remove");
    let vms: Vec<VmRecord> = e.store.list(VMS).expect("vms");
    assert_eq!(vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), vec!["vm3"], "only hv-b's VMs go");
    assert!(matches!(remove(&e.store, &e.revocations, &name("hv-b")), Err(InventoryError::UnknownHost(_))));
}

#[test]
fn move_changes_site_and_or_cloud() {
    let e = env();
    let req = |site: &str, cloud: &str| {
        MoveHostRequest::try_from(&v1::MoveHostRequest { host: "hv-a".into(), site: site.into(), cloud: cloud.into() })
    };
    let h = move_host(&e.store, &name("hv-a"), &req("secondary", "").expect("valid")).expect("move");
    assert_eq!((h.site.as_str(), h.cloud.as_str()), ("secondary", "gold-a"));
    let h = move_host(&e.store, &name("hv-a"), &req("", "gold-b").expect("valid")).expect("move");
    assert_eq!((h.site.as_str(), h.cloud.as_str()), ("secondary", "gold-b"));
    assert_eq!(get(&e, "hv-a"), Some(h));
    assert!(matches!(
        move_host(&e.store, &name("hv-x"), &req("a", "b").expect("valid")),
        Err(InventoryError::UnknownHost(_))
    ));
    // Each field checked, named; something must change.
    assert_eq!(req("", "").expect_err("nothing").field(), "move_host.site");
    for bad in ["../etc", "a/b", "."] {
        assert_eq!(req(bad, "").expect_err(bad).field(), "move_host.site");
        assert_eq!(req("", bad).expect_err(bad).field(), "move_host.cloud");
        let r =
            MoveHostRequest::try_from(&v1::MoveHostRequest { host: bad.into(), site: "s".into(), cloud: "".into() });
        assert_eq!(r.expect_err(bad).field(), "move_host.host");
    }
}

#[test]
fn revoked_certificates_newest_first() {
    let e = env();
    for (serial, at) in [("01", 5), ("02", 9), ("03", 7)] {
        let r = RevokedRecord {
            serial: serial.into(),
            host_id: "hv-a-0a0a0a".parse().expect("id"),
            host_name: name("hv-a"),
            revoked_unix_ms: at,
            reason: "host remove".into(),
        };
        e.revocations.revoke(&e.store, r).expect("revoke");
    }
    let serials: Vec<String> = revoked(&e.store, &e.revocations).expect("list").into_iter().map(|r| r.serial).collect();
    assert_eq!(serials, vec!["02", "03", "01"]);
}
