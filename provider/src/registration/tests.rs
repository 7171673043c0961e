//! The registration rules: the request's conversion, [`decide`] case by case, and the
//! service on a real vault (CA, secret, store) without a network: a name registers
//! once, renewal with the current certificate, `host reset` allows exactly one, site
//! and cloud stay, refusals are rate-limited before the secret is read.

use std::time::Duration;

use siterecovery_certs::VaultKeyFile;
use siterecovery_certs::csr::make_csr;

use super::*;
use crate::trust::{Revocations, RevokedRecord};

fn request() -> v1::RegisterRequest {
    v1::RegisterRequest {
        host_name: "hv1".into(),
        site: "primary".into(),
        cloud: "gold-a".into(),
        listen_address: "10.0.0.1:7443".into(),
        ..Default::default()
    }
}

#[test]
fn every_name_field_is_checked() {
    let ok = RegisterRequest::try_from(&request()).expect("valid");
    assert_eq!(ok.host_name, "hv1");
    for (field, set) in [
        ("register.host_name", (|r: &mut v1::RegisterRequest| r.host_name = "../etc".into()) as fn(&mut _)),
        ("register.site", |r| r.site = "a/b".into()),
        ("register.cloud", |r| r.cloud = ".".into()),
        ("register.listen_address", |r| r.listen_address = "no-port".into()),
        ("register.listen_address", |r| r.listen_address = "*.corp.example:7443".into()),
        ("register.listen_address", |r| r.listen_address = "0.0.0.0:7443".into()),
        ("register.host_name", |r| r.host_name = String::new()),
    ] {
        let mut r = request();
        set(&mut r);
        let e = RegisterRequest::try_from(&r).expect_err(field);
        assert_eq!(e.field(), field);
        let status = Status::from(RegistrationError::from(e));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }
    // Loopback names only for a loopback listener.
    let names = RegisterRequest::try_from(&request()).expect("valid").server_names;
    assert_eq!((names.dns.len(), names.ips.len()), (0, 1), "{names:?}");
}

#[test]
fn refusals_map_to_their_codes() {
    let code = |e: RegistrationError| Status::from(e).code();
    let name: HostName = "hv1".parse().expect("name");
    assert_eq!(code(RegistrationError::WrongSecret), tonic::Code::PermissionDenied);
    assert_eq!(code(RegistrationError::NoSecret), tonic::Code::FailedPrecondition);
    assert_eq!(code(RegistrationError::AlreadyRegistered(name.clone())), tonic::Code::AlreadyExists);
    assert_eq!(
        code(RegistrationError::NotCurrentCertificate { host: name.clone(), why: "x".into() }),
        tonic::Code::PermissionDenied
    );
    let moved = RegistrationError::Moved {
        host: name.clone(),
        site: "primary".parse().expect("site"),
        cloud: "gold-a".parse().expect("cloud"),
    };
    assert!(moved.to_string().contains("provider host move hv1"), "{moved}");
    assert_eq!(code(moved), tonic::Code::FailedPrecondition);
    assert_eq!(code(RegistrationError::RateLimited { retry_after_secs: 12 }), tonic::Code::ResourceExhausted);
    let already = RegistrationError::AlreadyRegistered(name).to_string();
    assert!(already.contains("already registered") && already.contains("provider host reset hv1"), "{already}");
    assert_eq!(truncated(&"x".repeat(200)).chars().count(), 81);
}

fn host(vault: &VaultId) -> (HostRecord, Presented) {
    let rec = HostRecord {
        id: "hv1-0a1b2c".parse().expect("id"),
        name: "hv1".parse().expect("name"),
        site: "primary".parse().expect("site"),
        cloud: "gold-a".parse().expect("cloud"),
        address: "10.0.0.1:7443".into(),
        agent_version: "0".into(),
        registered_unix_ms: 1,
        cert_serial: "0c0ffee0".into(),
        cert_not_after_unix_ms: 0,
        reset_pending: false,
        prev_cert_serial: String::new(),
    };
    let p = Presented {
        identity: PeerIdentity::new(vault.clone(), Role::Host, "hv1-0a1b2c").expect("identity"),
        serial: "0c0ffee0".into(),
    };
    (rec, p)
}

#[test]
fn the_rule_case_by_case() {
    let vault = VaultId::generate();
    let (rec, current) = host(&vault);
    let req = RegisterRequest::try_from(&request()).expect("valid");
    let none = |_: &str| false;
    let d =
        |rec: Option<&HostRecord>, p: Option<Result<Presented, String>>| decide(rec, &req, p.as_ref(), &vault, none);
    assert_eq!(d(None, None).ok(), Some(Grant::New));
    assert!(matches!(d(Some(&rec), None), Err(RegistrationError::AlreadyRegistered(_))));
    assert_eq!(d(Some(&rec), Some(Ok(current.clone()))).ok(), Some(Grant::Renewal));
    let reset = HostRecord { reset_pending: true, ..rec.clone() };
    assert_eq!(d(Some(&reset), None).ok(), Some(Grant::AfterReset));
    // A record from before serials were kept: the host id is enough.
    let legacy = HostRecord { cert_serial: String::new(), ..rec.clone() };
    assert_eq!(d(Some(&legacy), Some(Ok(current.clone()))).ok(), Some(Grant::Renewal));

    let refused = |p: Presented, want: &str| {
        let e = d(Some(&rec), Some(Ok(p))).expect_err(want);
        assert!(matches!(e, RegistrationError::NotCurrentCertificate { .. }), "{want}: {e}");
        assert!(e.to_string().contains(want), "{e}");
    };
    refused(Presented { serial: "0bad".into(), ..current.clone() }, "superseded by 0c0ffee0");
    refused(
        Presented {
            identity: PeerIdentity::new(vault.clone(), Role::Host, "hv2-999999").expect("id"),
            ..current.clone()
        },
        "host id hv2-999999",
    );
    refused(
        Presented {
            identity: PeerIdentity::new(vault.clone(), Role::Operator, "hv1-0a1b2c").expect("id"),
            ..current.clone()
        },
        "a certificate of role operator",
    );
    refused(
        Presented {
            identity: PeerIdentity::new(VaultId::generate(), Role::Host, "hv1-0a1b2c").expect("id"),
            ..current.clone()
        },
        "a certificate of vault",
    );
    // A revoked certificate, for a registered name or a new one.
    for existing in [Some(&rec), None] {
        let e = decide(existing, &req, Some(&Ok(current.clone())), &vault, |s| s == "0c0ffee0").expect_err("revoked");
        assert!(matches!(e, RegistrationError::Revoked { .. }) && e.to_string().contains("0c0ffee0"), "{e}");
    }
    // While a reset is pending, the host's certificates renew nothing, revoked yet or not.
    for revoked in [true, false] {
        let e = decide(Some(&reset), &req, Some(&Ok(current.clone())), &vault, |_| revoked).expect_err("reset");
        let want = if revoked { "is revoked" } else { "was reset" };
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(Status::from(e).code(), tonic::Code::PermissionDenied);
    }
    assert!(matches!(d(Some(&rec), Some(Err("garbage".into()))), Err(RegistrationError::NotCurrentCertificate { .. })));

    // Site and cloud never change by registration, whatever grants it.
    for (site, cloud) in [("secondary", "gold-a"), ("primary", "gold-b")] {
        let req =
            RegisterRequest::try_from(&v1::RegisterRequest { site: site.into(), cloud: cloud.into(), ..request() })
                .expect("valid");
        for (r, p) in [(&rec, Some(Ok(current.clone()))), (&reset, None)] {
            let e = decide(Some(r), &req, p.as_ref(), &vault, none).expect_err("moved");
            assert!(matches!(e, RegistrationError::Moved { .. }), "{e}");
        }
        // The refusal for want of authority comes first.
        assert!(matches!(decide(Some(&rec), &req, None, &vault, none), Err(RegistrationError::AlreadyRegistered(_))));
        assert_eq!(decide(None, &req, None, &vault, none).ok(), Some(Grant::New));
    }
}

/// A vault (CA, secret, store) in a temp dir, as the service's context.
struct Ctx {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    vault_id: VaultId,
    ca: VaultCa,
    store: Store,
    revocations: Revocations,
    secret: String,
}

impl RegistrationContext for Ctx {
    fn vault_id(&self) -> &VaultId {
        &self.vault_id
    }
    fn vault_dir(&self) -> &Path {
        &self.dir
    }
    fn ca(&self) -> &VaultCa {
        &self.ca
    }
    fn store(&self) -> &Store {
        &self.store
    }
    fn revocations(&self) -> &Revocations {
        &self.revocations
    }
    fn cert_validity(&self) -> Duration {
        Duration::from_secs(3600)
    }
}

fn service() -> RegistrationService<Ctx> {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("p");
    let key = tmp.path().join("vault.key");
    let v = crate::vault::create(&dir, "t", "127.0.0.1:1", &key, Duration::from_secs(600)).expect("vault");
    let store = Store::open(&dir).expect("store");
    let revocations = Revocations::load(&store).expect("revocations");
    let secret = VaultKeyFile::read(&key).expect("key file").content.secret;
    RegistrationService::new(Arc::new(Ctx {
        _tmp: tmp,
        dir,
        vault_id: v.info.vault_id.clone(),
        ca: v.ca,
        store,
        revocations,
        secret,
    }))
}

/// A request for `name` at `site` with the vault's secret and a fresh CSR.
fn req(svc: &RegistrationService<Ctx>, name: &str, site: &str) -> v1::RegisterRequest {
    v1::RegisterRequest {
        vault_id: svc.state.vault_id.to_string(),
        secret: svc.state.secret.clone(),
        csr_pem: make_csr(name).expect("csr").csr_pem,
        host_name: name.into(),
        site: site.into(),
        cloud: "gold-a".into(),
        listen_address: "127.0.0.1:7001".into(),
        reregister: true,
        agent_version: "t".into(),
    }
}

fn presenting(pem: &str) -> Option<Result<Presented, String>> {
    let der = siterecovery_certs::ca::first_cert_der(pem).expect("der");
    Some(Ok(Presented {
        identity: PeerIdentity::from_cert_der(&der).expect("identity"),
        serial: siterecovery_certs::live::serial_of_pem(pem).expect("serial"),
    }))
}

fn stored(svc: &RegistrationService<Ctx>, name: &str) -> HostRecord {
    svc.state.store.get(HOSTS, name).expect("store").expect("host record")
}

#[test]
fn a_name_registers_once_then_renews_with_its_certificate() {
    let svc = service();
    let (first, grant) = svc.register(&req(&svc, "hv1", "primary"), None).expect("first registration");
    assert_eq!(grant, Grant::New);
    let rec = stored(&svc, "hv1");
    assert_eq!(rec.id.as_str(), first.host_id);
    assert_eq!(rec.cert_serial, siterecovery_certs::live::serial_of_pem(&first.certificate_pem).expect("serial"));
    assert!(rec.cert_not_after_unix_ms > siterecovery_certs::unix_now() * 1000);
    assert!(!rec.reset_pending);

    // The attack: the vault key file and --reregister, without the host's certificate.
    let e = svc.register(&req(&svc, "hv1", "primary"), None).expect_err("replaced a registration");
    assert!(matches!(e, RegistrationError::AlreadyRegistered(_)), "{e}");
    assert_eq!(stored(&svc, "hv1"), rec, "a refused registration changed the host");

    // Renewal: same host id, a new current certificate.
    let (renewed, grant) =
        svc.register(&req(&svc, "hv1", "primary"), presenting(&first.certificate_pem).as_ref()).expect("renewal");
    assert_eq!(grant, Grant::Renewal);
    assert_eq!(renewed.host_id, first.host_id);
    let after = stored(&svc, "hv1");
    assert_ne!(after.cert_serial, rec.cert_serial);
    assert_eq!((after.registered_unix_ms, &after.site), (rec.registered_unix_ms, &rec.site));
    // The superseded certificate renews no more; another site is refused.
    let e = svc.register(&req(&svc, "hv1", "primary"), presenting(&first.certificate_pem).as_ref()).expect_err("old");
    assert!(e.to_string().contains("superseded"), "{e}");
    let e = svc
        .register(&req(&svc, "hv1", "secondary"), presenting(&renewed.certificate_pem).as_ref())
        .expect_err("moved by registration");
    assert!(matches!(e, RegistrationError::Moved { .. }), "{e}");
    // Another host's certificate does not renew this one.
    let (other, _) = svc.register(&req(&svc, "hv2", "primary"), None).expect("hv2");
    let e = svc.register(&req(&svc, "hv1", "primary"), presenting(&other.certificate_pem).as_ref()).expect_err("hv2's");
    assert!(matches!(e, RegistrationError::NotCurrentCertificate { .. }), "{e}");
    assert_eq!(stored(&svc, "hv1"), after);
}

#[test]
fn a_reset_allows_exactly_one_registration() {
    let svc = service();
    let (first, _) = svc.register(&req(&svc, "hv1", "primary"), None).expect("first registration");
    // What `host reset` does (inventory): revoke, flag.
    let mut rec = stored(&svc, "hv1");
    svc.state
        .revocations
        .revoke(
            &svc.state.store,
            RevokedRecord {
                serial: rec.cert_serial.clone(),
                host_id: rec.id.clone(),
                host_name: rec.name.clone(),
                revoked_unix_ms: 1,
                reason: "host reset".into(),
            },
        )
        .expect("revoke");
    rec.reset_pending = true;
    svc.state.store.put(HOSTS, "hv1", &rec).expect("flag");

    let e = svc.register(&req(&svc, "hv1", "primary"), presenting(&first.certificate_pem).as_ref()).expect_err("old");
    assert!(matches!(e, RegistrationError::Revoked { .. }), "{e}");
    let e = svc.register(&req(&svc, "hv1", "secondary"), None).expect_err("moved");
    assert!(matches!(e, RegistrationError::Moved { .. }), "{e}");
    // Four registrations racing: exactly one is the one the reset allows.
    let requests: Vec<_> = (0..4).map(|_| req(&svc, "hv1", "primary")).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(|| svc.register(r, None))).collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let granted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(granted.len(), 1, "{results:?}");
    let (again, grant) = granted[0];
    assert_eq!(*grant, Grant::AfterReset);
    assert!(
        results.iter().filter_map(|r| r.as_ref().err()).all(|e| matches!(e, RegistrationError::AlreadyRegistered(_)))
    );
    assert_eq!(stored(&svc, "hv1").id.as_str(), again.host_id);
    assert_ne!(again.host_id, first.host_id, "a fresh host id");
    assert!(!stored(&svc, "hv1").reset_pending, "the flag is cleared");
    let e = svc.register(&req(&svc, "hv1", "primary"), None).expect_err("a second one");
    assert!(matches!(e, RegistrationError::AlreadyRegistered(_)), "{e}");
}

#[tokio::test]
async fn refusals_are_rate_limited_before_the_secret_is_read() {
    let svc = service();
    let mut wrong = req(&svc, "hv1", "primary");
    wrong.secret = "00".repeat(32);
    for i in 0..5 {
        let s = Registration::register(&svc, Request::new(wrong.clone())).await.expect_err("wrong secret");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "attempt {i}: {s:?}");
    }
    // The secret file gone: were it read, the answer would be FAILED_PRECONDITION.
    std::fs::remove_file(svc.state.dir.join(crate::vault::SECRET_FILE)).expect("remove the secret");
    let s = Registration::register(&svc, Request::new(req(&svc, "hv1", "primary"))).await.expect_err("limited");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("too many refused registrations"), "{}", s.message());
    assert!(svc.state.store.get::<HostRecord>(HOSTS, "hv1").expect("store").is_none());
}
