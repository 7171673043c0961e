//! Target-site addresses of a VM's NICs: which addresses are taken, the reservation
//! for each NIC (through [`crate::network::plan_addresses`]), and how a reservation
//! reads in one line (job details, plan scripts).
//!
//! A bottom module: it knows networks, inventory records and the store, not
//! relationships. The caller passes the reservations other relationships hold.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use siterecovery_proto::model::NetworkName;

use crate::error::{Classify, ErrorClass};
use crate::inventory::VmRecord;
use crate::network::{self, NetworkError, NetworkStore, NicIn, Reservation};
use crate::store::{Store, StoreError, VMS};

/// Why addresses could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM's NICs cannot get addresses at the target site (no free address in a
    /// pool, an unmapped network...).
    #[error("addresses of VM {vm} at the target site: {source}")]
    Plan {
        vm: String,
        #[source]
        source: NetworkError,
    },
}

impl Classify for AddressError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Store(_) => ErrorClass::Internal,
            Self::Plan { .. } => ErrorClass::FailedPrecondition,
        }
    }
}

/// A reservation in one line, for job details and plan scripts.
pub fn describe_reservation(r: &Reservation) -> String {
    let net = |n: &Option<NetworkName>| n.as_ref().map(|n| n.to_string()).unwrap_or_default();
    let Some(target_network) = &r.target_network else {
        return format!("nic{} {}: {}", r.nic, net(&r.source_network), r.note);
    };
    let (from, to) = if r.dhcp {
        ("dhcp".to_string(), "dhcp".to_string())
    } else {
        (if r.source_ip.is_empty() { "-".into() } else { r.source_ip.clone() }, r.target_ip.clone())
    };
    format!("nic{} {} {from} → {target_network} {to} ({})", r.nic, net(&r.source_network), r.note)
}

/// Reserves target addresses for the NICs of `vm`. Taken are the addresses of other
/// VMs' static NICs and `held_by_others`: the reservations of the other VMs'
/// relationships.
pub fn reserve_addresses<'a>(
    store: &Store,
    vm: &VmRecord,
    held_by_others: impl IntoIterator<Item = &'a Reservation>,
) -> Result<Vec<Reservation>, AddressError> {
    let ns = NetworkStore::new(store);
    let networks = ns.networks()?;
    let mappings = ns.mappings()?;
    let mut taken: HashMap<NetworkName, HashSet<Ipv4Addr>> = HashMap::new();
    for a in held_by_others {
        if let (Ok(ip), Some(net)) = (a.target_ip.parse(), &a.target_network) {
            taken.entry(net.clone()).or_default().insert(ip);
        }
    }
    for other in store.list::<VmRecord>(VMS)?.iter().filter(|v| v.name != vm.name) {
        for n in other.nics.iter().filter(|n| !n.dhcp) {
            if let (Ok(ip), Some(net)) = (n.ip.parse(), &n.network) {
                taken.entry(net.clone()).or_default().insert(ip);
            }
        }
    }
    let nics: Vec<NicIn> =
        vm.nics.iter().map(|n| NicIn { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp }).collect();
    network::plan_addresses(&nics, &networks, &mappings, &mut taken)
        .map_err(|source| AddressError::Plan { vm: vm.name.to_string(), source })
}
