//! The provider's own certificate: loaded at start (and renewed there when it is
//! expired or does not match its key), then renewed by [`run`] at two thirds of its
//! life, issued locally by the vault CA and written to the data dir. The new
//! certificate is swapped into the [`LiveIdentity`] the listener presents: open
//! connections go on, new handshakes get the new certificate.

use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::live::LiveIdentity;
use tokio_util::sync::CancellationToken;

use super::{AppState, ServeError};
use crate::vault::{self, Vault, VaultInfo};

/// Between two attempts when a renewal failed (a full disk, say).
const RETRY: Duration = Duration::from_secs(60);

/// The provider's identity for the listener, renewed now when the stored one cannot
/// serve (expired, or the key does not match after a crash mid-renewal).
pub fn load_identity(vault: &mut Vault, validity: Duration) -> Result<Arc<LiveIdentity>, ServeError> {
    let why = match LiveIdentity::new(&vault.provider_identity) {
        Ok(live) => match live.validity() {
            Ok((_, not_after)) if not_after > siterecovery_certs::unix_now() => return Ok(live),
            Ok(_) => "it expired".to_owned(),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    tracing::warn!("the provider's certificate cannot serve ({why}); issuing a new one");
    let pem = vault.renew_provider_cert(validity).map_err(ServeError::Certificate)?;
    LiveIdentity::new(&pem).map_err(|e| ServeError::Certificate(e.into()))
}

/// How long until `identity` is due for renewal (zero when it is due now).
fn until_due(identity: &LiveIdentity) -> Result<Duration, siterecovery_certs::CertError> {
    let at_ms = identity.renew_at()?.saturating_mul(1000);
    let now_ms = crate::jobs::now_ms();
    Ok(Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0)))
}

/// Renews the provider's certificate whenever it is due, until `shutdown`.
pub async fn run(
    state: Arc<AppState>,
    info: VaultInfo,
    identity: Arc<LiveIdentity>,
    validity: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let wait = match until_due(&identity) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("cannot read the provider's certificate: {e}; renewing");
                Duration::ZERO
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        let renewed = vault::renew_provider_cert(&state.vault_dir, &info, &state.ca, validity)
            .map_err(|e| e.to_string())
            .and_then(|pem| identity.replace(&pem).map_err(|e| e.to_string()));
        let pause = match renewed {
            Ok(()) => {
                let serial = identity.serial().unwrap_or_default();
                let until = identity.validity().map(|(_, na)| na).unwrap_or_default();
                tracing::info!(%serial, not_after_unix = until, "provider certificate renewed");
                // A certificate always lives longer than this; never a tight loop.
                Duration::from_secs(1)
            }
            Err(e) => {
                tracing::error!("cannot renew the provider's certificate: {e}; retrying in {RETRY:?}");
                RETRY
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Reads `provider.pem` and `provider.key` again at every `reload` (`systemctl reload`)
/// and presents them when they changed and match; until `shutdown`.
pub async fn on_reload(
    dir: std::path::PathBuf,
    identity: Arc<LiveIdentity>,
    reload: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = reload.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let read = |name: &str| siterecovery_certs::files::read_text(&dir.join(name));
        let on_disk = match (read("provider.pem"), read("provider.key")) {
            (Ok(cert_pem), Ok(key_pem)) => siterecovery_certs::tls::PemIdentity { cert_pem, key_pem },
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("provider certificate not reloaded: {e}");
                continue;
            }
        };
        let now = identity.pem();
        if on_disk.cert_pem == now.cert_pem && on_disk.key_pem == now.key_pem {
            continue;
        }
        match identity.replace(&on_disk) {
            Ok(()) => tracing::info!(serial = %identity.serial().unwrap_or_default(),
                "provider certificate read again from the data dir"),
            Err(e) => tracing::error!("provider certificate not reloaded, the running one stays: {e}"),
        }
    }
}
