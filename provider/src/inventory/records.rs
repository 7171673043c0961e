//! The inventory's records, as stored: hosts (at registration) and VMs (as their hosts
//! report them), with their conversions from and to the wire.

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{
    CloudName, DiskId, FailoverKind, HostId, HostName, NetworkName, PointId, RelationshipId, SiteName, VmName,
};
use siterecovery_proto::v1;

use crate::store::empty_is_none;

/// What the provider knows of a host's connection right now (not persisted).
#[derive(Debug, Clone, Default)]
pub struct LiveStatus {
    pub connected: bool,
    pub last_heartbeat_unix_ms: i64,
    pub agent_version: Option<String>,
    pub free_bytes: u64,
}

/// A registered host, as stored (table `hosts`, by name). Change it with one
/// read-modify-write (`Store::update`), never by writing back a copy read earlier: a
/// reset, a move or a renewal in between would be undone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// Identity id in the host's certificate: kept at renewal, fresh at the one
    /// registration a `host reset` allows.
    pub id: HostId,
    pub name: HostName,
    pub site: SiteName,
    pub cloud: CloudName,
    /// host:port of the agent's peer listener.
    pub address: String,
    pub agent_version: String,
    pub registered_unix_ms: i64,
    /// Serial (lowercase hex) of the host's current certificate: the only one a control
    /// session may be opened with. Empty in a store from before: adopted from the
    /// first session.
    #[serde(default)]
    pub cert_serial: String,
    /// Expiry of that certificate.
    #[serde(default)]
    pub cert_not_after_unix_ms: i64,
    /// `host reset` ran: one new registration of this name is allowed.
    #[serde(default)]
    pub reset_pending: bool,
    /// The certificate before the last control-channel renewal, until the renewed one
    /// opens a session: a host that never received or never saved the renewed
    /// certificate (the stream broke, the agent crashed) comes back with this one, and
    /// the record returns to it instead of locking the host out.
    #[serde(default)]
    pub prev_cert_serial: String,
}

impl HostRecord {
    /// Records `cert_pem` as the host's current certificate (serial and expiry).
    pub fn with_certificate(&mut self, cert_pem: &str) -> Result<(), siterecovery_certs::CertError> {
        let serial = siterecovery_certs::live::serial_of_pem(cert_pem)?;
        let (_, not_after) = siterecovery_certs::ca::validity(cert_pem)?;
        self.cert_serial = serial;
        self.cert_not_after_unix_ms = not_after.saturating_mul(1000);
        Ok(())
    }
}

/// The rule of a host's listen address: `HOST:PORT`, port 1-65535, at most 255 bytes.
pub fn is_host_port(a: &str) -> bool {
    a.len() <= 255 && a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

impl HostRecord {
    /// The host as the operator's `ListHosts` shows it, without its live state.
    pub fn to_proto(&self) -> v1::Host {
        v1::Host {
            id: self.id.to_string(),
            name: self.name.to_string(),
            site: self.site.to_string(),
            cloud: self.cloud.to_string(),
            address: self.address.clone(),
            agent_version: self.agent_version.clone(),
            registered_unix_ms: self.registered_unix_ms,
            certificate_serial: self.cert_serial.clone(),
            certificate_expires_unix_ms: self.cert_not_after_unix_ms,
            reset_pending: self.reset_pending,
            ..Default::default()
        }
    }
}

/// Whether a VM runs, as its host last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Off,
    /// The host reported no (or an unknown) state.
    Unknown,
}

impl PowerState {
    /// The wire's value; unspecified and unknown values are `Unknown` (a newer agent
    /// may know more states: the VM is still worth recording).
    pub fn from_wire(v: i32) -> Self {
        match v1::PowerState::try_from(v) {
            Ok(v1::PowerState::Running) => Self::Running,
            Ok(v1::PowerState::Off) => Self::Off,
            _ => Self::Unknown,
        }
    }

    pub fn to_wire(self) -> i32 {
        (match self {
            Self::Running => v1::PowerState::Running,
            Self::Off => v1::PowerState::Off,
            Self::Unknown => v1::PowerState::Unspecified,
        }) as i32
    }
}

/// A VM as last reported by its host (table `vms`, by name). A serde mirror of the
/// proto message: easier to read in the store and in tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub name: VmName,
    /// The host the VM is placed on: written by the provider only (`vm create`, the
    /// failovers it runs), and by a report only of that host or of a failover of the
    /// VM's relationship on its replica host ([`judge_report`]). Never from a message's
    /// own field.
    pub host_id: HostId,
    pub folder: String,
    pub power_state: PowerState,
    pub created_unix_ms: i64,
    pub disks: Vec<DiskRecord>,
    pub nics: Vec<NicRecord>,
    /// Set when the VM was started by a failover on its host.
    #[serde(default)]
    pub failover: Option<FailoverRecord>,
    /// Memory, CPUs, boot settings (records from before them: the defaults).
    #[serde(default)]
    pub machine: super::machine::MachineRecord,
}

/// How a VM on a replica host came to run (from the agent's report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverRecord {
    pub relationship_id: RelationshipId,
    pub point_id: PointId,
    pub kind: FailoverKind,
    pub committed: bool,
    /// For a test VM: the protected VM it is a copy of.
    #[serde(default, with = "empty_is_none")]
    pub test_of: Option<VmName>,
    pub started_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub id: DiskId,
    pub size_bytes: u64,
    pub image_path: String,
    pub export_name: String,
    pub nbd_unix_uri: String,
    pub nbd_tcp_uri: String,
    pub tracking: bool,
    pub pending_log_bytes: u64,
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRecord {
    /// `None`: disconnected (a test VM without network).
    #[serde(with = "empty_is_none")]
    pub network: Option<NetworkName>,
    pub ip: String,
    pub dhcp: bool,
    pub mac: String,
}

impl NicRecord {
    /// A NIC from the wire; `field` names it in errors (`vm.nics[0]`).
    pub fn from_wire(n: &v1::Nic, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            network: wire::optional(&format!("{field}.network"), &n.network)?,
            ip: n.ip.clone(),
            dhcp: n.dhcp,
            mac: n.mac.clone(),
        })
    }

    pub fn to_proto(&self) -> v1::Nic {
        v1::Nic {
            network: self.network.as_ref().map(|n| n.to_string()).unwrap_or_default(),
            ip: self.ip.clone(),
            dhcp: self.dhcp,
            mac: self.mac.clone(),
        }
    }
}

impl FailoverRecord {
    /// A failover from the wire; `field` names it in errors (`vm.failover`).
    pub fn from_wire(f: &v1::FailoverInfo, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            relationship_id: wire::field(&format!("{field}.relationship_id"), &f.relationship_id)?,
            point_id: wire::field(&format!("{field}.point_id"), &f.point_id)?,
            kind: wire::enumeration(&format!("{field}.kind"), f.kind, FailoverKind::WORDS)?,
            committed: f.committed,
            test_of: wire::optional(&format!("{field}.test_of"), &f.test_of)?,
            started_unix_ms: f.started_unix_ms,
        })
    }

    pub fn to_proto(&self) -> v1::FailoverInfo {
        v1::FailoverInfo {
            relationship_id: self.relationship_id.to_string(),
            point_id: self.point_id.to_string(),
            kind: self.kind.into(),
            committed: self.committed,
            test_of: self.test_of.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            started_unix_ms: self.started_unix_ms,
        }
    }
}

impl DiskRecord {
    /// A disk from the wire; `field` names it in errors (`vm.disks[0]`).
    pub fn from_wire(d: &v1::Disk, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            id: wire::field(&format!("{field}.id"), &d.id)?,
            size_bytes: d.size_bytes,
            image_path: d.image_path.clone(),
            export_name: d.export_name.clone(),
            nbd_unix_uri: d.nbd_unix_uri.clone(),
            nbd_tcp_uri: d.nbd_tcp_uri.clone(),
            tracking: d.tracking,
            pending_log_bytes: d.pending_log_bytes,
            allocated_bytes: d.allocated_bytes,
        })
    }

    pub fn to_proto(&self) -> v1::Disk {
        v1::Disk {
            id: self.id.to_string(),
            size_bytes: self.size_bytes,
            image_path: self.image_path.clone(),
            export_name: self.export_name.clone(),
            nbd_unix_uri: self.nbd_unix_uri.clone(),
            nbd_tcp_uri: self.nbd_tcp_uri.clone(),
            tracking: self.tracking,
            pending_log_bytes: self.pending_log_bytes,
            allocated_bytes: self.allocated_bytes,
        }
    }
}

impl VmRecord {
    /// From a host's report; the host id comes from the authenticated session, never
    /// from the message. Errors name the field under `vm`.
    pub fn from_report(vm: &v1::Vm, host_id: &HostId) -> Result<Self, WireError> {
        Self::from_wire(vm, host_id, "vm")
    }

    /// [`VmRecord::from_report`] with the message's place in its parent (`field`,
    /// e.g. `inventory.vms[2]`) for the errors.
    pub fn from_wire(vm: &v1::Vm, host_id: &HostId, field: &str) -> Result<Self, WireError> {
        Ok(Self {
            name: wire::field(&format!("{field}.name"), &vm.name)?,
            host_id: host_id.clone(),
            folder: vm.folder.clone(),
            power_state: PowerState::from_wire(vm.power_state),
            created_unix_ms: vm.created_unix_ms,
            failover: match vm.failover.as_ref() {
                None => None,
                Some(f) => Some(FailoverRecord::from_wire(f, &format!("{field}.failover"))?),
            },
            machine: super::machine::MachineRecord::from_wire(vm.machine.as_ref(), &format!("{field}.machine"))?,
            disks: vm
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskRecord::from_wire(d, &format!("{field}.disks[{i}]")))
                .collect::<Result<_, _>>()?,
            nics: vm
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| NicRecord::from_wire(n, &format!("{field}.nics[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn to_proto(&self, host_name: &str) -> v1::Vm {
        v1::Vm {
            name: self.name.to_string(),
            host_id: self.host_id.to_string(),
            host_name: host_name.to_owned(),
            folder: self.folder.clone(),
            power_state: self.power_state.to_wire(),
            created_unix_ms: self.created_unix_ms,
            replication: None,
            failover: self.failover.as_ref().map(FailoverRecord::to_proto),
            disks: self.disks.iter().map(DiskRecord::to_proto).collect(),
            nics: self.nics.iter().map(NicRecord::to_proto).collect(),
            machine: Some(self.machine.to_proto()),
        }
    }
}

/// The hosts the provider placed a protected VM on: its relationship's primary and
/// replica host (what [`judge_report`] needs to know of protection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationshipHosts {
    pub relationship_id: String,
    pub primary_host_id: String,
    pub replica_host_id: String,
}

/// What becomes of one VM of a host's inventory report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportVerdict {
    /// The VM is placed on the reporting host: its report is recorded.
    Record,
    /// Another copy of a VM placed on this host too (the old primary's stopped copy
    /// after a failover): not recorded, and nothing to log.
    OtherCopy,
    /// Not the reporting host's VM: refused (not recorded) and logged.
    Refused(RefusedReport),
}

/// Why a reported VM was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReport {
    /// No VM of this name was placed anywhere (`vm create` records a VM; a report
    /// never creates one).
    NotPlaced,
    /// The VM is placed on another host that is none of its relationship's hosts.
    OtherHost,
}

impl std::fmt::Display for RefusedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotPlaced => "no VM of this name was created or failed over by the provider",
            Self::OtherHost => "the VM is placed on another host",
        })
    }
}

/// Whether a host's report of a VM may change the stored record of that name.
///
/// Placement is the stored record's `host_id`, written only by the provider: by `vm
/// create` (the VM the agent returned) and by the failovers it runs (the VM the replica
/// host returned). A report may update the record of a VM placed on the reporting host,
/// and never create, move or delete another host's VM — with one exception: the replica
/// host of the VM's relationship reporting a (non-test) failover of that relationship,
/// which an agent may make on its own while the provider is down; between that copy and
/// the stored one the failed-over copy wins, and of two failovers the later
/// ([`report_wins`]). Any other host of the relationship holds a known copy
/// ([`ReportVerdict::OtherCopy`]).
pub fn judge_report(
    stored: Option<&VmRecord>,
    reported: &VmRecord,
    relationship: Option<&RelationshipHosts>,
) -> ReportVerdict {
    let Some(stored) = stored else { return ReportVerdict::Refused(RefusedReport::NotPlaced) };
    if stored.host_id == reported.host_id {
        return ReportVerdict::Record;
    }
    let Some(rel) = relationship else { return ReportVerdict::Refused(RefusedReport::OtherHost) };
    let reporter = reported.host_id.as_str();
    let replica_failover = reporter == rel.replica_host_id
        && reported.failover.as_ref().is_some_and(|f| {
            f.relationship_id.as_str() == rel.relationship_id && f.kind != FailoverKind::Test && f.test_of.is_none()
        });
    if replica_failover && report_wins(stored, reported) {
        ReportVerdict::Record
    } else if reporter == rel.replica_host_id || reporter == rel.primary_host_id {
        ReportVerdict::OtherCopy
    } else {
        ReportVerdict::Refused(RefusedReport::OtherHost)
    }
}

/// Between two hosts' copies of one VM: whether `reported` (another host's) replaces
/// `stored`. After a failover the VM exists on two hosts until reverse replication
/// adopts the old primary's disks: the copy started by a failover wins over one that
/// was not; between two failed-over copies (failback) the later failover wins. Test VMs
/// have their own names and never compete.
pub fn report_wins(stored: &VmRecord, reported: &VmRecord) -> bool {
    if stored.host_id == reported.host_id {
        return true;
    }
    let live = |v: &VmRecord| v.failover.clone().filter(|f| f.kind != FailoverKind::Test && f.test_of.is_none());
    match (live(stored), live(reported)) {
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.started_unix_ms >= a.started_unix_ms,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(host: &str, failover: Option<(&str, i64)>) -> VmRecord {
        VmRecord {
            machine: Default::default(),
            name: "vm1".parse().expect("name"),
            host_id: host.parse().expect("host id"),
            folder: String::new(),
            power_state: PowerState::Running,
            created_unix_ms: 0,
            disks: vec![],
            nics: vec![],
            failover: failover.map(|(kind, t)| FailoverRecord {
                relationship_id: "r-00000001".parse().expect("relationship id"),
                point_id: "p1".parse().expect("point id"),
                kind: FailoverKind::from_word(kind).expect("test kind"),
                committed: true,
                test_of: None,
                started_unix_ms: t,
            }),
        }
    }

    #[test]
    fn the_failed_over_copy_wins() {
        assert!(report_wins(&vm("a", None), &vm("a", None)), "same host");
        assert!(report_wins(&vm("a", None), &vm("b", Some(("planned", 5)))), "failover wins");
        assert!(!report_wins(&vm("b", Some(("planned", 5))), &vm("a", None)), "old primary loses");
        // Failback: the later failover wins.
        assert!(report_wins(&vm("b", Some(("planned", 5))), &vm("a", Some(("planned", 9)))));
        assert!(!report_wins(&vm("a", Some(("planned", 9))), &vm("b", Some(("planned", 5)))));
        // A test copy never competes.
        assert!(report_wins(&vm("b", Some(("test", 5))), &vm("a", None)));
    }

    fn rel(primary: &str, replica: &str) -> RelationshipHosts {
        RelationshipHosts {
            relationship_id: "r-00000001".into(),
            primary_host_id: primary.into(),
            replica_host_id: replica.into(),
        }
    }

    /// A report changes only a VM placed on its host; the replica host of a
    /// relationship may report the failover of that relationship it made itself.
    #[test]
    fn a_report_records_only_the_reporters_vms() {
        use ReportVerdict::{OtherCopy, Record, Refused};
        let ab = rel("a", "b");
        // Placed on the reporter.
        assert_eq!(judge_report(Some(&vm("a", None)), &vm("a", None), None), Record);
        // A report never creates a VM, whoever reports it.
        assert_eq!(judge_report(None, &vm("a", None), Some(&ab)), Refused(RefusedReport::NotPlaced));
        // A host of no relationship of the VM: refused, even with a forged failover.
        assert_eq!(judge_report(Some(&vm("a", None)), &vm("c", None), None), Refused(RefusedReport::OtherHost));
        assert_eq!(
            judge_report(Some(&vm("a", None)), &vm("c", Some(("planned", i64::MAX))), Some(&ab)),
            Refused(RefusedReport::OtherHost)
        );
        // The replica host's local failover of this relationship wins.
        assert_eq!(judge_report(Some(&vm("a", None)), &vm("b", Some(("unplanned", 5))), Some(&ab)), Record);
        // ... but not a failover of another relationship, nor a test copy, nor no failover.
        let mut other = vm("b", Some(("unplanned", 5)));
        if let Some(f) = other.failover.as_mut() {
            f.relationship_id = "r-00000002".parse().expect("id");
        }
        assert_eq!(judge_report(Some(&vm("a", None)), &other, Some(&ab)), OtherCopy);
        assert_eq!(judge_report(Some(&vm("a", None)), &vm("b", Some(("test", 5))), Some(&ab)), OtherCopy);
        assert_eq!(judge_report(Some(&vm("a", None)), &vm("b", None), Some(&ab)), OtherCopy);
        // After a failover to b, the old primary's stopped copy is another copy.
        assert_eq!(judge_report(Some(&vm("b", Some(("planned", 5)))), &vm("a", None), Some(&ab)), OtherCopy);
        // The primary never takes the VM back by a report (failback is the provider's).
        assert_eq!(
            judge_report(Some(&vm("b", Some(("planned", 5)))), &vm("a", Some(("planned", 9))), Some(&ab)),
            OtherCopy
        );
    }

    /// Stored records keep the JSON shape of their string fields; a hostile name in a
    /// stored record does not decode.
    #[test]
    fn records_keep_their_stored_shape() {
        let old = serde_json::json!({
            "name": "vm1", "host_id": "hv-b-0a1b2c", "folder": "/vms/vm1", "power_state": "running",
            "created_unix_ms": 5,
            "disks": [{"id": "disk0", "size_bytes": 512, "image_path": "", "export_name": "", "nbd_unix_uri": "",
                "nbd_tcp_uri": "", "tracking": true, "pending_log_bytes": 0, "allocated_bytes": 0}],
            "nics": [{"network": "", "ip": "", "dhcp": true, "mac": "52:54:00:00:00:01"}],
            "failover": {"relationship_id": "r-0000abcd", "point_id": "p4", "kind": "test", "committed": false,
                "test_of": "vm0", "started_unix_ms": 9}
        });
        let rec: VmRecord = serde_json::from_value(old.clone()).expect("old record");
        assert_eq!(rec.nics[0].network, None);
        assert_eq!(rec.power_state, PowerState::Running);
        assert_eq!(rec.failover.as_ref().and_then(|f| f.test_of.as_ref()).map(|v| v.as_str()), Some("vm0"));
        // A record from before the machine settings gains the defaults (1 GiB, 1 CPU).
        let mut want = old.clone();
        want["machine"] =
            serde_json::json!({"memory_bytes": 1u64 << 30, "cpus": 1, "kernel": "", "initrd": "", "append": ""});
        assert_eq!(serde_json::to_value(&rec).expect("ser"), want);
        for (path, value) in [("name", "../etc"), ("host_id", "a/b")] {
            let mut bad = old.clone();
            bad[path] = value.into();
            assert!(serde_json::from_value::<VmRecord>(bad).is_err(), "{path}");
        }
        let mut bad = old.clone();
        bad["disks"][0]["id"] = "..".into();
        assert!(serde_json::from_value::<VmRecord>(bad).is_err());
        let host = HostRecord {
            id: "hv1-0a1b2c".parse().expect("id"),
            name: "hv1".parse().expect("name"),
            site: "primary".parse().expect("site"),
            cloud: "gold-a".parse().expect("cloud"),
            address: "10.0.0.1:7443".into(),
            agent_version: "0.1".into(),
            registered_unix_ms: 1,
            cert_serial: "0a1b".into(),
            cert_not_after_unix_ms: 2,
            reset_pending: false,
            prev_cert_serial: String::new(),
        };
        let mut json = serde_json::to_value(&host).expect("ser");
        assert_eq!(json["name"], "hv1");
        // A host record from before certificates were tracked loads, with no serial.
        let mut old_host = json.clone();
        for field in ["cert_serial", "cert_not_after_unix_ms", "reset_pending"] {
            old_host.as_object_mut().expect("object").remove(field);
        }
        let old_host: HostRecord = serde_json::from_value(old_host).expect("old host record");
        assert_eq!((old_host.cert_serial.as_str(), old_host.reset_pending), ("", false));
        json["cert_serial"] = "0a1b".into();
        assert_eq!(json["id"], "hv1-0a1b2c");
        assert_eq!(serde_json::from_value::<HostRecord>(json).expect("de"), host);
    }

    #[test]
    fn wire_round_trip() {
        let host: HostId = "hv1-0a1b2c".parse().expect("id");
        let v = vm("hv1-0a1b2c", Some(("unplanned", 3)));
        let back = VmRecord::from_report(&v.to_proto("hv1"), &host).expect("from wire");
        assert_eq!(back, v);
        assert!(is_host_port("10.0.0.1:7443") && is_host_port("[::1]:1"));
        assert!(!is_host_port("10.0.0.1") && !is_host_port(":7443") && !is_host_port("h:0"));
    }

    #[test]
    fn a_certificate_is_recorded_by_serial_and_expiry() {
        let vault = siterecovery_certs::VaultId::generate();
        let ca = siterecovery_certs::VaultCa::create(vault.clone(), "t").expect("ca");
        let id = siterecovery_certs::PeerIdentity::new(vault, siterecovery_certs::Role::Host, "hv1-0a1b2c")
            .expect("identity");
        let names = siterecovery_certs::ca::ServerNames::default();
        let (pem, _) = ca.issue_local(&id, &names, std::time::Duration::from_secs(3600)).expect("cert");
        let mut rec: HostRecord = serde_json::from_value(serde_json::json!({"id": "hv1-0a1b2c", "name": "hv1",
            "site": "primary", "cloud": "gold-a", "address": "10.0.0.1:7443", "agent_version": "0.1",
            "registered_unix_ms": 1}))
        .expect("record");
        rec.with_certificate(&pem).expect("recorded");
        assert_eq!(rec.cert_serial, siterecovery_certs::live::serial_of_pem(&pem).expect("serial"));
        assert_eq!(rec.cert_serial, rec.cert_serial.to_ascii_lowercase());
        let expires = rec.cert_not_after_unix_ms / 1000 - siterecovery_certs::unix_now();
        assert!((3500..=3601).contains(&expires), "{expires}");
        rec.reset_pending = true;
        let p = rec.to_proto();
        assert_eq!(
            (p.certificate_serial.as_str(), p.certificate_expires_unix_ms, p.reset_pending),
            (rec.cert_serial.as_str(), rec.cert_not_after_unix_ms, true)
        );
        assert!(rec.with_certificate("not a certificate").is_err());
    }
}
