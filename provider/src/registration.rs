//! Registration: a host trades the vault's registration secret and a CSR for a
//! certificate signed by the vault CA. The only service callable without a client
//! certificate (the server is still authenticated by the CA in the vault key file).
//!
//! Refused: another vault's id, a wrong or expired secret, a malformed CSR or name,
//! and a host name already registered unless re-registration is asked for explicitly.
//! Each refusal is logged with the caller's address, never with the secret.

use std::sync::Arc;

use siterecovery_certs::ca::{LEAF_VALIDITY, ServerNames};
use siterecovery_certs::identity::is_token;
use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::registration_server::Registration;
use tonic::{Request, Response, Status};

use crate::api::AppState;
use crate::inventory::{HostRecord, internal};
use crate::store::HOSTS;
use crate::vault::{SecretRecord, read_secret, sha256_hex};

pub struct RegistrationService {
    pub state: Arc<AppState>,
}

/// Constant-time comparison of two hex digests.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn valid_address(a: &str) -> bool {
    a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let from = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = req.into_inner();
        let refuse = |status: Status| {
            tracing::warn!(%from, host = %r.host_name, "registration refused: {}", status.message());
            status
        };
        if r.vault_id != self.state.vault_id.as_str() {
            return Err(refuse(Status::permission_denied(format!(
                "this provider serves vault {}, not {}",
                self.state.vault_id, r.vault_id
            ))));
        }
        let secret: SecretRecord = read_secret(&self.state.vault_dir).map_err(|e| {
            tracing::error!("cannot read the registration secret: {e:#}");
            Status::failed_precondition("this vault has no usable registration secret: run `provider vault key`")
        })?;
        if !same_digest(&sha256_hex(r.secret.as_bytes()), &secret.sha256) {
            return Err(refuse(Status::permission_denied(
                "wrong registration secret (the vault key file is not the current one)",
            )));
        }
        if siterecovery_certs::unix_now() >= secret.expires_unix {
            return Err(refuse(Status::permission_denied(
                "the registration secret expired: make a new vault key file on the provider",
            )));
        }
        for (what, v) in [("host name", &r.host_name), ("site", &r.site), ("cloud", &r.cloud)] {
            if !is_token(v) {
                return Err(refuse(Status::invalid_argument(format!(
                    "invalid {what} {v:?}: use 1-64 of A-Z a-z 0-9 . _ -"
                ))));
            }
        }
        if !valid_address(&r.listen_address) {
            return Err(refuse(Status::invalid_argument(format!(
                "listen address {:?} is not HOST:PORT",
                r.listen_address
            ))));
        }
        let existing: Option<HostRecord> = self.state.store.get(HOSTS, &r.host_name).map_err(internal)?;
        if existing.is_some() && !r.reregister {
            return Err(refuse(Status::already_exists(format!(
                "host {:?} is already registered; pass --reregister to replace its registration",
                r.host_name
            ))));
        }
        // A fresh id per registration: certificates of an earlier registration of the
        // same name stop being accepted on the control channel.
        let host_id = format!("{}-{}", r.host_name, siterecovery_certs::random_hex(3));
        let host_id = if host_id.len() > 64 { siterecovery_certs::random_hex(8) } else { host_id };
        let identity = PeerIdentity::new(self.state.vault_id.clone(), Role::Host, &host_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = self
            .state
            .ca
            .issue_for_csr(&r.csr_pem, &identity, &ServerNames::for_address(&r.listen_address), LEAF_VALIDITY)
            .map_err(|e| refuse(Status::invalid_argument(format!("certificate request: {e}"))))?;
        let record = HostRecord {
            id: host_id.clone(),
            name: r.host_name.clone(),
            site: r.site.clone(),
            cloud: r.cloud.clone(),
            address: r.listen_address.clone(),
            agent_version: r.agent_version.clone(),
            registered_unix_ms: siterecovery_certs::unix_now() * 1000,
        };
        self.state.store.put(HOSTS, &record.name, &record).map_err(internal)?;
        tracing::info!(%from, host = %record.name, host_id = %host_id, site = %record.site, cloud = %record.cloud,
            reregistered = existing.is_some(), "host registered");
        Ok(Response::new(v1::RegisterResponse {
            host_id,
            certificate_pem: cert,
            vault_id: self.state.vault_id.to_string(),
        }))
    }
}
