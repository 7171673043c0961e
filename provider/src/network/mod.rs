//! VM networks, network mappings and the static IP addresses NICs get at failover.
//!
//! A VM network belongs to a site and has a subnet, optional gateway and DNS servers,
//! and static IP pools. A mapping sends a network of one site to a network of another
//! (one mapping per source), allowed only when a cloud of the source site is paired with
//! a cloud of the target site. Network names are unique across sites, so `network map
//! --source N --target N` needs no site.
//!
//! Addresses: at protection time every static NIC of the VM gets a reservation in the
//! mapped network ([`plan_addresses`]): the same address when the target pool holds it
//! and it is free, else another free one; DHCP NICs are not managed; a NIC whose network
//! has no mapping keeps its network and address. The reservations live on the
//! relationship and are applied at failover.
//!
//! Storage: networks and mappings are small, so each collection is one JSON document in
//! the store's `meta` table (`networks`, `network_mappings`), written under a lock.
//!
//! - [`subnet`]: subnets and pools (parsing, containment).
//! - [`records`]: networks and mappings as stored, the requests that create them and
//!   their validation, and [`NetworkStore`].
//! - [`addresses`]: the address plan of a VM's NICs and the NICs of a failed-over or
//!   test VM.

pub mod addresses;
pub mod records;
pub mod subnet;

use siterecovery_proto::model::wire::WireError;

use crate::error::{Classify, ErrorClass};

pub use addresses::{NicIn, Reservation, TestNetwork, allocate, plan_addresses, test_nics};
pub use records::{
    MappingRecord, MappingRequest, NetworkRecord, NetworkRequest, NetworkStore, validate_mapping, validate_network,
};
pub use subnet::{Cidr, Pool};

/// `meta` key of the list of networks.
pub const NETWORKS_KEY: &str = "networks";
/// `meta` key of the list of mappings.
pub const MAPPINGS_KEY: &str = "network_mappings";
/// Suffix of the isolated network a test failover may use: `<target>-test-isolated`.
pub const ISOLATED_SUFFIX: &str = "-test-isolated";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// The request does not convert into domain types (a network or site name).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("unknown site {0:?} (sites come from registered hosts; see `site list`)")]
    UnknownSite(String),
    #[error("network {0:?} already exists")]
    Exists(String),
    #[error("no network {0:?} (see `network list`)")]
    UnknownNetwork(String),
    #[error("{0:?} is not a subnet in CIDR form (e.g. 10.0.0.0/24)")]
    InvalidSubnet(String),
    #[error("{0:?} is not an IPv4 address")]
    InvalidAddress(String),
    #[error("{0:?} is not a pool range A-B with A <= B")]
    InvalidPool(String),
    #[error("pool {pool} is not inside subnet {subnet}")]
    PoolOutsideSubnet { pool: String, subnet: String },
    #[error("pools {a} and {b} overlap")]
    PoolsOverlap { a: String, b: String },
    #[error("gateway {gateway} is not inside subnet {subnet}")]
    GatewayOutsideSubnet { gateway: String, subnet: String },
    #[error("networks {source_net} and {target} are both at site {site}: a mapping goes to another site")]
    SameSite { source_net: String, target: String, site: String },
    #[error(
        "no cloud of site {source_site} is paired with a cloud of site {target_site}: pair them first (`cloud pair`)"
    )]
    SitesNotPaired { source_site: String, target_site: String },
    #[error("network {source_net} is already mapped to {target}")]
    AlreadyMapped { source_net: String, target: String },
    #[error("the static pool of network {network} has no free address left")]
    PoolExhausted { network: String },
    #[error("network {0} has no static pool")]
    NoPool(String),
}

/// How the Protection service answers each refusal (through [`crate::error::status`]).
impl Classify for NetworkError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Exists(_) => ErrorClass::AlreadyExists,
            Self::UnknownNetwork(_) | Self::UnknownSite(_) => ErrorClass::NotFound,
            Self::SitesNotPaired { .. } | Self::AlreadyMapped { .. } | Self::PoolExhausted { .. } => {
                ErrorClass::FailedPrecondition
            }
            Self::Request(_)
            | Self::InvalidSubnet(_)
            | Self::InvalidAddress(_)
            | Self::InvalidPool(_)
            | Self::PoolOutsideSubnet { .. }
            | Self::PoolsOverlap { .. }
            | Self::GatewayOutsideSubnet { .. }
            | Self::SameSite { .. }
            | Self::NoPool(_) => ErrorClass::InvalidArgument,
        }
    }
}

#[cfg(test)]
mod tests;
