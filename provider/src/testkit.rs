//! The fixture the orchestration unit tests share (test builds only): a store with two
//! hosts in clouds `east` and `west`, policy `gold`, VMs on the primary, and a [`Core`]
//! whose agents are [`FakeAgents`] with both hosts connected.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::fake::FakeAgents;
use crate::inventory::{HostRecord, VmRecord};
use crate::jobs::JobRecord;
use crate::policy::PolicyRecord;
use crate::relationship::{Core, ProtectionConfig, ProtectionCore};
use crate::store::{HOSTS, POLICIES, Store, VMS};

/// The primary host's id (`hv-a`, cloud `east`).
pub const PRIMARY: &str = "hv-a-0a0a0a";
/// The replica host's id (`hv-b`, cloud `west`).
pub const REPLICA: &str = "hv-b-0b0b0b";

/// Writes the two hosts and policy `gold` (1 s interval, 1 h retention).
pub fn seed(store: &Store) {
    for (id, name, cloud) in [(PRIMARY, "hv-a", "east"), (REPLICA, "hv-b", "west")] {
        let h: HostRecord = serde_json::from_value(json!({
            "id": id, "name": name, "site": cloud, "cloud": cloud, "address": format!("{name}:7001"),
            "agent_version": "0", "registered_unix_ms": 1,
        }))
        .expect("host");
        store.put(HOSTS, id, &h).expect("put host");
    }
    let policy: PolicyRecord = serde_json::from_value(json!({
        "name": "gold", "interval_ms": 1000, "retention_ms": 3600000, "app_consistent_every_ms": 0,
        "compression": false, "initial_method": "network", "port": 0,
        "resync_window_start_hour": 0, "resync_window_end_hour": 0,
    }))
    .expect("policy");
    store.put(POLICIES, "gold", &policy).expect("put policy");
}

/// Writes VM `name` on the primary, with one 1 MiB disk when `disk`.
pub fn put_vm(store: &Store, name: &str, disk: bool) {
    let disks = if disk {
        json!([{"id": "disk0", "size_bytes": 1048576, "image_path": format!("/vms/{name}/disk0.img"),
                "export_name": format!("{name}-disk0"), "nbd_unix_uri": "", "nbd_tcp_uri": "", "tracking": true,
                "pending_log_bytes": 0, "allocated_bytes": 0}])
    } else {
        json!([])
    };
    let vm: VmRecord = serde_json::from_value(json!({
        "name": name, "host_id": PRIMARY, "folder": format!("/vms/{name}"), "power_state": "running",
        "created_unix_ms": 1, "disks": disks, "nics": [],
    }))
    .expect("vm");
    store.put(VMS, name, &vm).expect("put vm");
}

/// "Starts" the provider on `store`: loads relationships and jobs (returns the jobs to
/// resume) with fake agents, both hosts connected.
pub fn start(store: Store) -> (Arc<Core>, Arc<FakeAgents>, Vec<JobRecord>) {
    start_with(store, ProtectionConfig::for_tests())
}

/// [`start`] with other protection settings (a plan test's scripts directory).
pub fn start_with(store: Store, config: ProtectionConfig) -> (Arc<Core>, Arc<FakeAgents>, Vec<JobRecord>) {
    let (protection, resumed) = ProtectionCore::load(&store, config).expect("load");
    let agents = Arc::new(FakeAgents::default());
    agents.connect(PRIMARY);
    agents.connect(REPLICA);
    let core = Arc::new(Core {
        store: Arc::new(store),
        protection,
        agents: agents.clone(),
        shutdown: CancellationToken::new(),
    });
    (core, agents, resumed)
}
