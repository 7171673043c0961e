//! Loading, creating, starting, stopping, deleting and releasing VMs, and switching
//! change tracking: everything that changes a VM other than a failover.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::config::{DiskConfig, NicConfig, Power, VmConfig, random_mac, read_config, save_config};
use super::entry::{Disks, Entry, Running};
use super::journal::{self, AdoptDisk, AdoptPlan, AdoptStep, Journal};
use super::manager::{Hooks, VmManager};
use super::{MAX_DISK_SIZE, MAX_SOCKET_PATH, VmError, io, now_ms};
use crate::files::{self, SocketAccess};
use crate::machine::MachineConfig;
use crate::nbd::Exports;
use crate::replica::{ReplicaSet, ReplicaSpec};

impl VmManager {
    /// Loads every VM folder under `dir` and starts those configured as running.
    /// `tcp_exports` is served on `nbd_tcp` by the caller; `access` says who may reach
    /// the VMs' sockets (`dir` and every VM folder get their modes from it, at every
    /// start).
    pub async fn load(
        dir: PathBuf,
        replicas: Arc<ReplicaSet>,
        tcp_exports: Arc<Exports>,
        nbd_tcp: SocketAddr,
        access: SocketAccess,
        hooks: Hooks,
        shutdown: CancellationToken,
    ) -> Result<Self, VmError> {
        access.socket_dir(&dir).map_err(io(&dir))?;
        let mgr = Self {
            dir: dir.clone(),
            replicas,
            handles: std::sync::Mutex::new(BTreeMap::new()),
            vms: Mutex::new(BTreeMap::new()),
            tcp_exports,
            nbd_tcp,
            access,
            hooks,
            shutdown,
        };
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let folder = e.path();
            // Not followed: a VM folder is a directory of its own, never a symlink.
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Err(e) = mgr.access.socket_dir(&folder) {
                tracing::error!(folder = %folder.display(), "skipping VM folder: {e}");
                continue;
            }
            // A damaged config leaves the folder as it is (images and logs untouched) for
            // a person to look at; the VM is not served.
            match read_config(&folder) {
                Ok(Some(cfg)) => found.push((cfg, folder)),
                // No config: an adoption (reprotect) interrupted after it removed `vm.json`
                // is finished (the folder goes); anything else is left alone.
                Ok(None) => {
                    if let Err(e) = mgr.resume_journal(&folder) {
                        tracing::error!(folder = %folder.display(), "interrupted adoption: {e:#}");
                    }
                }
                Err(e) => tracing::error!(folder = %folder.display(), "skipping VM folder: {e}"),
            }
        }
        let mut vms = mgr.vms.lock().await;
        for (config, folder) in found {
            let name = config.name.clone();
            // An interrupted commit or change-point is finished (or undone) before the VM
            // is served; one that cannot finish keeps the VM stopped, its files as they are.
            let (config, resumed) = match mgr.resume_journal(&folder) {
                Ok(Some(c)) => (c, true),
                Ok(None) => (config, true),
                Err(e) => {
                    tracing::error!(vm = %name, folder = %folder.display(), "interrupted failover operation: {e:#}");
                    (config, false)
                }
            };
            let start = resumed && config.power == Power::Running;
            vms.insert(name.clone(), Entry { config, folder, running: None });
            if start {
                let entry = vms.get_mut(&name).ok_or_else(|| VmError::NotFound(name.clone()))?;
                match mgr.start_entry(entry).await {
                    Ok(()) => tracing::info!(vm = %name, "VM started (was running)"),
                    Err(e) => tracing::error!(vm = %name, "cannot start VM: {e:#}"),
                }
            }
        }
        drop(vms);
        Ok(mgr)
    }

    /// Runs the failover journal of `folder` to its end, if there is one; returns the
    /// config as it left it.
    fn resume_journal(&self, folder: &std::path::Path) -> Result<Option<VmConfig>, VmError> {
        let Some(j) = journal::read(folder)? else { return Ok(None) };
        tracing::warn!(folder = %folder.display(), journal = ?j, "finishing an interrupted failover operation");
        let outcome = journal::resume(folder, j, &self.replicas)?;
        tracing::info!(folder = %folder.display(), ?outcome, "interrupted failover operation finished");
        if outcome == journal::Outcome::Adopted {
            return Ok(None);
        }
        let config = read_config(folder)?
            .ok_or_else(|| VmError::State(format!("{}: the VM config is gone", folder.display())))?;
        Ok(Some(config))
    }

    /// Creates a VM folder with sparse disk images; starts it when asked.
    pub async fn create(
        &self,
        name: &VmName,
        disk_sizes: &[u64],
        nics: &[v1::Nic],
        machine: MachineConfig,
        start: bool,
    ) -> Result<v1::Vm, VmError> {
        machine.validate().map_err(VmError::Invalid)?;
        let name = name.as_str();
        if disk_sizes.is_empty() || disk_sizes.len() > 16 {
            return Err(VmError::Invalid("a VM has 1 to 16 disks".into()));
        }
        for &s in disk_sizes {
            if s == 0 || s % 512 != 0 || s > MAX_DISK_SIZE {
                return Err(VmError::Invalid(format!("disk size {s}: a multiple of 512 bytes, at most 64 TiB")));
            }
        }
        let mut vms = self.vms.lock().await;
        let folder = self.dir.join(name);
        if vms.contains_key(name) || folder.exists() {
            return Err(VmError::Exists(name.into()));
        }
        let sock = folder.join("nbd.sock");
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::Invalid(format!(
                "the NBD socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --data-dir",
                sock.display()
            )));
        }
        self.access.socket_dir(&folder).map_err(io(&folder))?;
        let result = (|| {
            let mut disks = Vec::new();
            for (i, &size) in disk_sizes.iter().enumerate() {
                let id = format!("disk{i}");
                let file = format!("{id}.img");
                let path = folder.join(&file);
                let f = files::create_new(&path).map_err(io(&path))?;
                f.set_len(size).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                disks.push(DiskConfig { id, size_bytes: size, file, tracking: false });
            }
            let nics = nics
                .iter()
                .map(|n| NicConfig { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: random_mac() })
                .collect();
            let config = VmConfig {
                name: name.into(),
                created_unix_ms: now_ms(),
                power: Power::Off,
                disks,
                nics,
                failover: None,
                machine,
            };
            save_config(&folder, &config)?;
            Ok(config)
        })();
        let config = match result {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        tracing::info!(vm = %name, disks = disk_sizes.len(), "VM created");
        vms.insert(name.into(), Entry { config, folder, running: None });
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if start {
            self.start_entry(entry).await?;
        }
        Ok(self.report(entry))
    }

    pub async fn start(&self, name: &VmName) -> Result<v1::Vm, VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if entry.running.is_none() {
            self.start_entry(entry).await?;
        }
        Ok(self.report(entry))
    }

    pub async fn stop(&self, name: &VmName) -> Result<v1::Vm, VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        self.stop_entry(entry, true).await?;
        Ok(self.report(entry))
    }

    /// Deletes a stopped or running VM with its folder (images and logs).
    pub async fn delete(&self, name: &VmName) -> Result<(), VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if entry.config.disks.iter().any(|d| d.tracking) {
            return Err(VmError::State(format!("VM {name} is protected; unprotect it before deleting")));
        }
        self.stop_entry(entry, true).await?;
        let folder = entry.folder.clone();
        std::fs::remove_dir_all(&folder).map_err(io(&folder))?;
        vms.remove(name);
        if let Ok(mut h) = self.handles.lock() {
            h.remove(name);
        }
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Switches change tracking on or off for every disk of a VM, durably: the setting
    /// is in `vm.json` and applies at the next start too.
    pub async fn set_tracking(&self, name: &VmName, on: bool) -> Result<(), VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if let Some(Running { disks: Disks::Tracked(disks), .. }) = &entry.running {
            for d in disks {
                d.set_tracking(on)?;
            }
        }
        for d in &mut entry.config.disks {
            d.tracking = on;
        }
        save_config(&entry.folder, &entry.config)?;
        tracing::info!(vm = %name, tracking = on, "change tracking switched");
        Ok(())
    }

    /// Reprotect on the former primary: stops the VM and adopts its images as the
    /// replica `spec` (journaled: `vm::journal::adopt`); the VM is gone afterwards. A
    /// VM already adopted (a crash lost the provider's answer) is taken over by `spec`
    /// while its replica has no points.
    pub async fn adopt_as_replica(&self, name: &VmName, spec: ReplicaSpec) -> Result<(), VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let replica_error = |e: crate::replica::ReplicaError| VmError::State(format!("adopting the disks: {e}"));
        let Some(entry) = vms.get_mut(name) else {
            if self.replicas.get(&VmName::new(name.to_owned()).map_err(|e| VmError::Invalid(e.to_string()))?).is_some()
            {
                self.replicas.readopt(spec).map_err(replica_error)?;
                return Ok(());
            }
            return Err(VmError::NotFound(name.into()));
        };
        self.stop_entry(entry, true).await?;
        let dir = self.replicas.clear_for_adoption(&spec).map_err(replica_error)?;
        let disks = entry
            .config
            .disks
            .iter()
            .map(|d| AdoptDisk {
                id: d.id.clone(),
                source: entry.folder.join(&d.file),
                target: dir.join(format!("{}.img", d.id)),
            })
            .collect();
        let plan = Journal::Adopt(AdoptPlan { vm: name.to_owned(), spec, disks, done: AdoptStep::Planned });
        let (folder, replicas) = (entry.folder.clone(), self.replicas.clone());
        let outcome = tokio::task::spawn_blocking(move || journal::start(&folder, plan, &replicas))
            .await
            .map_err(|e| VmError::State(format!("adoption journal: {e}")))??;
        tracing::info!(vm = %name, ?outcome, "the VM's disks are a replica now");
        vms.remove(name);
        Ok(())
    }

    /// Stops serving every VM for an agent shutdown: logs sealed, disks flushed, but the
    /// configured power state kept so the next start serves them again.
    pub async fn shutdown(&self) {
        let mut vms = self.vms.lock().await;
        for (name, entry) in vms.iter_mut() {
            if let Err(e) = self.stop_entry(entry, false).await {
                tracing::error!(vm = %name, "stopping VM at shutdown: {e:#}");
            }
        }
    }
}
