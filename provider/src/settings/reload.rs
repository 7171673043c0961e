//! `systemctl reload` of the provider (SIGHUP): the config file read again
//! ([`siterecovery_proto::settings::reload`]), the log level applied, and the server
//! told to read its certificate again from the data dir ([`crate::api::ServeOptions::reload`]).

use std::sync::Arc;

use siterecovery_proto::daemon::LogHandle;
use siterecovery_proto::settings::reload::Reloader;
use siterecovery_proto::settings::{Layers, SettingsError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{LIVE_KEYS, ProviderRuntime, ProviderSettings, validate};

/// The running settings of `provider serve`, at every reload.
pub type Live = watch::Receiver<Arc<ProviderRuntime>>;

/// Reloads on every SIGHUP until `shutdown`, waking `certificates` each time. Call it
/// inside the runtime.
pub fn on_sighup(
    layers: Layers<ProviderSettings>,
    runtime: ProviderRuntime,
    log: LogHandle,
    certificates: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<Live, ReloadError> {
    let reloader = Reloader::new(layers, runtime, validate, LIVE_KEYS)?;
    let apply = move |r: &ProviderRuntime, changed: &[String]| {
        if changed.iter().any(|k| k == "log-level") {
            match log.set(&r.log_level) {
                Ok(()) => {
                    tracing::info!(log_level = %r.log_level, "log level changed");
                    tracing::debug!(log_level = %r.log_level, "debug logging on");
                }
                Err(e) => tracing::error!("cannot change the log level: {e}"),
            }
        }
        certificates.notify_one();
    };
    reloader.spawn_on_sighup(apply, shutdown).map_err(ReloadError::Signal)
}

/// The reload could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}
