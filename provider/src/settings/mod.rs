//! The provider's settings: `provider serve`'s flags, their `SITERECOVERY_…`
//! environment variables and the keys of `/etc/siterecovery/provider.toml`, validated
//! into the runtime config [`ProviderRuntime`] by the pure [`validate`].
//!
//! Precedence, key by key: flag > environment > file > default; every key is the long
//! flag's name (`cert-validity` = `--cert-validity` = `SITERECOVERY_CERT_VALIDITY`).
//! `--log-json`, `--log-level` and `--config` are global flags ([`GlobalArgs`]).
//!
//! Adding a key: a field of [`ProviderSettings`], its line in [`validate`] (and
//! [`defaults`]), its commented line in `dist/etc/provider.toml` (a test fails until it
//! is there); [`LIVE_KEYS`] when `systemctl reload` may change it.

pub mod reload;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_proto::daemon::LogFilter;
use siterecovery_proto::metrics::MetricsListen;
use siterecovery_proto::settings::check::{address, at_least, duration_in, log_filter, path};
use siterecovery_proto::settings::{FileLayer, KeyError, KeyErrors, Layers, SettingsError};

use crate::api::MIN_CERT_VALIDITY;
use crate::relationship::DEFAULT_SCRIPTS_DIR;

/// The file read when `--config` is not given (a missing one is fine).
pub const DEFAULT_CONFIG: &str = "/etc/siterecovery/provider.toml";
/// The data dir (the vault) when none is set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/siterecovery";
/// The keys `systemctl reload` (SIGHUP) applies live; the others need a restart.
pub const LIVE_KEYS: &[&str] = &["log-level"];
/// Shutdown grace periods accepted.
const GRACE_RANGE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(600));
/// Certificate validities accepted.
const VALIDITY_RANGE: (Duration, Duration) = (MIN_CERT_VALIDITY, Duration::from_secs(10 * 365 * 24 * 3600));

/// What the help of `serve` says about the layers.
pub const PRECEDENCE_HELP: &str = "Every flag of `provider serve` is also a key of the config file \
    (/etc/siterecovery/provider.toml, or --config FILE; the key is the flag's name without the dashes, e.g. \
    cert-validity) and an environment variable (SITERECOVERY_CERT_VALIDITY). Precedence: flag > environment > file > \
    default. `systemctl reload` (SIGHUP) re-reads the file: log-level and the provider's certificate in the data dir \
    change live, other keys need a restart.";

/// The global flags of the daemon's settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// Log as JSON lines (for log collectors) instead of human-readable lines (default false).
    #[arg(long, global = true, env = "SITERECOVERY_LOG_JSON", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", value_name = "BOOL")]
    pub log_json: Option<bool>,
    /// Log filter of `serve`, e.g. info or warn,siterecovery_provider=debug (default:
    /// RUST_LOG, else info). Changes live at `systemctl reload`.
    #[arg(long, global = true, env = "SITERECOVERY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Config file of `serve` (default /etc/siterecovery/provider.toml; a missing default
    /// file is fine, a missing --config file is an error).
    #[arg(long, global = true, env = "SITERECOVERY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The provider's settings, one layer of them: all `Option` (unset).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProviderSettings {
    /// The vault's data dir (default /var/lib/siterecovery).
    #[arg(long, env = "SITERECOVERY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(skip)]
    pub log_json: Option<bool>,
    #[arg(skip)]
    pub log_level: Option<String>,
    /// Address to listen on; defaults to the vault's address.
    #[arg(long, env = "SITERECOVERY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// How long to let requests finish at shutdown (default 10s).
    #[arg(long, env = "SITERECOVERY_GRACE", value_name = "DUR")]
    pub grace: Option<String>,
    /// After SIGTERM, how long the listener stays up answering health checks with
    /// NOT_SERVING before it closes, so monitors and load balancers see the stop
    /// (default 0s).
    #[arg(long, env = "SITERECOVERY_DRAIN", value_name = "DUR")]
    pub drain: Option<String>,
    /// Tests only: allow policy intervals from 1s and retry backoff in seconds.
    #[arg(long, hide = true, env = "SITERECOVERY_TEST_INTERVALS", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", value_name = "BOOL")]
    pub test_intervals: Option<bool>,
    /// Validity of the host certificates issued at registration and renewal, and of
    /// the provider's own certificate when it renews it (at two thirds of its life)
    /// (default 365d, at least 30s).
    #[arg(long, env = "SITERECOVERY_CERT_VALIDITY", value_name = "DUR")]
    pub cert_validity: Option<String>,
    /// Open connections at most (handshaking or established); more are refused
    /// (default 1024).
    #[arg(long, env = "SITERECOVERY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// The only directory recovery-plan scripts run from (`plan create --script N=NAME`
    /// names a script in it) (default /etc/siterecovery/scripts).
    #[arg(long, env = "SITERECOVERY_SCRIPTS_DIR", value_name = "DIR")]
    pub scripts_dir: Option<PathBuf>,
    /// Prometheus metrics (plain HTTP, GET /metrics) on IP:PORT, or `off` (default
    /// 127.0.0.1:9464; when that default is in use the metrics are off, warned).
    #[arg(long, env = "SITERECOVERY_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
}

impl ProviderSettings {
    /// The command line's layer: `serve`'s flags with the global ones.
    pub fn with_globals(mut self, g: &GlobalArgs) -> Self {
        self.log_json = g.log_json;
        self.log_level = g.log_level.clone();
        self
    }
}

/// Every key's default, where it has one (`rust_log`: `RUST_LOG`, when set).
pub fn defaults(rust_log: Option<String>) -> ProviderSettings {
    ProviderSettings {
        data_dir: Some(DEFAULT_DATA_DIR.into()),
        log_json: Some(false),
        log_level: Some(rust_log.unwrap_or_else(|| "info".into())),
        listen: None,
        grace: Some("10s".into()),
        drain: Some("0s".into()),
        test_intervals: Some(false),
        cert_validity: Some("365d".into()),
        max_connections: Some(1024),
        scripts_dir: Some(DEFAULT_SCRIPTS_DIR.into()),
        metrics_listen: None,
    }
}

/// What `provider serve` runs with.
#[derive(Debug, Clone)]
pub struct ProviderRuntime {
    pub data_dir: PathBuf,
    pub log_json: bool,
    pub log_level: LogFilter,
    /// `None`: the vault's address.
    pub listen: Option<SocketAddr>,
    pub grace: Duration,
    pub drain: Duration,
    pub test_intervals: bool,
    pub cert_validity: Duration,
    pub max_connections: usize,
    pub scripts_dir: PathBuf,
    /// `None`: the default address, off when in use.
    pub metrics_listen: Option<MetricsListen>,
}

/// Checks every key of `s` (the merged layers); every refused key is reported.
pub fn validate(s: &ProviderSettings) -> Result<ProviderRuntime, Vec<KeyError>> {
    let mut errors = KeyErrors::default();
    let data_dir = errors.check(path("data-dir", s.data_dir.as_deref(), DEFAULT_DATA_DIR));
    let log_level = errors.check(log_filter("log-level", s.log_level.as_deref()));
    let listen = errors.check(s.listen.as_deref().map(|a| address("listen", a)).transpose());
    let grace = errors.check(duration_in("grace", s.grace.as_deref().unwrap_or("10s"), GRACE_RANGE));
    let drain = errors.check(duration_in("drain", s.drain.as_deref().unwrap_or("0s"), GRACE_RANGE));
    let cert_validity =
        errors.check(duration_in("cert-validity", s.cert_validity.as_deref().unwrap_or("365d"), VALIDITY_RANGE));
    let max_connections = errors.check(at_least("max-connections", s.max_connections, 1024, 1));
    let scripts_dir = errors.check(path("scripts-dir", s.scripts_dir.as_deref(), DEFAULT_SCRIPTS_DIR));
    let metrics_listen = errors.check(
        s.metrics_listen
            .as_deref()
            .map(|a| a.parse::<MetricsListen>().map_err(|e| KeyError::new("metrics-listen", e.to_string())))
            .transpose(),
    );
    let runtime = (|| {
        Some(ProviderRuntime {
            data_dir: data_dir?,
            log_json: s.log_json.unwrap_or(false),
            log_level: log_level?,
            listen: listen?,
            grace: grace?,
            drain: drain?,
            test_intervals: s.test_intervals.unwrap_or(false),
            cert_validity: cert_validity?,
            max_connections: max_connections?,
            scripts_dir: scripts_dir?,
            metrics_listen: metrics_listen?,
        })
    })();
    errors.finish(runtime)
}

/// The layers of `provider serve` (the command line `cli` over the file and defaults)
/// and the runtime config they give.
pub fn load(
    global: &GlobalArgs,
    cli: ProviderSettings,
) -> Result<(Layers<ProviderSettings>, ProviderRuntime), SettingsError> {
    let (path, explicit) = match &global.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let layers = Layers {
        defaults: defaults(std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty())),
        file: FileLayer::read(&path, explicit)?,
        cli: cli.with_globals(global),
    };
    let runtime = layers.validate(validate)?;
    Ok((layers, runtime))
}

/// Every key, in the order of the file.
pub fn keys() -> Vec<String> {
    let cmd = <ProviderSettings as clap::Args>::augment_args(clap::Command::new("provider"));
    let mut keys: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).collect();
    keys.splice(1..1, ["log-json".to_owned(), "log-level".into()]);
    keys
}

/// `provider config check`: the effective settings on stdout, or every error on
/// stderr; returns the exit code (0, or 1 on an error).
pub fn check(global: &GlobalArgs, cli: ProviderSettings) -> i32 {
    match load(global, cli).and_then(|(layers, _)| Ok((layers.describe(&keys())?, layers.file))) {
        Ok((text, file)) => {
            let from = if file.found { "" } else { " (no such file: defaults, environment and flags only)" };
            println!("# effective settings of `provider serve`, from {}{from}\n{text}", file.path.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
