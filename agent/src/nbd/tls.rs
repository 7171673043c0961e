//! The TLS side of the TCP listener: the acceptor made from the agent's trust, the
//! plaintext haggling until `NBD_OPT_STARTTLS`, and who may open exports once TLS is up.

use rustls::pki_types::CertificateDer;
use siterecovery_certs::live::Trust;
use siterecovery_certs::tls::ClientAuth;
use siterecovery_certs::{CertError, PeerIdentity, Role, VaultId};
use tokio_rustls::TlsAcceptor;

use super::*;

/// How the TCP listener treats its clients.
#[derive(Clone)]
pub enum TcpSecurity {
    /// TLS mandatory, with a client certificate of the vault (`nbd` or `host` role).
    Tls(Arc<NbdTls>),
    /// Plain NBD, for labs (`agent serve --nbd-insecure-tcp`); the agent refuses it on
    /// an address other than loopback.
    Insecure,
}

impl std::fmt::Debug for TcpSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcpSecurity::Tls(_) => "Tls",
            TcpSecurity::Insecure => "Insecure",
        })
    }
}

/// The TLS acceptor of the NBD TCP listener: the agent's live certificate, client
/// certificates verified against the vault CA and the revocation list at every
/// handshake, no ALPN (QEMU sends none).
pub struct NbdTls {
    acceptor: TlsAcceptor,
    vault: VaultId,
}

impl NbdTls {
    /// From the agent's trust; the certificate it presents and the revocation list it
    /// applies follow `trust` as they change.
    pub fn new(trust: &Trust) -> Result<Self, CertError> {
        let cfg = trust.server_config(ClientAuth::Required, false)?;
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(cfg)), vault: trust.vault.clone() })
    }

    /// Whether the verified client chain may open exports: the leaf must name this
    /// vault and the role `nbd` (a hypervisor's client certificate) or `host` (an
    /// agent). `Err` is the message the client is told.
    pub(super) fn admit(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, String> {
        let leaf = chain.and_then(|c| c.first()).ok_or("no client certificate")?;
        let id = PeerIdentity::from_cert_der(leaf).map_err(|e| format!("the client certificate: {e}"))?;
        if id.vault_id != self.vault {
            return Err(format!(
                "the client certificate is of vault {}, not of this host's",
                short(id.vault_id.as_str())
            ));
        }
        match id.role {
            Role::Nbd | Role::Host => Ok(id),
            other => Err(format!(
                "a certificate of role {other} may not open NBD exports (role nbd: `provider nbd-client-cert`)"
            )),
        }
    }
}

/// The handshake of one connection on a TLS-mandatory listener: greeting and options
/// in plaintext until `STARTTLS` (read unbuffered, so nothing the client sent after it
/// is taken as plaintext), the TLS handshake on the same stream, then the options again
/// inside TLS. `Ok(None)` when the client left before choosing an export.
pub(super) async fn tls_handshake<S>(
    mut stream: S,
    exports: &Exports,
    tls: &NbdTls,
    peer: &str,
) -> Result<Option<(TlsReader<S>, TlsWriter<S>, Session)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = {
        let (mut r, mut w) = tokio::io::split(&mut stream);
        let no_zeroes = greet(&mut r, &mut w).await?;
        match options(&mut r, &mut w, exports, no_zeroes, TlsPhase::Required).await? {
            Negotiated::StartTls => no_zeroes,
            Negotiated::Session(_) | Negotiated::Closed => return Ok(None),
        }
    };
    let stream = tls.acceptor.accept(stream).await.map_err(NbdError::Tls)?;
    let admitted = tls.admit(stream.get_ref().1.peer_certificates());
    let phase = match &admitted {
        Ok(id) => {
            tracing::debug!("nbd: TLS client {peer} is {}", short(&id.to_string()));
            TlsPhase::Done
        }
        Err(why) => {
            tracing::warn!("nbd: TLS client {peer} refused: {why}");
            TlsPhase::Denied(why)
        }
    };
    let (r, mut w) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(READ_BUF, r);
    match options(&mut reader, &mut w, exports, no_zeroes, phase).await? {
        Negotiated::Session(s) => Ok(Some((reader, w, s))),
        Negotiated::StartTls | Negotiated::Closed => Ok(None),
    }
}

/// The read side of a connection inside TLS, buffered.
pub(super) type TlsReader<S> = BufReader<tokio::io::ReadHalf<tokio_rustls::server::TlsStream<S>>>;
/// The write side of a connection inside TLS.
pub(super) type TlsWriter<S> = tokio::io::WriteHalf<tokio_rustls::server::TlsStream<S>>;
