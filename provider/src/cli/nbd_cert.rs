//! `nbd-client-cert`: a hypervisor's client certificate for the agents' TLS NBD
//! exports, issued with the vault CA on the provider's machine (no connection to a
//! running provider), in the files QEMU's `tls-creds-x509` object reads from its
//! `dir`: `ca-cert.pem` (the vault CA, to verify the agent), `client-cert.pem` (role
//! `nbd`), `client-key.pem` (PKCS#8, 0600; the key is made here and written only here).
//!
//! QEMU then opens a disk with
//! `--object tls-creds-x509,id=tls0,endpoint=client,dir=DIR` and
//! `driver=nbd,server.type=inet,server.host=HOST,server.port=PORT,export=VM-diskN,tls-creds=tls0`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::{PeerIdentity, Role, files};
use siterecovery_proto::model::units::parse_duration;

use crate::vault;

/// The files QEMU's `tls-creds-x509,endpoint=client` expects in its `dir`.
pub const CA_FILE: &str = "ca-cert.pem";
pub const CERT_FILE: &str = "client-cert.pem";
pub const KEY_FILE: &str = "client-key.pem";

/// `nbd-client-cert`.
#[derive(Args)]
pub struct NbdCertArgs {
    /// The provider's data dir (holds the vault CA).
    #[arg(long, value_name = "DIR", env = "SITERECOVERY_DATA_DIR")]
    data_dir: PathBuf,
    /// Where to write ca-cert.pem, client-cert.pem and client-key.pem (made 0700 when
    /// new; hand it to the hypervisor's user only).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Name recorded in the certificate (letters, digits, `-`, `_`, `.`), e.g. the
    /// hypervisor host's.
    #[arg(long, default_value = "qemu")]
    name: String,
    /// Validity of the certificate.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    validity: Duration,
}

/// `--json` of `nbd-client-cert`.
#[derive(Serialize)]
struct NbdCertIssued<'a> {
    dir: &'a Path,
    identity: String,
    serial: String,
    files: [&'static str; 3],
}

/// Issues a certificate of role `nbd` into `out` (see the module doc).
pub fn issue(data_dir: &Path, out: &Path, name: &str, validity: Duration) -> Result<PeerIdentity> {
    let v = vault::Vault::open(data_dir)?;
    let id = PeerIdentity::new(v.info.vault_id.clone(), Role::Nbd, name)
        .with_context(|| format!("--name {:?}", name.chars().take(80).collect::<String>()))?;
    // A client certificate: no server names.
    let (cert, key) = v.ca.issue_local(&id, &ServerNames::default(), validity)?;
    files::create_private_dir(out)?;
    files::write_public(&out.join(CA_FILE), v.ca.cert_pem().as_bytes())?;
    files::write_public(&out.join(CERT_FILE), cert.as_bytes())?;
    files::write_private(&out.join(KEY_FILE), key.as_bytes())?;
    Ok(id)
}

/// `nbd-client-cert`.
pub fn run(a: NbdCertArgs, json: bool) -> Result<()> {
    let id = issue(&a.data_dir, &a.out, &a.name, a.validity)?;
    let serial = siterecovery_certs::live::serial_of_pem(&files::read_text(&a.out.join(CERT_FILE))?)?;
    if json {
        let view = NbdCertIssued { dir: &a.out, identity: id.uri(), serial, files: [CA_FILE, CERT_FILE, KEY_FILE] };
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!(
            "NBD client certificate for {} written to {} ({CA_FILE}, {CERT_FILE}, {KEY_FILE})",
            id.uri(),
            a.out.display()
        );
        println!(
            "use: qemu-io --object tls-creds-x509,id=tls0,endpoint=client,dir={} --image-opts \
             driver=nbd,server.type=inet,server.host=HOST,server.port=PORT,export=VM-disk0,tls-creds=tls0",
            a.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issues_an_nbd_certificate_of_the_vault_in_qemus_file_names() {
        let t = tempfile::tempdir().expect("tmp");
        let data = t.path().join("p");
        vault::create(&data, "contoso", "127.0.0.1:7443", &t.path().join("vault.key"), Duration::from_secs(3600))
            .expect("vault");
        let out = t.path().join("nbd");
        let id = issue(&data, &out, "hv1-qemu", Duration::from_secs(3600)).expect("issue");
        assert_eq!(id.role, Role::Nbd);
        let cert = files::read_text(&out.join(CERT_FILE)).expect("cert");
        let ca = files::read_text(&out.join(CA_FILE)).expect("ca");
        siterecovery_certs::tls::verify_issued_by(&ca, &cert).expect("issued by the vault CA");
        let der = siterecovery_certs::ca::first_cert_der(&cert).expect("der");
        assert_eq!(PeerIdentity::from_cert_der(&der).expect("identity"), id);
        let key = files::read_text(&out.join(KEY_FILE)).expect("key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8, as GnuTLS reads it");
        let mode = |f: &str| std::fs::metadata(out.join(f)).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(std::fs::metadata(&out).expect("stat").permissions().mode() & 0o777, 0o700);
        assert!(issue(&data, &t.path().join("x"), "bad/name", Duration::from_secs(60)).is_err(), "a name with a slash");
    }
}
