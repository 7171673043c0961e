//! The `--json` output: one view per `v1` message, serialised with serde. Enums show
//! as the CLI's words (see [`super::words`]); the field names are a contract that
//! scripts and the end-to-end tests read.
//!
//! Fields are declared in alphabetical order: the order the JSON has always been
//! printed in (a sorted map), so output diffed across versions does not move.

use serde::Serialize;
use siterecovery_proto::v1;

use super::words;

#[derive(Serialize)]
pub struct SiteView<'a> {
    pub clouds: &'a [String],
    /// The number of hosts.
    pub hosts: u32,
    pub name: &'a str,
}

impl<'a> From<&'a v1::Site> for SiteView<'a> {
    fn from(s: &'a v1::Site) -> Self {
        Self { clouds: &s.clouds, hosts: s.host_count, name: &s.name }
    }
}

#[derive(Serialize)]
pub struct HostView<'a> {
    pub address: &'a str,
    pub agent_version: &'a str,
    /// Expiry of the host's current certificate (unix ms; 0 when not known).
    pub certificate_expires_unix_ms: i64,
    /// Serial of the host's current certificate (lowercase hex).
    pub certificate_serial: &'a str,
    pub cloud: &'a str,
    pub connected: bool,
    pub free_bytes: u64,
    pub id: &'a str,
    pub last_heartbeat_unix_ms: i64,
    pub name: &'a str,
    pub registered_unix_ms: i64,
    /// `host reset` ran: the next registration of the name is allowed.
    pub reset_pending: bool,
    pub site: &'a str,
}

impl<'a> From<&'a v1::Host> for HostView<'a> {
    fn from(h: &'a v1::Host) -> Self {
        Self {
            address: &h.address,
            agent_version: &h.agent_version,
            certificate_expires_unix_ms: h.certificate_expires_unix_ms,
            certificate_serial: &h.certificate_serial,
            cloud: &h.cloud,
            connected: h.connected,
            free_bytes: h.free_bytes,
            id: &h.id,
            last_heartbeat_unix_ms: h.last_heartbeat_unix_ms,
            name: &h.name,
            registered_unix_ms: h.registered_unix_ms,
            reset_pending: h.reset_pending,
            site: &h.site,
        }
    }
}

#[derive(Serialize)]
pub struct VmView<'a> {
    pub disks: Vec<DiskView<'a>>,
    pub failover: Option<FailoverView<'a>>,
    pub folder: &'a str,
    /// The host's name.
    pub host: &'a str,
    pub host_id: &'a str,
    /// Memory, CPUs, boot settings.
    pub machine: Option<MachineView<'a>>,
    pub name: &'a str,
    pub nics: Vec<NicView<'a>>,
    pub power_state: &'static str,
    pub replication: Option<ReplicationView<'a>>,
}

impl<'a> From<&'a v1::Vm> for VmView<'a> {
    fn from(v: &'a v1::Vm) -> Self {
        Self {
            disks: v.disks.iter().map(DiskView::from).collect(),
            failover: v.failover.as_ref().map(FailoverView::from),
            folder: &v.folder,
            host: &v.host_name,
            host_id: &v.host_id,
            machine: v.machine.as_ref().map(|m| MachineView {
                append: &m.append,
                cpus: m.cpus,
                initrd: &m.initrd,
                kernel: &m.kernel,
                memory_bytes: m.memory_bytes,
            }),
            name: &v.name,
            nics: v.nics.iter().map(NicView::from).collect(),
            power_state: words::power(v.power_state),
            replication: v.replication.as_ref().map(ReplicationView::from),
        }
    }
}

#[derive(Serialize)]
pub struct MachineView<'a> {
    pub append: &'a str,
    pub cpus: u32,
    pub initrd: &'a str,
    pub kernel: &'a str,
    pub memory_bytes: u64,
}

#[derive(Serialize)]
pub struct DiskView<'a> {
    pub allocated_bytes: u64,
    pub export_name: &'a str,
    pub id: &'a str,
    pub image_path: &'a str,
    pub nbd_tcp_uri: &'a str,
    pub nbd_unix_uri: &'a str,
    pub pending_log_bytes: u64,
    pub size_bytes: u64,
    pub tracking: bool,
}

impl<'a> From<&'a v1::Disk> for DiskView<'a> {
    fn from(d: &'a v1::Disk) -> Self {
        Self {
            allocated_bytes: d.allocated_bytes,
            export_name: &d.export_name,
            id: &d.id,
            image_path: &d.image_path,
            nbd_tcp_uri: &d.nbd_tcp_uri,
            nbd_unix_uri: &d.nbd_unix_uri,
            pending_log_bytes: d.pending_log_bytes,
            size_bytes: d.size_bytes,
            tracking: d.tracking,
        }
    }
}

#[derive(Serialize)]
pub struct NicView<'a> {
    pub dhcp: bool,
    pub ip: &'a str,
    pub mac: &'a str,
    pub network: &'a str,
}

impl<'a> From<&'a v1::Nic> for NicView<'a> {
    fn from(n: &'a v1::Nic) -> Self {
        Self { dhcp: n.dhcp, ip: &n.ip, mac: &n.mac, network: &n.network }
    }
}

#[derive(Serialize)]
pub struct ReplicationView<'a> {
    pub achieved_bytes_per_sec: u64,
    pub addresses: Vec<AddressView<'a>>,
    /// Bytes/s, 0 = unlimited.
    pub bandwidth_limit: u64,
    pub bytes_replicated: u64,
    pub done_bytes: u64,
    pub error: &'a str,
    pub health: &'static str,
    pub health_reasons: &'a [String],
    pub last_point_id: &'a str,
    pub last_point_unix_ms: i64,
    pub pending_log_bytes: u64,
    pub policy: &'a str,
    pub primary_host: &'a str,
    pub relationship_id: &'a str,
    pub replica_host: &'a str,
    pub rpo_lag_ms: u64,
    pub state: &'static str,
    pub test_failover_vm: &'a str,
    pub total_bytes: u64,
}

impl<'a> From<&'a v1::Replication> for ReplicationView<'a> {
    fn from(r: &'a v1::Replication) -> Self {
        Self {
            achieved_bytes_per_sec: r.achieved_bytes_per_sec,
            addresses: r.addresses.iter().map(AddressView::from).collect(),
            bandwidth_limit: r.bandwidth_limit,
            bytes_replicated: r.bytes_replicated,
            done_bytes: r.done_bytes,
            error: &r.error,
            health: words::health(r.health),
            health_reasons: &r.health_reasons,
            last_point_id: &r.last_point_id,
            last_point_unix_ms: r.last_point_unix_ms,
            pending_log_bytes: r.pending_log_bytes,
            policy: &r.policy,
            primary_host: &r.primary_host,
            relationship_id: &r.relationship_id,
            replica_host: &r.replica_host,
            rpo_lag_ms: r.rpo_lag_ms,
            state: words::replication_state(r.state),
            test_failover_vm: &r.test_failover_vm,
            total_bytes: r.total_bytes,
        }
    }
}

/// Where a NIC lands at failover.
#[derive(Serialize)]
pub struct AddressView<'a> {
    pub dhcp: bool,
    pub nic: u32,
    pub note: &'a str,
    pub source_ip: &'a str,
    pub source_network: &'a str,
    pub target_ip: &'a str,
    pub target_network: &'a str,
}

impl<'a> From<&'a v1::AddressReservation> for AddressView<'a> {
    fn from(a: &'a v1::AddressReservation) -> Self {
        Self {
            dhcp: a.dhcp,
            nic: a.nic,
            note: &a.note,
            source_ip: &a.source_ip,
            source_network: &a.source_network,
            target_ip: &a.target_ip,
            target_network: &a.target_network,
        }
    }
}

/// How a VM came to run on its host by a failover.
#[derive(Serialize)]
pub struct FailoverView<'a> {
    pub committed: bool,
    pub kind: &'static str,
    pub point_id: &'a str,
    pub relationship_id: &'a str,
    pub started_unix_ms: i64,
    pub test_of: &'a str,
}

impl<'a> From<&'a v1::FailoverInfo> for FailoverView<'a> {
    fn from(f: &'a v1::FailoverInfo) -> Self {
        Self {
            committed: f.committed,
            kind: words::failover_kind(f.kind),
            point_id: &f.point_id,
            relationship_id: &f.relationship_id,
            started_unix_ms: f.started_unix_ms,
            test_of: &f.test_of,
        }
    }
}

#[derive(Serialize)]
pub struct PolicyView<'a> {
    pub app_consistent_every_ms: u64,
    /// The bandwidth spec; empty = unlimited.
    pub bandwidth: &'a str,
    pub compression: bool,
    /// `network`, `offline` or `at=<RFC 3339>`.
    pub initial_method: String,
    pub interval_ms: u64,
    pub name: &'a str,
    pub port: u32,
    /// Empty = the `bandwidth` spec.
    pub resync_bandwidth: &'a str,
    pub resync_window_end_hour: u32,
    pub resync_window_start_hour: u32,
    pub retention_ms: u64,
}

impl<'a> From<&'a v1::Policy> for PolicyView<'a> {
    fn from(p: &'a v1::Policy) -> Self {
        Self {
            app_consistent_every_ms: p.app_consistent_every_ms,
            bandwidth: &p.bandwidth,
            compression: p.compression,
            initial_method: words::initial_method(p),
            interval_ms: p.interval_ms,
            name: &p.name,
            port: p.port,
            resync_bandwidth: &p.resync_bandwidth,
            resync_window_end_hour: p.resync_window_end_hour,
            resync_window_start_hour: p.resync_window_start_hour,
            retention_ms: p.retention_ms,
        }
    }
}

#[derive(Serialize)]
pub struct PairingView<'a> {
    pub policy: &'a str,
    pub source_cloud: &'a str,
    pub target_cloud: &'a str,
}

impl<'a> From<&'a v1::CloudPairing> for PairingView<'a> {
    fn from(p: &'a v1::CloudPairing) -> Self {
        Self { policy: &p.policy, source_cloud: &p.source_cloud, target_cloud: &p.target_cloud }
    }
}

/// A cloud with its pairing, from both ends.
#[derive(Serialize)]
pub struct CloudView<'a> {
    pub hosts: &'a [String],
    pub name: &'a str,
    /// The policy of the pairing this cloud is the source of.
    pub policy: Option<&'a str>,
    pub site: &'a str,
    /// The clouds paired to this one as their target.
    pub source_clouds: Vec<&'a str>,
    pub target_cloud: Option<&'a str>,
}

impl<'a> CloudView<'a> {
    pub fn new(c: &'a v1::Cloud, pairings: &'a [v1::CloudPairing]) -> Self {
        let p = pairings.iter().find(|p| p.source_cloud == c.name);
        Self {
            hosts: &c.hosts,
            name: &c.name,
            policy: p.map(|p| p.policy.as_str()),
            site: &c.site,
            source_clouds: pairings
                .iter()
                .filter(|p| p.target_cloud == c.name)
                .map(|p| p.source_cloud.as_str())
                .collect(),
            target_cloud: p.map(|p| p.target_cloud.as_str()),
        }
    }
}

#[derive(Serialize)]
pub struct JobView<'a> {
    pub created_unix_ms: i64,
    pub done_bytes: u64,
    pub ended_unix_ms: i64,
    pub error: &'a str,
    pub id: &'a str,
    pub kind: &'static str,
    pub rate_bytes_per_sec: u64,
    pub state: &'static str,
    pub steps: Vec<StepView<'a>>,
    pub total_bytes: u64,
    pub vm: &'a str,
}

impl<'a> From<&'a v1::Job> for JobView<'a> {
    fn from(j: &'a v1::Job) -> Self {
        Self {
            created_unix_ms: j.created_unix_ms,
            done_bytes: j.done_bytes,
            ended_unix_ms: j.ended_unix_ms,
            error: &j.error,
            id: &j.id,
            kind: words::job_kind(j.kind),
            rate_bytes_per_sec: j.rate_bytes_per_sec,
            state: words::job_state(j.state),
            steps: j.steps.iter().map(StepView::from).collect(),
            total_bytes: j.total_bytes,
            vm: &j.vm,
        }
    }
}

#[derive(Serialize)]
pub struct StepView<'a> {
    pub detail: &'a str,
    pub ended_unix_ms: i64,
    pub name: &'a str,
    pub started_unix_ms: i64,
    pub state: &'static str,
}

impl<'a> From<&'a v1::JobStep> for StepView<'a> {
    fn from(s: &'a v1::JobStep) -> Self {
        Self {
            detail: &s.detail,
            ended_unix_ms: s.ended_unix_ms,
            name: &s.name,
            started_unix_ms: s.started_unix_ms,
            state: words::step_state(s.state),
        }
    }
}

#[derive(Serialize)]
pub struct PointView<'a> {
    pub app_consistent: bool,
    pub created_unix_ms: i64,
    pub id: &'a str,
    pub kind: &'static str,
    pub seq: u64,
    pub size_bytes: u64,
}

impl<'a> From<&'a v1::RecoveryPoint> for PointView<'a> {
    fn from(p: &'a v1::RecoveryPoint) -> Self {
        Self {
            app_consistent: p.app_consistent,
            created_unix_ms: p.created_unix_ms,
            id: &p.id,
            kind: words::point_kind(p.kind),
            seq: p.seq,
            size_bytes: p.size_bytes,
        }
    }
}

#[derive(Serialize)]
pub struct ExportView<'a> {
    pub point_id: &'a str,
    pub uri: &'a str,
}

impl<'a> From<&'a v1::ExportPointResponse> for ExportView<'a> {
    fn from(r: &'a v1::ExportPointResponse) -> Self {
        Self { point_id: &r.point_id, uri: &r.uri }
    }
}

#[derive(Serialize)]
pub struct NetworkView<'a> {
    pub dns: &'a [String],
    pub gateway: &'a str,
    pub name: &'a str,
    pub pools: &'a [String],
    pub site: &'a str,
    pub subnet: &'a str,
}

impl<'a> From<&'a v1::VmNetwork> for NetworkView<'a> {
    fn from(n: &'a v1::VmNetwork) -> Self {
        Self { dns: &n.dns, gateway: &n.gateway, name: &n.name, pools: &n.pools, site: &n.site, subnet: &n.subnet }
    }
}

#[derive(Serialize)]
pub struct MappingView<'a> {
    pub source: &'a str,
    pub target: &'a str,
}

impl<'a> From<&'a v1::NetworkMapping> for MappingView<'a> {
    fn from(m: &'a v1::NetworkMapping) -> Self {
        Self { source: &m.source, target: &m.target }
    }
}

#[derive(Serialize)]
pub struct PlanView<'a> {
    pub actions: Vec<ActionView<'a>>,
    pub groups: Vec<GroupView<'a>>,
    pub name: &'a str,
}

impl<'a> From<&'a v1::RecoveryPlan> for PlanView<'a> {
    fn from(p: &'a v1::RecoveryPlan) -> Self {
        Self {
            actions: p.actions.iter().map(ActionView::from).collect(),
            groups: p.groups.iter().map(GroupView::from).collect(),
            name: &p.name,
        }
    }
}

#[derive(Serialize)]
pub struct GroupView<'a> {
    pub order: u32,
    pub vms: &'a [String],
}

impl<'a> From<&'a v1::PlanGroup> for GroupView<'a> {
    fn from(g: &'a v1::PlanGroup) -> Self {
        Self { order: g.order, vms: &g.vms }
    }
}

#[derive(Serialize)]
pub struct ActionView<'a> {
    pub after_group: u32,
    pub command: &'a str,
    pub kind: &'static str,
    pub timeout_secs: u32,
}

impl<'a> From<&'a v1::PlanAction> for ActionView<'a> {
    fn from(a: &'a v1::PlanAction) -> Self {
        Self {
            after_group: a.after_group,
            command: &a.command,
            kind: words::action_kind(a.kind),
            timeout_secs: a.timeout_secs,
        }
    }
}

/// A revoked certificate (`host revoked`).
#[derive(Serialize)]
pub struct RevokedView<'a> {
    pub host_id: &'a str,
    pub host_name: &'a str,
    pub reason: &'a str,
    pub revoked_unix_ms: i64,
    pub serial: &'a str,
}

impl<'a> From<&'a v1::RevokedCertificate> for RevokedView<'a> {
    fn from(r: &'a v1::RevokedCertificate) -> Self {
        Self {
            host_id: &r.host_id,
            host_name: &r.host_name,
            reason: &r.reason,
            revoked_unix_ms: r.revoked_unix_ms,
            serial: &r.serial,
        }
    }
}

/// The answer of `host remove`: `{"removed": HOST, "revoked_serial": SERIAL}`.
#[derive(Serialize)]
pub struct HostRemoved<'a> {
    pub removed: &'a str,
    pub revoked_serial: &'a str,
}

/// The answer of a delete: `{"deleted": NAME}`.
#[derive(Serialize)]
pub struct Deleted<'a> {
    pub deleted: &'a str,
}

/// The answer of `cloud unpair`: `{"unpaired": SOURCE}`.
#[derive(Serialize)]
pub struct Unpaired<'a> {
    pub unpaired: &'a str,
}

/// The answer of `point unexport`: `{"unexported": VM}`.
#[derive(Serialize)]
pub struct Unexported<'a> {
    pub unexported: &'a str,
}

/// Maps a list of messages to their views.
pub fn all<'a, M, V: From<&'a M>>(items: &'a [M]) -> Vec<V> {
    items.iter().map(V::from).collect()
}

#[cfg(test)]
mod tests;
