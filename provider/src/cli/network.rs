//! `network create | list | map | mappings`: VM networks (subnet, gateway, DNS, static
//! IP pools) and the mappings failover follows to the paired site.

use clap::Subcommand;
use siterecovery_proto::v1;

use super::output::{print_json, print_table};
use super::views::{self, MappingView, NetworkView};
use super::{CliError, Operator};

#[derive(Subcommand)]
pub enum NetworkCmd {
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

/// `network create | list | map | mappings`.
pub async fn run(op: &mut Operator, cmd: NetworkCmd) -> Result<(), CliError> {
    match cmd {
        NetworkCmd::Create { site, name, subnet, pools, gateway, dns } => {
            let req = v1::VmNetwork { site, name, subnet, pools, gateway: gateway.unwrap_or_default(), dns };
            let n = op.prot.create_network(req).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                return print_json(&NetworkView::from(&n));
            }
            let pools =
                if n.pools.is_empty() { "no static pool".to_string() } else { format!("pools {}", n.pools.join(", ")) };
            println!("network {} created at site {}: {} ({pools})", n.name, n.site, n.subnet);
        }
        NetworkCmd::List => {
            let nets =
                op.prot.list_networks(v1::ListNetworksRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().networks;
            if op.json {
                return print_json(&views::all::<_, NetworkView>(&nets));
            }
            let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
            let rows: Vec<_> = nets
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.site.clone(),
                        n.subnet.clone(),
                        dash(n.pools.join(",")),
                        dash(n.gateway.clone()),
                        dash(n.dns.join(",")),
                    ]
                })
                .collect();
            print_table(&["NETWORK", "SITE", "SUBNET", "POOLS", "GATEWAY", "DNS"], &rows);
        }
        NetworkCmd::Map { source, target } => {
            let m =
                op.prot.map_network(v1::NetworkMapping { source, target }).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                return print_json(&MappingView::from(&m));
            }
            println!("network {} mapped to {}", m.source, m.target);
        }
        NetworkCmd::Mappings => {
            let maps = op
                .prot
                .list_network_mappings(v1::ListNetworkMappingsRequest {})
                .await
                .map_err(|s| op.rpc(s))?
                .into_inner()
                .mappings;
            if op.json {
                return print_json(&views::all::<_, MappingView>(&maps));
            }
            let rows: Vec<_> = maps.iter().map(|m| vec![m.source.clone(), m.target.clone()]).collect();
            print_table(&["SOURCE", "TARGET"], &rows);
        }
    }
    Ok(())
}
