//! Issue "Trust hardening", registration: the attacks on registration replayed with the
//! real `provider` and `agent` binaries, the real `grpcurl` and `openssl`, on loopback.
//!
//! - `agent register --host hv-b --reregister` from another data dir with the vault key
//!   file is refused with a clear error; the real hv-b stays connected, unchanged;
//!   refusals from one address are rate-limited and logged truncated;
//! - the real hv-b renews by registering with its own certificate (grpcurl presenting
//!   `host.pem`): same host id, a new certificate it then runs on;
//! - `host reset hv-b`: the old certificate registers nothing, one new registration is
//!   allowed, a second refused; site and cloud change only by `host move`;
//! - `host remove`: refused while a relationship uses the host, then deregisters and
//!   revokes;
//! - the CA puts into a certificate only names from a validated listen address: no
//!   wildcard, no `localhost` / `127.0.0.1` for a non-loopback listener;
//! - `vault create` prints the CA fingerprint and the `agent register` line that pins it.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test trust_registration`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use siterecovery_tests::*;

/// A lab with a provider and hv-b (site secondary, cloud gold-b) registered, running
/// and connected.
fn with_hv_b(test: &str) -> (Lab, Proc, Proc) {
    let lab = Lab::new(test);
    lab.create_vault();
    let provider = lab.start_provider();
    lab.operator_cert();
    lab.register_agent("hv-b", "secondary", "gold-b");
    let agent = lab.start_agent("hv-b");
    lab.wait_host_connected("hv-b");
    (lab, provider, agent)
}

/// `agent --data-dir DIR register ... --listen LISTEN EXTRA` with the lab's vault key.
fn register(lab: &Lab, name: &str, dir: &Path, site: &str, cloud: &str, listen: &str, extra: &[&str]) -> Output {
    lab.run(
        Command::new(bin("agent"))
            .arg("--data-dir")
            .arg(dir)
            .arg("register")
            .arg("--vault-key")
            .arg(&lab.vault_key)
            .args(["--host", name, "--site", site, "--cloud", cloud, "--listen", listen])
            .args(extra),
    )
}

/// `openssl ARGS`, asserting success; its stdout.
#[track_caller]
fn openssl(lab: &Lab, args: &[&str]) -> String {
    let o = lab.run(Command::new("openssl").args(args));
    assert_ok(&o, &format!("openssl {}", args.join(" ")));
    stdout(&o)
}

/// The subject alternative names of a PEM certificate, as openssl prints them.
fn sans(lab: &Lab, pem: &Path) -> String {
    openssl(lab, &["x509", "-in", &pem.display().to_string(), "-noout", "-ext", "subjectAltName"])
}

/// The serial of a PEM certificate, lowercase hex (as `host list` shows it).
fn serial(lab: &Lab, pem: &Path) -> String {
    let out = openssl(lab, &["x509", "-in", &pem.display().to_string(), "-noout", "-serial"]);
    out.trim().trim_start_matches("serial=").to_ascii_lowercase()
}

/// A fresh P-256 key (`DIR/new.key`) and a registration request for `name` with its
/// CSR and the vault key file's secret, as grpcurl's JSON.
fn request_with_new_key(lab: &Lab, dir: &Path, name: &str, site: &str, cloud: &str, listen: &str) -> (String, PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let key = dir.join("new.key");
    let csr = dir.join("new.csr");
    openssl(
        lab,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &csr.display().to_string(),
        ],
    );
    let vk: Value = serde_json::from_str(&std::fs::read_to_string(&lab.vault_key).expect("vault key")).expect("json");
    let req = json!({
        "vault_id": vk["vault_id"], "secret": vk["secret"],
        "csr_pem": std::fs::read_to_string(&csr).expect("csr"),
        "host_name": name, "site": site, "cloud": cloud, "listen_address": listen,
        "reregister": true, "agent_version": "grpcurl",
    });
    (req.to_string(), key)
}

/// `Registration/Register` with grpcurl, presenting the TLS `flags` (a host's
/// certificate, or only the CA).
fn grpc_register(lab: &Lab, flags: &[String], request: &str) -> Output {
    lab.grpcurl_call(flags, "registration.proto", request, &lab.addr(), "siterecovery.v1.Registration/Register")
}

/// Only the vault CA (no client certificate).
fn ca_only(lab: &Lab) -> Vec<String> {
    tls_args(&lab.opdir.join("ca.pem"), None)
}

/// The provider's log.
fn provider_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.root.join("provider.log")).unwrap_or_default()
}

#[test]
fn the_reregister_attack_is_refused_and_the_real_host_unaffected() {
    let (lab, _provider, mut agent) = with_hv_b("reregister_attack");
    let before = lab.wait_host_connected("hv-b");
    let slot = lab.host_slot("hv-b");
    let listen = format!("127.0.0.1:{}", slot.listen_port);

    // The attack as filed: another machine (data dir), the vault key file, --reregister.
    let attacker = lab.root.join("attacker");
    let attacked_ms = unix_now_ms();
    let o = register(&lab, "hv-b", &attacker, "secondary", "gold-b", &listen, &["--reregister"]);
    assert_fails_saying(&o, &["already registered"], "register --host hv-b --reregister from another machine");
    let err = stderr(&o);
    assert!(err.contains("provider host reset hv-b"), "the refusal does not say what to do: {err}");
    assert!(!attacker.join("agent.json").exists() && !attacker.join("host.pem").exists(), "the attacker got files");

    // The real hv-b: same registration, same certificate, still heartbeating on the
    // session it had (the agent never stopped).
    let after = lab.wait_host_heartbeat_since("hv-b", attacked_ms);
    for field in
        ["id", "site", "cloud", "address", "certificate_serial", "certificate_expires_unix_ms", "reset_pending"]
    {
        assert_eq!(after[field], before[field], "{field} changed: {before} -> {after}");
    }
    assert_eq!(after["certificate_serial"], serial(&lab, &slot.dir.join("host.pem")), "{after}");
    assert!(agent.is_running(), "the real agent exited");
    assert_eq!(lab.hosts().len(), 1, "{:?}", lab.hosts());

    // The refusals are logged, each once, with the caller's strings truncated.
    let long = "x".repeat(200);
    let o = register(&lab, &long, &lab.root.join("long"), "secondary", "gold-b", &listen, &[]);
    assert_fails(&o, "register with a 200-character host name");
    let found = wait_until(Duration::from_secs(5), || provider_log(&lab).matches("registration refused").count() >= 2);
    let log = provider_log(&lab);
    assert!(found, "refusals not logged:\n{log}");
    assert_eq!(log.matches("registration refused").count(), 2, "each refusal once:\n{log}");
    assert!(!log.contains(&"x".repeat(81)), "an attacker's string logged whole");

    // More refusals from this address: rate-limited, then even a good request waits.
    for i in 0..3 {
        let o = register(&lab, "hv-b", &lab.root.join(format!("a{i}")), "secondary", "gold-b", &listen, &[]);
        assert_fails_saying(&o, &["already registered"], &format!("attack {i}"));
    }
    let o = register(&lab, "hv-new", &lab.root.join("hv-new"), "primary", "gold-a", &listen, &[]);
    assert_fails_saying(&o, &["too many refused registrations"], "a registration from a rate-limited address");
    assert!(lab.host("hv-new").is_none());
    let log = provider_log(&lab);
    assert_eq!(log.matches("too many refused attempts").count(), 1, "the limit is logged once:\n{log}");
    lab.wait_host_heartbeat_since("hv-b", unix_now_ms());
}

#[test]
fn the_real_host_renews_with_its_own_certificate() {
    let (lab, _provider, mut agent) = with_hv_b("renewal");
    let before = lab.wait_host_connected("hv-b");
    let slot = lab.host_slot("hv-b");
    let listen = format!("127.0.0.1:{}", slot.listen_port);
    let work = lab.root.join("renew");

    // Without a certificate the same request is the attack: refused (AlreadyExists).
    let (req, _) = request_with_new_key(&lab, &work, "hv-b", "secondary", "gold-b", &listen);
    assert_exit(&grpc_register(&lab, &ca_only(&lab), &req), grpc_exit(6), "Register hv-b without a certificate");
    // Presenting hv-b's own certificate: a renewal.
    let o = grpc_register(&lab, &host_tls(&slot.dir), &req);
    assert_ok(&o, "Register hv-b presenting its own certificate");
    let resp: Value = serde_json::from_slice(&o.stdout).expect("Register JSON");
    assert_eq!(resp["hostId"], before["id"], "renewal changed the host id: {resp}");
    let cert = work.join("new.pem");
    std::fs::write(&cert, resp["certificatePem"].as_str().expect("certificate")).expect("write the new certificate");
    let renewed = lab.host("hv-b").expect("hv-b");
    assert_eq!(renewed["id"], before["id"]);
    assert_eq!(renewed["certificate_serial"], serial(&lab, &cert), "{renewed}");
    assert_ne!(renewed["certificate_serial"], before["certificate_serial"]);
    assert!(renewed["certificate_expires_unix_ms"].as_i64().is_some_and(|t| t > unix_now_ms()), "{renewed}");
    // The superseded certificate renews no more.
    let (again, _) = request_with_new_key(&lab, &lab.root.join("again"), "hv-b", "secondary", "gold-b", &listen);
    let o = grpc_register(&lab, &host_tls(&slot.dir), &again);
    assert_fails(&o, "Register with the superseded certificate");
    assert_eq!(lab.host("hv-b").expect("hv-b")["certificate_serial"], renewed["certificate_serial"]);

    // The host runs on the new certificate: same id, connected.
    agent.stop_gracefully();
    std::fs::copy(&cert, slot.dir.join("host.pem")).expect("install host.pem");
    std::fs::copy(work.join("new.key"), slot.dir.join("host.key")).expect("install host.key");
    let since = unix_now_ms();
    let _agent = lab.start_agent("hv-b");
    let h = lab.wait_host_heartbeat_since("hv-b", since);
    assert_eq!(h["id"], before["id"], "{h}");
}

#[test]
fn host_reset_allows_exactly_one_new_registration() {
    let (lab, _provider, mut agent) = with_hv_b("host_reset");
    let before = lab.wait_host_connected("hv-b");
    let slot = lab.host_slot("hv-b");
    let listen = format!("127.0.0.1:{}", slot.listen_port);

    let o = lab.cli(&["host", "reset", "hv-b"]);
    assert_ok(&o, "host reset hv-b");
    let old_serial = before["certificate_serial"].as_str().expect("serial").to_owned();
    assert!(stdout(&o).contains(&format!("certificate {old_serial} revoked")), "{}", stdout(&o));
    let h = lab.host("hv-b").expect("hv-b");
    assert_eq!(h["reset_pending"], true, "{h}");
    let table = stdout(&lab.cli(&["host", "list"]));
    let row = table.lines().find(|l| l.starts_with("hv-b")).unwrap_or_else(|| panic!("no hv-b row:\n{table}"));
    assert!(row.contains("pending") && row.contains("(in "), "{table}");
    let revoked = lab.cli_json(&["host", "revoked"]);
    assert_eq!(revoked[0]["serial"], old_serial.as_str(), "{revoked}");
    assert_eq!(revoked[0]["reason"], "host reset", "{revoked}");
    assert_eq!(revoked[0]["host_name"], "hv-b", "{revoked}");

    // The old certificate registers nothing.
    let (req, _) = request_with_new_key(&lab, &lab.root.join("old"), "hv-b", "secondary", "gold-b", &listen);
    assert_fails(&grpc_register(&lab, &host_tls(&slot.dir), &req), "Register with the reset host's certificate");
    // Site and cloud stay as they were, whatever the reset allows.
    let fresh = lab.root.join("hv-b-new");
    let o = register(&lab, "hv-b", &fresh, "primary", "gold-b", &listen, &[]);
    assert_fails_saying(&o, &["provider host move hv-b"], "re-registration into another site");
    assert!(lab.host("hv-b").expect("hv-b")["reset_pending"] == true, "a refused attempt used the reset");

    // Exactly one new registration.
    let o = register(&lab, "hv-b", &fresh, "secondary", "gold-b", &listen, &[]);
    assert_ok(&o, "the registration the reset allows");
    let h = lab.host("hv-b").expect("hv-b");
    assert_ne!(h["id"], before["id"], "{h}");
    assert_eq!(h["reset_pending"], false, "{h}");
    assert_eq!(h["certificate_serial"], serial(&lab, &fresh.join("host.pem")), "{h}");
    let o = register(&lab, "hv-b", &lab.root.join("hv-b-third"), "secondary", "gold-b", &listen, &[]);
    assert_fails_saying(&o, &["already registered"], "a second registration after one reset");
    assert_eq!(lab.host("hv-b").expect("hv-b")["id"], h["id"]);

    // The host runs from its new registration.
    agent.stop_gracefully();
    let since = unix_now_ms();
    let _agent = lab.start_agent_in("hv-b", &fresh);
    let now = lab.wait_host_heartbeat_since("hv-b", since);
    assert_eq!(now["id"], h["id"], "{now}");

    // Site and cloud change by the operator's command only.
    let o = lab.cli(&["host", "move", "hv-b", "--site", "primary", "--cloud", "gold-a"]);
    assert_ok(&o, "host move");
    let moved = lab.host("hv-b").expect("hv-b");
    assert_eq!((moved["site"].as_str(), moved["cloud"].as_str()), (Some("primary"), Some("gold-a")), "{moved}");
    assert_eq!(moved["id"], h["id"]);
    let o = lab.cli(&["host", "move", "hv-b", "--site", "../etc"]);
    assert_fails_saying(&o, &["move_host.site"], "host move to a hostile site name");
}

#[test]
fn host_remove_waits_for_unprotect_then_revokes() {
    let w = World::new("host_remove");
    w.vm("vm1", &["8M"], &[]);
    w.protect("vm1");
    let b = w.host("hv-b").expect("hv-b");
    let o = w.cli(&["host", "remove", "hv-b"]);
    assert_fails_saying(&o, &["vm1"], "host remove of a replica host in use");
    assert!(stderr(&o).contains("unprotect"), "{}", stderr(&o));
    assert!(w.host("hv-b").is_some(), "a refused remove removed hv-b");

    let o = w.cli_long(&["unprotect", "vm1", "--wait"]);
    assert_ok(&o, "unprotect vm1");
    let o = w.cli(&["--json", "host", "remove", "hv-b"]);
    assert_ok(&o, "host remove hv-b");
    let r: Value = serde_json::from_slice(&o.stdout).expect("host remove JSON");
    assert_eq!(r["removed"], "hv-b", "{r}");
    assert_eq!(r["revoked_serial"], b["certificate_serial"], "{r}");
    assert!(w.host("hv-b").is_none(), "hv-b still listed");
    let revoked = w.cli_json(&["host", "revoked"]);
    assert!(
        revoked
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["serial"] == b["certificate_serial"] && x["reason"] == "host remove")),
        "{revoked}"
    );
    // hv-a is untouched.
    assert_eq!(w.host("hv-a").expect("hv-a")["connected"], true);
    // The removed certificate registers nothing, not even the name it had.
    let dir = w.dir("hv-b");
    let (req, _) = request_with_new_key(&w.lab, &w.lab.root.join("x"), "hv-b", "secondary", "gold-b", "127.0.0.1:1");
    assert_fails(&grpc_register(&w.lab, &host_tls(&dir), &req), "Register presenting a removed host's certificate");
    assert!(w.host("hv-b").is_none(), "the removed certificate registered hv-b");
}

#[test]
fn certificates_name_only_the_validated_listen_address() {
    let lab = Lab::new("listen_sans");
    lab.create_vault();
    let _provider = lab.start_provider();
    lab.operator_cert();
    for (i, bad) in ["*.corp.example:7443", "0.0.0.0:7443", "[::]:7443"].into_iter().enumerate() {
        let dir = lab.root.join(format!("bad{i}"));
        let o = register(&lab, &format!("hvbad{i}"), &dir, "primary", "gold-a", bad, &[]);
        assert_fails_saying(&o, &["listen_address"], &format!("register --listen {bad}"));
        assert!(!dir.join("host.pem").exists(), "{bad}: a certificate was written");
    }
    let cases: [(&str, &str, &[&str], &[&str]); 4] = [
        ("hvip", "192.0.2.10:7443", &["IP Address:192.0.2.10"], &["localhost", "127.0.0.1", "DNS:"]),
        ("hvdns", "hvdns.corp.example:7443", &["DNS:hvdns.corp.example"], &["localhost", "127.0.0.1", "*"]),
        ("hvlocal", "localhost:7444", &["DNS:localhost", "IP Address:127.0.0.1"], &["*"]),
        ("hvloop", "127.0.0.1:7445", &["IP Address:127.0.0.1", "DNS:localhost"], &["*"]),
    ];
    for (name, listen, want, never) in cases {
        let dir = lab.root.join(name);
        assert_ok(
            &register(&lab, name, &dir, "primary", "gold-a", listen, &[]),
            &format!("register --listen {listen}"),
        );
        let s = sans(&lab, &dir.join("host.pem"));
        for w in want {
            assert!(s.contains(w), "{listen}: no {w} in {s}");
        }
        for n in never {
            assert!(!s.contains(n), "{listen}: {n} in {s}");
        }
        assert!(s.contains("URI:siterecovery://"), "{listen}: no identity in {s}");
    }
}

#[test]
fn vault_create_prints_the_fingerprint_to_pin() {
    let lab = Lab::new("fingerprint");
    let o = lab.create_vault_at(&lab.provider_dir, &lab.addr(), &lab.vault_key, &[]);
    assert_ok(&o, "vault create");
    let text = stdout(&o);
    // The CA's SHA-256, as openssl computes it from ca.pem.
    let ca = lab.provider_dir.join("ca.pem").display().to_string();
    let fp = openssl(&lab, &["x509", "-in", &ca, "-noout", "-fingerprint", "-sha256"]);
    let hex: String = fp.trim().rsplit('=').next().unwrap_or_default().replace(':', "").to_ascii_lowercase();
    assert_eq!(hex.len(), 64, "{fp}");
    let want = format!("sha256:{hex}");
    assert!(text.contains(&format!("CA fingerprint: {want}")), "{text}");
    let line = text.lines().find(|l| l.trim_start().starts_with("agent register")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(&format!("--ca-fingerprint {want}")), "{line}");
    assert!(line.contains(&format!("--vault-key {}", lab.vault_key.display())), "{line}");
    let o = lab.provider(&["vault", "fingerprint", "--data-dir", &lab.provider_dir.display().to_string()]);
    assert_ok(&o, "vault fingerprint");
    assert_eq!(stdout(&o).trim(), want);
    let o = lab.provider(&["--json", "vault", "fingerprint", "--data-dir", &lab.provider_dir.display().to_string()]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["ca_fingerprint"], want.as_str());
    let o = lab.provider(&["vault", "fingerprint", "--data-dir", &lab.root.join("none").display().to_string()]);
    assert_fails_saying(&o, &["holds no vault"], "vault fingerprint of no vault");
}
