//! Authorisation of every RPC from the verified peer certificate.
//!
//! The TLS layer already refused certificates of other vaults, revoked and expired ones
//! (the vault CA is the only trust anchor, the revocation list is read at every
//! handshake). [`Guard`] wraps each service and checks every request once more against
//! the certificate of its connection, which may have been open since before a
//! revocation or may have outlived its certificate: no certificate (for every service
//! but Registration), a revoked or an expired one is refused before the handler runs.
//! Then each RPC states which roles may call it ([`authorize`]), and the identity read
//! from the leaf's SAN URI is returned for ownership checks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use siterecovery_certs::live::RevocationList;
use siterecovery_certs::{PeerIdentity, Role, VaultId};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

/// Why a caller may not call an RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a client certificate of this vault is required")]
    NoCertificate,
    #[error("client certificate: {0}")]
    BadCertificate(String),
    #[error("certificate of vault {0} is not of this vault")]
    OtherVault(VaultId),
    #[error("{caller} may not call this; it needs the {needed} role")]
    Role { caller: String, needed: String },
    #[error("client certificate {0} is revoked")]
    Revoked(String),
    #[error("client certificate {0} expired")]
    Expired(String),
}

/// The one mapping of authorisation errors to gRPC statuses.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoCertificate | AuthError::BadCertificate(_) | AuthError::Revoked(_) | AuthError::Expired(_) => {
                Status::unauthenticated(e.to_string())
            }
            AuthError::OtherVault(_) | AuthError::Role { .. } => Status::permission_denied(e.to_string()),
        }
    }
}

/// The caller's identity, when its role is one of `roles`.
pub fn check<T>(req: &Request<T>, vault: &VaultId, roles: &[Role]) -> Result<PeerIdentity, AuthError> {
    let certs = req.peer_certs().ok_or(AuthError::NoCertificate)?;
    let id = siterecovery_certs::tls::peer_identity(&certs).map_err(|e| AuthError::BadCertificate(e.to_string()))?;
    if &id.vault_id != vault {
        return Err(AuthError::OtherVault(id.vault_id));
    }
    if !roles.contains(&id.role) {
        let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        return Err(AuthError::Role { caller: id.to_string(), needed: want.join(" or ") });
    }
    Ok(id)
}

/// [`check`] for a service: the refusal as its status.
pub fn authorize<T>(req: &Request<T>, vault: &VaultId, roles: &[Role]) -> Result<PeerIdentity, Status> {
    Ok(check(req, vault, roles)?)
}

/// Whether a service may be called without a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificate {
    /// Registration: called before a host has one.
    Optional,
    /// Every other service.
    Required,
}

/// A service behind the connection-level checks of every request: a client
/// certificate when required, not revoked, not expired.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    revoked: Arc<RevocationList>,
    certificate: Certificate,
}

impl<S> Guard<S> {
    pub fn new(inner: S, revoked: Arc<RevocationList>, certificate: Certificate) -> Self {
        Self { inner, revoked, certificate }
    }

    fn check<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let certs = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.peer_certs());
        let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
            return match self.certificate {
                Certificate::Optional => Ok(()),
                Certificate::Required => Err(AuthError::NoCertificate.into()),
            };
        };
        let bad = |e: siterecovery_certs::CertError| Status::from(AuthError::BadCertificate(e.to_string()));
        let serial = siterecovery_certs::live::serial_of_der(leaf).map_err(bad)?;
        if self.revoked.is_revoked(&serial) {
            return Err(AuthError::Revoked(serial).into());
        }
        let (_, not_after) = siterecovery_certs::ca::validity_of_der(leaf).map_err(bad)?;
        if siterecovery_certs::unix_now() >= not_after {
            return Err(AuthError::Expired(serial).into());
        }
        Ok(())
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.check(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_certificate_is_unauthenticated() {
        let vault = VaultId::generate();
        let req = Request::new(());
        assert_eq!(check(&req, &vault, &[Role::Operator]), Err(AuthError::NoCertificate));
        assert_eq!(
            authorize(&req, &vault, &[Role::Operator]).expect_err("refused").code(),
            tonic::Code::Unauthenticated
        );
    }
}
