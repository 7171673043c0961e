//! `provider`: the siterecovery control plane, vault tools, operator CLI and lab.
//!
//! This file parses the command line and dispatches: the daemon (`serve`) and the lab
//! here, the vault tools and operator commands to their groups in
//! [`siterecovery_provider::cli`].

mod lab;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use siterecovery_proto::daemon;
use siterecovery_proto::daemon::LogHandle;
use siterecovery_proto::lifecycle::Lifecycle;
use siterecovery_proto::metrics::MetricsConfig;
use siterecovery_proto::settings::Layers;
use siterecovery_provider::cli::failover::FailoverCmd;
use siterecovery_provider::cli::hosts::HostCmd;
use siterecovery_provider::cli::inventory::{ListOnly, VmCmd};
use siterecovery_provider::cli::jobs::JobCmd;
use siterecovery_provider::cli::network::NetworkCmd;
use siterecovery_provider::cli::plan::PlanCmd;
use siterecovery_provider::cli::protection::{CloudCmd, ImportArgs, PointCmd, PolicyCmd, ProtectArgs, VmJobArgs};
use siterecovery_provider::cli::vault::{OperatorCertArgs, VaultCmd};
use siterecovery_provider::cli::{self, CliError, Operator, OperatorCerts};
use siterecovery_provider::metrics::DEFAULT_LISTEN as DEFAULT_METRICS_LISTEN;
use siterecovery_provider::relationship::ProtectionConfig;
use siterecovery_provider::settings::{self, GlobalArgs, ProviderRuntime, ProviderSettings};
use siterecovery_provider::{api, store, vault};

#[derive(Parser)]
#[command(
    name = "provider",
    version,
    about = "siterecovery provider: the control plane, the vault, and the operator CLI",
    long_about = "siterecovery provider: the control plane (\"VMM server + vault\"), the vault tools, and the operator CLI.\n\n\
        Start here: `provider lab` runs a whole two-site deployment on loopback.\n\
        Operator commands need --connect HOST:PORT and --certs DIR (from `provider operator-cert`),\n\
        or the environment variables SITERECOVERY_CONNECT and SITERECOVERY_CERTS."
)]
struct Cli {
    /// Provider address for operator commands (HOST:PORT).
    #[arg(long, global = true, env = "SITERECOVERY_CONNECT", value_name = "ADDR")]
    connect: Option<String>,
    /// Directory with ca.pem, op.pem and op.key (made by `provider operator-cert`).
    #[arg(long, global = true, env = "SITERECOVERY_CERTS", value_name = "OPDIR")]
    certs: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a vault, issue a new vault key file, or show the CA fingerprint hosts pin.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Run the provider (long-running; stops gracefully on SIGTERM or Ctrl-C).
    #[command(after_long_help = settings::PRECEDENCE_HELP)]
    Serve {
        #[command(flatten)]
        settings: ProviderSettings,
    },
    /// The config file: `config check [FILE]` prints the effective settings or the errors.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Issue an operator certificate (ca.pem, op.pem, op.key) for the CLI and grpcurl.
    OperatorCert(OperatorCertArgs),
    /// Issue a hypervisor's NBD client certificate (ca-cert.pem, client-cert.pem,
    /// client-key.pem) for QEMU's tls-creds-x509 and the agents' TLS NBD exports.
    NbdClientCert(siterecovery_provider::cli::nbd_cert::NbdCertArgs),
    /// Run a whole deployment on loopback: a vault, a provider and two hosts.
    Lab(lab::LabArgs),
    /// Sites (locations) known from registered hosts.
    #[command(subcommand)]
    Site(ListOnly),
    /// Registered hosts: list, reset, remove, move, and the revoked certificates.
    #[command(subcommand)]
    Host(HostCmd),
    /// Virtual machines on the hosts.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Replication policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Clouds (groups of hosts at a site) and their pairings.
    #[command(subcommand)]
    Cloud(CloudCmd),
    /// Protect a VM: start an Enable protection job.
    ///
    /// With a policy whose initial method is `offline` (`policy create --initial offline`),
    /// `--export-dir DIR` is required: the primary host writes the initial copy to DIR (a
    /// sparse image per disk and manifest.json) and starts tracking; the job then waits in
    /// "Waiting for import" until DIR, carried to the replica host, is imported there with
    /// `protect-import VM --dir DIR`. Only the writes made after the export travel over the
    /// network.
    Protect(ProtectArgs),
    /// Offline initial replication: import the initial copy exported by `protect VM
    /// --export-dir` into the replica; the waiting Enable protection job goes on.
    ProtectImport(ImportArgs),
    /// Stop protecting a VM and remove its replica.
    Unprotect(VmJobArgs),
    /// Resynchronise a protected VM now (only differing blocks travel).
    Resync(VmJobArgs),
    /// Recovery points of a protected VM, on its replica host.
    Points { vm: String },
    /// Export a recovery point read-only over NBD, or remove the export.
    #[command(subcommand)]
    Point(PointCmd),
    /// Jobs: list, show, watch.
    #[command(subcommand)]
    Job(JobCmd),
    /// Fail a protected VM over (test, planned, unplanned), commit, change point, clean up.
    #[command(subcommand)]
    Failover(FailoverCmd),
    /// Reverse replication after a failover: the former replica host becomes primary.
    Reprotect(VmJobArgs),
    /// VM networks (subnet, gateway, DNS, static IP pools) and network mappings.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Recovery plans: ordered groups of VMs that fail over together.
    #[command(subcommand)]
    Plan(PlanCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective settings of `provider serve` (file, environment, flags and
    /// defaults merged), or every refused key with its line; exits 1 on an error.
    #[command(after_long_help = settings::PRECEDENCE_HELP)]
    Check {
        /// The file to check (default: --config, else /etc/siterecovery/provider.toml).
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: ProviderSettings,
    },
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
            daemon::run_main(serve(layers, runtime, log));
        }
        Cmd::Config(ConfigCmd::Check { file, settings }) => {
            let global = GlobalArgs { config: file.or(cli.global.config.clone()), ..cli.global.clone() };
            std::process::exit(settings::check(&global, settings));
        }
        _ => {
            let is_daemon = matches!(cli.cmd, Cmd::Lab(_));
            daemon::init_logging(cli.global.log_json.unwrap_or(false), if is_daemon { "info" } else { "warn" });
            daemon::run_main(run(cli));
        }
    }
}

/// `provider serve`.
async fn serve(layers: Layers<ProviderSettings>, rt: ProviderRuntime, log: LogHandle) -> Result<()> {
    let v = vault::Vault::open(&rt.data_dir)?;
    let store = store::Store::open(&rt.data_dir)?;
    let addr = rt.listen.map(|a| a.to_string()).unwrap_or_else(|| v.info.address.clone());
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let signals = daemon::shutdown_on_signals().context("installing the SIGTERM/SIGINT handlers")?;
    let lifecycle = Lifecycle::starting(api::HEALTH_SERVICES).await;
    let shutdown = lifecycle.drain_after(signals, rt.drain);
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let _live = settings::reload::on_sighup(layers, rt.clone(), log, reload.clone(), shutdown.clone())?;
    let protection = if rt.test_intervals {
        tracing::warn!("--test-intervals: policies may use intervals from 1s; for tests only");
        ProtectionConfig::for_tests()
    } else {
        ProtectionConfig::default()
    };
    let protection = ProtectionConfig { scripts_dir: rt.scripts_dir.clone(), ..protection };
    let mut limits = api::ServerLimits::default();
    limits.accept.max_connections = rt.max_connections;
    let opts = api::ServeOptions {
        grace: rt.grace,
        protection,
        cert_validity: rt.cert_validity,
        limits,
        metrics: MetricsConfig::new(rt.metrics_listen, DEFAULT_METRICS_LISTEN),
        reload: Some(reload),
        lifecycle: Some(lifecycle),
    };
    api::serve_options(v, store, listener, shutdown, opts).await?;
    tracing::info!("provider stopped");
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Vault(c) => cli::vault::run(c, cli.json),
        Cmd::OperatorCert(a) => cli::vault::operator_cert(a, cli.json),
        Cmd::NbdClientCert(a) => cli::nbd_cert::run(a, cli.json),
        Cmd::Lab(args) => lab::run(args).await,
        cmd => {
            let address = cli.connect.ok_or(CliError::NoAddress)?;
            let certs = OperatorCerts::load(&cli.certs.ok_or(CliError::NoCerts)?)?;
            let mut op = Operator::connect(address, &certs, cli.json).await?;
            operator(&mut op, cmd).await
        }
    }
}

/// The commands that talk to a running provider.
async fn operator(op: &mut Operator, cmd: Cmd) -> Result<()> {
    use siterecovery_provider::cli::{failover, hosts, inventory, jobs, network, plan, protection};
    match cmd {
        Cmd::Site(ListOnly::List) => inventory::sites(op).await?,
        Cmd::Host(c) => hosts::run(op, c).await?,
        Cmd::Vm(c) => inventory::vm(op, c).await?,
        Cmd::Policy(c) => protection::policy(op, c).await?,
        Cmd::Cloud(c) => protection::cloud(op, c).await?,
        Cmd::Protect(a) => protection::protect(op, a).await?,
        Cmd::ProtectImport(a) => protection::import(op, a).await?,
        Cmd::Unprotect(a) => protection::unprotect(op, a).await?,
        Cmd::Resync(a) => protection::resync(op, a).await?,
        Cmd::Reprotect(a) => protection::reprotect(op, a).await?,
        Cmd::Points { vm } => protection::points(op, vm).await?,
        Cmd::Point(c) => protection::point(op, c).await?,
        Cmd::Job(c) => jobs::run(op, c).await?,
        Cmd::Failover(c) => failover::run(op, c).await?,
        Cmd::Network(c) => network::run(op, c).await?,
        Cmd::Plan(c) => plan::run(op, c).await?,
        Cmd::Vault(_)
        | Cmd::Serve { .. }
        | Cmd::Config(_)
        | Cmd::OperatorCert(_)
        | Cmd::NbdClientCert(_)
        | Cmd::Lab(_) => {
            anyhow::bail!("not an operator command")
        }
    }
    Ok(())
}
