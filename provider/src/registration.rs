//! Registration: a host trades the vault's registration secret and a CSR for a
//! certificate signed by the vault CA. The only service callable without a client
//! certificate (the server is still authenticated by the CA in the vault key file).
//!
//! The secret registers each host **name** once. Another registration of a registered
//! name is granted only ([`decide`], a pure function of the stored host and the caller):
//!
//! - as a **renewal**: the request arrives over mutual TLS with the host's current,
//!   unrevoked certificate (role host, the stored host id, the stored serial). The host
//!   keeps its id; the new certificate becomes the current one;
//! - **after `provider host reset`**: the reset revoked the old certificate and set
//!   `reset_pending`; exactly one registration of the name is then granted (a fresh
//!   host id), which clears the flag.
//!
//! Anything else is refused, the `reregister` flag of the request grants nothing by
//! itself, and site and cloud never change by registration (`provider host move`
//! does). Refused: another vault's id, a wrong or expired secret, a malformed CSR or
//! name, a revoked client certificate. Refusals are rate-limited per source address ([`limiter`]): over the limit an
//! attempt is answered `RESOURCE_EXHAUSTED` before the secret or the store is read.
//! Each refusal is logged once, with the caller's address and the strings it sent
//! truncated, never with the secret.

pub mod limiter;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, HostId, HostName, SiteName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::registration_server::Registration;
use tonic::{Request, Response, Status};

use self::limiter::{RefusalLimiter, Verdict};
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

/// The Registration service: its context and the limiter of refused attempts.
pub struct RegistrationService<C> {
    pub state: Arc<C>,
    limiter: RefusalLimiter,
}

impl<C> RegistrationService<C> {
    pub fn new(state: Arc<C>) -> Self {
        Self { state, limiter: RefusalLimiter::new() }
    }
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
    /// A registered name, asked for without the host's certificate and without a reset.
    #[error(
        "host {0} is already registered; the vault key file registers a host name once. To renew, the host \
         re-registers with its current certificate; to replace the host, an operator runs `provider host reset {0}` \
         first"
    )]
    AlreadyRegistered(HostName),
    /// A client certificate came with the request but is not the host's current one.
    #[error(
        "the certificate presented is not host {host}'s current one ({why}); to replace the host, an operator runs \
         `provider host reset {host}`"
    )]
    NotCurrentCertificate { host: HostName, why: String },
    /// The client certificate presented is revoked.
    #[error("the certificate presented (serial {serial}) is revoked")]
    Revoked { serial: String },
    /// A renewal or re-registration asked for another site or cloud.
    #[error(
        "host {host} is registered at site {site}, cloud {cloud}; registration never moves a host: an operator runs \
         `provider host move {host} --site SITE --cloud CLOUD`"
    )]
    Moved { host: HostName, site: SiteName, cloud: CloudName },
    /// Too many refused attempts from the caller's address.
    #[error("too many refused registrations from this address; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
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
            E::OtherVault { .. }
            | E::WrongSecret
            | E::ExpiredSecret
            | E::NotCurrentCertificate { .. }
            | E::Revoked { .. } => ErrorClass::PermissionDenied,
            E::Request(_) | E::Csr(_) => ErrorClass::InvalidArgument,
            E::NoSecret | E::Moved { .. } => ErrorClass::FailedPrecondition,
            E::AlreadyRegistered(_) => ErrorClass::AlreadyExists,
            E::RateLimited { .. } => ErrorClass::ResourceExhausted,
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

/// The client certificate a registration arrived with, as the TLS layer verified it
/// (signed by the vault CA): its identity and serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub identity: PeerIdentity,
    /// Lowercase hex.
    pub serial: String,
}

/// The caller's client certificate, if it presented one: `Err` when it does not read
/// as a vault certificate.
pub fn presented<T>(req: &Request<T>) -> Option<Result<Presented, String>> {
    let chain = req.peer_certs()?;
    let leaf = chain.first()?;
    let read = || -> Result<Presented, siterecovery_certs::CertError> {
        Ok(Presented {
            identity: siterecovery_certs::tls::peer_identity(&chain)?,
            serial: siterecovery_certs::live::serial_of_der(leaf)?,
        })
    };
    Some(read().map_err(|e| truncated(&e.to_string())))
}

/// What a registration is granted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A name not registered yet: a fresh host id.
    New,
    /// The host's current certificate was presented: same host id, new certificate.
    Renewal,
    /// The one registration a `host reset` allows: a fresh host id, the flag cleared.
    AfterReset,
}

impl Grant {
    fn as_str(self) -> &'static str {
        match self {
            Grant::New => "registered",
            Grant::Renewal => "renewed",
            Grant::AfterReset => "registered again after host reset",
        }
    }
}

/// The rule of a registration of `req.host_name` (see the module header), given the
/// stored host, the certificate presented, and the revoked serials. Pure.
pub fn decide(
    existing: Option<&HostRecord>,
    req: &RegisterRequest,
    presented: Option<&Result<Presented, String>>,
    vault: &VaultId,
    is_revoked: impl Fn(&str) -> bool,
) -> Result<Grant, RegistrationError> {
    // A revoked certificate is refused whatever it comes for (as the handshake refuses
    // it where the provider's verifier reads the revocation list).
    if let Some(Ok(p)) = presented
        && is_revoked(&p.serial)
    {
        return Err(RegistrationError::Revoked { serial: p.serial.clone() });
    }
    let Some(host) = existing else { return Ok(Grant::New) };
    let not_current = |why: String| RegistrationError::NotCurrentCertificate { host: host.name.clone(), why };
    let grant = match presented {
        Some(Err(why)) => return Err(not_current(format!("unreadable: {why}"))),
        // A reset voids every certificate of the host, revoked yet or not.
        Some(Ok(_)) if host.reset_pending => {
            return Err(not_current("the host was reset: register it without its old certificate".into()));
        }
        Some(Ok(p)) => {
            if &p.identity.vault_id != vault {
                return Err(not_current(format!("a certificate of vault {}", p.identity.vault_id)));
            }
            if p.identity.role != Role::Host {
                return Err(not_current(format!("a certificate of role {}, not host", p.identity.role)));
            }
            if p.identity.id != host.id.as_str() {
                return Err(not_current(format!("the certificate of host id {}", truncated(&p.identity.id))));
            }
            // Records from before serials were kept: the host id alone (each
            // registration had its own id, so one certificate per id).
            if !host.cert_serial.is_empty() && p.serial != host.cert_serial {
                return Err(not_current(format!("certificate {} was superseded by {}", p.serial, host.cert_serial)));
            }
            Grant::Renewal
        }
        None if host.reset_pending => Grant::AfterReset,
        None => return Err(RegistrationError::AlreadyRegistered(host.name.clone())),
    };
    if req.site != host.site || req.cloud != host.cloud {
        return Err(RegistrationError::Moved {
            host: host.name.clone(),
            site: host.site.clone(),
            cloud: host.cloud.clone(),
        });
    }
    Ok(grant)
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

/// A fresh host id for `name`: the name and 6 hex digits (certificates of an earlier
/// registration of the name stop being accepted on the control channel).
fn fresh_host_id(name: &HostName) -> Result<HostId, RegistrationError> {
    let id = format!("{name}-{}", siterecovery_certs::random_hex(3));
    let id = if id.len() > 64 { siterecovery_certs::random_hex(8) } else { id };
    HostId::new(id).map_err(|e| RegistrationError::Identity(e.to_string()))
}

impl<C: RegistrationContext> RegistrationService<C> {
    /// The rule applied to the stored host, and what a granted registration writes:
    /// the host record with its new certificate, the certificate, the grant.
    fn grant(
        &self,
        req: &RegisterRequest,
        r: &v1::RegisterRequest,
        presented: Option<&Result<Presented, String>>,
        existing: Option<HostRecord>,
    ) -> Result<(HostRecord, String, Grant), RegistrationError> {
        let state = self.state.as_ref();
        let grant = decide(existing.as_ref(), req, presented, state.vault_id(), |s| state.revocations().is_revoked(s))?;
        let mut record = match (grant, existing) {
            (Grant::Renewal, Some(host)) => {
                HostRecord { address: req.listen_address.clone(), agent_version: r.agent_version.clone(), ..host }
            }
            _ => HostRecord {
                id: fresh_host_id(&req.host_name)?,
                name: req.host_name.clone(),
                site: req.site.clone(),
                cloud: req.cloud.clone(),
                address: req.listen_address.clone(),
                agent_version: r.agent_version.clone(),
                registered_unix_ms: siterecovery_certs::unix_now() * 1000,
                cert_serial: String::new(),
                cert_not_after_unix_ms: 0,
                reset_pending: false,
                prev_cert_serial: String::new(),
            },
        };
        let identity = PeerIdentity::new(state.vault_id().clone(), Role::Host, record.id.as_str())
            .map_err(|e| RegistrationError::Identity(e.to_string()))?;
        let cert = state
            .ca()
            .issue_for_csr(&r.csr_pem, &identity, &req.server_names, state.cert_validity())
            .map_err(|e| RegistrationError::Csr(e.to_string()))?;
        record.with_certificate(&cert).map_err(|e| RegistrationError::Identity(e.to_string()))?;
        Ok((record, cert, grant))
    }

    /// One registration, past the limiter: checks, the rule, the certificate, the record.
    fn register(
        &self,
        r: &v1::RegisterRequest,
        presented: Option<&Result<Presented, String>>,
    ) -> Result<(v1::RegisterResponse, Grant), RegistrationError> {
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
        // Read, decide, issue and write in one store transaction: two registrations
        // racing after a `host reset` cannot both be the one it allows, and a reset or
        // a move in between is not undone.
        let (record, cert, grant) =
            state.store().update(HOSTS, req.host_name.as_str(), |existing: Option<HostRecord>| {
                match self.grant(&req, r, presented, existing) {
                    Ok((record, cert, grant)) => (Some(record.clone()), Ok((record, cert, grant))),
                    Err(e) => (None, Err(e)),
                }
            })??;
        tracing::info!(host = %record.name, host_id = %record.id, site = %record.site, cloud = %record.cloud,
            serial = %record.cert_serial, "host {}", grant.as_str());
        let resp = v1::RegisterResponse {
            host_id: record.id.to_string(),
            certificate_pem: cert,
            vault_id: state.vault_id().to_string(),
        };
        Ok((resp, grant))
    }
}

#[tonic::async_trait]
impl<C: RegistrationContext> Registration for RegistrationService<C> {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let from = req.remote_addr();
        let ip = from.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let from = from.map(|a| a.to_string()).unwrap_or_default();
        if let Verdict::Limited { first, retry_after } = self.limiter.check(ip, Instant::now()) {
            // Once per episode: a flood of attempts is not a flood of log lines.
            if first {
                tracing::warn!(%from, "registration refused: too many refused attempts from this address");
            }
            let e = RegistrationError::RateLimited { retry_after_secs: retry_after.as_secs().max(1) };
            return Err(e.into());
        }
        let presented = presented(&req);
        let r = req.into_inner();
        match RegistrationService::<C>::register(self, &r, presented.as_ref()) {
            Ok((resp, _)) => Ok(Response::new(resp)),
            Err(e) => {
                // Refusals logged once, here, with the caller's address, never with the
                // secret; internal errors by the mapping.
                if e.class() != ErrorClass::Internal {
                    self.limiter.refused(ip, Instant::now());
                    tracing::warn!(%from, host = %truncated(&r.host_name), reregister = r.reregister,
                        "registration refused: {e}");
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests;
