//! VMs started from a recovery point on the replica host: test and failed-over VMs run
//! on copy-on-write overlays until a failover is committed (the replica rolled back to
//! the point, the overlay's writes written into it, its images become the VM's own).

use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;

use super::config::{DiskConfig, FailoverConfig, NicConfig, Power, VmConfig, random_mac, save_config};
use super::entry::Entry;
use super::manager::VmManager;
use super::{VmError, io, now_ms};
use crate::disk::BlockDevice;
use crate::overlay::Overlay;

impl VmManager {
    /// Creates a VM whose disks are copy-on-write overlays over a recovery point of a
    /// replica on this host (a test VM, or a failed-over VM before commit), and starts it.
    pub async fn create_from_point(
        &self,
        name: &VmName,
        disks: &[(String, u64)],
        nics: &[v1::Nic],
        failover: FailoverConfig,
    ) -> Result<v1::Vm, VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let folder = self.dir.join(name);
        if vms.contains_key(name) || folder.exists() {
            return Err(VmError::Exists(name.into()));
        }
        self.access.socket_dir(&folder).map_err(io(&folder))?;
        let config = VmConfig {
            name: name.into(),
            created_unix_ms: now_ms(),
            power: Power::Off,
            disks: disks
                .iter()
                .map(|(id, size)| DiskConfig {
                    id: id.clone(),
                    size_bytes: *size,
                    file: format!("{id}.overlay"),
                    tracking: false,
                })
                .collect(),
            nics: nics
                .iter()
                .map(|n| NicConfig {
                    network: n.network.clone(),
                    ip: n.ip.clone(),
                    dhcp: n.dhcp,
                    mac: if n.mac.is_empty() { random_mac() } else { n.mac.clone() },
                })
                .collect(),
            failover: Some(failover),
        };
        if let Err(e) = save_config(&folder, &config) {
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        vms.insert(name.into(), Entry { config, folder: folder.clone(), running: None });
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if let Err(e) = self.start_entry(entry).await {
            vms.remove(name);
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        tracing::info!(vm = %name, "VM started from a recovery point (copy-on-write overlay)");
        Ok(self.report(entry))
    }

    /// Restarts a failed-over VM (not committed) from another point of its replica; the
    /// writes made since the failover are discarded.
    pub async fn change_point(&self, name: &VmName, point_id: &str) -> Result<v1::Vm, VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        match &entry.config.failover {
            Some(f) if !f.committed => {}
            _ => return Err(VmError::State(format!("VM {name} is not a failed-over VM waiting for commit"))),
        }
        self.stop_entry(entry, false).await?;
        for d in &entry.config.disks {
            Overlay::remove_files(&entry.folder.join(&d.file));
        }
        if let Some(f) = &mut entry.config.failover {
            f.point_id = point_id.to_owned();
        }
        save_config(&entry.folder, &entry.config)?;
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %point_id, "failed-over VM restarted from another point");
        Ok(self.report(entry))
    }

    /// Commits a failover: the replica is rolled back to the chosen point, the overlay's
    /// writes are written into it, and its images become the VM's own disks (tracked
    /// from now on); the replica and its other points are gone.
    pub async fn commit(&self, vm: &VmName) -> Result<v1::Vm, VmError> {
        let name = vm.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        let f = match &entry.config.failover {
            Some(f) if f.committed => return Ok(self.report(entry)),
            Some(f) if f.kind == siterecovery_proto::model::FailoverKind::Test => {
                return Err(VmError::State(format!("{name} is a test VM: clean it up instead")));
            }
            Some(f) => f.clone(),
            None => return Err(VmError::State(format!("VM {name} was not failed over"))),
        };
        let replica = self.replicas.get(vm).ok_or_else(|| VmError::State(format!("the replica of {name} is gone")))?;
        self.stop_entry(entry, false).await?;
        let folder = entry.folder.clone();
        let disks = entry.config.disks.clone();
        let point = f.point_id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VmError> {
            replica.rollback_to(&point).map_err(|e| VmError::State(format!("rolling the replica back: {e}")))?;
            let images = replica.images();
            for d in &disks {
                let (_, img_path) = images
                    .iter()
                    .find(|(id, _)| *id == d.id)
                    .ok_or_else(|| VmError::State(format!("replica has no disk {}", d.id)))?;
                let ov_path = folder.join(&d.file);
                let base: Arc<dyn BlockDevice> =
                    Arc::new(crate::disk::RawFile::open(img_path, true).map_err(io(img_path))?);
                let ov = Overlay::open(base, &ov_path)?;
                let img = crate::files::open_existing(img_path, true).map_err(io(img_path))?;
                let mut buf = vec![0u8; crate::overlay::BLOCK as usize];
                for b in ov.written_blocks() {
                    let off = b * crate::overlay::BLOCK;
                    let n = (d.size_bytes - off).min(crate::overlay::BLOCK) as usize;
                    ov.read_overlay_block(b, &mut buf[..n]).map_err(io(&ov_path))?;
                    std::os::unix::fs::FileExt::write_all_at(&img, &buf[..n], off).map_err(io(img_path))?;
                }
                img.sync_all().map_err(io(img_path))?;
                let target = folder.join(format!("{}.img", d.id));
                std::fs::rename(img_path, &target).map_err(io(&target))?;
                Overlay::remove_files(&ov_path);
            }
            Ok(())
        })
        .await
        .map_err(|e| VmError::State(format!("commit: {e}")))??;
        for d in &mut entry.config.disks {
            d.file = format!("{}.img", d.id);
        }
        if let Some(fc) = &mut entry.config.failover {
            fc.committed = true;
        }
        save_config(&entry.folder, &entry.config)?;
        if let Err(e) = self.replicas.remove(vm) {
            tracing::warn!(vm = %name, "removing the committed replica: {e:#}");
        }
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %f.point_id, "failover committed; the disks are the VM's own");
        Ok(self.report(entry))
    }
}
