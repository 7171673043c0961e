//! Certificate renewal over the control channel: a host sends a CSR for a key it just
//! made; the CA signs it with the same identity (`host/<id>`) and the names of the
//! host's stored address, the host record takes the new serial and expiry (only while
//! it is still the session's), and the session is bound to the new serial from then
//! on. At most [`MAX_PER_MINUTE`] renewals per session a minute; the session handles
//! one message at a time, so one renewal is in flight at most.

use std::collections::VecDeque;
use std::time::Duration;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::{CertError, PeerIdentity, Role};
use tokio::time::Instant;

use super::binding::Binding;
use super::service::{ControlContext, ControlError};

/// Renewals one session may ask for in a minute.
pub const MAX_PER_MINUTE: usize = 3;

/// Why a renewal was refused (answered in `CertificateIssued.error`).
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("too many certificate renewals on this session (at most {MAX_PER_MINUTE} a minute); try again later")]
    TooMany,
    #[error(transparent)]
    Session(#[from] ControlError),
    #[error("the host's address {address:?} gives no certificate names: {source}")]
    Names {
        address: String,
        #[source]
        source: CertError,
    },
    #[error("cannot issue the certificate: {0}")]
    Issue(#[source] CertError),
}

/// The renewals of one session in the last minute.
#[derive(Debug, Default)]
pub struct RenewLimiter {
    recent: VecDeque<Instant>,
}

impl RenewLimiter {
    /// Whether one more renewal is allowed at `now` (and counts it).
    pub fn allow(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            self.recent.pop_front();
        }
        if self.recent.len() >= MAX_PER_MINUTE {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// Issues a certificate for `csr_pem` to the session's host, records it as the host's
/// current certificate and rebinds the session to it. Returns the certificate (PEM).
pub fn renew<C: ControlContext>(state: &C, binding: &mut Binding, csr_pem: &str) -> Result<String, RenewError> {
    let host = binding.check(state.store())?;
    let names = ServerNames::for_address(&host.address)
        .map_err(|source| RenewError::Names { address: host.address.chars().take(80).collect(), source })?;
    let identity =
        PeerIdentity::new(state.vault_id().clone(), Role::Host, host.id.as_str()).map_err(RenewError::Issue)?;
    let cert =
        state.ca().issue_for_csr(csr_pem, &identity, &names, state.cert_validity()).map_err(RenewError::Issue)?;
    let mut recorded = None;
    binding.update(state.store(), |h| {
        let previous = h.cert_serial.clone();
        let r = h.with_certificate(&cert);
        let ok = r.is_ok();
        if ok {
            h.prev_cert_serial = previous;
        }
        recorded = Some(r);
        ok
    })?;
    if let Some(Err(e)) = recorded {
        return Err(RenewError::Issue(e));
    }
    binding.serial = siterecovery_certs::live::serial_of_pem(&cert).map_err(RenewError::Issue)?;
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_are_limited_per_minute() {
        let mut l = RenewLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_PER_MINUTE {
            assert!(l.allow(t0 + Duration::from_secs(i as u64)), "renewal {i}");
        }
        assert!(!l.allow(t0 + Duration::from_secs(10)));
        assert!(!l.allow(t0 + Duration::from_secs(59)));
        assert!(l.allow(t0 + Duration::from_secs(60)), "the first one left the window");
    }
}
