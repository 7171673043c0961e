//! The failover area's requests in domain types, converted once from the wire: a
//! field that breaks its rule (or a combination the kind does not allow) is refused
//! naming the field.

use siterecovery_proto::model::{PointSelector, VmName, WireError, wire};
use siterecovery_proto::v1;

use super::FailoverType;
use crate::network::TestNetwork;

/// A `Failover` request: which VM, which kind, from which point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailover {
    pub vm: VmName,
    pub kind: FailoverType,
    /// Planned failover always uses the last point the stopped primary shipped.
    pub point: PointSelector,
    /// Test failover only (mapped otherwise).
    pub test_network: TestNetwork,
    /// Unplanned only: try to stop the primary VM first.
    pub shutdown_primary: bool,
}

impl TryFrom<&v1::FailoverRequest> for StartFailover {
    type Error = WireError;

    fn try_from(r: &v1::FailoverRequest) -> Result<Self, WireError> {
        let vm = wire::field("vm", &r.vm)?;
        let kind = FailoverType::from_wire(r.r#type).ok_or(WireError::Enum {
            field: "type".into(),
            value: r.r#type,
            allowed: "test, planned or unplanned",
        })?;
        let point: PointSelector = if r.point.is_empty() {
            PointSelector::Latest
        } else {
            r.point.parse().map_err(|source| WireError::Invalid { field: "point".into(), source })?
        };
        let test_network = TestNetwork::from_wire(r.test_network).ok_or(WireError::Enum {
            field: "test_network".into(),
            value: r.test_network,
            allowed: "mapped, isolated or none",
        })?;
        if kind != FailoverType::Test && r.test_network != 0 {
            return Err(WireError::rule("test_network", "--test-network is for test failover only"));
        }
        if kind == FailoverType::Planned && point != PointSelector::Latest {
            return Err(WireError::rule(
                "point",
                "a planned failover always uses the last point shipped from the stopped primary; --point is for test and unplanned failover",
            ));
        }
        if kind != FailoverType::Unplanned && r.shutdown_primary {
            return Err(WireError::rule("shutdown_primary", "--shutdown-primary is for unplanned failover only"));
        }
        Ok(Self { vm, kind, point, test_network, shutdown_primary: r.shutdown_primary })
    }
}

/// A `ChangePoint` request: the failed-over VM and the point it restarts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePoint {
    pub vm: VmName,
    pub point: PointSelector,
}

impl TryFrom<&v1::ChangePointRequest> for ChangePoint {
    type Error = WireError;

    fn try_from(r: &v1::ChangePointRequest) -> Result<Self, WireError> {
        let vm = wire::field("vm", &r.vm)?;
        // Required here: "latest" would be the point the VM already runs from.
        if r.point.is_empty() {
            return Err(WireError::rule("point", "--point is required (see `points VM`)"));
        }
        let point = wire::field("point", &r.point)?;
        Ok(Self { vm, point })
    }
}

/// The VM of a commit, cleanup or reprotect request.
pub fn vm_of(r: &v1::VmRequest) -> Result<VmName, WireError> {
    wire::field("vm", &r.vm)
}

#[cfg(test)]
mod tests {
    use siterecovery_proto::model::FailoverKind;

    use super::*;

    fn good() -> v1::FailoverRequest {
        v1::FailoverRequest {
            vm: "vm1".into(),
            r#type: FailoverKind::Test.into(),
            point: "p7".into(),
            test_network: v1::TestNetwork::Isolated.into(),
            shutdown_primary: false,
        }
    }

    #[test]
    fn a_failover_request_converts_and_defaults_to_latest_and_mapped() {
        let r = StartFailover::try_from(&good()).expect("valid");
        assert_eq!(r.vm.as_str(), "vm1");
        assert_eq!(r.kind, FailoverType::Test);
        assert_eq!(r.point.to_string(), "p7");
        assert_eq!(r.test_network, TestNetwork::Isolated);
        let r = StartFailover::try_from(&v1::FailoverRequest {
            r#type: FailoverKind::Unplanned.into(),
            point: String::new(),
            test_network: 0,
            shutdown_primary: true,
            ..good()
        })
        .expect("valid");
        assert_eq!((r.point, r.test_network, r.shutdown_primary), (PointSelector::Latest, TestNetwork::Mapped, true));
    }

    #[test]
    fn a_hostile_value_in_each_failover_field_is_refused_naming_it() {
        let cases: Vec<(&str, v1::FailoverRequest)> = vec![
            ("vm", v1::FailoverRequest { vm: "../etc".into(), ..good() }),
            ("vm", v1::FailoverRequest { vm: String::new(), ..good() }),
            ("type", v1::FailoverRequest { r#type: 99, ..good() }),
            ("type", v1::FailoverRequest { r#type: FailoverKind::Local.into(), ..good() }),
            ("point", v1::FailoverRequest { point: "../../p1".into(), ..good() }),
            ("test_network", v1::FailoverRequest { test_network: 42, ..good() }),
            (
                "test_network",
                v1::FailoverRequest { r#type: FailoverKind::Unplanned.into(), point: String::new(), ..good() },
            ),
            ("point", v1::FailoverRequest { r#type: FailoverKind::Planned.into(), test_network: 0, ..good() }),
            ("shutdown_primary", v1::FailoverRequest { shutdown_primary: true, ..good() }),
        ];
        for (field, r) in cases {
            let e = StartFailover::try_from(&r).expect_err(field);
            assert_eq!(e.field(), field, "{r:?}: {e}");
            assert_eq!(crate::error::status(&e).code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn change_point_and_vm_requests_refuse_hostile_fields() {
        let ok =
            ChangePoint::try_from(&v1::ChangePointRequest { vm: "vm1".into(), point: "latest-app-consistent".into() })
                .expect("valid");
        assert_eq!(ok.point, PointSelector::LatestAppConsistent);
        for (field, vm, point) in [("vm", "a/b", "p1"), ("point", "vm1", "p1/../p2"), ("point", "vm1", "")] {
            let e =
                ChangePoint::try_from(&v1::ChangePointRequest { vm: vm.into(), point: point.into() }).expect_err(field);
            assert_eq!(e.field(), field, "{e}");
        }
        assert_eq!(vm_of(&v1::VmRequest { vm: "..".into() }).expect_err("hostile").field(), "vm");
        assert_eq!(vm_of(&v1::VmRequest { vm: "vm1".into() }).expect("valid").as_str(), "vm1");
    }
}
