//! The operator's Protection requests as domain types: each wire message is converted
//! once (`TryFrom`), naming the refused field, before anything reads the store or
//! reaches an agent.

use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, JobId, PointSelector, VmName};
use siterecovery_proto::v1;

/// A request that names one VM (`VmRequest`, `UnprotectRequest`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTarget(pub VmName);

macro_rules! vm_target {
    ($($msg:ty => $field:literal),* $(,)?) => {$(
        impl TryFrom<&$msg> for VmTarget {
            type Error = WireError;
            fn try_from(r: &$msg) -> Result<Self, WireError> {
                wire::field($field, &r.vm).map(Self)
            }
        }
    )*};
}

vm_target!(
    v1::VmRequest => "vm",
    v1::UnprotectRequest => "unprotect.vm",
    v1::ResyncRequest => "resync.vm",
    v1::ListPointsRequest => "list_points.vm",
    v1::UnexportPointRequest => "unexport_point.vm",
);

/// `Protect`: the VM, and the export directory of an offline initial copy (empty for
/// an online one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectVm {
    pub vm: VmName,
    pub export_dir: String,
}

impl TryFrom<&v1::ProtectRequest> for ProtectVm {
    type Error = WireError;
    fn try_from(r: &v1::ProtectRequest) -> Result<Self, WireError> {
        Ok(Self { vm: wire::field("protect.vm", &r.vm)?, export_dir: r.export_dir.trim().to_owned() })
    }
}

/// `ImportInitial`: the VM and the directory holding its export on the replica host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInitial {
    pub vm: VmName,
    pub dir: String,
}

impl TryFrom<&v1::ImportInitialRequest> for ImportInitial {
    type Error = WireError;
    fn try_from(r: &v1::ImportInitialRequest) -> Result<Self, WireError> {
        Ok(Self { vm: wire::field("import_initial.vm", &r.vm)?, dir: r.dir.trim().to_owned() })
    }
}

/// `ExportPoint`: the VM and which point (empty is `latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPoint {
    pub vm: VmName,
    pub point: PointSelector,
}

impl TryFrom<&v1::ExportPointRequest> for ExportPoint {
    type Error = WireError;
    fn try_from(r: &v1::ExportPointRequest) -> Result<Self, WireError> {
        let point =
            if r.point.is_empty() { PointSelector::Latest } else { wire::field("export_point.point", &r.point)? };
        Ok(Self { vm: wire::field("export_point.vm", &r.vm)?, point })
    }
}

/// A request that names one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef(pub JobId);

impl TryFrom<&v1::GetJobRequest> for JobRef {
    type Error = WireError;
    fn try_from(r: &v1::GetJobRequest) -> Result<Self, WireError> {
        wire::field("get_job.id", &r.id).map(Self)
    }
}

/// `UnpairClouds`: the source cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairClouds(pub CloudName);

impl TryFrom<&v1::UnpairCloudsRequest> for UnpairClouds {
    type Error = WireError;
    fn try_from(r: &v1::UnpairCloudsRequest) -> Result<Self, WireError> {
        wire::field("unpair_clouds.source_cloud", &r.source_cloud).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused_naming_the_field() {
        for bad in ["../x", "a/b", "..", ".", ""] {
            let e =
                ProtectVm::try_from(&v1::ProtectRequest { vm: bad.into(), export_dir: String::new() }).expect_err(bad);
            assert_eq!(e.field(), "protect.vm", "{bad:?}");
            let e = VmTarget::try_from(&v1::UnprotectRequest { vm: bad.into() }).expect_err(bad);
            assert_eq!(e.field(), "unprotect.vm");
            let e = VmTarget::try_from(&v1::ResyncRequest { vm: bad.into() }).expect_err(bad);
            assert_eq!(e.field(), "resync.vm");
            let e =
                ImportInitial::try_from(&v1::ImportInitialRequest { vm: bad.into(), dir: "/x".into() }).expect_err(bad);
            assert_eq!(e.field(), "import_initial.vm");
            let e = UnpairClouds::try_from(&v1::UnpairCloudsRequest { source_cloud: bad.into() }).expect_err(bad);
            assert_eq!(e.field(), "unpair_clouds.source_cloud");
            let e = JobRef::try_from(&v1::GetJobRequest { id: bad.into() }).expect_err(bad);
            assert_eq!(e.field(), "get_job.id");
        }
        let e = ExportPoint::try_from(&v1::ExportPointRequest { vm: "vm1".into(), point: "../p1".into() })
            .expect_err("point");
        assert_eq!(e.field(), "export_point.point");
    }

    #[test]
    fn good_requests_convert() {
        let p =
            ProtectVm::try_from(&v1::ProtectRequest { vm: "vm1".into(), export_dir: " /exp ".into() }).expect("valid");
        assert_eq!((p.vm.as_str(), p.export_dir.as_str()), ("vm1", "/exp"));
        let e =
            ExportPoint::try_from(&v1::ExportPointRequest { vm: "vm1".into(), point: String::new() }).expect("valid");
        assert_eq!(e.point, PointSelector::Latest);
        assert_eq!(
            JobRef::try_from(&v1::GetJobRequest { id: "j-000042".into() }).expect("valid").0.as_str(),
            "j-000042"
        );
    }
}
