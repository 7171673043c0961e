//! The address plan of a VM's NICs at the target site, and the NICs a failed-over or
//! test VM gets from it.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::NetworkName;
use siterecovery_proto::v1;

use super::records::{MappingRecord, NetworkRecord};
use super::{ISOLATED_SUFFIX, NetworkError};
use crate::store::empty_is_none;

/// The address a static NIC gets in `target`: `current` when the target pool holds it
/// and it is not taken, else the lowest free pool address (never the gateway).
pub fn allocate(
    current: Option<Ipv4Addr>,
    target: &NetworkRecord,
    taken: &HashSet<Ipv4Addr>,
) -> Result<Ipv4Addr, NetworkError> {
    if target.pools.is_empty() {
        return Err(NetworkError::NoPool(target.name.to_string()));
    }
    let free = |ip: Ipv4Addr| !taken.contains(&ip) && Some(ip) != target.gateway;
    if let Some(ip) = current
        && target.in_pool(ip)
        && free(ip)
    {
        return Ok(ip);
    }
    for p in &target.pools {
        for n in u32::from(p.start)..=u32::from(p.end) {
            let ip = Ipv4Addr::from(n);
            if free(ip) {
                return Ok(ip);
            }
        }
    }
    Err(NetworkError::PoolExhausted { network: target.name.to_string() })
}

/// The address plan of one NIC (stored on the relationship).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reservation {
    pub nic: u32,
    /// `None`: the NIC is not connected.
    #[serde(with = "empty_is_none")]
    pub source_network: Option<NetworkName>,
    pub source_ip: String,
    /// `None` when the source network has no mapping.
    #[serde(with = "empty_is_none")]
    pub target_network: Option<NetworkName>,
    pub target_ip: String,
    pub dhcp: bool,
    pub note: String,
}

fn name_or_empty(n: &Option<NetworkName>) -> String {
    n.as_ref().map(|n| n.to_string()).unwrap_or_default()
}

impl Reservation {
    pub fn to_proto(&self) -> v1::AddressReservation {
        v1::AddressReservation {
            nic: self.nic,
            source_network: name_or_empty(&self.source_network),
            source_ip: self.source_ip.clone(),
            target_network: name_or_empty(&self.target_network),
            target_ip: self.target_ip.clone(),
            dhcp: self.dhcp,
            note: self.note.clone(),
        }
    }

    /// The NIC of the failed-over VM (planned or unplanned failover).
    pub fn failover_nic(&self, mac: &str) -> v1::Nic {
        if self.target_network.is_none() {
            return v1::Nic {
                network: name_or_empty(&self.source_network),
                ip: self.source_ip.clone(),
                dhcp: self.dhcp,
                mac: mac.into(),
            };
        }
        v1::Nic {
            network: name_or_empty(&self.target_network),
            ip: self.target_ip.clone(),
            dhcp: self.dhcp,
            mac: mac.into(),
        }
    }
}

/// A NIC as the allocation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicIn {
    /// `None`: not connected.
    pub network: Option<NetworkName>,
    pub ip: String,
    pub dhcp: bool,
}

/// Reserves target addresses for the NICs of a VM. `taken` holds the addresses already
/// in use or reserved (by network name); the new reservations are added to it.
pub fn plan_addresses(
    nics: &[NicIn],
    networks: &[NetworkRecord],
    mappings: &[MappingRecord],
    taken: &mut std::collections::HashMap<NetworkName, HashSet<Ipv4Addr>>,
) -> Result<Vec<Reservation>, NetworkError> {
    let mut out = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let mut r = Reservation {
            nic: i as u32,
            source_network: n.network.clone(),
            source_ip: n.ip.clone(),
            dhcp: n.dhcp,
            ..Default::default()
        };
        let mapped = mappings.iter().find(|m| n.network.as_ref() == Some(&m.source));
        match mapped {
            None => r.note = format!("network {:?} is not mapped: network and address kept", name_or_empty(&n.network)),
            Some(m) => {
                r.target_network = Some(m.target.clone());
                if n.dhcp {
                    r.note = "dhcp: not managed".into();
                } else {
                    let target = networks
                        .iter()
                        .find(|x| x.name == m.target)
                        .ok_or_else(|| NetworkError::UnknownNetwork(m.target.to_string()))?;
                    let current = n.ip.parse::<Ipv4Addr>().ok();
                    let used = taken.entry(target.name.clone()).or_default();
                    let ip = allocate(current, target, used)?;
                    used.insert(ip);
                    r.target_ip = ip.to_string();
                    r.note = if Some(ip) == current {
                        "same address kept".into()
                    } else if current.is_some_and(|c| target.in_pool(c)) {
                        format!("{} is taken in {}: another free one", n.ip, target.name)
                    } else {
                        format!("{} is not in the pool of {}: another free one", display_ip(&n.ip), target.name)
                    };
                }
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn display_ip(s: &str) -> &str {
    if s.is_empty() { "no address" } else { s }
}

/// How a test failover connects the test VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestNetwork {
    /// The mapped network, with the reserved address.
    Mapped,
    /// `<target>-test-isolated`, address kept.
    Isolated,
    /// NICs disconnected.
    None,
}

impl TestNetwork {
    /// The wire's value; unspecified is the default, mapped.
    pub fn from_wire(v: i32) -> Option<Self> {
        use siterecovery_proto::v1::TestNetwork as W;
        match W::try_from(v).ok()? {
            W::Unspecified | W::Mapped => Some(Self::Mapped),
            W::Isolated => Some(Self::Isolated),
            W::None => Some(Self::None),
        }
    }

    pub fn to_wire(self) -> i32 {
        use siterecovery_proto::v1::TestNetwork as W;
        (match self {
            Self::Mapped => W::Mapped,
            Self::Isolated => W::Isolated,
            Self::None => W::None,
        }) as i32
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "mapped" => Self::Mapped,
            "isolated" => Self::Isolated,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mapped => "mapped",
            Self::Isolated => "isolated",
            Self::None => "none",
        }
    }
}

/// The NICs of a test VM.
pub fn test_nics(reservations: &[Reservation], macs: &[String], mode: TestNetwork) -> Vec<v1::Nic> {
    reservations
        .iter()
        .map(|r| {
            let mac = macs.get(r.nic as usize).cloned().unwrap_or_default();
            match mode {
                TestNetwork::Mapped => r.failover_nic(&mac),
                TestNetwork::Isolated => {
                    let base =
                        name_or_empty(r.target_network.as_ref().map_or(&r.source_network, |_| &r.target_network));
                    v1::Nic { network: format!("{base}{ISOLATED_SUFFIX}"), ip: r.source_ip.clone(), dhcp: r.dhcp, mac }
                }
                TestNetwork::None => v1::Nic { network: String::new(), ip: String::new(), dhcp: false, mac },
            }
        })
        .collect()
}
