//! Inventory: sites, clouds, hosts and VMs as the provider knows them, and the
//! operator's Inventory service.
//!
//! Hosts are persisted at registration; their connection state and heartbeat live in
//! the control sessions ([`crate::control`]). VMs are reported by their hosts (a full
//! list at each connection, and with every command result) and persisted, so the
//! inventory is intact across provider restarts even before hosts reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_certs::Role;
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{
    CloudName, DiskId, FailoverKind, HostId, HostName, NetworkName, PointId, RelationshipId, SiteName, VmName,
};
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_server::Inventory;
use siterecovery_proto::v1::provider_message::Command;
use tonic::{Request, Response, Status};

use crate::api::AppState;
use crate::auth::authorize;
use crate::store::{HOSTS, StoreError, VMS, empty_is_none};

/// A registered host, as stored (table `hosts`, by name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// Identity id in the host's certificate; changes at re-registration.
    pub id: HostId,
    pub name: HostName,
    pub site: SiteName,
    pub cloud: CloudName,
    /// host:port of the agent's peer listener.
    pub address: String,
    pub agent_version: String,
    pub registered_unix_ms: i64,
}

/// Whether a VM runs, as its host last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Off,
    /// The host reported no (or an unknown) state.
    Unknown,
}

impl PowerState {
    /// The wire's value; unspecified and unknown values are `Unknown` (a newer agent
    /// may know more states: the VM is still worth recording).
    pub fn from_wire(v: i32) -> Self {
        match v1::PowerState::try_from(v) {
            Ok(v1::PowerState::Running) => Self::Running,
            Ok(v1::PowerState::Off) => Self::Off,
            _ => Self::Unknown,
        }
    }

    pub fn to_wire(self) -> i32 {
        (match self {
            Self::Running => v1::PowerState::Running,
            Self::Off => v1::PowerState::Off,
            Self::Unknown => v1::PowerState::Unspecified,
        }) as i32
    }
}

/// A VM as last reported by its host (table `vms`, by name). A serde mirror of the
/// proto message: easier to read in the store and in tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub name: VmName,
    /// The host that reported it (from the authenticated session, never the message).
    pub host_id: HostId,
    pub folder: String,
    pub power_state: PowerState,
    pub created_unix_ms: i64,
    pub disks: Vec<DiskRecord>,
    pub nics: Vec<NicRecord>,
    /// Set when the VM was started by a failover on its host.
    #[serde(default)]
    pub failover: Option<FailoverRecord>,
}

/// How a VM on a replica host came to run (from the agent's report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverRecord {
    pub relationship_id: RelationshipId,
    pub point_id: PointId,
    pub kind: FailoverKind,
    pub committed: bool,
    /// For a test VM: the protected VM it is a copy of.
    #[serde(default, with = "empty_is_none")]
    pub test_of: Option<VmName>,
    pub started_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub id: DiskId,
    pub size_bytes: u64,
    pub image_path: String,
    pub export_name: String,
    pub nbd_unix_uri: String,
    pub nbd_tcp_uri: String,
    pub tracking: bool,
    pub pending_log_bytes: u64,
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRecord {
    /// `None`: disconnected (a test VM without network).
    #[serde(with = "empty_is_none")]
    pub network: Option<NetworkName>,
    pub ip: String,
    pub dhcp: bool,
    pub mac: String,
}

impl NicRecord {
    /// A NIC from the wire; `field` names it in errors (`vm.nics[0]`).
    pub fn from_wire(n: &v1::Nic, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            network: wire::optional(&format!("{field}.network"), &n.network)?,
            ip: n.ip.clone(),
            dhcp: n.dhcp,
            mac: n.mac.clone(),
        })
    }

    pub fn to_proto(&self) -> v1::Nic {
        v1::Nic {
            network: self.network.as_ref().map(|n| n.to_string()).unwrap_or_default(),
            ip: self.ip.clone(),
            dhcp: self.dhcp,
            mac: self.mac.clone(),
        }
    }
}

impl FailoverRecord {
    /// A failover from the wire; `field` names it in errors (`vm.failover`).
    pub fn from_wire(f: &v1::FailoverInfo, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            relationship_id: wire::field(&format!("{field}.relationship_id"), &f.relationship_id)?,
            point_id: wire::field(&format!("{field}.point_id"), &f.point_id)?,
            kind: wire::enumeration(&format!("{field}.kind"), f.kind, FailoverKind::WORDS)?,
            committed: f.committed,
            test_of: wire::optional(&format!("{field}.test_of"), &f.test_of)?,
            started_unix_ms: f.started_unix_ms,
        })
    }

    pub fn to_proto(&self) -> v1::FailoverInfo {
        v1::FailoverInfo {
            relationship_id: self.relationship_id.to_string(),
            point_id: self.point_id.to_string(),
            kind: self.kind.into(),
            committed: self.committed,
            test_of: self.test_of.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            started_unix_ms: self.started_unix_ms,
        }
    }
}

impl DiskRecord {
    /// A disk from the wire; `field` names it in errors (`vm.disks[0]`).
    pub fn from_wire(d: &v1::Disk, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            id: wire::field(&format!("{field}.id"), &d.id)?,
            size_bytes: d.size_bytes,
            image_path: d.image_path.clone(),
            export_name: d.export_name.clone(),
            nbd_unix_uri: d.nbd_unix_uri.clone(),
            nbd_tcp_uri: d.nbd_tcp_uri.clone(),
            tracking: d.tracking,
            pending_log_bytes: d.pending_log_bytes,
            allocated_bytes: d.allocated_bytes,
        })
    }

    pub fn to_proto(&self) -> v1::Disk {
        v1::Disk {
            id: self.id.to_string(),
            size_bytes: self.size_bytes,
            image_path: self.image_path.clone(),
            export_name: self.export_name.clone(),
            nbd_unix_uri: self.nbd_unix_uri.clone(),
            nbd_tcp_uri: self.nbd_tcp_uri.clone(),
            tracking: self.tracking,
            pending_log_bytes: self.pending_log_bytes,
            allocated_bytes: self.allocated_bytes,
        }
    }
}

impl VmRecord {
    /// From a host's report; the host id comes from the authenticated session, never
    /// from the message. Errors name the field under `vm`.
    pub fn from_report(vm: &v1::Vm, host_id: &HostId) -> Result<Self, WireError> {
        Self::from_wire(vm, host_id, "vm")
    }

    /// [`VmRecord::from_report`] with the message's place in its parent (`field`,
    /// e.g. `inventory.vms[2]`) for the errors.
    pub fn from_wire(vm: &v1::Vm, host_id: &HostId, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            name: wire::field(&format!("{field}.name"), &vm.name)?,
            host_id: host_id.clone(),
            folder: vm.folder.clone(),
            power_state: PowerState::from_wire(vm.power_state),
            created_unix_ms: vm.created_unix_ms,
            failover: match vm.failover.as_ref() {
                None => None,
                Some(f) => Some(FailoverRecord::from_wire(f, &format!("{field}.failover"))?),
            },
            disks: vm
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskRecord::from_wire(d, &format!("{field}.disks[{i}]")))
                .collect::<Result<_, _>>()?,
            nics: vm
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| NicRecord::from_wire(n, &format!("{field}.nics[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn to_proto(&self, host_name: &str) -> v1::Vm {
        v1::Vm {
            name: self.name.to_string(),
            host_id: self.host_id.to_string(),
            host_name: host_name.to_owned(),
            folder: self.folder.clone(),
            power_state: self.power_state.to_wire(),
            created_unix_ms: self.created_unix_ms,
            replication: None,
            failover: self.failover.as_ref().map(FailoverRecord::to_proto),
            disks: self.disks.iter().map(DiskRecord::to_proto).collect(),
            nics: self.nics.iter().map(NicRecord::to_proto).collect(),
        }
    }
}

/// Whether a host's report of a VM replaces the stored record of the same name.
///
/// After a failover the VM exists on two hosts until reverse replication adopts the old
/// primary's disks: the old primary still reports its stopped copy. The copy started by a
/// failover wins over one that was not; between two failed-over copies (failback) the
/// later failover wins. Test VMs have their own names and never compete.
pub fn report_wins(stored: Option<&VmRecord>, reported: &VmRecord) -> bool {
    let Some(stored) = stored else { return true };
    if stored.host_id == reported.host_id {
        return true;
    }
    let live = |v: &VmRecord| v.failover.clone().filter(|f| f.kind != FailoverKind::Test && f.test_of.is_none());
    match (live(stored), live(reported)) {
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.started_unix_ms >= a.started_unix_ms,
        _ => true,
    }
}

/// How long an operator RPC waits for the agent to carry out a VM command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an Inventory request failed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The request does not convert into domain types.
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("no host {0:?} (see `host list`)")]
    UnknownHost(String),
    #[error("no VM {0:?} (see `vm list`)")]
    UnknownVm(VmName),
    #[error("VM {0:?} already exists")]
    VmExists(VmName),
    /// The VM's host refused or did not carry out the command (its status, as the
    /// control session mapped it).
    #[error("{}", .0.message())]
    Agent(Status),
    #[error("agent returned no VM")]
    NoVmReturned,
    #[error("agent returned an invalid VM: {0}")]
    InvalidVmReturned(WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The one mapping of inventory errors to gRPC statuses.
impl From<InventoryError> for Status {
    fn from(e: InventoryError) -> Self {
        use InventoryError as E;
        match e {
            E::Agent(status) => status,
            E::Request(_) => Status::invalid_argument(e.to_string()),
            E::UnknownHost(_) | E::UnknownVm(_) => Status::not_found(e.to_string()),
            E::VmExists(_) => Status::already_exists(e.to_string()),
            E::NoVmReturned | E::InvalidVmReturned(_) | E::Store(_) => {
                tracing::error!("inventory: {e:#}");
                Status::internal(e.to_string())
            }
        }
    }
}

/// A host as an operator names it: by name or by id (the id's rule admits every name).
fn host_key(field: &str, value: &str) -> Result<HostId, WireError> {
    wire::field(field, value)
}

/// A NIC of a VM to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub network: Option<NetworkName>,
    /// `None` with DHCP, or when no address is given.
    pub ip: Option<std::net::Ipv4Addr>,
    pub dhcp: bool,
}

/// `CreateVm`, converted and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVmRequest {
    pub host: HostId,
    pub name: VmName,
    pub disk_sizes: Vec<u64>,
    pub nics: Vec<NicSpec>,
    pub start: bool,
}

/// At most this many disks per VM.
const MAX_DISKS: usize = 16;

impl TryFrom<&v1::CreateVmRequest> for CreateVmRequest {
    type Error = WireError;
    fn try_from(r: &v1::CreateVmRequest) -> Result<Self, WireError> {
        let name = wire::field("create_vm.name", &r.name)?;
        let host = host_key("create_vm.host", &r.host)?;
        if r.disks.is_empty() {
            return Err(WireError::rule("create_vm.disks", "a VM needs at least one --disk"));
        }
        if r.disks.len() > MAX_DISKS {
            return Err(WireError::rule("create_vm.disks", format!("at most {MAX_DISKS} disks per VM")));
        }
        for (i, d) in r.disks.iter().enumerate() {
            if d.size_bytes == 0 || d.size_bytes % 512 != 0 {
                return Err(WireError::rule(
                    format!("create_vm.disks[{i}].size_bytes"),
                    format!("disk size {} must be a positive multiple of 512 bytes", d.size_bytes),
                ));
            }
        }
        let nics = r
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let ip = if n.dhcp || n.ip.is_empty() {
                    None
                } else {
                    Some(n.ip.parse::<std::net::Ipv4Addr>().map_err(|_| {
                        WireError::rule(
                            format!("create_vm.nics[{i}].ip"),
                            format!(
                                "NIC address {:?} is not an IPv4 address",
                                n.ip.chars().take(80).collect::<String>()
                            ),
                        )
                    })?)
                };
                Ok(NicSpec {
                    network: wire::optional(&format!("create_vm.nics[{i}].network"), &n.network)?,
                    ip,
                    dhcp: n.dhcp,
                })
            })
            .collect::<Result<_, WireError>>()?;
        Ok(Self { host, name, disk_sizes: r.disks.iter().map(|d| d.size_bytes).collect(), nics, start: r.start })
    }
}

impl CreateVmRequest {
    /// The command for the agent.
    pub fn command(&self) -> Command {
        Command::CreateVm(v1::CreateVm {
            name: self.name.to_string(),
            disk_sizes: self.disk_sizes.clone(),
            nics: self
                .nics
                .iter()
                .map(|n| v1::Nic {
                    network: n.network.as_ref().map(|x| x.to_string()).unwrap_or_default(),
                    // A DHCP NIC's address is ignored, as before the types.
                    ip: n.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    dhcp: n.dhcp,
                    mac: String::new(),
                })
                .collect(),
            start: self.start,
        })
    }
}

pub struct InventoryService {
    pub state: Arc<AppState>,
}

impl InventoryService {
    fn hosts(&self) -> Result<Vec<HostRecord>, InventoryError> {
        Ok(self.state.store.list(HOSTS)?)
    }

    fn host_by_name_or_id(&self, key: &HostId) -> Result<HostRecord, InventoryError> {
        self.hosts()?
            .into_iter()
            .find(|h| h.name.as_str() == key.as_str() || &h.id == key)
            .ok_or_else(|| InventoryError::UnknownHost(key.to_string()))
    }

    fn vm(&self, name: &VmName) -> Result<VmRecord, InventoryError> {
        self.state.store.get::<VmRecord>(VMS, name)?.ok_or_else(|| InventoryError::UnknownVm(name.clone()))
    }

    /// Sends `cmd` to the VM's host and records the VM it returns.
    async fn vm_command(&self, host: &HostRecord, cmd: Command) -> Result<v1::Vm, InventoryError> {
        let result =
            self.state.sessions.command(&host.id, cmd, COMMAND_TIMEOUT).await.map_err(InventoryError::Agent)?;
        let vm = result.vm.ok_or(InventoryError::NoVmReturned)?;
        let rec = VmRecord::from_report(&vm, &host.id).map_err(InventoryError::InvalidVmReturned)?;
        self.state.store.put(VMS, &rec.name, &rec)?;
        Ok(rec.to_proto(host.name.as_str()))
    }

    fn list_vms(&self, r: &v1::ListVmsRequest) -> Result<v1::ListVmsResponse, InventoryError> {
        let filter: Option<HostId> = wire::optional("list_vms.host", &r.host)?;
        let hosts = self.hosts()?;
        let name_of = |id: &HostId| hosts.iter().find(|h| &h.id == id).map(|h| h.name.to_string()).unwrap_or_default();
        let mut replications = crate::protection::replication_views(&self.state, &hosts);
        let vms = self
            .state
            .store
            .list::<VmRecord>(VMS)?
            .into_iter()
            .filter(|v| filter.as_ref().is_none_or(|f| &v.host_id == f || name_of(&v.host_id) == f.as_str()))
            .map(|v| {
                let mut p = v.to_proto(&name_of(&v.host_id));
                p.replication = replications.remove(v.name.as_str());
                p
            })
            .collect();
        Ok(v1::ListVmsResponse { vms })
    }

    fn get_vm(&self, r: &v1::GetVmRequest) -> Result<v1::Vm, InventoryError> {
        let vm = self.vm(&wire::field("get_vm.name", &r.name)?)?;
        let hosts = self.hosts()?;
        let host_name = hosts.iter().find(|h| h.id == vm.host_id).map(|h| h.name.to_string()).unwrap_or_default();
        let mut p = vm.to_proto(&host_name);
        p.replication = crate::protection::replication_views(&self.state, &hosts).remove(vm.name.as_str());
        Ok(p)
    }

    async fn create_vm(&self, r: &v1::CreateVmRequest) -> Result<v1::Vm, InventoryError> {
        let req = CreateVmRequest::try_from(r)?;
        if self.state.store.get::<VmRecord>(VMS, &req.name)?.is_some() {
            return Err(InventoryError::VmExists(req.name));
        }
        let host = self.host_by_name_or_id(&req.host)?;
        self.vm_command(&host, req.command()).await
    }

    async fn delete_vm(&self, r: &v1::DeleteVmRequest) -> Result<(), InventoryError> {
        let vm = self.vm(&wire::field("delete_vm.name", &r.name)?)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        self.state
            .sessions
            .command(&host.id, Command::DeleteVm(v1::DeleteVm { name: vm.name.to_string() }), COMMAND_TIMEOUT)
            .await
            .map_err(InventoryError::Agent)?;
        self.state.store.delete(VMS, &vm.name)?;
        Ok(())
    }

    async fn power(&self, field: &str, name: &str, start: bool) -> Result<v1::Vm, InventoryError> {
        let vm = self.vm(&wire::field(field, name)?)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        let name = vm.name.to_string();
        let cmd = if start { Command::StartVm(v1::StartVm { name }) } else { Command::StopVm(v1::StopVm { name }) };
        self.vm_command(&host, cmd).await
    }
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn list_sites(&self, req: Request<v1::ListSitesRequest>) -> Result<Response<v1::ListSitesResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let mut sites: BTreeMap<String, (BTreeSet<String>, u32)> = BTreeMap::new();
        for h in self.hosts()? {
            let e = sites.entry(h.site.to_string()).or_default();
            e.0.insert(h.cloud.to_string());
            e.1 += 1;
        }
        let sites = sites
            .into_iter()
            .map(|(name, (clouds, n))| v1::Site { name, clouds: clouds.into_iter().collect(), host_count: n })
            .collect();
        Ok(Response::new(v1::ListSitesResponse { sites }))
    }

    async fn list_clouds(
        &self,
        req: Request<v1::ListCloudsRequest>,
    ) -> Result<Response<v1::ListCloudsResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let mut clouds: BTreeMap<String, v1::Cloud> = BTreeMap::new();
        for h in self.hosts()? {
            let c = clouds.entry(h.cloud.to_string()).or_insert_with(|| v1::Cloud {
                name: h.cloud.to_string(),
                site: h.site.to_string(),
                hosts: vec![],
            });
            c.hosts.push(h.name.to_string());
        }
        Ok(Response::new(v1::ListCloudsResponse { clouds: clouds.into_values().collect() }))
    }

    async fn list_hosts(&self, req: Request<v1::ListHostsRequest>) -> Result<Response<v1::ListHostsResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let hosts = self
            .hosts()?
            .into_iter()
            .map(|h| {
                let live = self.state.sessions.status(&h.id);
                v1::Host {
                    connected: live.connected,
                    last_heartbeat_unix_ms: live.last_heartbeat_unix_ms,
                    agent_version: live.agent_version.unwrap_or(h.agent_version),
                    free_bytes: live.free_bytes,
                    id: h.id.into_string(),
                    name: h.name.into_string(),
                    site: h.site.into_string(),
                    cloud: h.cloud.into_string(),
                    address: h.address,
                    registered_unix_ms: h.registered_unix_ms,
                }
            })
            .collect();
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn list_vms(&self, req: Request<v1::ListVmsRequest>) -> Result<Response<v1::ListVmsResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        Ok(Response::new(InventoryService::list_vms(self, req.get_ref())?))
    }

    async fn get_vm(&self, req: Request<v1::GetVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        Ok(Response::new(InventoryService::get_vm(self, req.get_ref())?))
    }

    async fn create_vm(&self, req: Request<v1::CreateVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        Ok(Response::new(InventoryService::create_vm(self, req.get_ref()).await?))
    }

    async fn delete_vm(&self, req: Request<v1::DeleteVmRequest>) -> Result<Response<v1::DeleteVmResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        InventoryService::delete_vm(self, req.get_ref()).await?;
        Ok(Response::new(v1::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<v1::StartVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        Ok(Response::new(self.power("start_vm.name", &req.get_ref().name, true).await?))
    }

    async fn stop_vm(&self, req: Request<v1::StopVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        Ok(Response::new(self.power("stop_vm.name", &req.get_ref().name, false).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(host: &str, failover: Option<(&str, i64)>) -> VmRecord {
        VmRecord {
            name: "vm1".parse().expect("name"),
            host_id: host.parse().expect("host id"),
            folder: String::new(),
            power_state: PowerState::Running,
            created_unix_ms: 0,
            disks: vec![],
            nics: vec![],
            failover: failover.map(|(kind, t)| FailoverRecord {
                relationship_id: "r-00000001".parse().expect("relationship id"),
                point_id: "p1".parse().expect("point id"),
                kind: FailoverKind::from_word(kind).expect("test kind"),
                committed: true,
                test_of: None,
                started_unix_ms: t,
            }),
        }
    }

    #[test]
    fn the_failed_over_copy_wins() {
        assert!(report_wins(None, &vm("a", None)));
        assert!(report_wins(Some(&vm("a", None)), &vm("a", None)), "same host");
        assert!(report_wins(Some(&vm("a", None)), &vm("b", Some(("planned", 5)))), "failover wins");
        assert!(!report_wins(Some(&vm("b", Some(("planned", 5)))), &vm("a", None)), "old primary loses");
        // Failback: the later failover wins.
        assert!(report_wins(Some(&vm("b", Some(("planned", 5)))), &vm("a", Some(("planned", 9)))));
        assert!(!report_wins(Some(&vm("a", Some(("planned", 9)))), &vm("b", Some(("planned", 5)))));
        // A test copy never competes.
        assert!(report_wins(Some(&vm("b", Some(("test", 5)))), &vm("a", None)));
    }
}
