//! `provider lab`: a whole deployment on loopback — a vault, a provider and two hosts
//! (`hv-a` at site `primary`, cloud `gold-a`; `hv-b` at `secondary`, `gold-b`) — as
//! real child processes with real certificates, until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use siterecovery_provider::cli::{self, OperatorCerts};
use siterecovery_provider::vault;
use tokio::process::{Child, Command};

#[derive(clap::Args)]
pub struct LabArgs {
    /// Directory for the lab's data, logs and certificates (wiped if it holds an earlier lab).
    #[arg(long, default_value = "siterecovery-lab")]
    dir: PathBuf,
    /// Set up, show the state, then stop instead of running until Ctrl-C.
    #[arg(long)]
    exit_when_ready: bool,
    /// Walk the whole journey: after protecting vm1, a test failover and its cleanup, a
    /// planned failover to hv-b with reverse replication, and the failback.
    #[arg(long)]
    demo: bool,
}

const MARKER: &str = "siterecovery-lab.marker";

/// A child process of the lab; SIGTERM then SIGKILL on stop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
                Ok(Ok(status)) => println!("  {} stopped ({status})", self.name),
                _ => {
                    let _ = self.child.kill().await;
                    println!("  {} killed after 15 s", self.name);
                }
            }
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!("{} not found next to {}: build it with `cargo build --release --workspace --bins`", name, exe.display());
    }
    Ok(p)
}

fn spawn(name: &str, program: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { name: name.into(), child })
}

async fn run_ok(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        bail!("{} {} failed: {}", program.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {deadline:?} waiting for {what}")
}

pub async fn run(args: LabArgs) -> Result<()> {
    let dir = &args.dir;
    if dir.exists() {
        if dir.join(MARKER).exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("wiping the earlier lab in {}", dir.display()))?;
        } else if std::fs::read_dir(dir)?.next().is_some() {
            bail!("{} exists and is not a lab directory; choose another --dir", dir.display());
        }
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), b"made by `provider lab`; wiped by the next run\n")?;
    let dir = std::fs::canonicalize(dir)?;
    let provider_bin = std::env::current_exe()?;
    let agent_bin = sibling("agent")?;
    // The lab writes to its VM and checks its replica with the real NBD clients.
    for tool in ["qemu-io", "qemu-img"] {
        let found = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        if !found {
            bail!(
                "{tool} not found: the lab uses it as the VM's NBD client (install qemu-utils, e.g. `apt-get install qemu-utils`)"
            );
        }
    }
    let addr = format!("127.0.0.1:{}", free_port()?);
    let pdir = dir.join("provider");
    let key = dir.join("vault.key");
    let opdir = dir.join("op");

    println!("siterecovery lab in {}", dir.display());
    let v = vault::create(&pdir, "lab", &addr, &key, Duration::from_secs(5 * 86400))?;
    println!("  vault lab ({}) created", v.info.vault_id);
    // The hosts pin the CA they register with, as the README's journey does.
    let fingerprint = siterecovery_certs::live::fingerprint_of_pem(v.ca.cert_pem())?;
    v.issue_operator_cert(&opdir, "operator", Duration::from_secs(30 * 86400))?;
    drop(v);

    let mut procs = Vec::new();
    let result = async {
        let p = pdir.to_string_lossy().into_owned();
        // Lab intervals (5 s) are below the production minimum of 30 s.
        let metrics = format!("127.0.0.1:{}", free_port()?);
        procs.push(spawn(
            "provider",
            &provider_bin,
            &["serve", "--data-dir", &p, "--test-intervals", "--metrics-listen", &metrics],
            &dir.join("provider.log"),
        )?);
        wait_for("the provider to listen", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await?;
        println!("  provider serving on {addr}, metrics on http://{metrics}/metrics");
        for (host, site, cloud) in [("hv-a", "primary", "gold-a"), ("hv-b", "secondary", "gold-b")] {
            let hdir = dir.join(host).to_string_lossy().into_owned();
            let listen = format!("127.0.0.1:{}", free_port()?);
            let metrics = format!("127.0.0.1:{}", free_port()?);
            let k = key.to_string_lossy().into_owned();
            run_ok(
                &agent_bin,
                &[
                    "--data-dir",
                    &hdir,
                    "register",
                    "--vault-key",
                    &k,
                    "--host",
                    host,
                    "--site",
                    site,
                    "--cloud",
                    cloud,
                    "--listen",
                    &listen,
                    "--ca-fingerprint",
                    &fingerprint,
                ],
            )
            .await?;
            procs.push(spawn(
                host,
                &agent_bin,
                // Point exports are read over the loopback TCP export with plain qemu-img.
                &["--data-dir", &hdir, "serve", "--heartbeat", "2s", "--nbd-insecure-tcp", "--metrics-listen", &metrics],
                &dir.join(format!("{host}.log")),
            )?);
            println!(
                "  host {host} registered (site {site}, cloud {cloud}) and started, peer traffic on {listen}, metrics on http://{metrics}/metrics"
            );
        }
        let certs = OperatorCerts::load(&opdir)?;
        let channel = cli::connect(&addr, &certs).await?;
        let channel_for_journey = channel.clone();
        let inv = InventoryClient::new(channel);
        wait_for("both hosts to connect", Duration::from_secs(30), || {
            let mut inv = inv.clone();
            async move {
                match inv.list_hosts(v1::ListHostsRequest {}).await {
                    Ok(r) => {
                        let hosts = r.into_inner().hosts;
                        hosts.len() == 2 && hosts.iter().all(|h| h.connected)
                    }
                    Err(_) => false,
                }
            }
        })
        .await?;
        println!("  both hosts connected");
        journey(channel_for_journey, args.demo).await?;
        let cli_prefix = format!("{} --connect {addr} --certs {}", provider_bin.display(), opdir.display());
        println!();
        println!("Reach it:");
        println!("  {cli_prefix} host list");
        println!("  {cli_prefix} vm create --host hv-a --name vm2 --disk 1G");
        println!("  export SITERECOVERY_CONNECT={addr} SITERECOVERY_CERTS={}", opdir.display());
        println!(
            "  grpcurl -cacert {0}/ca.pem -cert {0}/op.pem -key {0}/op.key {addr} siterecovery.v1.Inventory/ListHosts",
            opdir.display()
        );
        println!("Logs: {}/{{provider,hv-a,hv-b}}.log", dir.display());
        Ok::<_, anyhow::Error>(())
    }
    .await;

    if result.is_ok() && !args.exit_when_ready {
        println!();
        println!("Running; Ctrl-C stops the lab.");
        let shutdown =
            siterecovery_proto::daemon::shutdown_on_signals().context("installing the SIGTERM/SIGINT handlers")?;
        shutdown.cancelled().await;
    }
    println!("stopping the lab");
    for p in procs.into_iter().rev() {
        p.stop().await;
    }
    if let Err(e) = &result {
        eprintln!("the lab failed; logs are in {}", dir.display());
        for log in ["provider.log", "hv-a.log", "hv-b.log"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(log)) {
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                eprintln!("--- {log} (last lines)");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        bail!("{e:#}");
    }
    Ok(())
}

type Chan = tonic::transport::Channel;

fn rpc(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("{what}: {}", s.message())
}

/// Polls a job until it ends, printing each step as it completes; errors if it failed.
async fn wait_job(prot: &mut ProtectionClient<Chan>, job: v1::Job) -> Result<v1::Job> {
    let end = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut shown = 0;
    loop {
        let j = prot.get_job(v1::GetJobRequest { id: job.id.clone() }).await.map_err(rpc("job show"))?.into_inner();
        for s in j
            .steps
            .iter()
            .skip(shown)
            .take_while(|s| matches!(s.state(), v1::StepState::Succeeded | v1::StepState::Failed))
        {
            println!(
                "      {} {}: {}{}",
                j.id,
                s.name,
                siterecovery_provider::job::StepState::name_of(s.state),
                if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) }
            );
            shown += 1;
        }
        if j.state() != v1::JobState::Running {
            if j.state() == v1::JobState::Failed {
                bail!("job {} {} failed: {}", j.id, siterecovery_provider::job::kind_name(j.kind), j.error);
            }
            return Ok(j);
        }
        if tokio::time::Instant::now() > end {
            bail!("job {} {} still running after 5 minutes", j.id, siterecovery_provider::job::kind_name(j.kind));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a recovery point of `vm` newer than `after_ms`.
async fn wait_point(prot: &mut ProtectionClient<Chan>, vm: &str, after_ms: i64) -> Result<v1::RecoveryPoint> {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = prot.list_points(v1::ListPointsRequest { vm: vm.into() }).await
            && let Some(p) = r.into_inner().points.into_iter().rev().find(|p| p.created_unix_ms > after_ms)
        {
            return Ok(p);
        }
        if tokio::time::Instant::now() > end {
            bail!("no new recovery point of {vm} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn qemu(args: &[&str]) -> Result<()> {
    run_ok(Path::new("qemu-io"), args).await.map(|_| ())
}

async fn same(a: &str, b: &str) -> Result<bool> {
    let out = Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw", a, b]).output().await?;
    Ok(out.status.success())
}

/// The journey: vm1 on hv-a written through NBD, protected to gold-b; with `demo`, a
/// test failover and its cleanup, a planned failover to hv-b, and the failback.
async fn journey(channel: Chan, demo: bool) -> Result<()> {
    let mut inv = InventoryClient::new(channel.clone());
    let mut prot = ProtectionClient::new(channel);
    let vm = inv
        .create_vm(v1::CreateVmRequest {
            host: "hv-a".into(),
            name: "vm1".into(),
            disks: vec![v1::DiskSpec { size_bytes: 256 << 20 }, v1::DiskSpec { size_bytes: 64 << 20 }],
            nics: vec![],
            start: true,
            machine: None,
        })
        .await
        .map_err(rpc("vm create"))?
        .into_inner();
    let uri = vm.disks.first().map(|d| d.nbd_unix_uri.clone()).context("vm1 has no disk")?;
    println!("  VM vm1 created on hv-a; disk0 served at {uri}");
    qemu(&["-f", "raw", "-c", "write -P 0xab 0 8M", "-c", "write -P 0xcd 64M 1M", &uri]).await?;
    println!("  qemu-io wrote 9 MiB to vm1 through NBD");
    prot.create_policy(v1::Policy {
        name: "lab".into(),
        interval_ms: 5_000,
        retention_ms: 3_600_000,
        compression: true,
        initial_method: v1::InitialMethod::Network.into(),
        ..Default::default()
    })
    .await
    .map_err(rpc("policy create"))?;
    prot.pair_clouds(v1::CloudPairing {
        source_cloud: "gold-a".into(),
        target_cloud: "gold-b".into(),
        policy: "lab".into(),
    })
    .await
    .map_err(rpc("cloud pair"))?;
    println!("  policy lab (every 5 s, zstd) pairs gold-a with gold-b; protecting vm1:");
    let job = prot
        .protect(v1::ProtectRequest { vm: "vm1".into(), export_dir: String::new() })
        .await
        .map_err(rpc("protect"))?
        .into_inner();
    wait_job(&mut prot, job).await?;
    let t = now_ms();
    qemu(&["-f", "raw", "-c", "write -P 0x5a 16M 2M", &uri]).await?;
    let p = wait_point(&mut prot, "vm1", t).await?;
    let exported = prot
        .export_point(v1::ExportPointRequest { vm: "vm1".into(), point: p.id.clone() })
        .await
        .map_err(rpc("point export"))?
        .into_inner();
    let replica_uri = exported.uri.split_whitespace().next().unwrap_or_default().to_owned();
    let identical = same(&uri, &replica_uri).await?;
    println!(
        "  wrote 2 MiB more; recovery point {} on hv-b is {} the primary ({replica_uri})",
        p.id,
        if identical { "identical to" } else { "DIFFERENT from" }
    );
    let _ = prot.unexport_point(v1::UnexportPointRequest { vm: "vm1".into() }).await;
    if !identical {
        bail!("the replica differs from the primary at point {}", p.id);
    }
    if !demo {
        return Ok(());
    }
    println!("  test failover of vm1 (replication keeps running):");
    let job = prot
        .failover(cli::failover::request("vm1", FailoverKind::Test, "latest"))
        .await
        .map_err(rpc("failover test"))?
        .into_inner();
    wait_job(&mut prot, job).await?;
    let test =
        inv.get_vm(v1::GetVmRequest { name: "vm1-test".into() }).await.map_err(rpc("vm show vm1-test"))?.into_inner();
    if let Some(d) = test.disks.first() {
        qemu(&["-f", "raw", "-c", "write -P 0xee 0 1M", &d.nbd_unix_uri]).await?;
        println!("  vm1-test runs on hv-b at {}; a write to it stays there", d.nbd_unix_uri);
    }
    let job = prot
        .cleanup_test_failover(v1::VmRequest { vm: "vm1".into() })
        .await
        .map_err(rpc("failover cleanup"))?
        .into_inner();
    wait_job(&mut prot, job).await?;
    println!("  planned failover of vm1 to hv-b (no data loss), then reverse replication:");
    let uri_b = planned_failover_to(&mut prot, &mut inv, "hv-b").await?;
    qemu(&["-f", "raw", "-c", "write -P 0x77 32M 1M", &uri_b]).await?;
    println!("  vm1 runs on hv-b ({uri_b}), replicating back to hv-a; wrote 1 MiB there");
    println!("  failback: planned failover back to hv-a, then reverse replication again:");
    let uri_a = planned_failover_to(&mut prot, &mut inv, "hv-a").await?;
    let ok =
        run_ok(Path::new("qemu-io"), &["-f", "raw", "-c", "read -P 0x77 32M 1M", "-c", "read -P 0x5a 16M 2M", &uri_a])
            .await
            .is_ok();
    println!("  vm1 is back on hv-a; the writes made at both sites are {}", if ok { "all there" } else { "MISSING" });
    if !ok {
        bail!("data written before the failback is missing on hv-a");
    }
    Ok(())
}

/// A planned failover of vm1 to `host` (then reverse replication); returns vm1's disk0
/// NBD URI there.
async fn planned_failover_to(
    prot: &mut ProtectionClient<Chan>,
    inv: &mut InventoryClient<Chan>,
    host: &str,
) -> Result<String> {
    let job = prot
        .failover(cli::failover::request("vm1", FailoverKind::Planned, "latest"))
        .await
        .map_err(rpc("failover planned"))?
        .into_inner();
    wait_job(prot, job).await?;
    wait_reprotected(inv, host).await?;
    let vm = inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.map_err(rpc("vm show"))?.into_inner();
    Ok(vm.disks.first().map(|d| d.nbd_unix_uri.clone()).unwrap_or_default())
}

/// Waits until vm1 runs on `host` and its reverse replication is replicating.
async fn wait_reprotected(inv: &mut InventoryClient<Chan>, host: &str) -> Result<()> {
    let end = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(vm) = inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await {
            let vm = vm.into_inner();
            if vm.host_name == host
                && vm.replication.as_ref().is_some_and(|r| r.state() == v1::ReplicationState::Replicating)
            {
                println!(
                    "      vm1 on {host}, replicating to {}",
                    vm.replication.map(|r| r.replica_host).unwrap_or_default()
                );
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > end {
            bail!("vm1 not replicating from {host} within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
