//! Registration: a host trades the vault's registration secret and a CSR for a
//! certificate signed by the vault CA. The only service callable without a client
//! certificate (the server is still authenticated by the CA in the vault key file).
//!
//! Refused: another vault's id, a wrong or expired secret, a malformed CSR or name,
//! and a host name already registered unless re-registration is asked for explicitly.
//! Each refusal is logged with the caller's address, never with the secret.

use std::path::Path;
use std::sync::Arc;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, HostId, HostName, SiteName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::registration_server::Registration;
use tonic::{Request, Response, Status};

use crate::error::{self, Classify, ErrorClass};
use crate::inventory::{HostRecord, is_host_port};
use crate::store::{HOSTS, Store, StoreError};
use crate::vault::{SecretRecord, read_secret, sha256_hex};

/// What registration needs from the provider around it.
pub trait RegistrationContext: Send + Sync + 'static {
    fn vault_id(&self) -> &VaultId;
    /// The data dir, where the registration secret lives.
    fn vault_dir(&self) -> &Path;
    fn ca(&self) -> &VaultCa;
    fn store(&self) -> &Store;
    fn revocations(&self) -> &crate::trust::Revocations;
    /// Validity of the host certificates it issues (`serve --cert-validity`).
    fn cert_validity(&self) -> std::time::Duration;
}

pub struct RegistrationService<C> {
    pub state: Arc<C>,
}

/// Why a registration was refused (or failed).
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("this provider serves vault {ours}, not {theirs}")]
    OtherVault { ours: String, theirs: String },
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("this vault has no usable registration secret: run `provider vault key`")]
    NoSecret,
    #[error("wrong registration secret (the vault key file is not the current one)")]
    WrongSecret,
    #[error("the registration secret expired: make a new vault key file on the provider")]
    ExpiredSecret,
    #[error("host {0:?} is already registered; pass --reregister to replace its registration")]
    AlreadyRegistered(HostName),
    #[error("certificate request: {0}")]
    Csr(String),
    #[error("host identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for RegistrationError {
    fn class(&self) -> ErrorClass {
        use RegistrationError as E;
        match self {
            E::OtherVault { .. } | E::WrongSecret | E::ExpiredSecret => ErrorClass::PermissionDenied,
            E::Request(_) | E::Csr(_) => ErrorClass::InvalidArgument,
            E::NoSecret => ErrorClass::FailedPrecondition,
            E::AlreadyRegistered(_) => ErrorClass::AlreadyExists,
            E::Identity(_) | E::Store(_) => ErrorClass::Internal,
        }
    }
}

/// The one mapping of registration errors to gRPC statuses.
impl From<RegistrationError> for Status {
    fn from(e: RegistrationError) -> Self {
        error::status(&e)
    }
}

/// A registration request, converted: the names follow their rules and the listen
/// address is `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub host_name: HostName,
    pub site: SiteName,
    pub cloud: CloudName,
    pub listen_address: String,
    /// The names the CA puts into the certificate, from the listen address alone.
    pub server_names: ServerNames,
}

impl TryFrom<&v1::RegisterRequest> for RegisterRequest {
    type Error = WireError;
    fn try_from(r: &v1::RegisterRequest) -> Result<Self, WireError> {
        if !is_host_port(&r.listen_address) {
            return Err(WireError::rule(
                "register.listen_address",
                format!("{:?} is not HOST:PORT", truncated(&r.listen_address)),
            ));
        }
        let server_names = ServerNames::for_address(&r.listen_address)
            .map_err(|e| WireError::rule("register.listen_address", e.to_string()))?;
        Ok(Self {
            server_names,
            host_name: wire::field("register.host_name", &r.host_name)?,
            site: wire::field("register.site", &r.site)?,
            cloud: wire::field("register.cloud", &r.cloud)?,
            listen_address: r.listen_address.clone(),
        })
    }
}

/// At most 80 chars of a string from the network, for messages and logs.
fn truncated(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Constant-time comparison of two hex digests.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<C: RegistrationContext> RegistrationService<C> {
    async fn register(&self, r: &v1::RegisterRequest) -> Result<v1::RegisterResponse, RegistrationError> {
        let state = self.state.as_ref();
        if r.vault_id != state.vault_id().as_str() {
            return Err(RegistrationError::OtherVault {
                ours: state.vault_id().to_string(),
                theirs: truncated(&r.vault_id),
            });
        }
        // Converted before the secret file or the store is read.
        let req = RegisterRequest::try_from(r)?;
        let secret: SecretRecord = read_secret(state.vault_dir()).map_err(|e| {
            tracing::error!("cannot read the registration secret: {e:#}");
            RegistrationError::NoSecret
        })?;
        if !same_digest(&sha256_hex(r.secret.as_bytes()), &secret.sha256) {
            return Err(RegistrationError::WrongSecret);
        }
        if siterecovery_certs::unix_now() >= secret.expires_unix {
            return Err(RegistrationError::ExpiredSecret);
        }
        let existing: Option<HostRecord> = state.store().get(HOSTS, req.host_name.as_str())?;
        if existing.is_some() && !r.reregister {
            return Err(RegistrationError::AlreadyRegistered(req.host_name));
        }
        // A fresh id per registration: certificates of an earlier registration of the
        // same name stop being accepted on the control channel.
        let host_id = format!("{}-{}", req.host_name, siterecovery_certs::random_hex(3));
        let host_id = if host_id.len() > 64 { siterecovery_certs::random_hex(8) } else { host_id };
        let host_id = HostId::new(host_id).map_err(|e| RegistrationError::Identity(e.to_string()))?;
        let identity = PeerIdentity::new(state.vault_id().clone(), Role::Host, host_id.as_str())
            .map_err(|e| RegistrationError::Identity(e.to_string()))?;
        let cert = state
            .ca()
            .issue_for_csr(&r.csr_pem, &identity, &req.server_names, state.cert_validity())
            .map_err(|e| RegistrationError::Csr(e.to_string()))?;
        let mut record = HostRecord {
            id: host_id.clone(),
            name: req.host_name,
            site: req.site,
            cloud: req.cloud,
            address: req.listen_address,
            agent_version: r.agent_version.clone(),
            registered_unix_ms: siterecovery_certs::unix_now() * 1000,
            cert_serial: String::new(),
            cert_not_after_unix_ms: 0,
            reset_pending: false,
        };
        record.with_certificate(&cert).map_err(|e| RegistrationError::Identity(e.to_string()))?;
        state.store().put(HOSTS, record.name.as_str(), &record)?;
        tracing::info!(host = %record.name, host_id = %host_id, site = %record.site, cloud = %record.cloud,
            reregistered = existing.is_some(), "host registered");
        Ok(v1::RegisterResponse {
            host_id: host_id.to_string(),
            certificate_pem: cert,
            vault_id: state.vault_id().to_string(),
        })
    }
}

#[tonic::async_trait]
impl<C: RegistrationContext> Registration for RegistrationService<C> {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let from = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = req.into_inner();
        match RegistrationService::<C>::register(self, &r).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                // Refusals logged once, here, with the caller's address, never with the
                // secret; internal errors by the mapping.
                if e.class() != ErrorClass::Internal {
                    tracing::warn!(%from, host = %truncated(&r.host_name), "registration refused: {e}");
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> v1::RegisterRequest {
        v1::RegisterRequest {
            host_name: "hv1".into(),
            site: "primary".into(),
            cloud: "gold-a".into(),
            listen_address: "10.0.0.1:7443".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_name_field_is_checked() {
        let ok = RegisterRequest::try_from(&request()).expect("valid");
        assert_eq!(ok.host_name, "hv1");
        for (field, set) in [
            ("register.host_name", (|r: &mut v1::RegisterRequest| r.host_name = "../etc".into()) as fn(&mut _)),
            ("register.site", |r| r.site = "a/b".into()),
            ("register.cloud", |r| r.cloud = ".".into()),
            ("register.listen_address", |r| r.listen_address = "no-port".into()),
            ("register.host_name", |r| r.host_name = String::new()),
        ] {
            let mut r = request();
            set(&mut r);
            let e = RegisterRequest::try_from(&r).expect_err(field);
            assert_eq!(e.field(), field);
            let status = Status::from(RegistrationError::from(e));
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(field), "{}", status.message());
        }
    }

    #[test]
    fn refusals_map_to_their_codes() {
        let code = |e: RegistrationError| Status::from(e).code();
        assert_eq!(code(RegistrationError::WrongSecret), tonic::Code::PermissionDenied);
        assert_eq!(code(RegistrationError::NoSecret), tonic::Code::FailedPrecondition);
        assert_eq!(
            code(RegistrationError::AlreadyRegistered("hv1".parse().expect("name"))),
            tonic::Code::AlreadyExists
        );
        assert_eq!(truncated(&"x".repeat(200)).chars().count(), 81);
    }
}
