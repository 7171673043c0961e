//! `systemctl reload` of the agent (SIGHUP): the config file read again
//! ([`siterecovery_proto::settings::reload`]), the log level and the host's bandwidth limit applied, and this host's
//! certificate read again from the data dir (`host.pem`, `host.key`) when it changed
//! there, so a certificate replaced by hand is presented from the next handshake.

use std::sync::Arc;

use siterecovery_proto::daemon::LogHandle;
use siterecovery_proto::settings::reload::Reloader;
use siterecovery_proto::settings::{Layers, SettingsError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{AgentRuntime, AgentSettings, LIVE_KEYS, validate};
use crate::config::AgentFiles;

/// The running settings of `agent serve`: a watch channel of the runtime config that
/// follows every reload (parts that change live subscribe to it).
pub type Live = watch::Receiver<Arc<AgentRuntime>>;

/// Reloads on every SIGHUP until `shutdown`. Call it inside the runtime.
pub fn on_sighup(
    layers: Layers<AgentSettings>,
    runtime: AgentRuntime,
    log: LogHandle,
    files: Arc<AgentFiles>,
    shutdown: CancellationToken,
) -> Result<Live, ReloadError> {
    let reloader = Reloader::new(layers, runtime, validate, LIVE_KEYS)?;
    let apply = move |r: &AgentRuntime, changed: &[String]| {
        if changed.iter().any(|k| k == "log-level") {
            match log.set(&r.log_level) {
                Ok(()) => {
                    tracing::info!(log_level = %r.log_level, "log level changed");
                    tracing::debug!(log_level = %r.log_level, "debug logging on");
                }
                Err(e) => tracing::error!("cannot change the log level: {e}"),
            }
        }
        if changed.iter().any(|k| k == "bandwidth") {
            // Unset in the file now: unlimited.
            crate::bandwidth::set_host_limit(r.bandwidth.clone().unwrap_or_default());
        }
        match files.reload_identity() {
            Ok(true) => tracing::info!(serial = %files.trust.identity.serial().unwrap_or_default(),
                "host certificate read again from the data dir"),
            Ok(false) => {}
            Err(e) => tracing::error!("host certificate not reloaded, the running one stays: {e:#}"),
        }
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
