//! `provider`: the siterecovery control plane, vault tools, operator CLI and lab.
//!
//! This file parses the command line and dispatches: the daemon (`serve`) and the lab
//! here, the vault tools and operator commands to their groups in
//! [`siterecovery_provider::cli`].

mod lab;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use siterecovery_proto::daemon;
use siterecovery_proto::lifecycle::Lifecycle;
use siterecovery_proto::model::units::parse_duration;
use siterecovery_provider::cli::failover::FailoverCmd;
use siterecovery_provider::cli::hosts::HostCmd;
use siterecovery_provider::cli::inventory::{ListOnly, VmCmd};
use siterecovery_provider::cli::jobs::JobCmd;
use siterecovery_provider::cli::network::NetworkCmd;
use siterecovery_provider::cli::plan::PlanCmd;
use siterecovery_provider::cli::protection::{CloudCmd, ImportArgs, PointCmd, PolicyCmd, ProtectArgs, VmJobArgs};
use siterecovery_provider::cli::vault::{OperatorCertArgs, VaultCmd};
use siterecovery_provider::cli::{self, CliError, Operator, OperatorCerts};
use siterecovery_provider::relationship::{DEFAULT_SCRIPTS_DIR, ProtectionConfig};
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
    /// Log as JSON lines (for log collectors) instead of human-readable lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a vault, issue a new vault key file, or show the CA fingerprint hosts pin.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Run the provider (long-running; stops gracefully on SIGTERM or Ctrl-C).
    Serve {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Address to listen on; defaults to the vault's address.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// How long to let requests finish at shutdown.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace: Duration,
        /// After SIGTERM, how long the listener stays up answering health checks with
        /// NOT_SERVING before it closes (so monitors and load balancers see the stop).
        #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DUR")]
        drain: Duration,
        /// Tests only: allow policy intervals from 1s and retry backoff in seconds.
        #[arg(long, hide = true)]
        test_intervals: bool,
        /// Validity of the host certificates issued at registration and renewal, and of
        /// the provider's own certificate when it renews it (at two thirds of its life).
        #[arg(long, default_value = "365d", value_parser = parse_cert_validity, value_name = "DUR")]
        cert_validity: Duration,
        /// Open connections at most (handshaking or established); more are refused.
        #[arg(long, default_value_t = 1024, value_name = "N")]
        max_connections: usize,
        /// The only directory recovery-plan scripts run from (`plan create --script N=NAME`
        /// names a script in it).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_SCRIPTS_DIR)]
        scripts_dir: PathBuf,
    },
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

/// `--cert-validity`: a duration of at least [`api::MIN_CERT_VALIDITY`].
fn parse_cert_validity(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d < api::MIN_CERT_VALIDITY {
        return Err(format!("{s:?} is under the minimum of {}s", api::MIN_CERT_VALIDITY.as_secs()));
    }
    Ok(d)
}

fn main() {
    let cli = Cli::parse();
    let is_daemon = matches!(cli.cmd, Cmd::Serve { .. } | Cmd::Lab(_));
    daemon::init_logging(cli.log_json, if is_daemon { "info" } else { "warn" });
    daemon::run_main(run(cli));
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Vault(c) => cli::vault::run(c, cli.json),
        Cmd::OperatorCert(a) => cli::vault::operator_cert(a, cli.json),
        Cmd::NbdClientCert(a) => cli::nbd_cert::run(a, cli.json),
        Cmd::Serve { data_dir, listen, grace, drain, test_intervals, scripts_dir, cert_validity, max_connections } => {
            let v = vault::Vault::open(&data_dir)?;
            let store = store::Store::open(&data_dir)?;
            let addr = listen.unwrap_or_else(|| v.info.address.clone());
            let listener =
                tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let signals = daemon::shutdown_on_signals().context("installing the SIGTERM/SIGINT handlers")?;
            let lifecycle = Lifecycle::starting(api::HEALTH_SERVICES).await;
            let shutdown = lifecycle.drain_after(signals, drain);
            let protection = if test_intervals {
                tracing::warn!("--test-intervals: policies may use intervals from 1s; for tests only");
                ProtectionConfig::for_tests()
            } else {
                ProtectionConfig::default()
            };
            let protection = ProtectionConfig { scripts_dir, ..protection };
            let mut limits = api::ServerLimits::default();
            limits.accept.max_connections = max_connections;
            let opts = api::ServeOptions { grace, protection, cert_validity, limits, lifecycle: Some(lifecycle) };
            api::serve_options(v, store, listener, shutdown, opts).await?;
            tracing::info!("provider stopped");
            Ok(())
        }
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
        Cmd::Vault(_) | Cmd::Serve { .. } | Cmd::OperatorCert(_) | Cmd::NbdClientCert(_) | Cmd::Lab(_) => {
            anyhow::bail!("not an operator command")
        }
    }
    Ok(())
}
