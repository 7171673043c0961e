//! The edge services' view of the provider's shared state: [`AppState`] implements the
//! small context traits of registration, inventory and control, so those modules do
//! not import `api`, `protection` or `failover` (the imports point down to them).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use siterecovery_certs::{VaultCa, VaultId};
use siterecovery_proto::model::{HostId, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::command::CommandError;
use crate::control::{ControlContext, ReplicationReport, Sessions};
use crate::inventory::{HostRecord, InventoryContext, LiveStatus, RelationshipHosts, VmRecord};
use crate::registration::RegistrationContext;
use crate::store::Store;
use crate::trust::Revocations;

impl RegistrationContext for AppState {
    fn vault_id(&self) -> &VaultId {
        &self.vault_id
    }

    fn vault_dir(&self) -> &Path {
        &self.vault_dir
    }

    fn ca(&self) -> &VaultCa {
        &self.ca
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    fn cert_validity(&self) -> Duration {
        self.cert_validity
    }
}

#[tonic::async_trait]
impl InventoryContext for AppState {
    fn vault_id(&self) -> &VaultId {
        &self.vault_id
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    fn live_status(&self, host: &HostId) -> LiveStatus {
        self.sessions.status(host)
    }

    async fn command(&self, host: &HostId, cmd: Command, timeout: Duration) -> Result<v1::CommandResult, CommandError> {
        self.sessions.command(host, cmd, timeout).await
    }

    fn replication_views(&self, hosts: &[HostRecord]) -> HashMap<String, v1::Replication> {
        crate::relationship::replication_views(self, hosts)
    }
}

impl ControlContext for AppState {
    fn vault_id(&self) -> &VaultId {
        &self.vault_id
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    fn ca(&self) -> &VaultCa {
        &self.ca
    }

    fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    fn cert_validity(&self) -> Duration {
        self.cert_validity
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn on_inventory(&self, host: &HostRecord, vms: &[VmRecord]) {
        crate::failover::on_inventory(self, host, vms);
    }

    fn on_replication(&self, host: &HostRecord, report: &ReplicationReport) {
        self.protection.on_status(&self.store, host.id.as_str(), &report.status);
    }

    fn relationship_hosts(&self, vm: &VmName) -> Option<RelationshipHosts> {
        self.protection.of_vm(vm.as_str()).map(|r| RelationshipHosts {
            relationship_id: r.id,
            primary_host_id: r.primary_host_id,
            replica_host_id: r.replica_host_id,
        })
    }
}
