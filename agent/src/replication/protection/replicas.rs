//! The replica side of protection: prepare (or adopt) a replica, import an offline
//! copy, list and export recovery points, and start VMs from them (test, planned,
//! unplanned and local failover, change of point, commit, test cleanup).

use siterecovery_proto::model::{FailoverKind, PointKind, PointSelector, VmName};
use siterecovery_proto::v1;

use super::error::joined;
use super::request::{
    ChangePoint, CleanupTestFailover, CommitFailover, Failover, ImportInitial, PrepareReplica, test_vm_name,
};
use super::{PointExport, Protection, ProtectionError};
use crate::offline::{ExportTarget, Manifest, Target, TargetDisk};
use crate::replica::{PointInfo, ReplicaDisk, ReplicaSpec};

/// A point of a replica: its id, the disks (id, size), the VM's machine settings.
type ResolvedPoint = (String, Vec<(String, u64)>, crate::vm::MachineConfig);

impl Protection {
    /// The replica side of a new relationship.
    pub async fn prepare_replica(&self, c: PrepareReplica) -> Result<(), ProtectionError> {
        let PrepareReplica { relationship, vm, primary, disks, settings, adopt_vm_disks, machine } = c;
        let disks =
            disks.into_iter().map(|d| ReplicaDisk { id: d.id.into_string(), size_bytes: d.size_bytes }).collect();
        let spec = ReplicaSpec {
            relationship_id: relationship.into_string(),
            vm: vm.to_string(),
            primary_host_id: primary.into_string(),
            disks,
            retention_ms: settings.retention_ms,
            // One point per hour, as Hyper-V Replica; a short interval (tests, labs)
            // keeps one point per interval bucket so there is something to choose from.
            bucket_ms: if settings.interval_ms < 30_000 { settings.interval_ms.max(1) } else { 3_600_000 },
            machine,
        };
        if spec.disks.is_empty() {
            return Err(ProtectionError::Invalid("a replica needs at least one disk".into()));
        }
        if adopt_vm_disks {
            // Reverse replication: this host's (former primary's) VM becomes the replica.
            self.stop_sender(&vm).await;
            self.vms.adopt_as_replica(&vm, spec).await?;
            tracing::info!(%vm, "former primary's disks adopted as the replica (resync brings them in line)");
            return Ok(());
        }
        let replicas = self.replicas.clone();
        tokio::task::spawn_blocking(move || replicas.prepare(spec)).await.map_err(joined)??;
        Ok(())
    }

    /// Offline initial replication, replica side: verify the export in `c.dir` and copy
    /// it into the prepared replica. Returns the bytes imported.
    pub async fn import_initial(&self, c: ImportInitial) -> Result<u64, ProtectionError> {
        let ImportInitial { relationship: relationship_id, vm, dir } = c;
        let r = self
            .replicas
            .get(&vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        if r.spec().relationship_id != relationship_id.as_str() {
            return Err(ProtectionError::Invalid(format!(
                "the replica of {vm} belongs to relationship {}, not {relationship_id}",
                r.spec().relationship_id,
            )));
        }
        tokio::task::spawn_blocking(move || {
            let manifest = Manifest::read(&dir)?;
            manifest.check(r.spec())?;
            Ok::<_, ProtectionError>(r.import_initial(&dir, &manifest)?)
        })
        .await
        .map_err(joined)?
    }

    pub fn list_points(&self, vm: &VmName) -> Result<Vec<v1::RecoveryPoint>, ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        let points = r.points();
        let last = points.last().map(|p| p.seq);
        Ok(points.iter().map(|p| to_proto(p, Some(p.seq) == last)).collect())
    }

    /// Exports a point read-only over NBD on this host's TCP port; returns the URIs
    /// (one per disk, space-separated) and the point id.
    pub fn export_point(&self, vm: &VmName, point: PointSelector) -> Result<(String, String), ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        self.unexport_point(vm);
        let view = r.open_point(&point.to_string())?;
        let mut names = Vec::new();
        let mut uris = Vec::new();
        for (disk, dev) in &view.disks {
            let name = format!("{vm}-{}-{disk}", view.info.id);
            self.exports.remove(&name);
            self.exports.add(name.clone(), dev.clone())?;
            uris.push(format!("nbd://{}/{name}", self.nbd_tcp));
            names.push(name);
        }
        let id = view.info.id.clone();
        tracing::info!(%vm, point = %id, "recovery point exported read-only");
        if let Ok(mut p) = self.point_exports.lock() {
            p.insert(vm.clone(), PointExport { names, _view: view });
        }
        Ok((uris.join(" "), id))
    }

    pub fn unexport_point(&self, vm: &VmName) -> bool {
        let old = self.point_exports.lock().ok().and_then(|mut p| p.remove(vm.as_str()));
        match old {
            Some(e) => {
                for n in &e.names {
                    self.exports.remove(n);
                }
                true
            }
            None => false,
        }
    }

    fn resolve_point(&self, replica_of: &VmName, point: PointSelector) -> Result<ResolvedPoint, ProtectionError> {
        let r = self
            .replicas
            .get(replica_of)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {replica_of} on this host")))?;
        let points = r.points();
        let p = match point {
            PointSelector::Latest => points.last(),
            PointSelector::LatestAppConsistent => points.iter().rev().find(|p| p.app_consistent),
            PointSelector::Id(id) => points.iter().find(|p| p.seq == id.seq().0),
        }
        .ok_or_else(|| {
            ProtectionError::NotFound(format!("no recovery point {:?} of {replica_of}", point.to_string()))
        })?;
        let disks = r.spec().disks.iter().map(|d| (d.id.clone(), d.size_bytes)).collect();
        Ok((p.id.clone(), disks, r.spec().machine.clone()))
    }

    /// Failover on the replica host (test, planned, unplanned or local).
    pub async fn failover(&self, c: Failover) -> Result<v1::Vm, ProtectionError> {
        let Failover { relationship, vm, point, kind, test_vm, nics } = c;
        let (point_id, disks, machine) = self.resolve_point(&vm, point)?;
        let test = kind == FailoverKind::Test;
        let name = if test { test_vm_name(&vm, test_vm.as_ref())? } else { vm.clone() };
        let fc = crate::vm::FailoverConfig {
            relationship_id: relationship.into_string(),
            point_id: point_id.clone(),
            kind,
            committed: false,
            test_of: if test { vm.to_string() } else { String::new() },
            started_unix_ms: now_ms(),
        };
        // A planned failover is committed at once: the VM starts (its start hook boots the
        // guest) only after the commit, not once before it as well.
        let start = kind != FailoverKind::Planned;
        let created = self.vms.create_from_point(&name, &disks, &nics, fc, machine, start).await?;
        tracing::info!(vm = %name, point = %point_id, %kind, "VM started from a recovery point");
        if kind == FailoverKind::Planned {
            return Ok(self.vms.commit(&name).await?);
        }
        Ok(created)
    }

    pub async fn change_point(&self, c: ChangePoint) -> Result<v1::Vm, ProtectionError> {
        let (point_id, ..) = self.resolve_point(&c.vm, c.point)?;
        Ok(self.vms.change_point(&c.vm, &point_id).await?)
    }

    pub async fn commit_failover(&self, c: CommitFailover) -> Result<v1::Vm, ProtectionError> {
        Ok(self.vms.commit(&c.vm).await?)
    }

    pub async fn cleanup_test_failover(&self, c: CleanupTestFailover) -> Result<(), ProtectionError> {
        let name = test_vm_name(&c.vm, c.test_vm.as_ref())?;
        match self.vms.config(&name).await {
            Some(cfg) if cfg.failover.as_ref().is_some_and(|f| f.kind == FailoverKind::Test) => {
                self.vms.delete(&name).await?;
                Ok(())
            }
            Some(_) => Err(ProtectionError::Invalid(format!("{name} is not a test VM"))),
            None => Ok(()), // already gone
        }
    }

    /// Local failover (the provider may be down): start the VM from a point of its
    /// replica here, as an unplanned failover the provider learns of when it is back.
    pub async fn local_failover(&self, vm: &VmName, point: PointSelector) -> Result<v1::Vm, ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        let relationship = r
            .spec()
            .relationship_id
            .parse()
            .map_err(|e| ProtectionError::Internal(format!("the replica of {vm} names a bad relationship: {e}")))?;
        let c =
            Failover { relationship, vm: vm.clone(), point, kind: FailoverKind::Local, test_vm: None, nics: vec![] };
        self.failover(c).await
    }
}

/// The replica store's spec is what an offline export must fit.
impl ExportTarget for ReplicaSpec {
    fn target(&self) -> Target {
        Target {
            relationship_id: self.relationship_id.clone(),
            vm: self.vm.clone(),
            disks: self.disks.iter().map(|d| TargetDisk { id: d.id.clone(), size_bytes: d.size_bytes }).collect(),
        }
    }
}

fn to_proto(p: &PointInfo, latest: bool) -> v1::RecoveryPoint {
    v1::RecoveryPoint {
        id: p.id.clone(),
        seq: p.seq,
        created_unix_ms: p.created_unix_ms,
        app_consistent: p.app_consistent,
        size_bytes: p.size_bytes,
        kind: if latest {
            PointKind::Latest
        } else if p.app_consistent {
            PointKind::AppConsistent
        } else if p.resync {
            PointKind::Resync
        } else {
            PointKind::Hourly
        }
        .into(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
