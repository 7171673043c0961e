//! `agent`: the siterecovery host daemon and its local commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use siterecovery_agent::config::AgentFiles;
use siterecovery_agent::control::{self, ControlOptions};
use siterecovery_agent::files::{self, SocketAccess};
use siterecovery_agent::nbd::{self, Exports, NbdTls, TcpSecurity};
use siterecovery_agent::peer;
use siterecovery_agent::protection::Protection;
use siterecovery_agent::register::{RegisterArgs, register};
use siterecovery_agent::replica::ReplicaSet;
use siterecovery_agent::settings::{self, AgentRuntime, AgentSettings, GlobalArgs, NbdSettings};
use siterecovery_agent::tracker::bitmap;
use siterecovery_agent::vm::VmManager;
use siterecovery_proto::daemon;
use siterecovery_proto::daemon::LogHandle;
use siterecovery_proto::lifecycle::Lifecycle;
use siterecovery_proto::metrics::MetricsConfig;
use siterecovery_proto::model::{NameError, PointSelector, VmName};
use siterecovery_proto::settings::Layers;

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "siterecovery agent: serves VM disks over NBD, tracks writes in HRL logs, replicates to a peer host",
    long_about = "siterecovery agent: the host daemon. It serves every VM disk over NBD (unix socket in the VM folder \
        for the hypervisor's group, and TCP with TLS and a client certificate of the vault), tracks every write in per-disk HRL logs, and replicates to a peer host over mutual TLS.\n\n\
        First `agent register` with the vault key file from the provider, then `agent serve`."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register this host with a vault (makes a key pair here; only a CSR travels).
    Register {
        /// The vault key file made by `provider vault create`.
        #[arg(long, value_name = "FILE")]
        vault_key: PathBuf,
        /// This host's name.
        #[arg(long)]
        host: String,
        /// Site (location) of this host, e.g. primary or secondary.
        #[arg(long)]
        site: String,
        /// Cloud (group of hosts at the site) this host belongs to.
        #[arg(long)]
        cloud: String,
        /// Address other hosts reach this agent on (HOST:PORT), for replication traffic.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Renew the registration held in the data dir (presents its current
        /// certificate), or register a name an operator reset (`provider host reset`).
        #[arg(long)]
        reregister: bool,
        /// The vault CA's fingerprint as `provider vault create` printed it
        /// (sha256:HEX): a vault key file of another CA is refused before anything is
        /// sent. Without it, registration warns that the CA was not pinned.
        #[arg(long, value_name = "sha256:HEX")]
        ca_fingerprint: Option<String>,
    },
    /// Run the agent (long-running; stops gracefully on SIGTERM or Ctrl-C).
    #[command(after_long_help = settings::PRECEDENCE_HELP)]
    Serve {
        #[command(flatten)]
        settings: AgentSettings,
    },
    /// The config file: `config check [FILE]` prints the effective settings or the errors.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// VMs on this host, read from the data dir (no provider needed).
    #[command(subcommand)]
    Vm(VmCmd),
    /// Fail a VM over to this host from its replica, without the provider (for when the
    /// provider itself is down); the provider learns of it when it is back. Needs the
    /// agent running (`agent serve`).
    Failover(LocalFailover),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective settings of `agent serve` (file, environment, flags and
    /// defaults merged), or every refused key with its line; exits 1 on an error.
    #[command(after_long_help = settings::PRECEDENCE_HELP)]
    Check {
        /// The file to check (default: --config, else /etc/siterecovery/agent.toml).
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: AgentSettings,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// List the VMs in the data dir.
    List,
}

#[derive(clap::Args)]
struct LocalFailover {
    /// The protected VM whose replica is on this host.
    vm: VmName,
    /// Recovery point: latest (default), latest-app-consistent, or a point id.
    #[arg(long, default_value = "latest", value_parser = parse_point)]
    point: PointSelector,
}

/// A point as the agent accepts it everywhere (a selector, or a bare sequence number).
fn parse_point(s: &str) -> Result<PointSelector, NameError> {
    siterecovery_agent::control::command::point_selector(s)
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { settings } => {
            let (layers, runtime) = match settings::load(&cli.global, settings) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            };
            let log = daemon::init_daemon_logging(runtime.log_json, &runtime.log_level);
            siterecovery_agent::faults::setup();
            daemon::run_main(serve_cmd(layers, runtime, log));
        }
        Cmd::Config(ConfigCmd::Check { file, settings }) => {
            let global = GlobalArgs { config: file.or(cli.global.config.clone()), ..cli.global.clone() };
            std::process::exit(settings::check(&global, settings));
        }
        cmd => {
            daemon::init_logging(cli.global.log_json.unwrap_or(false), "warn");
            siterecovery_agent::faults::setup();
            daemon::run_main(run(cli.global, cli.json, cmd));
        }
    }
}

/// The data dir of a local command: --data-dir, SITERECOVERY_DATA_DIR, `data-dir` of
/// the config file, or the default.
fn data_dir(global: &GlobalArgs) -> Result<PathBuf> {
    Ok(settings::load(global, AgentSettings::default())?.1.data_dir)
}

async fn run(global: GlobalArgs, json: bool, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Register { vault_key, host, site, cloud, listen, reregister, ca_fingerprint } => {
            let dir = data_dir(&global)?;
            let cfg = register(RegisterArgs {
                vault_key: &vault_key,
                host: &host,
                site: &site,
                cloud: &cloud,
                data_dir: &dir,
                listen: &listen,
                reregister,
                ca_fingerprint: ca_fingerprint.as_deref(),
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                println!(
                    "host {} registered as {} (site {}, cloud {}) with the provider at {}",
                    cfg.host_name, cfg.host_id, cfg.site, cfg.cloud, cfg.provider_address
                );
                println!("next: agent serve --data-dir {}", dir.display());
            }
            Ok(())
        }
        Cmd::Failover(f) => {
            let dir = data_dir(&global)?;
            let req = siterecovery_agent::admin::Request {
                op: "failover".into(),
                vm: f.vm.to_string(),
                point: f.point.to_string(),
            };
            let answer = siterecovery_agent::admin::call(&dir, &req).await.with_context(|| {
                format!(
                    "cannot reach the agent at {} (is `agent --data-dir {} serve` running?)",
                    siterecovery_agent::admin::socket_path(&dir).display(),
                    dir.display()
                )
            })?;
            if !answer.ok {
                anyhow::bail!("local failover of {} refused: {}", f.vm, answer.error);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!("VM {} failed over locally from point {}; its disks:", answer.vm, answer.point);
                for u in &answer.uris {
                    println!("  {u}");
                }
                println!("commit it from the provider (`failover commit {}`) once it is back", answer.vm);
            }
            Ok(())
        }
        Cmd::Vm(VmCmd::List) => {
            let dir = data_dir(&global)?;
            let files = AgentFiles::load(&dir)?;
            let mut rows = Vec::new();
            let vms_dir = files.vms_dir();
            if vms_dir.exists() {
                for e in std::fs::read_dir(&vms_dir).with_context(|| format!("listing {}", vms_dir.display()))? {
                    let folder = e?.path();
                    match siterecovery_agent::vm::read_config(&folder) {
                        Ok(Some(c)) => {
                            // Hand-written or from an older agent: listed, but no command
                            // can name it.
                            if let Err(e) = VmName::new(c.name.as_str()) {
                                eprintln!("warning: {}: {e}", folder.display());
                            }
                            rows.push(c)
                        }
                        Ok(None) => {}
                        Err(e) => eprintln!("warning: {e}"),
                    }
                }
            }
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<20} {:<8} {:>5}", "VM", "POWER", "DISKS");
                for c in rows {
                    let power = serde_json::to_value(c.power)?.as_str().unwrap_or("?").to_owned();
                    println!("{:<20} {:<8} {:>5}", c.name, power, c.disks.len());
                }
            }
            Ok(())
        }
        Cmd::Serve { .. } | Cmd::Config(_) => anyhow::bail!("handled in main"),
    }
}

/// `agent serve`: the log budget, then [`serve`].
async fn serve_cmd(layers: Layers<AgentSettings>, rt: AgentRuntime, log: LogHandle) -> Result<()> {
    // Absolute, so the NBD URIs reported to the provider work from anywhere.
    let dir = std::fs::canonicalize(&rt.data_dir).with_context(|| format!("data dir {}", rt.data_dir.display()))?;
    let budget = match rt.log_budget {
        Some(b) => b,
        None => {
            let fs = nix::sys::statvfs::statvfs(&dir)
                .with_context(|| format!("free space of the data dir {}", dir.display()))?;
            let free = fs.blocks_available().saturating_mul(fs.fragment_size());
            bitmap::default_log_budget(free)
        }
    };
    bitmap::set_default_log_budget(budget);
    tracing::info!(
        budget,
        "log budget (all disks of the host): {}",
        siterecovery_proto::model::units::human_size(budget)
    );
    if let Some(spec) = rt.bandwidth.clone() {
        siterecovery_agent::bandwidth::set_host_limit(spec);
    }
    serve(dir, layers, rt, log).await
}

/// The NBD TCP listener's security: TLS, or plain with `--nbd-insecure-tcp` on
/// loopback only.
fn nbd_security(args: &NbdSettings, bound: std::net::SocketAddr, files: &AgentFiles) -> Result<TcpSecurity> {
    if !args.insecure_tcp {
        return Ok(TcpSecurity::Tls(Arc::new(NbdTls::new(&files.trust)?)));
    }
    if !bound.ip().is_loopback() {
        anyhow::bail!(
            "--nbd-insecure-tcp serves every disk without TLS: only on a loopback address, not {bound} \
             (drop --nbd-insecure-tcp to require TLS with a client certificate of the vault)"
        );
    }
    tracing::warn!(nbd = %bound, "--nbd-insecure-tcp: plain NBD on TCP, any local user can reach every disk; for labs only");
    Ok(TcpSecurity::Insecure)
}

async fn serve(dir: PathBuf, layers: Layers<AgentSettings>, rt: AgentRuntime, log: LogHandle) -> Result<()> {
    let files = Arc::new(AgentFiles::load(&dir)?);
    let nbd_args = rt.nbd.clone();
    let limits = nbd_args.limits;
    let (heartbeat, hooks, quiesce_hook) = (rt.heartbeat, rt.hooks.clone(), rt.quiesce_hook.clone());
    let access = match &nbd_args.group {
        Some(g) => SocketAccess::for_group(g)?,
        None => SocketAccess::default(),
    };
    // The data dir leads to the VMs' sockets: 0700, or 0710 in the NBD group. Forced
    // at every start, as are vms/ and replicas/ (and their folders) when opened below.
    access.socket_dir(&dir).with_context(|| format!("data dir {}", dir.display()))?;
    files::private_dir(&dir.join("replicas")).with_context(|| format!("data dir {}", dir.display()))?;
    let signals = daemon::shutdown_on_signals().context("installing the SIGTERM/SIGINT handlers")?;
    // Health NOT_SERVING and no READY=1 until the control channel is up (control::run).
    let lifecycle = Lifecycle::starting(&["siterecovery.v1.Peer"]).await;
    let shutdown = lifecycle.drain_after(signals, rt.drain);
    // The running settings, at every `systemctl reload` (SIGHUP).
    let _live = settings::reload::on_sighup(layers, rt.clone(), log, files.clone(), shutdown.clone())?;
    let peer_addr = rt.peer_listen.map(|a| a.to_string()).unwrap_or_else(|| files.config.listen_address.clone());
    let peer_listener = tokio::net::TcpListener::bind(&peer_addr)
        .await
        .with_context(|| format!("cannot listen on {peer_addr} for peer traffic"))?;
    let nbd_listen = &nbd_args.listen;
    let nbd_listener = tokio::net::TcpListener::bind(nbd_listen)
        .await
        .with_context(|| format!("cannot listen on {nbd_listen} for NBD"))?;
    let nbd_addr = nbd_listener.local_addr()?;
    let security = nbd_security(&nbd_args, nbd_addr, &files)?;
    let exports = Arc::new(Exports::with_limits(limits));
    let replicas_dir = dir.join("replicas");
    let replicas = Arc::new(
        tokio::task::spawn_blocking(move || ReplicaSet::open(&replicas_dir)).await.context("opening replicas")??,
    );
    let vms = Arc::new(
        VmManager::load(files.vms_dir(), replicas.clone(), exports.clone(), nbd_addr, access, hooks, shutdown.clone())
            .await?,
    );

    let protection = Protection::start(
        files.clone(),
        vms.clone(),
        replicas.clone(),
        exports.clone(),
        nbd_addr,
        quiesce_hook,
        shutdown.clone(),
    )
    .await;
    let metrics = MetricsConfig::new(rt.metrics_listen, siterecovery_agent::metrics::DEFAULT_LISTEN);
    let metrics_task =
        siterecovery_agent::metrics::spawn(metrics, protection.clone(), vms.clone(), shutdown.clone()).await?;
    tracing::info!(host = %files.config.host_name, host_id = %files.config.host_id, peer = %files.config.listen_address,
        nbd = %nbd_addr, nbd_tls = matches!(security, TcpSecurity::Tls(_)), "agent serving");
    let nbd_task = tokio::spawn(nbd::serve_tcp(nbd_listener, exports, security, shutdown.clone()));
    let peer_task = tokio::spawn(peer::serve(
        files.clone(),
        replicas.clone(),
        peer_listener,
        lifecycle.health_service(),
        shutdown.clone(),
    ));
    let opts = ControlOptions { heartbeat, lifecycle: Some(lifecycle), ..ControlOptions::default() };
    let admin_path = siterecovery_agent::admin::socket_path(&dir);
    let _ = std::fs::remove_file(&admin_path);
    let admin_listener = tokio::net::UnixListener::bind(&admin_path)
        .with_context(|| format!("cannot listen on {}", admin_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&admin_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let admin_task =
        tokio::spawn(siterecovery_agent::admin::serve(admin_listener, protection.clone(), shutdown.clone()));
    let control_task =
        tokio::spawn(control::run(files.clone(), vms.clone(), protection.clone(), opts, shutdown.clone()));
    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping replication, then VMs (logs sealed, disks flushed)");
    protection.shutdown().await;
    vms.shutdown().await;
    let grace = Duration::from_secs(10);
    let joined = tokio::time::timeout(grace, async {
        let _ = control_task.await;
        let _ = admin_task.await;
        let _ = nbd_task.await;
        match peer_task.await {
            Ok(Err(e)) => tracing::warn!("peer server: {e}"),
            Err(e) => tracing::warn!("peer server task: {e}"),
            Ok(Ok(())) => {}
        }
    })
    .await;
    if let Some(m) = metrics_task {
        m.abort();
    }
    if joined.is_err() {
        tracing::warn!("tasks still running after {grace:?}; exiting");
    }
    tracing::info!("agent stopped");
    Ok(())
}
