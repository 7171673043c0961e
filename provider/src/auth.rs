//! Authorisation of every RPC from the verified peer certificate.
//!
//! The TLS layer already refused certificates of other vaults (the vault CA is the only
//! trust anchor); here each RPC states which roles may call it, and the identity read
//! from the leaf's SAN URI is returned for ownership checks.

use siterecovery_certs::{PeerIdentity, Role, VaultId};
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
}

/// The one mapping of authorisation errors to gRPC statuses.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoCertificate | AuthError::BadCertificate(_) => Status::unauthenticated(e.to_string()),
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
