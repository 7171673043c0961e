//! A VM as the inventory reports it ([`v1::Vm`]): config, power, NBD URIs of the served
//! disks, tracking and allocation.

use std::os::unix::fs::MetadataExt;

use siterecovery_proto::v1;

use super::config::FailoverConfig;
use super::entry::{Disks, Entry};
use super::export_name;
use super::manager::VmManager;

impl VmManager {
    /// Every VM as the inventory reports it.
    pub async fn list(&self) -> Vec<v1::Vm> {
        let vms = self.vms.lock().await;
        vms.values().map(|e| self.report(e)).collect()
    }

    pub(super) fn report(&self, e: &Entry) -> v1::Vm {
        let sock = e.folder.join("nbd.sock");
        let running = e.running.as_ref();
        v1::Vm {
            name: e.config.name.clone(),
            host_id: String::new(),
            host_name: String::new(),
            folder: e.folder.display().to_string(),
            created_unix_ms: e.config.created_unix_ms,
            replication: None,
            failover: e.config.failover.as_ref().map(FailoverConfig::to_proto),
            machine: Some(e.config.machine.to_proto()),
            power_state: if running.is_some() { v1::PowerState::Running } else { v1::PowerState::Off } as i32,
            disks: e
                .config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let path = e.folder.join(&d.file);
                    let export = export_name(&e.config.name, &d.id);
                    let live = running.and_then(|r| match &r.disks {
                        Disks::Tracked(d) => d.get(i),
                        Disks::Overlays { .. } => None,
                    });
                    v1::Disk {
                        id: d.id.clone(),
                        size_bytes: d.size_bytes,
                        image_path: path.display().to_string(),
                        nbd_unix_uri: if running.is_some() {
                            format!("nbd+unix:///{export}?socket={}", sock.display())
                        } else {
                            String::new()
                        },
                        nbd_tcp_uri: if running.is_some() {
                            format!("nbd://{}/{export}", self.nbd_tcp)
                        } else {
                            String::new()
                        },
                        export_name: export,
                        tracking: live.map(|d| d.tracking()).unwrap_or(d.tracking),
                        pending_log_bytes: live.map(|d| d.pending_log_bytes()).unwrap_or(0),
                        allocated_bytes: std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0),
                    }
                })
                .collect(),
            nics: e
                .config
                .nics
                .iter()
                .map(|n| v1::Nic { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: n.mac.clone() })
                .collect(),
        }
    }
}
