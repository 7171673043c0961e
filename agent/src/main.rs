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
use siterecovery_agent::tracker::bitmap;
use siterecovery_agent::vm::{Hooks, VmManager};
use siterecovery_proto::daemon;
use siterecovery_proto::lifecycle::Lifecycle;
use siterecovery_proto::model::units::{parse_duration, parse_size};
use siterecovery_proto::model::{NameError, PointSelector, VmName};

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
    /// Data dir, for the local commands (`vm list`).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Log as JSON lines instead of human-readable lines.
    #[arg(long, global = true)]
    log_json: bool,
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
    Serve {
        /// Address to bind the peer (replication) listener to, when it differs from the
        /// address registered with --listen (NAT, a proxy in front of the agent).
        #[arg(long, value_name = "ADDR")]
        peer_listen: Option<String>,
        #[command(flatten)]
        nbd: NbdArgs,
        /// Heartbeat interval to the provider.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        heartbeat: Duration,
        /// Command run (sh -c) when a VM starts, e.g. to attach QEMU to its NBD exports.
        #[arg(long, value_name = "CMD")]
        on_vm_start: Option<String>,
        /// Command run (sh -c) when a VM stops.
        #[arg(long, value_name = "CMD")]
        on_vm_stop: Option<String>,
        /// Command run (sh -c, with SITERECOVERY_VM) before an app-consistent recovery
        /// point is taken, e.g. `fsfreeze` through a guest agent; the point is marked
        /// app-consistent only when it exits 0.
        #[arg(long, value_name = "CMD")]
        quiesce_hook: Option<String>,
        /// Most bytes of pending HRL logs per disk (e.g. 8G). Past it the disk runs on a
        /// dirty-block bitmap until the replica catches up: guest writes never fail
        /// because of logs. Default: a quarter of the data dir's free space at start,
        /// between 64 MiB and 64 GiB.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        log_budget: Option<u64>,
        /// After SIGTERM, how long the peer listener stays up answering health checks
        /// with NOT_SERVING (replication goes on) before the agent stops.
        #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DUR")]
        drain: Duration,
    },
    /// VMs on this host, read from the data dir (no provider needed).
    #[command(subcommand)]
    Vm(VmCmd),
    /// Fail a VM over to this host from its replica, without the provider (for when the
    /// provider itself is down); the provider learns of it when it is back. Needs the
    /// agent running (`agent serve`).
    Failover(LocalFailover),
}

/// The NBD flags of `agent serve`.
#[derive(clap::Args)]
struct NbdArgs {
    /// TCP address of the NBD server. Clients must negotiate TLS on it (NBD STARTTLS,
    /// QEMU's `tls-creds-x509`) with a client certificate of the vault: role `nbd`
    /// (`provider nbd-client-cert`) or `host`.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    nbd_listen: String,
    /// Labs only: plain NBD on the TCP listener, no TLS. Refused unless --nbd-listen is
    /// a loopback address (any local user can then reach every disk).
    #[arg(long)]
    nbd_insecure_tcp: bool,
    /// Group given the VMs' NBD unix sockets (mode 0660) and the right to traverse the
    /// directories leading to them (0710): the hypervisor's, e.g. `kvm`. Without it the
    /// sockets are reachable by the agent's own user only.
    #[arg(long, value_name = "GROUP")]
    nbd_group: Option<String>,
    /// NBD connections at once on the TCP listener; over it a client is closed at once.
    /// Each VM's unix socket has its own cap ((its disks + 1) times --nbd-max-export-connections).
    #[arg(long, default_value_t = nbd::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    nbd_max_connections: usize,
    /// NBD connections at once to one disk, over both listeners; over it NBD_OPT_GO is refused.
    #[arg(long, default_value_t = nbd::DEFAULT_MAX_EXPORT_CONNECTIONS, value_name = "N")]
    nbd_max_export_connections: usize,
    /// Request payload bytes one NBD connection may have in flight (at least 32M, the
    /// largest request); a client sending more before it reads replies is not read on.
    #[arg(long, default_value = "64M", value_parser = parse_size, value_name = "SIZE")]
    nbd_max_request_memory: u64,
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
    daemon::init_logging(cli.log_json, if matches!(cli.cmd, Cmd::Serve { .. }) { "info" } else { "warn" });
    siterecovery_agent::faults::setup();
    daemon::run_main(run(cli));
}

fn data_dir(d: Option<PathBuf>) -> Result<PathBuf> {
    d.context("--data-dir DIR is required")
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Register { vault_key, host, site, cloud, listen, reregister, ca_fingerprint } => {
            let dir = data_dir(cli.data_dir)?;
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
            if cli.json {
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
        Cmd::Serve { peer_listen, nbd, heartbeat, on_vm_start, on_vm_stop, quiesce_hook, log_budget, drain } => {
            let dir = data_dir(cli.data_dir)?;
            // Absolute, so the NBD URIs reported to the provider work from anywhere.
            let dir = std::fs::canonicalize(&dir).with_context(|| format!("data dir {}", dir.display()))?;
            let budget = match log_budget {
                Some(b) => b,
                None => {
                    let fs = nix::sys::statvfs::statvfs(&dir)
                        .with_context(|| format!("free space of the data dir {}", dir.display()))?;
                    let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                    bitmap::default_log_budget(free)
                }
            };
            bitmap::set_default_log_budget(budget);
            tracing::info!(budget, "log budget per disk: {}", siterecovery_proto::model::units::human_size(budget));
            let hooks = Hooks { on_start: on_vm_start, on_stop: on_vm_stop };
            serve(dir, peer_listen, nbd, heartbeat, hooks, quiesce_hook, drain).await
        }
        Cmd::Failover(f) => {
            let dir = data_dir(cli.data_dir)?;
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
            if cli.json {
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
            let dir = data_dir(cli.data_dir)?;
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
            if cli.json {
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
    }
}

/// The NBD TCP listener's security: TLS, or plain with `--nbd-insecure-tcp` on
/// loopback only.
fn nbd_security(args: &NbdArgs, bound: std::net::SocketAddr, files: &AgentFiles) -> Result<TcpSecurity> {
    if !args.nbd_insecure_tcp {
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

async fn serve(
    dir: PathBuf,
    peer_listen: Option<String>,
    nbd_args: NbdArgs,
    heartbeat: Duration,
    hooks: Hooks,
    quiesce_hook: Option<String>,
    drain: Duration,
) -> Result<()> {
    let files = Arc::new(AgentFiles::load(&dir)?);
    let limits = nbd::Limits::new(
        nbd_args.nbd_max_connections,
        nbd_args.nbd_max_export_connections,
        nbd_args.nbd_max_request_memory,
    )
    .context("NBD limits")?;
    let access = match &nbd_args.nbd_group {
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
    let shutdown = lifecycle.drain_after(signals, drain);
    let peer_addr = peer_listen.unwrap_or_else(|| files.config.listen_address.clone());
    let peer_listener = tokio::net::TcpListener::bind(&peer_addr)
        .await
        .with_context(|| format!("cannot listen on {peer_addr} for peer traffic"))?;
    let nbd_listen = &nbd_args.nbd_listen;
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
    if joined.is_err() {
        tracing::warn!("tasks still running after {grace:?}; exiting");
    }
    tracing::info!("agent stopped");
    Ok(())
}
