//! `provider lab`: a whole deployment on loopback — a vault, a provider and two hosts
//! (`hv-a` at site `primary`, cloud `gold-a`; `hv-b` at `secondary`, `gold-b`) — as
//! real child processes with real certificates, until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_client::InventoryClient;
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
    /// Also create a VM `vm1` on hv-a and write to its disk through NBD with qemu-io.
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
    let addr = format!("127.0.0.1:{}", free_port()?);
    let pdir = dir.join("provider");
    let key = dir.join("vault.key");
    let opdir = dir.join("op");

    println!("siterecovery lab in {}", dir.display());
    let v = vault::create(&pdir, "lab", &addr, &key, Duration::from_secs(5 * 86400))?;
    println!("  vault lab ({}) created", v.info.vault_id);
    v.issue_operator_cert(&opdir, "operator", Duration::from_secs(30 * 86400))?;
    drop(v);

    let mut procs = Vec::new();
    let result = async {
        let p = pdir.to_string_lossy().into_owned();
        procs.push(spawn("provider", &provider_bin, &["serve", "--data-dir", &p], &dir.join("provider.log"))?);
        wait_for("the provider to listen", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await?;
        println!("  provider serving on {addr}");
        for (host, site, cloud) in [("hv-a", "primary", "gold-a"), ("hv-b", "secondary", "gold-b")] {
            let hdir = dir.join(host).to_string_lossy().into_owned();
            let listen = format!("127.0.0.1:{}", free_port()?);
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
                ],
            )
            .await?;
            procs.push(spawn(
                host,
                &agent_bin,
                &["--data-dir", &hdir, "serve", "--heartbeat", "2s"],
                &dir.join(format!("{host}.log")),
            )?);
            println!("  host {host} registered (site {site}, cloud {cloud}) and started, peer traffic on {listen}");
        }
        let certs = OperatorCerts::load(&opdir)?;
        let channel = cli::connect(&addr, &certs).await?;
        let mut inv = InventoryClient::new(channel);
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
        if args.demo {
            demo(&mut inv, &dir).await?;
        }
        let cli_prefix = format!("{} --connect {addr} --certs {}", provider_bin.display(), opdir.display());
        println!();
        println!("Reach it:");
        println!("  {cli_prefix} host list");
        println!("  {cli_prefix} vm create --host hv-a --name vm1 --disk 1G");
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
        let shutdown = crate::shutdown_on_signals()?;
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

/// Creates vm1 on hv-a and writes to it through its NBD export with the real qemu-io.
async fn demo(inv: &mut InventoryClient<tonic::transport::Channel>, _dir: &Path) -> Result<()> {
    let vm = inv
        .create_vm(v1::CreateVmRequest {
            host: "hv-a".into(),
            name: "vm1".into(),
            disks: vec![v1::DiskSpec { size_bytes: 256 << 20 }],
            nics: vec![],
            start: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("vm create: {}", s.message()))?
        .into_inner();
    let uri = vm.disks.first().map(|d| d.nbd_unix_uri.clone()).context("vm1 has no disk")?;
    println!("  VM vm1 created on hv-a; disk0 served at {uri}");
    let qemu_io = Path::new("qemu-io");
    match run_ok(qemu_io, &["-f", "raw", "-c", "write -P 0xab 0 4M", "-c", "write -P 0xcd 64M 1M", &uri]).await {
        Ok(_) => println!("  qemu-io wrote 5 MiB to vm1 through NBD"),
        Err(e) => println!("  (qemu-io not usable here: {e:#})"),
    }
    Ok(())
}
