//! `site list` and `vm create | list | show | delete | start | stop`: the inventory of
//! sites and VMs (hosts: [`super::hosts`]).

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use siterecovery_proto::model::units::{human_size, parse_size};
use siterecovery_proto::v1;

use super::Operator;
use super::output::{print_json, print_table};
use super::views::{self, Deleted, SiteView, VmView};
use super::words::{health, power, replication_state};

#[derive(Subcommand)]
pub enum ListOnly {
    /// List them.
    List,
}

#[derive(Subcommand)]
pub enum VmCmd {
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
pub struct VmCreate {
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
    /// Memory of the VM (K/M/G/T suffixes or bytes; whole MiB, at least 16M), for the
    /// QEMU hook.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Virtual CPUs (1-255).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
    cpus: u32,
    /// Boot this kernel directly (an absolute path on the VM's hosts, primary and
    /// replica); without it the VM boots from disk0.
    #[arg(long, value_name = "PATH")]
    kernel: Option<String>,
    /// Initrd for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<String>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    append: Option<String>,
}

/// `site list`.
pub async fn sites(op: &mut Operator) -> Result<()> {
    let sites = op.inv.list_sites(v1::ListSitesRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().sites;
    if op.json {
        print_json(&views::all::<_, SiteView>(&sites))?;
    } else {
        let rows: Vec<_> =
            sites.iter().map(|s| vec![s.name.clone(), s.clouds.join(","), s.host_count.to_string()]).collect();
        print_table(&["SITE", "CLOUDS", "HOSTS"], &rows);
    }
    Ok(())
}

/// `vm create | list | show | delete | start | stop`.
pub async fn vm(op: &mut Operator, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::List { host } => {
            let vms = op
                .inv
                .list_vms(v1::ListVmsRequest { host: host.unwrap_or_default() })
                .await
                .map_err(|s| op.rpc(s))?
                .into_inner()
                .vms;
            if op.json {
                print_json(&views::all::<_, VmView>(&vms))?;
            } else {
                let rows: Vec<_> = vms
                    .iter()
                    .map(|v| {
                        let total: u64 = v.disks.iter().map(|d| d.size_bytes).sum();
                        let (repl, health) = match &v.replication {
                            Some(r) => (replication_state(r.state).into(), health(r.health).into()),
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
        VmCmd::Show { name } => {
            let vm = op.inv.get_vm(v1::GetVmRequest { name }).await.map_err(|s| op.rpc(s))?.into_inner();
            print_vm(&vm, op.json)?;
        }
        VmCmd::Create(c) => {
            let mut nics = Vec::new();
            for n in &c.nics {
                nics.push(parse_nic(n)?);
            }
            let vm = op
                .inv
                .create_vm(v1::CreateVmRequest {
                    host: c.host,
                    name: c.name,
                    disks: c.disks.iter().map(|&size_bytes| v1::DiskSpec { size_bytes }).collect(),
                    nics,
                    start: !c.stopped,
                    machine: Some(v1::Machine {
                        memory_bytes: c.memory,
                        cpus: c.cpus,
                        kernel: c.kernel.unwrap_or_default(),
                        initrd: c.initrd.unwrap_or_default(),
                        append: c.append.unwrap_or_default(),
                    }),
                })
                .await
                .map_err(|s| op.rpc(s))?
                .into_inner();
            print_vm(&vm, op.json)?;
        }
        VmCmd::Delete { name } => {
            op.inv.delete_vm(v1::DeleteVmRequest { name: name.clone() }).await.map_err(|s| op.rpc(s))?;
            if op.json {
                println!("{}", serde_json::to_string(&Deleted { deleted: &name })?);
            } else {
                println!("VM {name} deleted");
            }
        }
        VmCmd::Start { name } => {
            let vm = op.inv.start_vm(v1::StartVmRequest { name }).await.map_err(|s| op.rpc(s))?.into_inner();
            print_vm(&vm, op.json)?;
        }
        VmCmd::Stop { name } => {
            let vm = op.inv.stop_vm(v1::StopVmRequest { name }).await.map_err(|s| op.rpc(s))?.into_inner();
            print_vm(&vm, op.json)?;
        }
    }
    Ok(())
}

/// `--nic NETWORK`, `NETWORK=IP` or `NETWORK=dhcp`.
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

fn print_vm(v: &v1::Vm, json: bool) -> Result<()> {
    if json {
        print_json(&VmView::from(v))?;
        return Ok(());
    }
    println!("VM        {}", v.name);
    println!("host      {}", v.host_name);
    println!("power     {}", power(v.power_state));
    println!("folder    {}", v.folder);
    if let Some(m) = &v.machine {
        let boot = if m.kernel.is_empty() {
            "disk0".to_string()
        } else {
            format!(
                "kernel {} initrd {} append {:?}",
                m.kernel,
                if m.initrd.is_empty() { "-" } else { &m.initrd },
                m.append
            )
        };
        println!("machine   {} memory, {} CPU(s), boot {boot}", human_size(m.memory_bytes), m.cpus);
    }
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
        super::failover::print_vm_failover(f);
    }
    super::protection::print_replication(v.replication.as_ref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics() {
        let n = parse_nic("lan").ok();
        assert_eq!(n.map(|n| (n.network, n.ip, n.dhcp)), Some(("lan".into(), String::new(), false)));
        assert_eq!(parse_nic("lan=dhcp").ok().map(|n| n.dhcp), Some(true));
        assert_eq!(parse_nic("lan=10.0.0.5").ok().map(|n| n.ip), Some("10.0.0.5".into()));
        assert!(parse_nic("=10.0.0.5").is_err());
        let e = parse_nic("lan=10.0.0.300").err().map(|e| format!("{e:#}"));
        assert!(e.is_some_and(|e| e.contains("\"10.0.0.300\" is not an IPv4 address")));
    }
}
