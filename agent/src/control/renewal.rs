//! Renewal of this host's certificate over the control channel.
//!
//! At two thirds of the certificate's life ([`LiveIdentity::renew_at`], re-read after
//! every renewal and every reconnect) a fresh key pair is made here and its CSR sent
//! (`RenewCertificate`); the provider answers `CertificateIssued` on the same session.
//! The certificate is checked (issued by the vault CA, valid now, the same
//! `host/<id>` of the same vault, for the key made here), `host.key`/`host.pem` are
//! replaced as a pair and the live identity swapped: open connections go on, the next
//! handshakes (peer listener, senders, control reconnects) present the new certificate.
//! A refusal, or no answer within [`ANSWER_TIMEOUT`], is retried with backoff.
//!
//! A certificate that expires before it could be renewed locks the host out (the
//! provider refuses it at the handshake): an operator's `provider host reset` and an
//! `agent register --reregister` bring it back.
//!
//! [`LiveIdentity::renew_at`]: siterecovery_certs::live::LiveIdentity::renew_at

use std::time::Duration;

use siterecovery_certs::csr::make_csr;
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::{CertError, PeerIdentity};
use siterecovery_proto::v1;
use tokio::time::Instant;

use crate::config::{AgentFiles, ConfigError};

/// How long an answer to `RenewCertificate` may take before the request counts as lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay after a refused renewal; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Least time between two renewals: a certificate whose renewal time has already
/// passed when it arrives (clocks apart, a validity too short) is not renewed in a loop.
pub const MIN_GAP: Duration = Duration::from_secs(5);

/// Why a renewal did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("the provider refused to renew the certificate: {0}")]
    Refused(String),
    #[error("no answer to the renewal request within {0:?}")]
    NoAnswer(Duration),
    #[error("a certificate arrived that this host did not ask for")]
    Unexpected,
    #[error("the issued certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("cannot make a key and CSR: {0}")]
    Csr(#[source] CertError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What a renewal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// A request in flight: the key of its CSR (it never leaves this host) and when it went.
struct Pending {
    key_pem: String,
    sent: Instant,
}

/// The renewal schedule of one agent (kept across control sessions).
#[derive(Default)]
pub struct Renewal {
    pending: Option<Pending>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// No new request before this (after a failure).
    retry_at: Option<Instant>,
}

/// The instant of a unix time `at` (seconds), `now` being the unix time now.
fn instant_of_unix(at: i64, now: Instant) -> Instant {
    let wait = at.saturating_sub(siterecovery_certs::unix_now()).max(0);
    now + Duration::from_secs(u64::try_from(wait).unwrap_or(0))
}

/// The backoff after `failures` consecutive failures (1-based).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    MIN_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

impl Renewal {
    /// When [`Renewal::tick`] has something to do: the answer's deadline while a request
    /// is in flight, else the renewal time (not before a retry's).
    pub fn next_at(&self, files: &AgentFiles) -> Instant {
        self.next_from(files, Instant::now())
    }

    fn next_from(&self, files: &AgentFiles, now: Instant) -> Instant {
        if let Some(p) = &self.pending {
            return p.sent + ANSWER_TIMEOUT;
        }
        let due = match files.trust.identity.renew_at() {
            Ok(at) => instant_of_unix(at, now),
            // Unreadable validity (cannot happen for a loaded certificate): try now.
            Err(_) => now,
        };
        self.retry_at.map_or(due, |r| r.max(due))
    }

    /// At [`Renewal::next_at`]: the request to send, when one is due. A request left
    /// unanswered counts as a failure (retried after the backoff).
    pub fn tick(&mut self, files: &AgentFiles, now: Instant) -> Result<Option<v1::RenewCertificate>, RenewalError> {
        if let Some(p) = &self.pending {
            if now < p.sent + ANSWER_TIMEOUT {
                return Ok(None);
            }
            self.pending = None;
            self.failed(now);
            return Err(RenewalError::NoAnswer(ANSWER_TIMEOUT));
        }
        if now < self.next_from(files, now) {
            return Ok(None);
        }
        let csr = make_csr(&files.config.host_name).map_err(|e| {
            self.failed(now);
            RenewalError::Csr(e)
        })?;
        self.pending = Some(Pending { key_pem: csr.key_pem, sent: now });
        Ok(Some(v1::RenewCertificate { csr_pem: csr.csr_pem }))
    }

    /// The provider's answer: the checked certificate written and presented from now on.
    pub fn issued(
        &mut self,
        files: &AgentFiles,
        msg: v1::CertificateIssued,
        now: Instant,
    ) -> Result<Renewed, RenewalError> {
        let pending = self.pending.take().ok_or(RenewalError::Unexpected)?;
        let result = if msg.certificate_pem.is_empty() {
            Err(RenewalError::Refused(msg.error.chars().take(80).collect()))
        } else {
            take(files, PemIdentity { cert_pem: msg.certificate_pem, key_pem: pending.key_pem })
        };
        match &result {
            Ok(_) => {
                self.failures = 0;
                self.retry_at = Some(now + MIN_GAP);
            }
            Err(_) => self.failed(now),
        }
        result
    }

    /// The session ended: an answer cannot come any more (the next session asks again).
    pub fn session_ended(&mut self) {
        self.pending = None;
    }

    fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + backoff(self.failures));
    }
}

/// Checks a renewed certificate against the current one and takes it.
fn take(files: &AgentFiles, new: PemIdentity) -> Result<Renewed, RenewalError> {
    let bad = |e: &dyn std::fmt::Display| RenewalError::BadCertificate(e.to_string());
    siterecovery_certs::tls::verify_issued_by(&files.ca_pem, &new.cert_pem).map_err(|e| bad(&e))?;
    let identity_of =
        |pem: &str| siterecovery_certs::ca::first_cert_der(pem).and_then(|der| PeerIdentity::from_cert_der(&der));
    let current = identity_of(&files.identity().cert_pem).map_err(|e| bad(&e))?;
    let renewed = identity_of(&new.cert_pem).map_err(|e| bad(&e))?;
    if renewed != current {
        return Err(bad(&format!(
            "it names {renewed} of vault {}, this host is {current} of vault {}",
            renewed.vault_id, current.vault_id
        )));
    }
    siterecovery_certs::live::LiveIdentity::new(&new)
        .map_err(|e| bad(&format!("it does not go with the key made here: {e}")))?;
    files.renewed(&new)?;
    let serial = files.trust.identity.serial().map_err(|e| bad(&e))?;
    let (_, not_after) = files.trust.identity.validity().map_err(|e| bad(&e))?;
    Ok(Renewed { serial, not_after })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use siterecovery_certs::ca::ServerNames;
    use siterecovery_certs::{VaultCa, VaultId};

    use super::*;
    use crate::config::testkit::{host_id, registered, registered_due};

    const DAY: Duration = Duration::from_secs(86_400);

    /// A provider's answer to a renewal request.
    type Answer<'a> = dyn Fn(&v1::RenewCertificate) -> v1::CertificateIssued + 'a;

    /// What the provider's CA answers to `req` for identity `who` of `ca`.
    fn answer(ca: &VaultCa, who: &PeerIdentity, req: &v1::RenewCertificate) -> v1::CertificateIssued {
        let names = ServerNames::for_address("127.0.0.1:1").expect("names");
        let cert = ca.issue_for_csr(&req.csr_pem, who, &names, DAY).expect("issue");
        v1::CertificateIssued { certificate_pem: cert, error: String::new() }
    }

    #[test]
    fn nothing_is_asked_before_two_thirds_of_the_life() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = registered(tmp.path(), "hv1-abc", "127.0.0.1:1", DAY);
        let mut renewal = Renewal::default();
        let now = Instant::now();
        let at = renewal.next_at(&r.files);
        let (nb, na) = r.files.trust.identity.validity().expect("validity");
        let expected = siterecovery_certs::live::renew_at(nb, na) - siterecovery_certs::unix_now();
        let wait = at.duration_since(now).as_secs() as i64;
        assert!((expected - 2..=expected + 1).contains(&wait), "renewal in {wait}s, expected about {expected}s");
        assert!(renewal.tick(&r.files, now).expect("tick").is_none(), "asked before the renewal time");
    }

    #[test]
    fn a_renewal_is_checked_written_and_presented() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = registered_due(tmp.path(), "hv1-abc", "127.0.0.1:1");
        let old = r.files.trust.identity.serial().expect("serial");
        let mut renewal = Renewal::default();
        let now = Instant::now();
        let req = renewal.tick(&r.files, now).expect("tick").expect("a request is due");
        // While it is in flight nothing more is asked.
        assert!(renewal.tick(&r.files, now + Duration::from_secs(1)).expect("tick").is_none());
        let done = renewal.issued(&r.files, answer(&r.ca, &host_id(&r.ca, "hv1-abc"), &req), now).expect("renewed");
        assert_ne!(done.serial, old);
        assert_eq!(r.files.trust.identity.serial().expect("serial"), done.serial);
        let on_disk = std::fs::read_to_string(tmp.path().join("host.pem")).expect("read");
        assert_eq!(on_disk, r.files.identity().cert_pem);
        // The next renewal is two thirds into the new certificate's life.
        let next = renewal.next_at(&r.files).duration_since(now);
        assert!(next > Duration::from_secs(86_400 / 2), "next renewal in {next:?}");
    }

    #[test]
    fn a_certificate_of_another_identity_ca_or_key_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = registered_due(tmp.path(), "hv1-abc", "127.0.0.1:1");
        let old = r.files.trust.identity.serial().expect("serial");
        let other_ca = VaultCa::create(VaultId::generate(), "other").expect("ca");
        let now = Instant::now();
        let mut renewal = Renewal::default();
        let cases: Vec<(&str, Box<Answer<'_>>)> = vec![
            ("another host", Box::new(|q| answer(&r.ca, &host_id(&r.ca, "hv2-def"), q))),
            ("another vault", Box::new(|q| answer(&other_ca, &host_id(&other_ca, "hv1-abc"), q))),
            (
                "another key",
                Box::new(|_| {
                    let (cert, _) =
                        r.ca.issue_local(&host_id(&r.ca, "hv1-abc"), &ServerNames::default(), DAY).expect("issue");
                    v1::CertificateIssued { certificate_pem: cert, error: String::new() }
                }),
            ),
            ("a refusal", Box::new(|_| v1::CertificateIssued { certificate_pem: String::new(), error: "no".into() })),
        ];
        let mut t = now;
        for (what, make) in cases {
            // Each failure moves the next try out by the backoff.
            t = renewal.next_at(&r.files).max(t);
            let req = renewal.tick(&r.files, t).expect("tick").unwrap_or_else(|| panic!("{what}: no request"));
            let err = renewal.issued(&r.files, make(&req), t).expect_err(what);
            assert!(matches!(err, RenewalError::BadCertificate(_) | RenewalError::Refused(_)), "{what}: {err:?}");
            assert_eq!(r.files.trust.identity.serial().expect("serial"), old, "{what} was taken");
            assert!(renewal.next_at(&r.files) >= t + MIN_BACKOFF, "{what}: retried at once");
        }
        // An answer nobody asked for is refused too.
        let stray = answer(
            &r.ca,
            &host_id(&r.ca, "hv1-abc"),
            &v1::RenewCertificate { csr_pem: siterecovery_certs::csr::make_csr("x").expect("csr").csr_pem },
        );
        assert!(matches!(renewal.issued(&r.files, stray, t), Err(RenewalError::Unexpected)));
        assert_eq!(r.files.trust.identity.serial().expect("serial"), old);
    }

    #[test]
    fn an_unanswered_request_is_retried_after_the_backoff() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = registered_due(tmp.path(), "hv1-abc", "127.0.0.1:1");
        let mut renewal = Renewal::default();
        let now = Instant::now();
        assert!(renewal.tick(&r.files, now).expect("tick").is_some());
        assert_eq!(renewal.next_at(&r.files), now + ANSWER_TIMEOUT);
        let late = now + ANSWER_TIMEOUT;
        assert!(matches!(renewal.tick(&r.files, late), Err(RenewalError::NoAnswer(_))));
        assert_eq!(renewal.next_at(&r.files), late + MIN_BACKOFF);
        assert!(renewal.tick(&r.files, late + MIN_BACKOFF).expect("tick").is_some(), "not asked again");
        // A session that ends forgets the request in flight: the next one asks anew.
        renewal.session_ended();
        assert!(renewal.tick(&r.files, late + MIN_BACKOFF).expect("tick").is_some());
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let d: Vec<u64> = (1..=8).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(d, vec![2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
