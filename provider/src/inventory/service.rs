//! The operator's Inventory service: sites, clouds and hosts (from the store, with
//! their live connection state), and the VMs of each host (created, started, stopped
//! and deleted by commands to the host).
//!
//! Every request is converted into domain types before the store or an agent is
//! reached; what the service needs from the rest of the provider comes through
//! [`InventoryContext`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::{Role, VaultId};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{HostId, HostName, NetworkName, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_server::Inventory;
use siterecovery_proto::v1::provider_message::Command;
use tonic::{Request, Response, Status};

use super::hosts;
use super::records::{HostRecord, LiveStatus, VmRecord};
use crate::auth::authorize;
use crate::command::CommandError;
use crate::error::{self, Classify, ErrorClass};
use crate::store::{HOSTS, Store, StoreError, VMS};

/// What the Inventory service needs from the provider around it.
#[tonic::async_trait]
pub trait InventoryContext: Send + Sync + 'static {
    fn vault_id(&self) -> &VaultId;
    fn store(&self) -> &Store;
    fn revocations(&self) -> &crate::trust::Revocations;
    /// The host's connection right now.
    fn live_status(&self, host: &HostId) -> LiveStatus;
    /// Sends a command to a connected host and waits for its result; the error is the
    /// host's refusal (or its absence) as the control channel maps it.
    async fn command(&self, host: &HostId, cmd: Command, timeout: Duration) -> Result<v1::CommandResult, CommandError>;
    /// The replication of each protected VM, by VM name.
    fn replication_views(&self, hosts: &[HostRecord]) -> HashMap<String, v1::Replication>;
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
    /// The VM's host refused or did not carry out the command.
    #[error(transparent)]
    Agent(#[from] CommandError),
    #[error("agent returned no VM")]
    NoVmReturned,
    #[error("agent returned an invalid VM: {0}")]
    InvalidVmReturned(WireError),
    /// `host remove` of a host a replication relationship uses.
    #[error("host {host} is used by the replication of {}: unprotect them first", vms.join(", "))]
    HostInUse { host: HostName, vms: Vec<String> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for InventoryError {
    fn class(&self) -> ErrorClass {
        use InventoryError as E;
        match self {
            E::Request(_) => ErrorClass::InvalidArgument,
            E::UnknownHost(_) | E::UnknownVm(_) => ErrorClass::NotFound,
            E::VmExists(_) => ErrorClass::AlreadyExists,
            E::HostInUse { .. } => ErrorClass::FailedPrecondition,
            // Mapped with the agent's own code (see `From` below).
            E::Agent(_) => ErrorClass::Unavailable,
            E::NoVmReturned | E::InvalidVmReturned(_) | E::Store(_) => ErrorClass::Internal,
        }
    }
}

/// The one mapping of inventory errors to gRPC statuses: an agent's refusal keeps its
/// code (not found, deadline exceeded, ...), the rest by class.
impl From<InventoryError> for Status {
    fn from(e: InventoryError) -> Self {
        match e {
            InventoryError::Agent(e) => e.into(),
            e => error::status(&e),
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
    /// Every NIC is on a VM network of its site (`--nic NETWORK[=IP|dhcp]`).
    pub network: NetworkName,
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
    pub machine: super::machine::MachineRecord,
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
                    network: wire::field(&format!("create_vm.nics[{i}].network"), &n.network)?,
                    ip,
                    dhcp: n.dhcp,
                })
            })
            .collect::<Result<_, WireError>>()?;
        let machine = super::machine::MachineRecord::from_wire(r.machine.as_ref(), "create_vm.machine")?;
        Ok(Self {
            host,
            name,
            disk_sizes: r.disks.iter().map(|d| d.size_bytes).collect(),
            nics,
            machine,
            start: r.start,
        })
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
                    network: n.network.to_string(),
                    // A DHCP NIC's address is ignored, as before the types.
                    ip: n.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    dhcp: n.dhcp,
                    mac: String::new(),
                })
                .collect(),
            machine: Some(self.machine.to_proto()),
            start: self.start,
        })
    }
}

pub struct InventoryService<C> {
    pub state: Arc<C>,
}

impl<C: InventoryContext> InventoryService<C> {
    fn hosts(&self) -> Result<Vec<HostRecord>, InventoryError> {
        Ok(self.state.store().list(HOSTS)?)
    }

    fn host_by_name_or_id(&self, key: &HostId) -> Result<HostRecord, InventoryError> {
        self.hosts()?
            .into_iter()
            .find(|h| h.name.as_str() == key.as_str() || &h.id == key)
            .ok_or_else(|| InventoryError::UnknownHost(key.to_string()))
    }

    /// The host an operator request names (by name or id) in `field`.
    fn named_host(&self, field: &str, value: &str) -> Result<HostRecord, InventoryError> {
        self.host_by_name_or_id(&host_key(field, value)?)
    }

    /// A host as `ListHosts` shows it: the record and its connection now.
    fn host_view(&self, h: HostRecord) -> v1::Host {
        let live = self.state.live_status(&h.id);
        v1::Host {
            connected: live.connected,
            last_heartbeat_unix_ms: live.last_heartbeat_unix_ms,
            agent_version: live.agent_version.unwrap_or_else(|| h.agent_version.clone()),
            free_bytes: live.free_bytes,
            ..h.to_proto()
        }
    }

    fn vm(&self, name: &VmName) -> Result<VmRecord, InventoryError> {
        self.state.store().get::<VmRecord>(VMS, name)?.ok_or_else(|| InventoryError::UnknownVm(name.clone()))
    }

    /// Sends `cmd` about VM `name` to the VM's host and records the VM it returns (only
    /// that one: the VM is placed on `host`).
    async fn vm_command(&self, host: &HostRecord, name: &VmName, cmd: Command) -> Result<v1::Vm, InventoryError> {
        let result = self.state.command(&host.id, cmd, COMMAND_TIMEOUT).await?;
        let vm = result.vm.ok_or(InventoryError::NoVmReturned)?;
        let rec = VmRecord::from_report(&vm, &host.id).map_err(InventoryError::InvalidVmReturned)?;
        if &rec.name != name {
            return Err(InventoryError::InvalidVmReturned(WireError::rule("vm.name", "not the VM asked for")));
        }
        self.state.store().put(VMS, &rec.name, &rec)?;
        Ok(rec.to_proto(host.name.as_str()))
    }

    fn list_vms(&self, r: &v1::ListVmsRequest) -> Result<v1::ListVmsResponse, InventoryError> {
        let filter: Option<HostId> = wire::optional("list_vms.host", &r.host)?;
        let hosts = self.hosts()?;
        let name_of = |id: &HostId| hosts.iter().find(|h| &h.id == id).map(|h| h.name.to_string()).unwrap_or_default();
        let mut replications = self.state.replication_views(&hosts);
        let vms = self
            .state
            .store()
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
        p.replication = self.state.replication_views(&hosts).remove(vm.name.as_str());
        Ok(p)
    }

    async fn create_vm(&self, r: &v1::CreateVmRequest) -> Result<v1::Vm, InventoryError> {
        let req = CreateVmRequest::try_from(r)?;
        if self.state.store().get::<VmRecord>(VMS, &req.name)?.is_some() {
            return Err(InventoryError::VmExists(req.name));
        }
        let host = self.host_by_name_or_id(&req.host)?;
        self.vm_command(&host, &req.name, req.command()).await
    }

    async fn delete_vm(&self, r: &v1::DeleteVmRequest) -> Result<(), InventoryError> {
        let vm = self.vm(&wire::field("delete_vm.name", &r.name)?)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        self.state
            .command(&host.id, Command::DeleteVm(v1::DeleteVm { name: vm.name.to_string() }), COMMAND_TIMEOUT)
            .await?;
        self.state.store().delete(VMS, &vm.name)?;
        Ok(())
    }

    async fn power(&self, field: &str, name: &str, start: bool) -> Result<v1::Vm, InventoryError> {
        let vm = self.vm(&wire::field(field, name)?)?;
        let host = self.host_by_name_or_id(&vm.host_id)?;
        let name = vm.name.to_string();
        let cmd = if start { Command::StartVm(v1::StartVm { name }) } else { Command::StopVm(v1::StopVm { name }) };
        self.vm_command(&host, &vm.name, cmd).await
    }
}

#[tonic::async_trait]
impl<C: InventoryContext> Inventory for InventoryService<C> {
    async fn list_sites(&self, req: Request<v1::ListSitesRequest>) -> Result<Response<v1::ListSitesResponse>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
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
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
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
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        let hosts = self.hosts()?.into_iter().map(|h| self.host_view(h)).collect();
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn list_vms(&self, req: Request<v1::ListVmsRequest>) -> Result<Response<v1::ListVmsResponse>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        Ok(Response::new(InventoryService::<C>::list_vms(self, req.get_ref())?))
    }

    async fn get_vm(&self, req: Request<v1::GetVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        Ok(Response::new(InventoryService::<C>::get_vm(self, req.get_ref())?))
    }

    async fn create_vm(&self, req: Request<v1::CreateVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        Ok(Response::new(InventoryService::<C>::create_vm(self, req.get_ref()).await?))
    }

    async fn delete_vm(&self, req: Request<v1::DeleteVmRequest>) -> Result<Response<v1::DeleteVmResponse>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        InventoryService::<C>::delete_vm(self, req.get_ref()).await?;
        Ok(Response::new(v1::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<v1::StartVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        Ok(Response::new(self.power("start_vm.name", &req.get_ref().name, true).await?))
    }

    async fn stop_vm(&self, req: Request<v1::StopVmRequest>) -> Result<Response<v1::Vm>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        Ok(Response::new(self.power("stop_vm.name", &req.get_ref().name, false).await?))
    }

    async fn reset_host(&self, req: Request<v1::HostRequest>) -> Result<Response<v1::Host>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        let host = self.named_host("reset_host.host", &req.get_ref().host)?;
        let host = hosts::reset(self.state.store(), self.state.revocations(), &host.name)?;
        Ok(Response::new(self.host_view(host)))
    }

    async fn remove_host(&self, req: Request<v1::HostRequest>) -> Result<Response<v1::RemoveHostResponse>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        let host = self.named_host("remove_host.host", &req.get_ref().host)?;
        let serial = hosts::remove(self.state.store(), self.state.revocations(), &host.name)?;
        Ok(Response::new(v1::RemoveHostResponse { revoked_serial: serial.unwrap_or_default() }))
    }

    async fn move_host(&self, req: Request<v1::MoveHostRequest>) -> Result<Response<v1::Host>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        let r = hosts::MoveHostRequest::try_from(req.get_ref()).map_err(InventoryError::from)?;
        let host = self.host_by_name_or_id(&r.host)?;
        let host = hosts::move_host(self.state.store(), &host.name, &r)?;
        Ok(Response::new(self.host_view(host)))
    }

    async fn list_revoked(
        &self,
        req: Request<v1::ListRevokedRequest>,
    ) -> Result<Response<v1::ListRevokedResponse>, Status> {
        authorize(&req, self.state.vault_id(), &[Role::Operator])?;
        let revoked = hosts::revoked(self.state.store(), self.state.revocations()).map_err(InventoryError::from)?;
        Ok(Response::new(v1::ListRevokedResponse { revoked }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create() -> v1::CreateVmRequest {
        v1::CreateVmRequest {
            machine: Default::default(),
            host: "hv1".into(),
            name: "vm1".into(),
            disks: vec![v1::DiskSpec { size_bytes: 1 << 20 }],
            nics: vec![v1::NicSpec { network: "corp".into(), ip: "10.0.0.5".into(), dhcp: false }],
            start: true,
        }
    }

    fn refused(r: &v1::CreateVmRequest) -> String {
        let e = CreateVmRequest::try_from(r).expect_err("refused");
        let status = Status::from(InventoryError::from(e.clone()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(e.field()), "{}", status.message());
        e.field().to_owned()
    }

    #[test]
    fn create_vm_converts() {
        let req = CreateVmRequest::try_from(&create()).expect("valid");
        assert_eq!(req.name, "vm1");
        assert_eq!(req.nics[0].ip, Some(std::net::Ipv4Addr::new(10, 0, 0, 5)));
        let Command::CreateVm(c) = req.command() else { panic!("not a CreateVm") };
        assert_eq!(
            (c.name.as_str(), c.disk_sizes.as_slice(), c.nics[0].network.as_str()),
            ("vm1", &[1 << 20][..], "corp")
        );
        assert!(c.start);
    }

    /// A path-traversal or malformed value in every name field of every request.
    #[test]
    fn hostile_values_are_refused_naming_the_field() {
        for bad in ["../etc", "a/b", ".", "x".repeat(70).as_str()] {
            let mut r = create();
            r.name = bad.into();
            assert_eq!(refused(&r), "create_vm.name");
            let mut r = create();
            r.host = bad.into();
            // 70 chars is a valid host id (ids are up to 80): only the others are hostile.
            if bad.len() < 64 {
                assert_eq!(refused(&r), "create_vm.host");
            }
            let mut r = create();
            r.nics[0].network = bad.into();
            assert_eq!(refused(&r), "create_vm.nics[0].network");
            let mut r = create();
            r.nics[0].network = String::new();
            assert_eq!(refused(&r), "create_vm.nics[0].network", "a NIC names its network");
            for field in ["get_vm.name", "delete_vm.name", "start_vm.name", "stop_vm.name"] {
                let e = wire::field::<VmName>(field, bad).expect_err(bad);
                assert_eq!(e.field(), field);
            }
            let e = wire::optional::<HostId>("list_vms.host", bad);
            assert!(bad.len() > 63 || e.is_err_and(|e| e.field() == "list_vms.host"), "{bad}");
        }
        let mut r = create();
        r.name.clear();
        assert_eq!(refused(&r), "create_vm.name");
        let mut r = create();
        r.disks.clear();
        assert_eq!(refused(&r), "create_vm.disks");
        let mut r = create();
        r.disks[0].size_bytes = 513;
        assert_eq!(refused(&r), "create_vm.disks[0].size_bytes");
        let mut r = create();
        r.nics[0].ip = "10.0.0.300".into();
        assert_eq!(refused(&r), "create_vm.nics[0].ip");
        let mut r = create();
        r.disks = vec![v1::DiskSpec { size_bytes: 512 }; MAX_DISKS + 1];
        assert_eq!(refused(&r), "create_vm.disks");
    }

    #[test]
    fn errors_map_to_their_codes() {
        let vm: VmName = "vm1".parse().expect("name");
        assert_eq!(Status::from(InventoryError::UnknownVm(vm.clone())).code(), tonic::Code::NotFound);
        assert_eq!(Status::from(InventoryError::VmExists(vm)).code(), tonic::Code::AlreadyExists);
        assert_eq!(Status::from(InventoryError::UnknownHost("x".into())).code(), tonic::Code::NotFound);
        let e = CommandError::NotConnected("hv1".into());
        assert_eq!(Status::from(InventoryError::Agent(e)).code(), tonic::Code::Unavailable);
        assert_eq!(Status::from(InventoryError::NoVmReturned).code(), tonic::Code::Internal);
    }
}
