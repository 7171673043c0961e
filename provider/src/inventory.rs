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
use siterecovery_certs::identity::is_token;
use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_server::Inventory;
use siterecovery_proto::v1::provider_message::Command;
use tonic::{Request, Response, Status};

use crate::api::AppState;
use crate::auth::authorize;
use crate::store::{HOSTS, VMS};

/// A registered host, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// Identity id in the host's certificate; changes at re-registration.
    pub id: String,
    pub name: String,
    pub site: String,
    pub cloud: String,
    /// host:port of the agent's peer listener.
    pub address: String,
    pub agent_version: String,
    pub registered_unix_ms: i64,
}

/// A VM as last reported by its host. The proto message is kept as its encoded form
/// would lose nothing, but a serde mirror is easier to read in the store and in tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub name: String,
    pub host_id: String,
    pub folder: String,
    pub power_state: String,
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
    pub relationship_id: String,
    pub point_id: String,
    pub kind: FailoverKind,
    pub committed: bool,
    pub test_of: String,
    pub started_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub id: String,
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
    pub network: String,
    pub ip: String,
    pub dhcp: bool,
    pub mac: String,
}

impl VmRecord {
    /// From a host's report; the host id comes from the authenticated session, never
    /// from the message.
    pub fn from_report(vm: &v1::Vm, host_id: &str) -> Result<Self, Status> {
        if !is_token(&vm.name) {
            return Err(Status::invalid_argument(format!("invalid VM name {:?}", vm.name)));
        }
        let power = v1::PowerState::try_from(vm.power_state).unwrap_or(v1::PowerState::Unspecified);
        Ok(Self {
            name: vm.name.clone(),
            host_id: host_id.to_owned(),
            folder: vm.folder.clone(),
            power_state: match power {
                v1::PowerState::Running => "running",
                v1::PowerState::Off => "off",
                v1::PowerState::Unspecified => "unknown",
            }
            .into(),
            created_unix_ms: vm.created_unix_ms,
            failover: match vm.failover.as_ref() {
                None => None,
                Some(f) => Some(FailoverRecord {
                    relationship_id: f.relationship_id.clone(),
                    point_id: f.point_id.clone(),
                    kind: FailoverKind::try_from(f.kind).map_err(|v| {
                        Status::invalid_argument(format!(
                            "vm.failover.kind: value {v} is not one of {}",
                            FailoverKind::WORDS
                        ))
                    })?,
                    committed: f.committed,
                    test_of: f.test_of.clone(),
                    started_unix_ms: f.started_unix_ms,
                }),
            },
            disks: vm
                .disks
                .iter()
                .map(|d| DiskRecord {
                    id: d.id.clone(),
                    size_bytes: d.size_bytes,
                    image_path: d.image_path.clone(),
                    export_name: d.export_name.clone(),
                    nbd_unix_uri: d.nbd_unix_uri.clone(),
                    nbd_tcp_uri: d.nbd_tcp_uri.clone(),
                    tracking: d.tracking,
                    pending_log_bytes: d.pending_log_bytes,
                    allocated_bytes: d.allocated_bytes,
                })
                .collect(),
            nics: vm
                .nics
                .iter()
                .map(|n| NicRecord { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: n.mac.clone() })
                .collect(),
        })
    }

    pub fn to_proto(&self, host_name: &str) -> v1::Vm {
        v1::Vm {
            name: self.name.clone(),
            host_id: self.host_id.clone(),
            host_name: host_name.to_owned(),
            folder: self.folder.clone(),
            power_state: match self.power_state.as_str() {
                "running" => v1::PowerState::Running,
                "off" => v1::PowerState::Off,
                _ => v1::PowerState::Unspecified,
            } as i32,
            created_unix_ms: self.created_unix_ms,
            replication: None,
            failover: self.failover.as_ref().map(|f| v1::FailoverInfo {
                relationship_id: f.relationship_id.clone(),
                point_id: f.point_id.clone(),
                kind: f.kind.into(),
                committed: f.committed,
                test_of: f.test_of.clone(),
                started_unix_ms: f.started_unix_ms,
            }),
            disks: self
                .disks
                .iter()
                .map(|d| v1::Disk {
                    id: d.id.clone(),
                    size_bytes: d.size_bytes,
                    image_path: d.image_path.clone(),
                    export_name: d.export_name.clone(),
                    nbd_unix_uri: d.nbd_unix_uri.clone(),
                    nbd_tcp_uri: d.nbd_tcp_uri.clone(),
                    tracking: d.tracking,
                    pending_log_bytes: d.pending_log_bytes,
                    allocated_bytes: d.allocated_bytes,
                })
                .collect(),
            nics: self
                .nics
                .iter()
                .map(|n| v1::Nic { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: n.mac.clone() })
                .collect(),
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
    let live = |v: &VmRecord| v.failover.clone().filter(|f| f.kind != FailoverKind::Test && f.test_of.is_empty());
    match (live(stored), live(reported)) {
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.started_unix_ms >= a.started_unix_ms,
        _ => true,
    }
}

/// How long an operator RPC waits for the agent to carry out a VM command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub struct InventoryService {
    pub state: Arc<AppState>,
}

impl InventoryService {
    fn hosts(&self) -> Result<Vec<HostRecord>, Status> {
        self.state.store.list(HOSTS).map_err(internal)
    }

    fn host_by_name_or_id(&self, key: &str) -> Result<HostRecord, Status> {
        self.hosts()?
            .into_iter()
            .find(|h| h.name == key || h.id == key)
            .ok_or_else(|| Status::not_found(format!("no host {key:?} (see `host list`)")))
    }

    fn vm(&self, name: &str) -> Result<VmRecord, Status> {
        self.state
            .store
            .get::<VmRecord>(VMS, name)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no VM {name:?} (see `vm list`)")))
    }

    fn host_name(&self, id: &str) -> String {
        self.hosts().ok().and_then(|hs| hs.into_iter().find(|h| h.id == id)).map(|h| h.name).unwrap_or_default()
    }

    /// Sends `cmd` to the VM's host and records the VM it returns.
    async fn vm_command(&self, host: &HostRecord, cmd: Command) -> Result<v1::Vm, Status> {
        let result = self.state.sessions.command(&host.id, cmd, COMMAND_TIMEOUT).await?;
        let vm = result.vm.ok_or_else(|| Status::internal("agent returned no VM"))?;
        let rec = VmRecord::from_report(&vm, &host.id)?;
        self.state.store.put(VMS, &rec.name, &rec).map_err(internal)?;
        Ok(rec.to_proto(&host.name))
    }
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!("internal error: {e:#}");
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn list_sites(&self, req: Request<v1::ListSitesRequest>) -> Result<Response<v1::ListSitesResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let mut sites: BTreeMap<String, (BTreeSet<String>, u32)> = BTreeMap::new();
        for h in self.hosts()? {
            let e = sites.entry(h.site).or_default();
            e.0.insert(h.cloud);
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
            let c = clouds.entry(h.cloud.clone()).or_insert_with(|| v1::Cloud {
                name: h.cloud.clone(),
                site: h.site.clone(),
                hosts: vec![],
            });
            c.hosts.push(h.name);
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
                    id: h.id,
                    name: h.name,
                    site: h.site,
                    cloud: h.cloud,
                    address: h.address,
                    registered_unix_ms: h.registered_unix_ms,
                }
            })
            .collect();
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn list_vms(&self, req: Request<v1::ListVmsRequest>) -> Result<Response<v1::ListVmsResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let filter = req.into_inner().host;
        let hosts = self.hosts()?;
        let name_of = |id: &str| hosts.iter().find(|h| h.id == id).map(|h| h.name.clone()).unwrap_or_default();
        let mut replications = crate::protection::replication_views(&self.state, &hosts);
        let vms = self
            .state
            .store
            .list::<VmRecord>(VMS)
            .map_err(internal)?
            .into_iter()
            .filter(|v| filter.is_empty() || v.host_id == filter || name_of(&v.host_id) == filter)
            .map(|v| {
                let mut p = v.to_proto(&name_of(&v.host_id));
                p.replication = replications.remove(&v.name);
                p
            })
            .collect();
        Ok(Response::new(v1::ListVmsResponse { vms }))
    }

    async fn get_vm(&self, req: Request<v1::GetVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let vm = self.vm(&req.into_inner().name)?;
        let mut p = vm.to_proto(&self.host_name(&vm.host_id));
        p.replication = crate::protection::replication_views(&self.state, &self.hosts()?).remove(&vm.name);
        Ok(Response::new(p))
    }

    async fn create_vm(&self, req: Request<v1::CreateVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let r = req.into_inner();
        if !is_token(&r.name) {
            return Err(Status::invalid_argument(format!(
                "invalid VM name {:?}: use 1-64 of A-Z a-z 0-9 . _ -",
                r.name
            )));
        }
        if r.disks.is_empty() {
            return Err(Status::invalid_argument("a VM needs at least one --disk"));
        }
        if r.disks.len() > 16 {
            return Err(Status::invalid_argument("at most 16 disks per VM"));
        }
        for d in &r.disks {
            if d.size_bytes == 0 || d.size_bytes % 512 != 0 {
                return Err(Status::invalid_argument(format!(
                    "disk size {} must be a positive multiple of 512 bytes",
                    d.size_bytes
                )));
            }
        }
        for n in &r.nics {
            if !n.dhcp && !n.ip.is_empty() && n.ip.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(Status::invalid_argument(format!("NIC address {:?} is not an IPv4 address", n.ip)));
            }
        }
        if self.state.store.get::<VmRecord>(VMS, &r.name).map_err(internal)?.is_some() {
            return Err(Status::already_exists(format!("VM {:?} already exists", r.name)));
        }
        let host = self.host_by_name_or_id(&r.host)?;
        let cmd = Command::CreateVm(v1::CreateVm {
            name: r.name,
            disk_sizes: r.disks.iter().map(|d| d.size_bytes).collect(),
            nics: r
                .nics
                .into_iter()
                .map(|n| v1::Nic { network: n.network, ip: n.ip, dhcp: n.dhcp, mac: String::new() })
                .collect(),
            start: r.start,
        });
        Ok(Response::new(self.vm_command(&host, cmd).await?))
    }

    async fn delete_vm(&self, req: Request<v1::DeleteVmRequest>) -> Result<Response<v1::DeleteVmResponse>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let vm = self.vm(&req.into_inner().name)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        self.state
            .sessions
            .command(&host.id, Command::DeleteVm(v1::DeleteVm { name: vm.name.clone() }), COMMAND_TIMEOUT)
            .await?;
        self.state.store.delete(VMS, &vm.name).map_err(internal)?;
        Ok(Response::new(v1::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<v1::StartVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let vm = self.vm(&req.into_inner().name)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        Ok(Response::new(self.vm_command(&host, Command::StartVm(v1::StartVm { name: vm.name })).await?))
    }

    async fn stop_vm(&self, req: Request<v1::StopVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, &self.state.vault_id, &[Role::Operator])?;
        let vm = self.vm(&req.into_inner().name)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        Ok(Response::new(self.vm_command(&host, Command::StopVm(v1::StopVm { name: vm.name })).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(host: &str, failover: Option<(&str, i64)>) -> VmRecord {
        VmRecord {
            name: "vm1".into(),
            host_id: host.into(),
            folder: String::new(),
            power_state: "running".into(),
            created_unix_ms: 0,
            disks: vec![],
            nics: vec![],
            failover: failover.map(|(kind, t)| FailoverRecord {
                relationship_id: "r-1".into(),
                point_id: "p-1".into(),
                kind: FailoverKind::from_word(kind).expect("test kind"),
                committed: true,
                test_of: String::new(),
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
