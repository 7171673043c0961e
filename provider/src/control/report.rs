//! What an agent says on its control stream, converted once into domain types.
//!
//! Every [`v1::AgentMessage`] becomes an [`AgentReport`] before the provider acts on it:
//! names and ids follow their rules, enums are known values. A message that does not
//! convert ends the session with `InvalidArgument` naming the field; nothing of it
//! reaches the store.

use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{HostId, PointId, RelationshipId, SenderState, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;

use crate::inventory::{VmRecord, is_host_port};

/// One message of an agent, converted.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentReport {
    /// First message of a connection.
    Hello {
        agent_version: String,
        listen_address: Option<String>,
    },
    Heartbeat {
        free_bytes: u64,
    },
    /// The host's whole VM list (recorded as owned by the session's host).
    Inventory {
        vms: Vec<VmRecord>,
        free_bytes: u64,
    },
    /// The answer to a command; its VM and points were checked, the message is kept
    /// whole for the command's caller.
    Result(Box<v1::CommandResult>),
    Replication(Box<ReplicationReport>),
    /// A certificate renewal request: the CSR, PEM (its signature is checked by the CA).
    RenewCertificate {
        csr_pem: String,
    },
    /// A message without a body (a newer agent's kind): ignored.
    Empty,
}

/// A replication status, its identifying fields converted. The counters stay in
/// `status` (plain numbers, nothing to validate).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationReport {
    pub relationship_id: RelationshipId,
    pub vm: VmName,
    pub state: SenderState,
    pub last_point: Option<PointId>,
    pub status: v1::ReplicationStatus,
}

impl AgentReport {
    /// Converts a message of the host `host_id` (from its certificate, never from the
    /// message).
    pub fn from_wire(m: v1::AgentMessage, host_id: &HostId) -> Result<Self, WireError> {
        let Some(body) = m.body else { return Ok(Self::Empty) };
        Ok(match body {
            Body::Hello(h) => {
                if !h.listen_address.is_empty() && !is_host_port(&h.listen_address) {
                    return Err(WireError::rule("hello.listen_address", "not HOST:PORT"));
                }
                Self::Hello {
                    agent_version: h.agent_version.chars().take(64).collect(),
                    listen_address: Some(h.listen_address).filter(|a| !a.is_empty()),
                }
            }
            Body::Heartbeat(hb) => Self::Heartbeat { free_bytes: hb.free_bytes },
            Body::Inventory(inv) => Self::Inventory {
                vms: inv
                    .vms
                    .iter()
                    .enumerate()
                    .map(|(i, vm)| VmRecord::from_wire(vm, host_id, &format!("inventory.vms[{i}]")))
                    .collect::<Result<_, _>>()?,
                free_bytes: inv.free_bytes,
            },
            Body::Result(r) => {
                if let Some(vm) = &r.vm {
                    VmRecord::from_wire(vm, host_id, "result.vm")?;
                }
                for (i, p) in r.points.iter().enumerate() {
                    wire::field::<PointId>(&format!("result.points[{i}].id"), &p.id)?;
                }
                Self::Result(Box::new(r))
            }
            Body::Replication(s) => Self::Replication(Box::new(ReplicationReport {
                relationship_id: wire::field("replication.relationship_id", &s.relationship_id)?,
                vm: wire::field("replication.vm", &s.vm)?,
                state: wire::enumeration("replication.state", s.state, SenderState::WORDS)?,
                last_point: match &s.last_point {
                    Some(p) => Some(wire::field("replication.last_point.id", &p.id)?),
                    None => None,
                },
                status: s,
            })),
            Body::RenewCertificate(r) => {
                if r.csr_pem.is_empty() || r.csr_pem.len() > 16 * 1024 {
                    return Err(WireError::rule("renew_certificate.csr_pem", "empty or longer than 16 KiB"));
                }
                Self::RenewCertificate { csr_pem: r.csr_pem }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostId {
        "hv1-abc123".parse().expect("host id")
    }

    fn vm() -> v1::Vm {
        v1::Vm {
            name: "vm1".into(),
            disks: vec![v1::Disk { id: "disk0".into(), size_bytes: 512, ..Default::default() }],
            nics: vec![v1::Nic { network: "corp".into(), ..Default::default() }],
            failover: Some(v1::FailoverInfo {
                relationship_id: "r-0000abcd".into(),
                point_id: "p7".into(),
                kind: v1::FailoverKind::Planned.into(),
                test_of: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn status() -> v1::ReplicationStatus {
        v1::ReplicationStatus {
            relationship_id: "r-0000abcd".into(),
            vm: "vm1".into(),
            state: v1::SenderState::Replicating.into(),
            last_point: Some(v1::RecoveryPoint { id: "p3".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn msg(body: Body) -> v1::AgentMessage {
        v1::AgentMessage { body: Some(body) }
    }

    fn refused(body: Body) -> String {
        let e = AgentReport::from_wire(msg(body), &host()).expect_err("hostile value");
        let status = tonic::Status::from(e.clone());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(e.field()), "{}", status.message());
        e.field().to_owned()
    }

    #[test]
    fn valid_reports_convert() {
        let inv = v1::InventoryReport { vms: vec![vm()], free_bytes: 9 };
        match AgentReport::from_wire(msg(Body::Inventory(inv)), &host()).expect("valid") {
            AgentReport::Inventory { vms, free_bytes } => {
                assert_eq!(free_bytes, 9);
                assert_eq!(vms[0].name, "vm1");
                assert_eq!(vms[0].host_id, host(), "the session's host, not the message's");
                assert_eq!(vms[0].failover.as_ref().map(|f| f.point_id.to_string()), Some("p7".into()));
            }
            other => panic!("{other:?}"),
        }
        match AgentReport::from_wire(msg(Body::Replication(status())), &host()).expect("valid") {
            AgentReport::Replication(r) => {
                assert_eq!(r.state, SenderState::Replicating);
                assert_eq!(r.last_point.map(|p| p.to_string()), Some("p3".into()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(AgentReport::from_wire(v1::AgentMessage { body: None }, &host()), Ok(AgentReport::Empty));
    }

    /// A path-traversal or malformed value in every name/id field of every report.
    #[test]
    fn hostile_values_are_refused_naming_the_field() {
        let hostile = ["../etc", "a/b", "", ".", "x".repeat(100).as_str()].map(str::to_owned);
        type Set = fn(&mut v1::Vm, &str);
        let vm_fields: [(&str, Set); 5] = [
            ("name", |v, s| v.name = s.into()),
            ("disks[0].id", |v, s| v.disks[0].id = s.into()),
            ("failover.relationship_id", |v, s| {
                if let Some(f) = v.failover.as_mut() {
                    f.relationship_id = s.into()
                }
            }),
            ("failover.point_id", |v, s| {
                if let Some(f) = v.failover.as_mut() {
                    f.point_id = s.into()
                }
            }),
            ("nics[0].network", |v, s| v.nics[0].network = s.into()),
        ];
        for bad in &hostile {
            for (field, set) in vm_fields {
                let mut v = vm();
                set(&mut v, bad);
                // An empty NIC network is "not connected", which is valid.
                if field == "nics[0].network" && bad.is_empty() {
                    continue;
                }
                let inv = v1::InventoryReport { vms: vec![vm(), v.clone()], free_bytes: 0 };
                assert_eq!(refused(Body::Inventory(inv)), format!("inventory.vms[1].{field}"), "{bad:?}");
                let result = v1::CommandResult { ok: true, vm: Some(v), ..Default::default() };
                assert_eq!(refused(Body::Result(result)), format!("result.vm.{field}"), "{bad:?}");
            }
            let mut v = vm();
            if let Some(f) = v.failover.as_mut() {
                f.test_of = bad.clone();
            }
            if !bad.is_empty() {
                let inv = v1::InventoryReport { vms: vec![v], free_bytes: 0 };
                assert_eq!(refused(Body::Inventory(inv)), "inventory.vms[0].failover.test_of");
            }
            let points = vec![v1::RecoveryPoint { id: bad.clone(), ..Default::default() }];
            let result = v1::CommandResult { ok: true, points, ..Default::default() };
            assert_eq!(refused(Body::Result(result)), "result.points[0].id");
            let mut s = status();
            s.relationship_id = bad.clone();
            assert_eq!(refused(Body::Replication(s)), "replication.relationship_id");
            let mut s = status();
            s.vm = bad.clone();
            assert_eq!(refused(Body::Replication(s)), "replication.vm");
            let mut s = status();
            s.last_point = Some(v1::RecoveryPoint { id: bad.clone(), ..Default::default() });
            assert_eq!(refused(Body::Replication(s)), "replication.last_point.id");
        }
        let mut v = vm();
        if let Some(f) = v.failover.as_mut() {
            f.kind = 0;
        }
        let inv = v1::InventoryReport { vms: vec![v], free_bytes: 0 };
        assert_eq!(refused(Body::Inventory(inv)), "inventory.vms[0].failover.kind");
        let mut s = status();
        s.state = 99;
        assert_eq!(refused(Body::Replication(s)), "replication.state");
        let hello = v1::Hello { agent_version: "1".into(), listen_address: "no port".into() };
        assert_eq!(refused(Body::Hello(hello)), "hello.listen_address");
    }
}
