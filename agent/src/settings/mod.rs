//! The agent's settings: `agent serve`'s flags, their `SITERECOVERY_…` environment
//! variables and the keys of `/etc/siterecovery/agent.toml`, validated into the
//! runtime config [`AgentRuntime`] by the pure [`validate`].
//!
//! Precedence, key by key: flag > environment > file > default. Every key is the long
//! flag's name (`nbd-listen` = `--nbd-listen` = `SITERECOVERY_NBD_LISTEN`). The
//! global flags (`--data-dir`, `--log-json`, `--log-level`, `--config`) live on the
//! top-level command ([`GlobalArgs`]) and are copied into the settings.
//!
//! Adding a key: a field of [`AgentSettings`] (doc = its `--help`, `env`), its line in
//! [`validate`] (and [`defaults`] when it has one), and its commented line in
//! `dist/etc/agent.toml` (a test fails until it is there). A key that may change at
//! `systemctl reload` goes into [`LIVE_KEYS`].

pub mod reload;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_proto::daemon::LogFilter;
use siterecovery_proto::metrics::MetricsListen;
use siterecovery_proto::model::bandwidth::BandwidthSpec;
use siterecovery_proto::settings::check::{address, at_least, command, duration_in, group, log_filter, path, size};
use siterecovery_proto::settings::{FileLayer, KeyError, KeyErrors, Layers, SettingsError};

use crate::nbd;
use crate::vm::Hooks;

/// The file read when `--config` is not given (a missing one is fine).
pub const DEFAULT_CONFIG: &str = "/etc/siterecovery/agent.toml";
/// The data dir when none is set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/siterecovery";
/// Drain times accepted.
const DRAIN_RANGE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(600));
/// The keys `systemctl reload` (SIGHUP) applies live; the others need a restart.
pub const LIVE_KEYS: &[&str] = &["log-level", "bandwidth"];
/// Heartbeat intervals accepted.
const HEARTBEAT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));

/// What the help of `serve` says about the layers.
pub const PRECEDENCE_HELP: &str = "Every flag of `agent serve` is also a key of the config file (/etc/siterecovery/agent.toml, \
    or --config FILE; the key is the flag's name without the dashes in front, e.g. nbd-listen) and an environment \
    variable (SITERECOVERY_NBD_LISTEN). Precedence: flag > environment > file > default. `systemctl reload` (SIGHUP) \
    re-reads the file: log-level and the certificates in the data dir change live, other keys need a restart.";

/// The flags every command takes (`agent --data-dir DIR vm list`); of the settings,
/// `data-dir`, `log-json` and `log-level`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// Data dir (default /var/lib/siterecovery).
    #[arg(long, global = true, env = "SITERECOVERY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable lines (default false).
    #[arg(long, global = true, env = "SITERECOVERY_LOG_JSON", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", value_name = "BOOL")]
    pub log_json: Option<bool>,
    /// Log filter of the daemon, e.g. info or warn,siterecovery_agent=debug (default:
    /// RUST_LOG, else info). Changes live at `systemctl reload`.
    #[arg(long, global = true, env = "SITERECOVERY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Config file (default /etc/siterecovery/agent.toml; a missing default file is fine,
    /// a missing --config file is an error).
    #[arg(long, global = true, env = "SITERECOVERY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The agent's settings, one layer of them: all `Option` (unset), the flags of `serve`
/// and the keys of `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentSettings {
    /// From [`GlobalArgs`].
    #[arg(skip)]
    pub data_dir: Option<PathBuf>,
    #[arg(skip)]
    pub log_json: Option<bool>,
    #[arg(skip)]
    pub log_level: Option<String>,
    /// Address to bind the peer (replication) listener to, when it differs from the
    /// address registered with --listen (NAT, a proxy in front of the agent).
    #[arg(long, env = "SITERECOVERY_PEER_LISTEN", value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// TCP address of the NBD server (default 127.0.0.1:0). Clients must negotiate TLS on
    /// it (NBD STARTTLS, QEMU's `tls-creds-x509`) with a client certificate of the vault:
    /// role `nbd` (`provider nbd-client-cert`) or `host`.
    #[arg(long, env = "SITERECOVERY_NBD_LISTEN", value_name = "ADDR")]
    pub nbd_listen: Option<String>,
    /// Labs only: plain NBD on the TCP listener, no TLS. Refused unless --nbd-listen is
    /// a loopback address (any local user can then reach every disk).
    #[arg(long, env = "SITERECOVERY_NBD_INSECURE_TCP", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", value_name = "BOOL")]
    pub nbd_insecure_tcp: Option<bool>,
    /// Group given the VMs' NBD unix sockets (mode 0660) and the right to traverse the
    /// directories leading to them (0710): the hypervisor's, e.g. `kvm`. Without it the
    /// sockets are reachable by the agent's own user only.
    #[arg(long, env = "SITERECOVERY_NBD_GROUP", value_name = "GROUP")]
    pub nbd_group: Option<String>,
    /// NBD connections at once on the TCP listener (default 256); over it a client is
    /// closed at once. Each VM's unix socket has its own cap ((its disks + 1) times
    /// --nbd-max-export-connections).
    #[arg(long, env = "SITERECOVERY_NBD_MAX_CONNECTIONS", value_name = "N")]
    pub nbd_max_connections: Option<usize>,
    /// NBD connections at once to one disk, over both listeners (default 16); over it
    /// NBD_OPT_GO is refused.
    #[arg(long, env = "SITERECOVERY_NBD_MAX_EXPORT_CONNECTIONS", value_name = "N")]
    pub nbd_max_export_connections: Option<usize>,
    /// Request payload bytes one NBD connection may have in flight (default 64M, at
    /// least 32M, the largest request); a client sending more before it reads replies
    /// is not read on.
    #[arg(long, env = "SITERECOVERY_NBD_MAX_REQUEST_MEMORY", value_name = "SIZE")]
    pub nbd_max_request_memory: Option<String>,
    /// Heartbeat interval to the provider (default 5s).
    #[arg(long, env = "SITERECOVERY_HEARTBEAT", value_name = "DUR")]
    pub heartbeat: Option<String>,
    /// Command run (sh -c) when a VM starts, e.g. to attach QEMU to its NBD exports.
    #[arg(long, env = "SITERECOVERY_ON_VM_START", value_name = "CMD")]
    pub on_vm_start: Option<String>,
    /// Command run (sh -c) when a VM stops.
    #[arg(long, env = "SITERECOVERY_ON_VM_STOP", value_name = "CMD")]
    pub on_vm_stop: Option<String>,
    /// Command run (sh -c, with SITERECOVERY_VM) before an app-consistent recovery
    /// point is taken, e.g. `fsfreeze` through a guest agent; the point is marked
    /// app-consistent only when it exits 0.
    #[arg(long, env = "SITERECOVERY_QUIESCE_HOOK", value_name = "CMD")]
    pub quiesce_hook: Option<String>,
    /// Most bytes of pending HRL logs of all disks of this host together (e.g. 8G); a
    /// disk's own logs also stay under half its size. A disk whose write would pass it
    /// runs on a dirty-block bitmap until the replica catches up: guest writes never
    /// fail because of logs. Default: a quarter of the data dir's free space at start,
    /// between 64 MiB and 64 GiB.
    #[arg(long, env = "SITERECOVERY_LOG_BUDGET", value_name = "SIZE")]
    pub log_budget: Option<String>,
    /// After SIGTERM, how long the peer listener stays up answering health checks with
    /// NOT_SERVING (replication goes on) before the agent stops (default 0s).
    #[arg(long, env = "SITERECOVERY_DRAIN", value_name = "DUR")]
    pub drain: Option<String>,
    /// Prometheus metrics (plain HTTP, GET /metrics) on IP:PORT, or `off` (default
    /// 127.0.0.1:9465; when that default is in use the metrics are off, warned).
    #[arg(long, env = "SITERECOVERY_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,
    /// Replication rate limit of this host, shared by all its relationships, e.g.
    /// "08:00-18:00=50M,*=0": windows HH:MM-HH:MM in this host's local time zone,
    /// `*` for the rest of the day, rates in bytes/s (K, M, G; 0 = unlimited). A
    /// policy's own limit also applies: the smaller one wins. Default: unlimited.
    /// Changes live at `systemctl reload`.
    #[arg(long, env = "SITERECOVERY_BANDWIDTH", value_name = "SPEC")]
    pub bandwidth: Option<String>,
}

impl AgentSettings {
    /// The command line's layer: `serve`'s flags with the global ones.
    pub fn with_globals(mut self, g: &GlobalArgs) -> Self {
        self.data_dir = g.data_dir.clone();
        self.log_json = g.log_json;
        self.log_level = g.log_level.clone();
        self
    }
}

/// Every key's default, where it has one (`rust_log`: the `RUST_LOG` variable, the
/// default log filter when set).
pub fn defaults(rust_log: Option<String>) -> AgentSettings {
    AgentSettings {
        data_dir: Some(DEFAULT_DATA_DIR.into()),
        log_json: Some(false),
        log_level: Some(rust_log.unwrap_or_else(|| "info".into())),
        nbd_listen: Some("127.0.0.1:0".into()),
        nbd_insecure_tcp: Some(false),
        nbd_max_connections: Some(nbd::DEFAULT_MAX_CONNECTIONS),
        nbd_max_export_connections: Some(nbd::DEFAULT_MAX_EXPORT_CONNECTIONS),
        nbd_max_request_memory: Some("64M".into()),
        heartbeat: Some("5s".into()),
        drain: Some("0s".into()),
        ..AgentSettings::default()
    }
}

/// The NBD server's settings.
#[derive(Debug, Clone)]
pub struct NbdSettings {
    pub listen: SocketAddr,
    pub insecure_tcp: bool,
    /// A group name (its existence is checked at start).
    pub group: Option<String>,
    pub limits: nbd::Limits,
}

/// What `agent serve` runs with.
#[derive(Debug, Clone)]
pub struct AgentRuntime {
    pub data_dir: PathBuf,
    pub log_json: bool,
    pub log_level: LogFilter,
    /// `None`: the address registered with `agent register --listen`.
    pub peer_listen: Option<SocketAddr>,
    pub nbd: NbdSettings,
    pub heartbeat: Duration,
    pub hooks: Hooks,
    pub quiesce_hook: Option<String>,
    /// `None`: a quarter of the data dir's free space (measured at start).
    pub log_budget: Option<u64>,
    pub drain: Duration,
    /// `None`: the default address, off when in use.
    pub metrics_listen: Option<MetricsListen>,
    /// `None`: unlimited.
    pub bandwidth: Option<BandwidthSpec>,
}

/// Checks every key of `s` (the merged layers) and applies the defaults left to the
/// runtime; every refused key is reported, not only the first.
pub fn validate(s: &AgentSettings) -> Result<AgentRuntime, Vec<KeyError>> {
    let mut errors = KeyErrors::default();
    let data_dir = errors.check(path("data-dir", s.data_dir.as_deref(), DEFAULT_DATA_DIR));
    let log_level = errors.check(log_filter("log-level", s.log_level.as_deref()));
    let peer_listen = errors.check(s.peer_listen.as_deref().map(|a| address("peer-listen", a)).transpose());
    let nbd_listen = errors.check(address("nbd-listen", s.nbd_listen.as_deref().unwrap_or("127.0.0.1:0")));
    let nbd_group = errors.check(s.nbd_group.as_deref().map(|g| group("nbd-group", g)).transpose());
    let max_conn =
        errors.check(at_least("nbd-max-connections", s.nbd_max_connections, nbd::DEFAULT_MAX_CONNECTIONS, 1));
    let max_export = errors.check(at_least(
        "nbd-max-export-connections",
        s.nbd_max_export_connections,
        nbd::DEFAULT_MAX_EXPORT_CONNECTIONS,
        1,
    ));
    let request_memory =
        errors.check(size("nbd-max-request-memory", s.nbd_max_request_memory.as_deref().unwrap_or("64M")));
    let heartbeat = errors.check(duration_in("heartbeat", s.heartbeat.as_deref().unwrap_or("5s"), HEARTBEAT_RANGE));
    let on_start = errors.check(command("on-vm-start", s.on_vm_start.as_deref()));
    let on_stop = errors.check(command("on-vm-stop", s.on_vm_stop.as_deref()));
    let quiesce_hook = errors.check(command("quiesce-hook", s.quiesce_hook.as_deref()));
    let log_budget = errors.check(s.log_budget.as_deref().map(|b| log_budget("log-budget", b)).transpose());
    let drain = errors.check(duration_in("drain", s.drain.as_deref().unwrap_or("0s"), DRAIN_RANGE));
    let metrics_listen = errors.check(
        s.metrics_listen
            .as_deref()
            .map(|a| a.parse::<MetricsListen>().map_err(|e| KeyError::new("metrics-listen", e)))
            .transpose(),
    );
    let bandwidth = errors.check(
        s.bandwidth
            .as_deref()
            .map(|b| b.parse::<BandwidthSpec>().map_err(|e| KeyError::new("bandwidth", e)))
            .transpose(),
    );
    let limits = match (max_conn, max_export, request_memory) {
        (Some(c), Some(e), Some(m)) => {
            errors.check(nbd::Limits::new(c, e, m).map_err(|e| KeyError::new("nbd-max-request-memory", e)))
        }
        _ => None,
    };
    let runtime = (|| {
        Some(AgentRuntime {
            data_dir: data_dir?,
            log_json: s.log_json.unwrap_or(false),
            log_level: log_level?,
            peer_listen: peer_listen?,
            nbd: NbdSettings {
                listen: nbd_listen?,
                insecure_tcp: s.nbd_insecure_tcp.unwrap_or(false),
                group: nbd_group?,
                limits: limits?,
            },
            heartbeat: heartbeat?,
            hooks: Hooks { on_start: on_start?, on_stop: on_stop? },
            quiesce_hook: quiesce_hook?,
            log_budget: log_budget?,
            drain: drain?,
            metrics_listen: metrics_listen?,
            bandwidth: bandwidth?,
        })
    })();
    errors.finish(runtime)
}

fn log_budget(key: &'static str, s: &str) -> Result<u64, KeyError> {
    let b = size(key, s)?;
    if b == 0 {
        return Err(KeyError::new(key, "0 is out of range: at least 1 byte"));
    }
    Ok(b)
}

/// The settings of the command line `cli` (flags and environment, with the global
/// flags) over the config file and the defaults.
pub fn layers(global: &GlobalArgs, cli: AgentSettings) -> Result<Layers<AgentSettings>, SettingsError> {
    let (path, explicit) = match &global.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    Ok(Layers {
        defaults: defaults(std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty())),
        file: FileLayer::read(&path, explicit)?,
        cli: cli.with_globals(global),
    })
}

/// Every key, in the order of the file.
pub fn keys() -> Vec<String> {
    let cmd = <AgentSettings as clap::Args>::augment_args(clap::Command::new("agent"));
    let mut keys = vec!["data-dir".to_owned(), "log-json".into(), "log-level".into()];
    keys.extend(cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)));
    keys
}

/// The layers of `agent serve` and the runtime config they give.
pub fn load(global: &GlobalArgs, cli: AgentSettings) -> Result<(Layers<AgentSettings>, AgentRuntime), SettingsError> {
    let layers = layers(global, cli)?;
    let runtime = layers.validate(validate)?;
    Ok((layers, runtime))
}

/// `agent config check`: the effective settings on stdout, or every error on stderr;
/// returns the exit code (0, or 1 on an error).
pub fn check(global: &GlobalArgs, cli: AgentSettings) -> i32 {
    let shown = load(global, cli).and_then(|(layers, _)| Ok((layers.describe(&keys())?, layers.file)));
    match shown {
        Ok((text, file)) => {
            let from = if file.found { "" } else { " (no such file: defaults, environment and flags only)" };
            println!("# effective settings of `agent serve`, from {}{from}\n{text}", file.path.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
