//! The replica side of protection: prepare (or adopt) a replica, import an offline
//! copy, list and export recovery points, and start VMs from them (test, planned,
//! unplanned and local failover, change of point, commit, test cleanup).

use siterecovery_proto::model::{FailoverKind, HostId, PointKind, RelationshipId, VmName, wire};
use siterecovery_proto::v1;

use super::error::joined;
use super::{PointExport, Protection, ProtectionError};
use crate::replica::{PointInfo, ReplicaDisk, ReplicaSpec};
use crate::replication::offline::{ExportTarget, Manifest, Target, TargetDisk};

impl Protection {
    /// The replica side of a new relationship.
    pub async fn prepare_replica(&self, c: v1::PrepareReplica) -> Result<(), ProtectionError> {
        let vm: VmName = wire::field("prepare_replica.vm", &c.vm)?;
        let relationship_id: RelationshipId = wire::field("prepare_replica.relationship_id", &c.relationship_id)?;
        let primary: HostId = wire::field("prepare_replica.primary_host_id", &c.primary_host_id)?;
        let mut disks = Vec::new();
        for (i, d) in c.disks.iter().enumerate() {
            let id: siterecovery_proto::model::DiskId = wire::field(&format!("prepare_replica.disks[{i}].id"), &d.id)?;
            disks.push(ReplicaDisk { id: id.into_string(), size_bytes: d.size_bytes });
        }
        let settings = c.settings.unwrap_or_default();
        let spec = ReplicaSpec {
            relationship_id: relationship_id.into_string(),
            vm: vm.to_string(),
            primary_host_id: primary.into_string(),
            disks,
            retention_ms: settings.retention_ms,
            // One point per hour, as Hyper-V Replica; a short interval (tests, labs)
            // keeps one point per interval bucket so there is something to choose from.
            bucket_ms: if settings.interval_ms < 30_000 { settings.interval_ms.max(1) } else { 3_600_000 },
        };
        if spec.disks.is_empty() {
            return Err(ProtectionError::Invalid("a replica needs at least one disk".into()));
        }
        if c.adopt_vm_disks {
            // Reverse replication: this host's (former primary's) VM becomes the replica.
            self.stop_sender(vm.as_str()).await;
            let images = self.vms.release(vm.as_str()).await?;
            let replicas = self.replicas.clone();
            tokio::task::spawn_blocking(move || replicas.adopt(spec, &images)).await.map_err(joined)??;
            self.vms.forget(vm.as_str()).await?;
            tracing::info!(%vm, "former primary's disks adopted as the replica (resync brings them in line)");
            return Ok(());
        }
        let replicas = self.replicas.clone();
        tokio::task::spawn_blocking(move || replicas.prepare(spec)).await.map_err(joined)??;
        Ok(())
    }

    /// Offline initial replication, replica side: verify the export in `c.dir` and copy
    /// it into the prepared replica. Returns the bytes imported.
    pub async fn import_initial(&self, c: v1::ImportInitial) -> Result<u64, ProtectionError> {
        let vm: VmName = wire::field("import_initial.vm", &c.vm)?;
        let relationship_id: RelationshipId = wire::field("import_initial.relationship_id", &c.relationship_id)?;
        let r = self
            .replicas
            .get(vm.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        if r.spec().relationship_id != relationship_id.as_str() {
            return Err(ProtectionError::Invalid(format!(
                "the replica of {vm} belongs to relationship {}, not {relationship_id}",
                r.spec().relationship_id,
            )));
        }
        let dir = std::path::PathBuf::from(&c.dir);
        tokio::task::spawn_blocking(move || {
            let manifest = Manifest::read(&dir)?;
            manifest.check(r.spec())?;
            Ok::<_, ProtectionError>(r.import_initial(&dir, &manifest)?)
        })
        .await
        .map_err(joined)?
    }

    pub fn list_points(&self, vm: &str) -> Result<Vec<v1::RecoveryPoint>, ProtectionError> {
        let vm: VmName = wire::field("list_points.vm", vm)?;
        let r = self
            .replicas
            .get(vm.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        let points = r.points();
        let last = points.last().map(|p| p.seq);
        Ok(points.iter().map(|p| to_proto(p, Some(p.seq) == last)).collect())
    }

    /// Exports a point read-only over NBD on this host's TCP port; returns the URIs
    /// (one per disk, space-separated) and the point id.
    pub fn export_point(&self, vm: &str, point: &str) -> Result<(String, String), ProtectionError> {
        let vm: VmName = wire::field("export_point.vm", vm)?;
        let r = self
            .replicas
            .get(vm.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        self.unexport_point(vm.as_str());
        let view = r.open_point(if point.is_empty() { "latest" } else { point })?;
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
            p.insert(vm.to_string(), PointExport { names, _view: view });
        }
        Ok((uris.join(" "), id))
    }

    pub fn unexport_point(&self, vm: &str) -> bool {
        let old = self.point_exports.lock().ok().and_then(|mut p| p.remove(vm));
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

    fn resolve_point(&self, replica_of: &VmName, point: &str) -> Result<(String, Vec<(String, u64)>), ProtectionError> {
        let r = self
            .replicas
            .get(replica_of.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {replica_of} on this host")))?;
        let points = r.points();
        let p = match point {
            "" | "latest" => points.last(),
            "latest-app-consistent" => points.iter().rev().find(|p| p.app_consistent),
            id => points.iter().find(|p| p.id == id || p.seq.to_string() == id),
        }
        .ok_or_else(|| ProtectionError::NotFound(format!("no recovery point {point:?} of {replica_of}")))?;
        let disks = r.spec().disks.iter().map(|d| (d.id.clone(), d.size_bytes)).collect();
        Ok((p.id.clone(), disks))
    }

    /// Failover on the replica host (test, planned or unplanned).
    pub async fn failover(&self, c: v1::Failover, kind: FailoverKind) -> Result<v1::Vm, ProtectionError> {
        let vm: VmName = wire::field("failover.vm", &c.vm)?;
        let relationship_id: RelationshipId = wire::field("failover.relationship_id", &c.relationship_id)?;
        let test_name: Option<VmName> = wire::optional("failover.test_vm_name", &c.test_vm_name)?;
        let (point_id, disks) = self.resolve_point(&vm, &c.point)?;
        let name = if c.test {
            match test_name {
                Some(n) => n.into_string(),
                None => format!("{vm}-test"),
            }
        } else {
            vm.to_string()
        };
        let fc = crate::vm::FailoverConfig {
            relationship_id: relationship_id.into_string(),
            point_id: point_id.clone(),
            kind,
            committed: false,
            test_of: if c.test { vm.to_string() } else { String::new() },
            started_unix_ms: now_ms(),
        };
        let created = self.vms.create_from_point(&name, &disks, &c.nics, fc).await?;
        tracing::info!(vm = %name, point = %point_id, %kind, "VM started from a recovery point");
        if c.planned {
            return Ok(self.vms.commit(&name).await?);
        }
        Ok(created)
    }

    pub async fn change_point(&self, c: v1::ChangePoint) -> Result<v1::Vm, ProtectionError> {
        let vm: VmName = wire::field("change_point.vm", &c.vm)?;
        let (point_id, _) = self.resolve_point(&vm, &c.point)?;
        Ok(self.vms.change_point(vm.as_str(), &point_id).await?)
    }

    pub async fn commit_failover(&self, c: v1::CommitFailover) -> Result<v1::Vm, ProtectionError> {
        let vm: VmName = wire::field("commit_failover.vm", &c.vm)?;
        Ok(self.vms.commit(vm.as_str()).await?)
    }

    pub async fn cleanup_test_failover(&self, c: v1::CleanupTestFailover) -> Result<(), ProtectionError> {
        let vm: VmName = wire::field("cleanup_test_failover.vm", &c.vm)?;
        let test_name: Option<VmName> = wire::optional("cleanup_test_failover.test_vm_name", &c.test_vm_name)?;
        let name = test_name.map_or_else(|| format!("{vm}-test"), VmName::into_string);
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
    pub async fn local_failover(&self, vm: &str, point: &str) -> Result<v1::Vm, ProtectionError> {
        let name: VmName = wire::field("vm", vm)?;
        let r = self
            .replicas
            .get(name.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {name} on this host")))?;
        let relationship_id = r.spec().relationship_id.clone();
        let c = v1::Failover {
            relationship_id,
            vm: name.into_string(),
            point: point.to_owned(),
            nics: vec![],
            test: false,
            test_vm_name: String::new(),
            planned: false,
        };
        self.failover(c, FailoverKind::Local).await
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
