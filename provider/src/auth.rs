//! Authorisation of every RPC from the verified peer certificate.
//!
//! The TLS layer already refused certificates of other vaults (the vault CA is the only
//! trust anchor); here each RPC states which roles may call it, and the identity read
//! from the leaf's SAN URI is returned for ownership checks.

use siterecovery_certs::{PeerIdentity, Role, VaultId};
use tonic::{Request, Status};

/// The caller's identity, when its role is one of `roles`.
pub fn authorize<T>(req: &Request<T>, vault: &VaultId, roles: &[Role]) -> Result<PeerIdentity, Status> {
    let certs =
        req.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate of this vault is required"))?;
    let id = siterecovery_certs::tls::peer_identity(&certs)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if &id.vault_id != vault {
        return Err(Status::permission_denied(format!("certificate of vault {} is not of this vault", id.vault_id)));
    }
    if !roles.contains(&id.role) {
        let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        return Err(Status::permission_denied(format!(
            "{} may not call this; it needs the {} role",
            id,
            want.join(" or ")
        )));
    }
    Ok(id)
}
