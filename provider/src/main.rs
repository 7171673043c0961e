//! `provider`: the siterecovery control plane, vault tools, operator CLI and lab.

mod lab;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use siterecovery_provider::cli::protection as protect_cli;
use siterecovery_provider::cli::{self, CliError, OperatorCerts, human_size, parse_duration, parse_size, print_table};
use siterecovery_provider::protection::ProtectionConfig;
use siterecovery_provider::{api, store, vault};
use tokio_util::sync::CancellationToken;

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
    /// Create a vault, or issue a new vault key file.
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
        /// Tests only: allow policy intervals from 1s and retry backoff in seconds.
        #[arg(long, hide = true)]
        test_intervals: bool,
    },
    /// Issue an operator certificate (ca.pem, op.pem, op.key) for the CLI and grpcurl.
    OperatorCert {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_name = "OPDIR")]
        out: PathBuf,
        /// Operator name recorded in the certificate.
        #[arg(long, default_value = "operator")]
        name: String,
        /// Validity of the certificate.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        validity: Duration,
    },
    /// Run a whole deployment on loopback: a vault, a provider and two hosts.
    Lab(lab::LabArgs),
    /// Sites (locations) known from registered hosts.
    #[command(subcommand)]
    Site(ListOnly),
    /// Registered hosts and their connection state.
    #[command(subcommand)]
    Host(ListOnly),
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
    Protect {
        vm: String,
        /// Offline initial replication: absolute directory on the primary host to export
        /// the initial copy to.
        #[arg(long, value_name = "DIR")]
        export_dir: Option<String>,
        /// Watch the job until it ends; exit non-zero when it fails (offline: it ends only
        /// after `protect-import`).
        #[arg(long)]
        wait: bool,
    },
    /// Offline initial replication: import the initial copy exported by `protect VM
    /// --export-dir` into the replica; the waiting Enable protection job goes on.
    ProtectImport {
        vm: String,
        /// Absolute path of the export directory on the replica host.
        #[arg(long, value_name = "DIR")]
        dir: String,
        /// Watch the job until it ends (initial replication done); exit non-zero when it fails.
        #[arg(long)]
        wait: bool,
    },
    /// Stop protecting a VM and remove its replica.
    Unprotect {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Resynchronise a protected VM now (only differing blocks travel).
    Resync {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
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
    Reprotect {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// VM networks (subnet, gateway, DNS, static IP pools) and network mappings.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Recovery plans: ordered groups of VMs that fail over together.
    #[command(subcommand)]
    Plan(PlanCmd),
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Start a test VM (VM-test) from a point; replication goes on.
    Test {
        vm: String,
        /// latest, latest-app-consistent or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
        /// mapped (the mapped network and reserved address), isolated (NETWORK-test-isolated) or none.
        #[arg(long, default_value = "mapped", value_parser = parse_test_network)]
        test_network: i32,
        #[arg(long)]
        wait: bool,
    },
    /// Stop the primary VM, ship its last changes, start it on the replica host; then reverse replication.
    Planned {
        vm: String,
        /// Always the last point shipped from the stopped primary.
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        wait: bool,
    },
    /// Start the VM on the replica host from a point; the primary may be gone.
    Unplanned {
        vm: String,
        /// latest, latest-app-consistent or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Try to stop the primary VM first (best effort).
        #[arg(long)]
        shutdown_primary: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Make the failed-over VM's disks its own (other points are discarded).
    Commit {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Remove the test VM of a test failover and its overlay.
    Cleanup {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Restart the failed-over VM from another point (before commit).
    ChangePoint {
        vm: String,
        #[arg(long)]
        point: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a VM network at a site.
    Create {
        #[arg(long)]
        site: String,
        #[arg(long)]
        name: String,
        /// CIDR, e.g. 10.0.0.0/24.
        #[arg(long)]
        subnet: String,
        /// Static IP pool range A-B; repeat for more.
        #[arg(long = "pool", value_name = "A-B")]
        pools: Vec<String>,
        #[arg(long)]
        gateway: Option<String>,
        /// DNS server; repeat for more.
        #[arg(long = "dns", value_name = "IP")]
        dns: Vec<String>,
    },
    /// List VM networks.
    List,
    /// Map a network of one site to a network of a paired site (failover target).
    Map {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
    },
    /// List network mappings.
    Mappings,
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Create a recovery plan.
    Create {
        name: String,
        /// N:VM1,VM2 — group N fails over after group N-1; repeat for more groups.
        #[arg(long = "group", value_name = "N:VM1,VM2", required = true)]
        groups: Vec<String>,
        /// AFTER_GROUP=PATH — a script run on the provider after that group (0 = before the first).
        #[arg(long = "script", value_name = "AFTER_GROUP=PATH")]
        scripts: Vec<String>,
        /// AFTER_GROUP=TEXT — a manual action the run waits on until `plan confirm JOB`.
        #[arg(long = "manual", value_name = "AFTER_GROUP=TEXT")]
        manuals: Vec<String>,
        /// Timeout of each script.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        script_timeout: Duration,
    },
    /// List recovery plans.
    List,
    /// Fail a plan over: shutdown step, then groups in order.
    Failover {
        plan: String,
        /// test, planned or unplanned.
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        wait: bool,
    },
    /// Confirm the manual action a plan job waits for.
    Confirm { job_id: String },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Create a replication policy.
    Create(PolicyCreate),
    /// List policies.
    List,
    /// Delete a policy no pairing uses.
    Delete { name: String },
}

#[derive(Args)]
struct PolicyCreate {
    #[arg(long)]
    name: String,
    /// Replication interval: 30s, 5m or 15m.
    #[arg(long, value_parser = parse_duration)]
    interval: Duration,
    /// How long recovery points are kept (1h to 30d).
    #[arg(long, value_parser = parse_duration)]
    retention: Duration,
    /// App-consistent snapshot frequency (default never).
    #[arg(long, value_parser = parse_duration)]
    app_consistent_every: Option<Duration>,
    /// Compress replication traffic (zstd).
    #[arg(long)]
    compression: bool,
    /// Initial replication: network (now), offline, or at=TIME (RFC 3339).
    #[arg(long, default_value = "network", value_parser = parse_initial)]
    initial: (i32, i64),
    /// Replication port on the replica host (default: the host's listener).
    #[arg(long, default_value_t = 0)]
    port: u32,
    /// Business hours START-END (0-23) outside which automatic resync runs, e.g. 18-6.
    #[arg(long, value_name = "START-END", value_parser = parse_window)]
    resync_window: Option<(u32, u32)>,
}

#[derive(Subcommand)]
enum CloudCmd {
    /// Pair a source cloud with a target cloud at another site, under a policy.
    Pair {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        policy: String,
    },
    /// Clouds with their site, hosts and pairing.
    List,
    /// Remove the pairing of a source cloud (none of its VMs may be protected).
    Unpair {
        #[arg(long)]
        source: String,
    },
}

#[derive(Subcommand)]
enum PointCmd {
    /// Export a point read-only over NBD on the replica host; prints its URI.
    Export {
        vm: String,
        /// `latest` or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
    },
    /// Remove the export of a VM's point.
    Unexport { vm: String },
}

#[derive(Subcommand)]
enum JobCmd {
    /// List jobs, oldest first.
    List,
    /// Show a job with its steps.
    Show { id: String },
    /// Follow a job until it ends; exit non-zero when it fails.
    Watch { id: String },
}

fn parse_test_network(s: &str) -> Result<i32, String> {
    Ok(match s {
        "mapped" => v1::TestNetwork::Mapped,
        "isolated" => v1::TestNetwork::Isolated,
        "none" => v1::TestNetwork::None,
        _ => return Err("use mapped, isolated or none".into()),
    }
    .into())
}

/// `network`, `offline` or `at=TIME` (RFC 3339): the wire's method and start time.
fn parse_initial(s: &str) -> Result<(i32, i64), String> {
    match s {
        "network" => Ok((v1::InitialMethod::Network.into(), 0)),
        "offline" => Ok((v1::InitialMethod::Offline.into(), 0)),
        _ => {
            let t = s
                .strip_prefix("at=")
                .ok_or("use network, offline or at=TIME (RFC 3339, e.g. at=2025-01-31T22:00:00Z)")?;
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("{t:?} is not an RFC 3339 time (e.g. 2025-01-31T22:00:00Z): {e}"))?;
            Ok((v1::InitialMethod::At.into(), (t.unix_timestamp_nanos() / 1_000_000) as i64))
        }
    }
}

fn parse_window(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected START-END hours, e.g. 18-6"))?;
    let h = |x: &str| -> Result<u32, String> {
        let n: u32 = x.trim().parse().map_err(|_| format!("{s:?}: {x:?} is not an hour"))?;
        if n > 23 { Err(format!("{s:?}: hours are 0-23")) } else { Ok(n) }
    };
    Ok((h(a)?, h(b)?))
}

#[derive(Subcommand)]
enum VaultCmd {
    /// Create a new vault: CA, provider certificate, store, and a vault key file.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Address hosts and operators use to reach this provider (HOST:PORT).
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// Where to write the vault key file (hand it to hosts to register).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Lifetime of the registration secret.
        #[arg(long, default_value = "5d", value_parser = parse_duration)]
        expiry: Duration,
    },
    /// Issue a new vault key file; the previous registration secret stops working.
    Key {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long, default_value = "5d", value_parser = parse_duration)]
        expiry: Duration,
    },
}

#[derive(Subcommand)]
enum ListOnly {
    /// List them.
    List,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM on a host: a folder with one sparse raw image per disk.
    Create(VmCreate),
    /// List VMs.
    List {
        /// Only the VMs of this host.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show one VM: host, power state, disks with NBD export paths, NICs.
    Show { name: String },
    /// Delete a VM and its disks.
    Delete { name: String },
    /// Start serving a VM's disks over NBD.
    Start { name: String },
    /// Stop a VM: writes refused, logs sealed, disks flushed.
    Stop { name: String },
}

#[derive(Args)]
struct VmCreate {
    #[arg(long)]
    host: String,
    #[arg(long)]
    name: String,
    /// Disk size (K/M/G/T suffixes or bytes); repeat for more disks.
    #[arg(long = "disk", value_name = "SIZE", required = true, value_parser = parse_size)]
    disks: Vec<u64>,
    /// NIC on a VM network: NETWORK, NETWORK=IP or NETWORK=dhcp; repeat for more.
    #[arg(long = "nic", value_name = "NETWORK[=IP|dhcp]")]
    nics: Vec<String>,
    /// Create it powered off (by default its disks are served at once).
    #[arg(long)]
    stopped: bool,
}

fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() {
    let cli = Cli::parse();
    let is_daemon = matches!(cli.cmd, Cmd::Serve { .. } | Cmd::Lab(_));
    init_logging(cli.log_json, if is_daemon { "info" } else { "warn" });
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Cancels the returned token on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    Ok(token)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Vault(VaultCmd::Create { name, data_dir, address, out, expiry }) => {
            let v = vault::create(&data_dir, &name, &address, &out, expiry)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"vault_id": v.info.vault_id, "name": v.info.name, "address": v.info.address, "vault_key": out})
                );
            } else {
                println!("vault {} ({}) created in {}", v.info.name, v.info.vault_id, data_dir.display());
                println!("vault key file: {} (registration secret valid {})", out.display(), humantime(expiry));
                println!("next: provider serve --data-dir {}", data_dir.display());
            }
            Ok(())
        }
        Cmd::Vault(VaultCmd::Key { data_dir, out, expiry }) => {
            let v = vault::Vault::open(&data_dir)?;
            // Works while `provider serve` runs: the secret is a file, not in the store.
            v.issue_key_file(&out, expiry)?;
            println!("vault key file written to {}; the previous one no longer registers hosts", out.display());
            Ok(())
        }
        Cmd::Serve { data_dir, listen, grace, test_intervals } => {
            let v = vault::Vault::open(&data_dir)?;
            let store = store::Store::open(&data_dir)?;
            let addr = listen.unwrap_or_else(|| v.info.address.clone());
            let listener =
                tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let shutdown = shutdown_on_signals()?;
            let protection = if test_intervals {
                tracing::warn!("--test-intervals: policies may use intervals from 1s; for tests only");
                ProtectionConfig::for_tests()
            } else {
                ProtectionConfig::default()
            };
            api::serve_with(v, store, listener, shutdown, grace, protection).await?;
            tracing::info!("provider stopped");
            Ok(())
        }
        Cmd::OperatorCert { data_dir, out, name, validity } => {
            let v = vault::Vault::open(&data_dir)?;
            let id = v.issue_operator_cert(&out, &name, validity)?;
            if cli.json {
                println!("{}", serde_json::json!({"identity": id.uri(), "dir": out}));
            } else {
                println!("operator certificate for {} written to {} (ca.pem, op.pem, op.key)", id.uri(), out.display());
                println!("use: provider --connect {} --certs {} host list", v.info.address, out.display());
            }
            Ok(())
        }
        Cmd::Lab(args) => lab::run(args).await,
        cmd => operator(cli.connect, cli.certs, cli.json, cmd).await,
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86400) {
        format!("{} days", s / 86400)
    } else if s.is_multiple_of(3600) {
        format!("{} hours", s / 3600)
    } else {
        format!("{s} s")
    }
}

async fn operator(connect: Option<String>, certs: Option<PathBuf>, json: bool, cmd: Cmd) -> Result<()> {
    let address = connect.ok_or(CliError::NoAddress)?;
    let certs = OperatorCerts::load(&certs.ok_or(CliError::NoCerts)?)?;
    let channel = cli::connect(&address, &certs).await?;
    let mut inv = InventoryClient::new(channel.clone());
    let mut prot = ProtectionClient::new(channel);
    let rpc = |s: tonic::Status| cli::rpc_error(&address, s);
    match cmd {
        Cmd::Site(ListOnly::List) => {
            let sites = inv.list_sites(v1::ListSitesRequest {}).await.map_err(rpc)?.into_inner().sites;
            if json {
                let v: Vec<_> = sites
                    .iter()
                    .map(|s| serde_json::json!({"name": s.name, "clouds": s.clouds, "hosts": s.host_count}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<_> =
                    sites.iter().map(|s| vec![s.name.clone(), s.clouds.join(","), s.host_count.to_string()]).collect();
                print_table(&["SITE", "CLOUDS", "HOSTS"], &rows);
            }
        }
        Cmd::Host(ListOnly::List) => {
            let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.map_err(rpc)?.into_inner().hosts;
            if json {
                let v: Vec<_> = hosts.iter().map(host_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<_> = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            h.site.clone(),
                            h.cloud.clone(),
                            if h.connected { "yes".into() } else { "no".into() },
                            cli::age(h.last_heartbeat_unix_ms),
                            h.agent_version.clone(),
                            h.address.clone(),
                        ]
                    })
                    .collect();
                print_table(&["HOST", "SITE", "CLOUD", "CONNECTED", "LAST HEARTBEAT", "VERSION", "ADDRESS"], &rows);
            }
        }
        Cmd::Vm(VmCmd::List { host }) => {
            let vms = inv
                .list_vms(v1::ListVmsRequest { host: host.unwrap_or_default() })
                .await
                .map_err(rpc)?
                .into_inner()
                .vms;
            if json {
                let v: Vec<_> = vms.iter().map(vm_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<_> = vms
                    .iter()
                    .map(|v| {
                        let total: u64 = v.disks.iter().map(|d| d.size_bytes).sum();
                        let (repl, health) = match &v.replication {
                            Some(r) => {
                                (protect_cli::replication_state(r.state).into(), protect_cli::health(r.health).into())
                            }
                            None => ("not enabled".into(), "-".into()),
                        };
                        vec![
                            v.name.clone(),
                            v.host_name.clone(),
                            power(v.power_state).into(),
                            v.disks.len().to_string(),
                            human_size(total),
                            repl,
                            health,
                        ]
                    })
                    .collect();
                print_table(&["VM", "HOST", "POWER", "DISKS", "SIZE", "REPLICATION", "HEALTH"], &rows);
            }
        }
        Cmd::Vm(VmCmd::Show { name }) => {
            let vm = inv.get_vm(v1::GetVmRequest { name }).await.map_err(rpc)?.into_inner();
            print_vm(&vm, json)?;
        }
        Cmd::Vm(VmCmd::Create(c)) => {
            let mut nics = Vec::new();
            for n in &c.nics {
                nics.push(parse_nic(n)?);
            }
            let vm = inv
                .create_vm(v1::CreateVmRequest {
                    host: c.host,
                    name: c.name,
                    disks: c.disks.iter().map(|&size_bytes| v1::DiskSpec { size_bytes }).collect(),
                    nics,
                    start: !c.stopped,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_vm(&vm, json)?;
        }
        Cmd::Vm(VmCmd::Delete { name }) => {
            inv.delete_vm(v1::DeleteVmRequest { name: name.clone() }).await.map_err(rpc)?;
            if json {
                println!("{}", serde_json::json!({"deleted": name}));
            } else {
                println!("VM {name} deleted");
            }
        }
        Cmd::Vm(VmCmd::Start { name }) => {
            let vm = inv.start_vm(v1::StartVmRequest { name }).await.map_err(rpc)?.into_inner();
            print_vm(&vm, json)?;
        }
        Cmd::Vm(VmCmd::Stop { name }) => {
            let vm = inv.stop_vm(v1::StopVmRequest { name }).await.map_err(rpc)?.into_inner();
            print_vm(&vm, json)?;
        }
        Cmd::Policy(c) => {
            let args = match c {
                PolicyCmd::Create(p) => {
                    let (start, end) = p.resync_window.unwrap_or((0, 0));
                    protect_cli::PolicyArgs::Create(v1::Policy {
                        name: p.name,
                        interval_ms: p.interval.as_millis() as u64,
                        retention_ms: p.retention.as_millis() as u64,
                        app_consistent_every_ms: p.app_consistent_every.map(|d| d.as_millis() as u64).unwrap_or(0),
                        compression: p.compression,
                        initial_method: p.initial.0,
                        initial_at_unix_ms: p.initial.1,
                        port: p.port,
                        resync_window_start_hour: start,
                        resync_window_end_hour: end,
                    })
                }
                PolicyCmd::List => protect_cli::PolicyArgs::List,
                PolicyCmd::Delete { name } => protect_cli::PolicyArgs::Delete(name),
            };
            protect_cli::policy(&mut prot, args, json, &rpc).await?
        }
        Cmd::Cloud(c) => {
            let args = match c {
                CloudCmd::Pair { source, target, policy } => protect_cli::CloudArgs::Pair(v1::CloudPairing {
                    source_cloud: source,
                    target_cloud: target,
                    policy,
                }),
                CloudCmd::List => protect_cli::CloudArgs::List,
                CloudCmd::Unpair { source } => protect_cli::CloudArgs::Unpair(source),
            };
            protect_cli::cloud(&mut inv, &mut prot, args, json, &rpc).await?
        }
        Cmd::Protect { vm, export_dir, wait } => {
            let export_dir = export_dir.unwrap_or_default();
            let job = prot.protect(v1::ProtectRequest { vm, export_dir }).await.map_err(rpc)?.into_inner();
            protect_cli::started(&mut prot, job, wait, json, &rpc).await?;
        }
        Cmd::ProtectImport { vm, dir, wait } => {
            let job = prot.import_initial(v1::ImportInitialRequest { vm, dir }).await.map_err(rpc)?.into_inner();
            protect_cli::started(&mut prot, job, wait, json, &rpc).await?;
        }
        Cmd::Unprotect { vm, wait } => {
            let job = prot.unprotect(v1::UnprotectRequest { vm }).await.map_err(rpc)?.into_inner();
            protect_cli::started(&mut prot, job, wait, json, &rpc).await?;
        }
        Cmd::Resync { vm, wait } => {
            let job = prot.resync(v1::ResyncRequest { vm }).await.map_err(rpc)?.into_inner();
            protect_cli::started(&mut prot, job, wait, json, &rpc).await?;
        }
        Cmd::Points { vm } => protect_cli::points(&mut prot, vm, json, &rpc).await?,
        Cmd::Point(c) => {
            let args = match c {
                PointCmd::Export { vm, point } => protect_cli::PointArgs::Export { vm, point },
                PointCmd::Unexport { vm } => protect_cli::PointArgs::Unexport(vm),
            };
            protect_cli::point(&mut prot, args, json, &rpc).await?
        }
        Cmd::Job(c) => {
            let args = match c {
                JobCmd::List => protect_cli::JobArgs::List,
                JobCmd::Show { id } => protect_cli::JobArgs::Show(id),
                JobCmd::Watch { id } => protect_cli::JobArgs::Watch(id),
            };
            protect_cli::job(&mut prot, args, json, &rpc).await?
        }
        Cmd::Failover(c) => {
            let (req, wait) = match c {
                FailoverCmd::Test { vm, point, test_network, wait } => (
                    protect_cli::FailoverArgs::Start(v1::FailoverRequest {
                        vm,
                        r#type: FailoverKind::Test.into(),
                        point,
                        test_network,
                        shutdown_primary: false,
                    }),
                    wait,
                ),
                FailoverCmd::Planned { vm, point, wait } => (
                    protect_cli::FailoverArgs::Start(v1::FailoverRequest {
                        vm,
                        r#type: FailoverKind::Planned.into(),
                        point,
                        test_network: 0,
                        shutdown_primary: false,
                    }),
                    wait,
                ),
                FailoverCmd::Unplanned { vm, point, shutdown_primary, wait } => (
                    protect_cli::FailoverArgs::Start(v1::FailoverRequest {
                        vm,
                        r#type: FailoverKind::Unplanned.into(),
                        point,
                        test_network: 0,
                        shutdown_primary,
                    }),
                    wait,
                ),
                FailoverCmd::Commit { vm, wait } => (protect_cli::FailoverArgs::Commit(vm), wait),
                FailoverCmd::Cleanup { vm, wait } => (protect_cli::FailoverArgs::Cleanup(vm), wait),
                FailoverCmd::ChangePoint { vm, point, wait } => {
                    (protect_cli::FailoverArgs::ChangePoint(v1::ChangePointRequest { vm, point }), wait)
                }
            };
            protect_cli::failover(&mut prot, req, wait, json, &rpc).await?
        }
        Cmd::Reprotect { vm, wait } => {
            let job = prot.reprotect(v1::VmRequest { vm }).await.map_err(rpc)?.into_inner();
            protect_cli::started(&mut prot, job, wait, json, &rpc).await?;
        }
        Cmd::Network(c) => {
            let args = match c {
                NetworkCmd::Create { site, name, subnet, pools, gateway, dns } => {
                    protect_cli::NetworkArgs::Create(v1::VmNetwork {
                        site,
                        name,
                        subnet,
                        pools,
                        gateway: gateway.unwrap_or_default(),
                        dns,
                    })
                }
                NetworkCmd::List => protect_cli::NetworkArgs::List,
                NetworkCmd::Map { source, target } => {
                    protect_cli::NetworkArgs::Map(v1::NetworkMapping { source, target })
                }
                NetworkCmd::Mappings => protect_cli::NetworkArgs::Mappings,
            };
            protect_cli::network(&mut prot, args, json, &rpc).await?
        }
        Cmd::Plan(c) => {
            let args = match c {
                PlanCmd::Create { name, groups, scripts, manuals, script_timeout } => {
                    let plan = protect_cli::plan_from_flags(name, &groups, &scripts, &manuals, script_timeout)
                        .map_err(anyhow::Error::msg)?;
                    protect_cli::PlanArgs::Create(plan)
                }
                PlanCmd::List => protect_cli::PlanArgs::List,
                PlanCmd::Failover { plan, kind, wait } => protect_cli::PlanArgs::Failover { plan, kind, wait },
                PlanCmd::Confirm { job_id } => protect_cli::PlanArgs::Confirm(job_id),
            };
            protect_cli::plan(&mut prot, args, json, &rpc).await?
        }
        Cmd::Vault(_) | Cmd::Serve { .. } | Cmd::OperatorCert { .. } | Cmd::Lab(_) => bail!("not an operator command"),
    }
    Ok(())
}

fn parse_nic(s: &str) -> Result<v1::NicSpec> {
    let (network, addr) = match s.split_once('=') {
        Some((n, a)) => (n, Some(a)),
        None => (s, None),
    };
    if network.is_empty() {
        bail!("--nic {s:?}: expected NETWORK, NETWORK=IP or NETWORK=dhcp");
    }
    Ok(match addr {
        None | Some("") => v1::NicSpec { network: network.into(), ip: String::new(), dhcp: false },
        Some("dhcp") => v1::NicSpec { network: network.into(), ip: String::new(), dhcp: true },
        Some(ip) => {
            ip.parse::<std::net::Ipv4Addr>().with_context(|| format!("--nic {s:?}: {ip:?} is not an IPv4 address"))?;
            v1::NicSpec { network: network.into(), ip: ip.into(), dhcp: false }
        }
    })
}

fn power(p: i32) -> &'static str {
    match v1::PowerState::try_from(p) {
        Ok(v1::PowerState::Running) => "running",
        Ok(v1::PowerState::Off) => "off",
        _ => "unknown",
    }
}

pub fn host_json(h: &v1::Host) -> serde_json::Value {
    serde_json::json!({
        "id": h.id, "name": h.name, "site": h.site, "cloud": h.cloud, "address": h.address,
        "connected": h.connected, "last_heartbeat_unix_ms": h.last_heartbeat_unix_ms,
        "agent_version": h.agent_version, "registered_unix_ms": h.registered_unix_ms, "free_bytes": h.free_bytes,
    })
}

fn vm_json(v: &v1::Vm) -> serde_json::Value {
    serde_json::json!({
        "name": v.name, "host": v.host_name, "host_id": v.host_id, "power_state": power(v.power_state), "folder": v.folder,
        "disks": v.disks.iter().map(|d| serde_json::json!({
            "id": d.id, "size_bytes": d.size_bytes, "allocated_bytes": d.allocated_bytes, "image_path": d.image_path,
            "export_name": d.export_name, "nbd_unix_uri": d.nbd_unix_uri, "nbd_tcp_uri": d.nbd_tcp_uri,
            "tracking": d.tracking, "pending_log_bytes": d.pending_log_bytes,
        })).collect::<Vec<_>>(),
        "nics": v.nics.iter().map(|n| serde_json::json!({"network": n.network, "ip": n.ip, "dhcp": n.dhcp, "mac": n.mac})).collect::<Vec<_>>(),
        "replication": v.replication.as_ref().map(protect_cli::replication_json),
        "failover": v.failover.as_ref().map(protect_cli::vm_failover_json),
    })
}

fn print_vm(v: &v1::Vm, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&vm_json(v))?);
        return Ok(());
    }
    println!("VM        {}", v.name);
    println!("host      {}", v.host_name);
    println!("power     {}", power(v.power_state));
    println!("folder    {}", v.folder);
    for d in &v.disks {
        println!(
            "disk {}   {} ({} allocated), tracking {}, pending logs {}",
            d.id,
            human_size(d.size_bytes),
            human_size(d.allocated_bytes),
            if d.tracking { "on" } else { "off" },
            human_size(d.pending_log_bytes)
        );
        println!("          image {}", d.image_path);
        if !d.nbd_unix_uri.is_empty() {
            println!("          nbd   {}", d.nbd_unix_uri);
            println!("          nbd   {}", d.nbd_tcp_uri);
        }
    }
    for n in &v.nics {
        let addr = if n.dhcp {
            "dhcp".to_string()
        } else if n.ip.is_empty() {
            "-".into()
        } else {
            n.ip.clone()
        };
        println!("nic       {} {} {}", n.network, addr, n.mac);
    }
    if let Some(f) = &v.failover {
        protect_cli::print_vm_failover(f);
    }
    protect_cli::print_replication(v.replication.as_ref());
    Ok(())
}
