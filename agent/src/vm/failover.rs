//! VMs started from a recovery point on the replica host: test and failed-over VMs run
//! on copy-on-write overlays until a failover is committed (the replica rolled back to
//! the point, the overlay's writes written into it, its images become the VM's own).

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;

use super::config::{DiskConfig, FailoverConfig, NicConfig, Power, VmConfig, random_mac, read_config, save_config};
use super::entry::Entry;
use super::journal::{self, ChangePointPlan, ChangePointStep, CommitDisk, CommitPlan, CommitStep, Journal, Outcome};
use super::manager::VmManager;
use super::{VmError, io, now_ms};
use crate::machine::MachineConfig;

impl VmManager {
    /// Creates a VM whose disks are copy-on-write overlays over a recovery point of a
    /// replica on this host (a test VM, or a failed-over VM before commit), and starts it.
    pub async fn create_from_point(
        &self,
        name: &VmName,
        disks: &[(String, u64)],
        nics: &[v1::Nic],
        failover: FailoverConfig,
        machine: MachineConfig,
        start: bool,
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
            machine,
        };
        if let Err(e) = save_config(&folder, &config) {
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        vms.insert(name.into(), Entry { config, folder: folder.clone(), running: None });
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if !start {
            return Ok(self.report(entry));
        }
        if let Err(e) = self.start_entry(entry).await {
            vms.remove(name);
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        tracing::info!(vm = %name, "VM started from a recovery point (copy-on-write overlay)");
        Ok(self.report(entry))
    }

    /// Restarts a failed-over VM (not committed) from another point of its replica; the
    /// writes made since the failover are discarded. Journaled (`vm::journal`).
    pub async fn change_point(&self, name: &VmName, point_id: &str) -> Result<v1::Vm, VmError> {
        let name = name.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        let f = match &entry.config.failover {
            Some(f) if !f.committed => f.clone(),
            _ => return Err(VmError::State(format!("VM {name} is not a failed-over VM waiting for commit"))),
        };
        let replica_of = if f.test_of.is_empty() { name.to_owned() } else { f.test_of.clone() };
        let known = VmName::new(replica_of.clone())
            .ok()
            .and_then(|r| self.replicas.get(&r))
            .is_some_and(|r| r.points().iter().any(|p| p.id == point_id));
        if !known {
            return Err(VmError::NotFound(format!("recovery point {point_id} of {replica_of}")));
        }
        self.stop_entry(entry, false).await?;
        let plan = Journal::ChangePoint(ChangePointPlan {
            vm: name.to_owned(),
            replica_of,
            from_point: f.point_id.clone(),
            to_point: point_id.to_owned(),
            overlays: entry.config.disks.iter().map(|d| d.file.clone()).collect(),
            done: ChangePointStep::Planned,
        });
        self.run_journal(entry, Some(plan)).await?;
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %point_id, "failed-over VM restarted from another point");
        Ok(self.report(entry))
    }

    /// Commits a failover: the replica is rolled back to the chosen point, the overlay's
    /// writes are written into it, and its images become the VM's own disks (tracked
    /// from now on); the replica and its other points are gone. Journaled
    /// (`vm::journal`): an interrupted commit is finished at the next agent start, or by
    /// calling this again.
    pub async fn commit(&self, vm: &VmName) -> Result<v1::Vm, VmError> {
        let name = vm.as_str();
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if journal::read(&entry.folder)?.is_some() {
            // An interrupted commit or change-point: finish it first.
            self.stop_entry(entry, false).await?;
            self.run_journal(entry, None).await?;
        }
        let f = match &entry.config.failover {
            Some(f) if f.committed => {
                if entry.running.is_none() && entry.config.power == Power::Running {
                    self.start_entry(entry).await?;
                }
                return Ok(self.report(entry));
            }
            Some(f) if f.kind == siterecovery_proto::model::FailoverKind::Test => {
                return Err(VmError::State(format!("{name} is a test VM: clean it up instead")));
            }
            Some(f) => f.clone(),
            None => return Err(VmError::State(format!("VM {name} was not failed over"))),
        };
        let replica = self.replicas.get(vm).ok_or_else(|| VmError::State(format!("the replica of {name} is gone")))?;
        let images = replica.images();
        let mut disks = Vec::new();
        for d in &entry.config.disks {
            let (_, source) = images
                .iter()
                .find(|(id, _)| *id == d.id)
                .ok_or_else(|| VmError::State(format!("replica has no disk {}", d.id)))?;
            disks.push(CommitDisk {
                id: d.id.clone(),
                size_bytes: d.size_bytes,
                overlay: d.file.clone(),
                source: source.clone(),
                target: format!("{}.img", d.id),
            });
        }
        self.stop_entry(entry, false).await?;
        let plan = Journal::Commit(CommitPlan {
            vm: name.to_owned(),
            point_id: f.point_id.clone(),
            disks,
            done: CommitStep::Planned,
        });
        self.run_journal(entry, Some(plan)).await?;
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %f.point_id, "failover committed; the disks are the VM's own");
        Ok(self.report(entry))
    }

    /// Runs a new journaled operation (`Some`) or the one in the VM folder (`None`) to
    /// its end on a blocking thread, then reloads the VM's config it changed.
    async fn run_journal(&self, entry: &mut Entry, new: Option<Journal>) -> Result<(), VmError> {
        let folder = entry.folder.clone();
        let replicas = self.replicas.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<Option<Outcome>, VmError> {
            match new {
                Some(j) => journal::start(&folder, j, &replicas).map(Some),
                None => match journal::read(&folder)? {
                    Some(j) => journal::resume(&folder, j, &replicas).map(Some),
                    None => Ok(None),
                },
            }
        })
        .await
        .map_err(|e| VmError::State(format!("failover journal: {e}")))??;
        if let Some(outcome) = outcome {
            tracing::info!(vm = %entry.config.name, ?outcome, "failover journal done");
        }
        entry.config = read_config(&entry.folder)?
            .ok_or_else(|| VmError::State(format!("{}: the VM config is gone", entry.folder.display())))?;
        Ok(())
    }
}
