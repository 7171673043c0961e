//! Policies and cloud pairings as stored, and their wire forms.

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::bandwidth::BandwidthSpec;
use siterecovery_proto::model::{CloudName, PolicyName, SiteName};
use siterecovery_proto::v1;

use super::PolicyError;

/// A policy, as stored (table `policies`, by name). Durations in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: PolicyName,
    pub interval_ms: u64,
    pub retention_ms: u64,
    /// 0 = never.
    pub app_consistent_every_ms: u64,
    pub compression: bool,
    pub initial_method: InitialMethod,
    /// 0 = the replica host's own address.
    pub port: u32,
    pub resync_window_start_hour: u32,
    pub resync_window_end_hour: u32,
    /// Replication rate limit (`None` = unlimited); stores before it read as unlimited.
    #[serde(default)]
    pub bandwidth: Option<BandwidthSpec>,
    /// Bulk traffic's limit (initial copy, resync, catch-up); `None` = `bandwidth`.
    #[serde(default)]
    pub resync_bandwidth: Option<BandwidthSpec>,
}

/// How the first full copy of a VM reaches its replica host.
///
/// Stored as the words of the records before this type (`network`, `offline`,
/// `at=<RFC 3339>`), so existing stores read unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum InitialMethod {
    /// Over the network, as soon as protection is enabled.
    Network,
    /// Exported to a directory on the primary host, imported on the replica host.
    Offline,
    /// Over the network, from a given time (unix milliseconds, positive).
    At { unix_ms: i64 },
}

impl InitialMethod {
    /// The wire's method and time; unspecified is the default, network.
    pub fn from_wire(method: i32, at_unix_ms: i64) -> Result<Self, PolicyError> {
        match v1::InitialMethod::try_from(method) {
            Ok(v1::InitialMethod::Unspecified | v1::InitialMethod::Network) => Ok(Self::Network),
            Ok(v1::InitialMethod::Offline) => Ok(Self::Offline),
            Ok(v1::InitialMethod::At) => {
                if at_unix_ms <= 0 || rfc3339(at_unix_ms).is_none() {
                    return Err(PolicyError::Initial(format!("at {at_unix_ms} ms")));
                }
                Ok(Self::At { unix_ms: at_unix_ms })
            }
            Err(_) => Err(PolicyError::Initial(format!("method {method}"))),
        }
    }

    pub fn to_wire(self) -> (v1::InitialMethod, i64) {
        match self {
            Self::Network => (v1::InitialMethod::Network, 0),
            Self::Offline => (v1::InitialMethod::Offline, 0),
            Self::At { unix_ms } => (v1::InitialMethod::At, unix_ms),
        }
    }
}

/// `t` (unix ms) in RFC 3339, UTC.
fn rfc3339(unix_ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl std::fmt::Display for InitialMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Network => f.write_str("network"),
            Self::Offline => f.write_str("offline"),
            Self::At { unix_ms } => match rfc3339(*unix_ms) {
                Some(t) => write!(f, "at={t}"),
                None => write!(f, "at={unix_ms}ms"),
            },
        }
    }
}

impl std::str::FromStr for InitialMethod {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "network" => Ok(Self::Network),
            "offline" => Ok(Self::Offline),
            _ => s
                .strip_prefix("at=")
                .and_then(parse_rfc3339_ms)
                .filter(|&t| t > 0)
                .map(|unix_ms| Self::At { unix_ms })
                .ok_or_else(|| PolicyError::Initial(s.to_owned())),
        }
    }
}

impl TryFrom<String> for InitialMethod {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<InitialMethod> for String {
    fn from(m: InitialMethod) -> String {
        m.to_string()
    }
}

/// A pairing, as stored (table `pairings`, by source cloud: a cloud has at most one target).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairingRecord {
    pub source_cloud: CloudName,
    pub target_cloud: CloudName,
    pub policy: PolicyName,
}

/// A cloud as known from registered hosts, for pairing checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInfo {
    pub name: CloudName,
    pub site: SiteName,
}

/// A spec's canonical text; empty when unset.
pub fn spec_text(s: &Option<BandwidthSpec>) -> String {
    s.as_ref().map(|s| s.to_string()).unwrap_or_default()
}

impl PolicyRecord {
    pub fn to_proto(&self) -> v1::Policy {
        let (method, at) = self.initial_method.to_wire();
        v1::Policy {
            name: self.name.to_string(),
            interval_ms: self.interval_ms,
            retention_ms: self.retention_ms,
            app_consistent_every_ms: self.app_consistent_every_ms,
            compression: self.compression,
            initial_method: method.into(),
            initial_at_unix_ms: at,
            port: self.port,
            resync_window_start_hour: self.resync_window_start_hour,
            resync_window_end_hour: self.resync_window_end_hour,
            bandwidth: spec_text(&self.bandwidth),
            resync_bandwidth: spec_text(&self.resync_bandwidth),
        }
    }

    /// For `initial_method = at=TIME`: when initial replication may start (unix ms).
    pub fn initial_at_unix_ms(&self) -> Option<i64> {
        match self.initial_method {
            InitialMethod::At { unix_ms } => Some(unix_ms),
            _ => None,
        }
    }
}

impl PairingRecord {
    pub fn to_proto(&self) -> v1::CloudPairing {
        v1::CloudPairing {
            source_cloud: self.source_cloud.to_string(),
            target_cloud: self.target_cloud.to_string(),
            policy: self.policy.to_string(),
        }
    }
}

/// Parses an RFC 3339 time (`2025-01-31T22:00:00Z`, `…+01:00`, fractions allowed)
/// into unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}
