//! The vault CA: a self-signed ECDSA P-256 certificate authority.
//!
//! The CA chooses every field of an issued certificate (validity, serial, key usage,
//! SANs, identity); from a CSR it takes only the public key, after checking the CSR's
//! signature, so a request cannot ask for `is_ca` or another identity.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;
use crate::identity::{PeerIdentity, VaultId};

/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of leaf certificates.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Names a leaf certificate is valid for as a TLS server (the agent's or provider's
/// listening address), besides its identity URI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// The names of a listener at `address` (`HOST:PORT`), validated: an IP address, or
    /// a DNS name (letters, digits and hyphens in dot-separated labels; never a
    /// wildcard). `localhost` and loopback addresses only for a loopback listener: a
    /// loopback IP gets `localhost` too, any other address only itself. The
    /// unspecified address (`0.0.0.0`, `::`) is refused: it is not a name peers dial.
    pub fn for_address(address: &str) -> Result<Self, CertError> {
        let bad = |why: &str| CertError::parse("listen address", format!("{why}: {:?}", short(address)));
        if !address.contains(':') {
            return Err(bad("not HOST:PORT"));
        }
        let host = crate::host_of(address);
        match host.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => Err(bad("an unspecified address is not a name peers can dial")),
            Ok(ip) if ip.is_loopback() => Ok(ServerNames { dns: vec!["localhost".into()], ips: vec![ip] }),
            Ok(ip) => Ok(ServerNames { dns: vec![], ips: vec![ip] }),
            Err(_) => {
                let lower = host.to_ascii_lowercase();
                if !is_dns_name(&lower) {
                    return Err(bad("not a DNS name or IP address (no wildcards)"));
                }
                if lower == "localhost" || lower.ends_with(".localhost") {
                    let loopback: IpAddr = [127, 0, 0, 1].into();
                    return Ok(ServerNames { dns: vec![lower], ips: vec![loopback] });
                }
                Ok(ServerNames { dns: vec![lower], ips: vec![] })
            }
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A DNS host name: 1..=253 chars, dot-separated labels of 1..=63 letters, digits and
/// hyphens, no label starting or ending with a hyphen, not all-numeric at the top.
pub fn is_dns_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    labels.iter().all(label_ok) && labels.last().is_some_and(|t| !t.bytes().all(|b| b.is_ascii_digit()))
}

/// The vault CA: its certificate and its key. Lives only on the provider.
pub struct VaultCa {
    vault_id: VaultId,
    cert_pem: String,
    key: KeyPair,
}

impl VaultCa {
    /// Creates a new CA for a new vault.
    pub fn create(vault_id: VaultId, vault_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("siterecovery vault {vault_name} CA"));
        dn.push(DnType::OrganizationName, format!("siterecovery vault {vault_id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self { vault_id, cert_pem: cert.pem(), key })
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn load(vault_id: VaultId, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        // Fail early on a mismatching pair rather than at the first handshake.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(Self { vault_id, cert_pem: cert_pem.to_owned(), key })
    }

    pub fn vault_id(&self) -> &VaultId {
        &self.vault_id
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs `msg` with the CA key (ECDSA P-256 SHA-256, ASN.1 DER signature).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CertError> {
        use rcgen::SigningKey;
        Ok(self.key.sign(msg)?)
    }

    fn leaf_params(
        &self,
        identity: &PeerIdentity,
        names: &ServerNames,
        validity: Duration,
    ) -> Result<CertificateParams, CertError> {
        if identity.vault_id != self.vault_id {
            return Err(CertError::NoIdentity(format!(
                "identity of vault {} cannot be issued by vault {}",
                identity.vault_id, self.vault_id
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} {}", identity.role, identity.id));
        dn.push(DnType::OrganizationName, format!("siterecovery vault {}", self.vault_id));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if identity.role == crate::Role::Nbd {
            // QEMU's tls-creds-x509 refuses its client certificate when the (critical)
            // key usage lacks keyEncipherment, whatever the key type.
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // Backdated for clock skew, but by at most a tenth of the validity: a
        // short-lived certificate's "two thirds of its life" must lie in its future.
        let skew = validity.min(Duration::from_secs(3000)) / 10;
        params.not_before = now - skew;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let mut sans = vec![SanType::URI(identity.uri().try_into()?)];
        for d in &names.dns {
            sans.push(SanType::DnsName(d.clone().try_into()?));
        }
        for ip in &names.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        Ok(params)
    }

    /// Issues a certificate for the public key of a CSR (PEM). The CSR's signature is
    /// verified; nothing else of it is used.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        identity: &PeerIdentity,
        names: &ServerNames,
        validity: Duration,
    ) -> Result<String, CertError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::parse("certificate signing request", e))?;
        let params = self.leaf_params(identity, names, validity)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(params.signed_by(&csr.public_key, &issuer)?.pem())
    }

    /// Issues a certificate and its key on this machine (the provider's own and operator
    /// certificates, made where the CA lives). Returns (cert PEM, key PEM).
    pub fn issue_local(
        &self,
        identity: &PeerIdentity,
        names: &ServerNames,
        validity: Duration,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let params = self.leaf_params(identity, names, validity)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    }

    /// Issues with explicit validity bounds (tests of expiry).
    pub fn issue_local_between(
        &self,
        identity: &PeerIdentity,
        names: &ServerNames,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = self.leaf_params(identity, names, LEAF_VALIDITY)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    }
}

/// Random positive 16-byte serial (rcgen would derive it from the key: re-issuing for
/// the same key would repeat it).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::fill(&mut b[..]);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::parse("certificate", "no CERTIFICATE block in PEM"))?
        .map_err(|e| CertError::parse("certificate", e))?;
    Ok(der.to_vec())
}

/// Validity bounds of a PEM certificate, as unix seconds.
pub fn validity(pem: &str) -> Result<(i64, i64), CertError> {
    validity_of_der(&first_cert_der(pem)?)
}

/// Validity bounds of a DER certificate (a peer's, as TLS gives it), as unix seconds.
pub fn validity_of_der(der: &[u8]) -> Result<(i64, i64), CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::parse("certificate", e))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Errors with [`CertError::NotValidNow`] when the certificate is expired or not yet valid.
pub fn check_valid_now(what: &str, pem: &str) -> Result<(), CertError> {
    let (nb, na) = validity(pem)?;
    let now = crate::unix_now();
    if now < nb || now >= na {
        let fmt =
            |t: i64| OffsetDateTime::from_unix_timestamp(t).map(|d| d.to_string()).unwrap_or_else(|_| t.to_string());
        return Err(CertError::NotValidNow { what: what.to_owned(), not_before: fmt(nb), not_after: fmt(na) });
    }
    Ok(())
}

/// The raw public key bits (uncompressed EC point) of a PEM certificate.
pub fn public_key_bits(pem: &str) -> Result<Vec<u8>, CertError> {
    let der = first_cert_der(pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CertError::parse("certificate", e))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn csr_is_signed_with_ca_chosen_identity() {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let req = crate::csr::make_csr("whatever").expect("csr");
        let id = PeerIdentity::new(vault.clone(), Role::Host, "h1").expect("id");
        let pem = ca
            .issue_for_csr(&req.csr_pem, &id, &ServerNames::for_address("127.0.0.1:1").expect("names"), LEAF_VALIDITY)
            .expect("issue");
        let der = first_cert_der(&pem).expect("der");
        assert_eq!(PeerIdentity::from_cert_der(&der).expect("identity"), id);
        check_valid_now("leaf", &pem).expect("valid");
        // another vault's identity is refused
        let other = PeerIdentity::new(VaultId::generate(), Role::Host, "h1").expect("id");
        assert!(ca.issue_for_csr(&req.csr_pem, &other, &ServerNames::default(), LEAF_VALIDITY).is_err());
        // garbage CSR is refused
        assert!(
            ca.issue_for_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &id,
                &ServerNames::default(),
                LEAF_VALIDITY
            )
            .is_err()
        );
    }

    #[test]
    fn server_names_come_only_from_a_valid_address() {
        let names = |a: &str| ServerNames::for_address(a).map(|n| (n.dns, n.ips));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(names("10.0.0.1:7443").expect("ip"), (vec![], vec![ip("10.0.0.1")]));
        assert_eq!(names("127.0.0.1:7443").expect("loopback"), (vec!["localhost".to_string()], vec![ip("127.0.0.1")]));
        assert_eq!(names("[::1]:7443").expect("v6 loopback"), (vec!["localhost".to_string()], vec![ip("::1")]));
        assert_eq!(names("HV1.Corp.Example:7443").expect("dns"), (vec!["hv1.corp.example".to_string()], vec![]));
        for bad in
            ["*.corp.example:1", "0.0.0.0:1", "[::]:1", "no-port", "a..b:1", "-a.b:1", "a_b.c:1", "1.2.3:1", ":1"]
        {
            assert!(ServerNames::for_address(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ca_reloads_from_pem() {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let again = VaultCa::load(vault.clone(), ca.cert_pem(), &ca.key_pem()).expect("load");
        let id = PeerIdentity::new(vault, Role::Operator, "op").expect("id");
        let (cert, _key) = again.issue_local(&id, &ServerNames::default(), LEAF_VALIDITY).expect("issue");
        assert!(check_valid_now("op", &cert).is_ok());
    }

    #[test]
    fn expired_certificate_is_reported() {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let id = PeerIdentity::new(vault, Role::Operator, "op").expect("id");
        let now = OffsetDateTime::now_utc();
        let (cert, _) = ca
            .issue_local_between(
                &id,
                &ServerNames::default(),
                now - time::Duration::days(2),
                now - time::Duration::days(1),
            )
            .expect("issue");
        assert!(matches!(check_valid_now("op", &cert), Err(CertError::NotValidNow { .. })));
    }
}
