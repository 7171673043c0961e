//! The provider's gRPC server: our own TLS under tonic, services, reflection, limits,
//! graceful shutdown.
//!
//! One listener serves everything, through [`siterecovery_certs::transport::incoming`]
//! (handshakes in their own tasks with a timeout, a connection cap). The vault CA is
//! the only trust anchor and the revocation list is read at every handshake: a
//! certificate of another vault, a revoked or an expired one fails the handshake. A
//! client certificate is optional at the handshake because Registration is called
//! before a host has one; every other service refuses a request without one
//! ([`crate::auth::Guard`]) and every RPC authorises its caller's role
//! ([`crate::auth`]). Per connection, HTTP/2 streams are capped; per service, message
//! sizes (decode and encode).
//!
//! - [`protection`]: the Protection service's handlers.
//! - [`renewal`]: the provider's own certificate, renewed at two thirds of its life
//!   and swapped in without a restart.

pub mod protection;
pub mod renewal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::live::{RevocationList, Trust};
use siterecovery_certs::tls::ClientAuth;
use siterecovery_certs::transport::AcceptLimits;
use siterecovery_certs::{Role, VaultCa, VaultId};
use siterecovery_proto::lifecycle::{self, Lifecycle};
use siterecovery_proto::metrics::MetricsConfig;
use siterecovery_proto::v1::control_server::ControlServer;
use siterecovery_proto::v1::inventory_server::InventoryServer;
use siterecovery_proto::v1::protection_server::ProtectionServer;
use siterecovery_proto::v1::registration_server::RegistrationServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use self::protection::ProtectionService;
use crate::auth::{Certificate, Guard};
use crate::control::{ControlService, Sessions};
use crate::inventory::InventoryService;
use crate::registration::RegistrationService;
use crate::relationship::{Core, ProtectionConfig, ProtectionCore};
use crate::store::Store;
use crate::trust::Revocations;
use crate::vault::Vault;

/// Shared state of the registration, inventory and control services. Orchestration
/// gets only the [`Core`] (through `Deref`, so `state.store` and `state.protection`
/// read as before).
pub struct AppState {
    pub vault_id: VaultId,
    /// The provider's data dir (registration secret file lives there).
    pub vault_dir: std::path::PathBuf,
    pub ca: VaultCa,
    pub sessions: Arc<Sessions>,
    pub core: Arc<Core>,
    /// The revoked certificates.
    pub revocations: Arc<Revocations>,
    /// Validity of the host certificates issued at registration and renewal.
    pub cert_validity: Duration,
}

impl std::ops::Deref for AppState {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup: {0}")]
    Tls(#[from] siterecovery_certs::CertError),
    #[error("the provider's certificate: {0}")]
    Certificate(#[source] crate::vault::VaultError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("invalid serve settings: {0}")]
    Settings(String),
    #[error("{0}")]
    Metrics(#[source] std::io::Error),
}

/// Shortest certificate validity `serve --cert-validity` accepts: renewal at two thirds
/// of the life must leave a host time to reconnect.
pub const MIN_CERT_VALIDITY: Duration = Duration::from_secs(30);

/// Limits of the listener.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections (handshaking or established) and handshake time.
    pub accept: AcceptLimits,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self { accept: AcceptLimits::default(), max_concurrent_streams: 128 }
    }
}

/// Largest request (decode) and response (encode) message of each service.
pub mod message_limits {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    /// A CSR and a few names.
    pub const REGISTRATION: (usize, usize) = (64 * KIB, 64 * KIB);
    /// Operator requests are small; `vm list` answers grow with the VMs.
    pub const INVENTORY: (usize, usize) = (256 * KIB, 16 * MIB);
    /// An agent's whole inventory (hundreds of VMs) up; commands down.
    pub const CONTROL: (usize, usize) = (8 * MIB, 4 * MIB);
    /// Plans of up to 100 VMs up; job lists down.
    pub const PROTECTION: (usize, usize) = (MIB, 16 * MIB);
    /// Symbol names up; file descriptors down.
    pub const REFLECTION: (usize, usize) = (64 * KIB, 4 * MIB);
}

/// The services whose health `grpc.health.v1.Health/Check` reports besides the server
/// (`""`): all follow the server's status.
pub const HEALTH_SERVICES: &[&str] = &["siterecovery.v1.Registration", "siterecovery.v1.Control"];

/// How `provider serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long to let requests finish at shutdown.
    pub grace: Duration,
    pub protection: ProtectionConfig,
    /// Validity of the host certificates issued at registration and renewal, and of the
    /// provider's own renewals (`serve --cert-validity`).
    pub cert_validity: Duration,
    pub limits: ServerLimits,
    /// The Prometheus endpoint (`serve --metrics-listen`; [`crate::metrics`]).
    pub metrics: MetricsConfig,
    /// Woken at `systemctl reload`: the provider's certificate is read again from the
    /// data dir and presented from the next handshake when it changed there.
    pub reload: Option<Arc<tokio::sync::Notify>>,
    /// Health status and systemd notifications (`serve` makes one with its drain; none:
    /// a fresh one, NOT_SERVING until the server is up).
    pub lifecycle: Option<Lifecycle>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            protection: ProtectionConfig::default(),
            cert_validity: siterecovery_certs::ca::LEAF_VALIDITY,
            limits: ServerLimits::default(),
            metrics: MetricsConfig::OFF,
            reload: None,
            lifecycle: None,
        }
    }
}

impl ServeOptions {
    /// Refuses settings the server cannot run with.
    pub fn validate(&self) -> Result<(), ServeError> {
        if self.cert_validity < MIN_CERT_VALIDITY {
            return Err(ServeError::Settings(format!(
                "certificate validity {:?} is under the minimum of {MIN_CERT_VALIDITY:?}",
                self.cert_validity
            )));
        }
        if self.limits.accept.max_connections == 0 || self.limits.max_concurrent_streams == 0 {
            return Err(ServeError::Settings("connection and stream limits must be at least 1".into()));
        }
        Ok(())
    }
}

/// Serves on `listener` until `shutdown` is cancelled, then drains for up to `grace`.
pub async fn serve(
    vault: Vault,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    serve_with(vault, store, listener, shutdown, grace, ProtectionConfig::default()).await
}

/// [`serve`] with explicit protection settings (`serve --test-intervals`).
pub async fn serve_with(
    vault: Vault,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
    protection: ProtectionConfig,
) -> Result<(), ServeError> {
    let opts = ServeOptions { grace, protection, ..ServeOptions::default() };
    serve_options(vault, store, listener, shutdown, opts).await
}

/// [`serve`] with every setting.
pub async fn serve_options(
    mut vault: Vault,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    opts.validate()?;
    siterecovery_certs::tls::install_crypto_provider();
    let identity = renewal::load_identity(&mut vault, opts.cert_validity)?;
    let (protection, resumed) = ProtectionCore::load(&store, opts.protection.clone())?;
    let sessions = Arc::new(Sessions::new());
    let core =
        Arc::new(Core { store: Arc::new(store), protection, agents: sessions.clone(), shutdown: shutdown.clone() });
    let revocations = Arc::new(Revocations::load(&core.store)?);
    let trust = Trust {
        vault: vault.info.vault_id.clone(),
        ca_pem: vault.ca.cert_pem().to_owned(),
        identity: identity.clone(),
        revoked: revocations.list().clone(),
    };
    let tls = Arc::new(trust.server_config(ClientAuth::Optional, true)?);
    let revoked = revocations.list().clone();
    let info = vault.info.clone();
    let state = Arc::new(AppState {
        revocations,
        cert_validity: opts.cert_validity,
        vault_id: vault.info.vault_id.clone(),
        vault_dir: vault.dir.clone(),
        ca: vault.ca,
        sessions,
        core: core.clone(),
    });
    let metrics = crate::metrics::spawn(opts.metrics, core.clone(), state.sessions.clone(), shutdown.child_token())
        .await
        .map_err(ServeError::Metrics)?;
    crate::protection::resume_jobs(&core, resumed);
    if let Some(reload) = opts.reload.clone() {
        tokio::spawn(renewal::on_reload(vault.dir.clone(), identity.clone(), reload, shutdown.child_token()));
    }
    let renewing =
        tokio::spawn(renewal::run(state.clone(), info, identity, opts.cert_validity, shutdown.child_token()));
    // The API schema is for members of the vault only, like every other call.
    let reflection_auth = {
        let vault_id = state.vault_id.clone();
        move |req: tonic::Request<()>| {
            crate::auth::authorize(&req, &vault_id, &[Role::Operator, Role::Host, Role::Provider])?;
            Ok(req)
        }
    };
    use message_limits as m;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(lifecycle::HEALTH_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(m::REFLECTION.0)
        .max_encoding_message_size(m::REFLECTION.1);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(lifecycle::HEALTH_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(m::REFLECTION.0)
        .max_encoding_message_size(m::REFLECTION.1);
    let lifecycle = match opts.lifecycle.clone() {
        Some(l) => l,
        None => Lifecycle::starting(HEALTH_SERVICES).await,
    };
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(vault = %state.vault_id, listen = ?local, "provider serving");
    let incoming = siterecovery_certs::transport::incoming(listener, tls, opts.limits.accept);
    let optional = |svc| Guard::new(svc, revoked.clone(), Certificate::Optional);
    fn required<S>(svc: S, revoked: &Arc<RevocationList>) -> Guard<S> {
        Guard::new(svc, revoked.clone(), Certificate::Required)
    }
    let drained = CancellationToken::new();
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(opts.limits.max_concurrent_streams)
        .http2_max_header_list_size(16 * 1024)
        .add_service(optional(
            RegistrationServer::new(RegistrationService::new(state.clone()))
                .max_decoding_message_size(m::REGISTRATION.0)
                .max_encoding_message_size(m::REGISTRATION.1),
        ))
        .add_service(required(
            InventoryServer::new(InventoryService { state: state.clone() })
                .max_decoding_message_size(m::INVENTORY.0)
                .max_encoding_message_size(m::INVENTORY.1),
            &revoked,
        ))
        .add_service(required(
            ControlServer::new(ControlService { state: state.clone() })
                .max_decoding_message_size(m::CONTROL.0)
                .max_encoding_message_size(m::CONTROL.1),
            &revoked,
        ))
        .add_service(required(
            ProtectionServer::new(ProtectionService { core: core.clone(), vault_id: state.vault_id.clone() })
                .max_decoding_message_size(m::PROTECTION.0)
                .max_encoding_message_size(m::PROTECTION.1),
            &revoked,
        ))
        // Health without a client certificate (a monitor may hold only the vault's CA):
        // it tells nothing but SERVING / NOT_SERVING; revoked certificates stay refused.
        .add_service(Guard::new(lifecycle.health_service(), revoked.clone(), Certificate::Optional))
        .add_service(InterceptedService::new(required(reflection_v1, &revoked), reflection_auth.clone()))
        .add_service(InterceptedService::new(required(reflection_v1alpha, &revoked), reflection_auth))
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            let state = state.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: closing control sessions");
                state.sessions.close_all();
            }
        });
    lifecycle.serving().await;
    lifecycle.ready(&format!(
        "serving vault {} on {}",
        state.vault_id,
        local.map(|a| a.to_string()).unwrap_or_default()
    ));
    let drained2 = drained.clone();
    let grace = opts.grace;
    let result = tokio::select! {
        r = server => r.map_err(ServeError::Transport),
        _ = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            drained2.cancel();
        } => {
            tracing::warn!("grace period of {grace:?} over; stopping with requests in flight");
            Ok(())
        }
    };
    drained.cancel();
    renewing.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_options_refuse_a_validity_under_30s() {
        let mut o = ServeOptions::default();
        assert!(o.validate().is_ok());
        o.cert_validity = Duration::from_secs(29);
        assert!(matches!(o.validate(), Err(ServeError::Settings(_))));
        o.cert_validity = MIN_CERT_VALIDITY;
        assert!(o.validate().is_ok());
        o.limits.max_concurrent_streams = 0;
        assert!(o.validate().is_err());
    }
}
