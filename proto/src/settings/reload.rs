//! `systemctl reload` (SIGHUP): the config file read again, the keys that can change
//! live applied, the others logged as "needs a restart".
//!
//! The running settings are published on a [`watch`] channel of the runtime config
//! ([`Reloader::subscribe`]): a part that can follow a change live (the log level, the
//! bandwidth limits) reads it there. Only the daemon's live keys take their new value;
//! every other key keeps the value the process started with, so what the channel holds
//! is what runs.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{KeyError, Layers, SettingsError, changed_keys, to_table};

/// How a daemon turns its merged settings into its runtime config.
pub type Validate<T, R> = fn(&T) -> Result<R, Vec<KeyError>>;

/// The running settings of a daemon and how to read them again.
pub struct Reloader<T, R> {
    layers: Layers<T>,
    /// The merged settings that run (live keys as last reloaded, others as started).
    running: T,
    validate: Validate<T, R>,
    live: &'static [&'static str],
    tx: watch::Sender<Arc<R>>,
}

impl<T, R> Reloader<T, R>
where
    T: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    /// The settings a daemon started with (`layers` merged and validated into `runtime`);
    /// `live` are the keys a reload may change.
    pub fn new(
        layers: Layers<T>,
        runtime: R,
        validate: Validate<T, R>,
        live: &'static [&'static str],
    ) -> Result<Self, SettingsError> {
        let running = layers.merged()?;
        let (tx, _) = watch::channel(Arc::new(runtime));
        Ok(Self { layers, running, validate, live, tx })
    }

    /// The runtime config now and at every reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<R>> {
        self.tx.subscribe()
    }

    /// Reads the file again. On success the live keys take their new values (returned
    /// with the keys that changed, live or not); the others are logged as needing a
    /// restart. On an error nothing changes.
    pub fn reload(&mut self) -> Result<(Arc<R>, Vec<String>), SettingsError> {
        let layers = self.layers.reread()?;
        let wanted = layers.merged()?;
        // Validate the whole new file first: a bad value is refused even in a key that
        // needs a restart.
        layers.validate(self.validate)?;
        let changed = changed_keys(&self.running, &wanted)?;
        let mut table = to_table(&self.running)?;
        let new = to_table(&wanted)?;
        for key in &changed {
            if self.live.contains(&key.as_str()) {
                match new.get(key) {
                    Some(v) => table.insert(key.clone(), v.clone()),
                    None => table.remove(key),
                };
            } else {
                tracing::warn!(key = %key, "needs a restart: {key}");
            }
        }
        let running: T =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| SettingsError::Merge(e.to_string()))?;
        let runtime = Arc::new((self.validate)(&running).map_err(|e| layers.named(e))?);
        self.layers = layers;
        self.running = running;
        self.tx.send_replace(runtime.clone());
        Ok((runtime, changed))
    }

    /// Reloads on every SIGHUP until `shutdown`, calling `apply` with the runtime config
    /// after each successful reload (also when the file did not change: certificates are
    /// read again then). Installs the handler before it returns.
    pub fn spawn_on_sighup(
        mut self,
        mut apply: impl FnMut(&R, &[String]) + Send + 'static,
        shutdown: CancellationToken,
    ) -> std::io::Result<watch::Receiver<Arc<R>>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let rx = self.subscribe();
        let path = self.layers.file.path.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => if got.is_none() { return },
                    _ = shutdown.cancelled() => return,
                }
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                match self.reload() {
                    Ok((runtime, changed)) => {
                        apply(&runtime, &changed);
                        tracing::info!(changed = ?changed, "configuration reloaded");
                    }
                    Err(e) => tracing::error!("configuration not reloaded, the running one stays: {e}"),
                }
            }
        });
        Ok(rx)
    }
}
