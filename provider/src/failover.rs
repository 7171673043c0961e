//! Failover orchestration: test, planned and unplanned failover, commit, change of
//! recovery point, cleanup of a test failover, reverse replication (reprotect), and
//! failovers an agent made on its own while the provider was down.
//!
//! Every operation is a job. Refusals (wrong state, host not connected) are checked
//! before the job task starts and returned as the RPC's error (`failed_precondition`
//! for state, `unavailable` for a missing host); the rest runs in a task.
//!
//! Command sequences to the agents:
//! - test: `Failover{test}` to the replica host (a `V-test` VM on an overlay over the
//!   point; replication goes on); cleanup: `CleanupTestFailover` to the replica host.
//! - planned: `PrepareFailover` to the primary host (VM stopped, last log shipped; its
//!   result names the last acknowledged point), `Failover{planned, point}` to the
//!   replica host (committed at once), then a Reverse replication job.
//! - unplanned: optionally `StopVm` to the primary host (best effort), `Failover{point}`
//!   to the replica host; then `ChangePoint` / `CommitFailover` to the replica host.
//! - reprotect: `CommitFailover` to the new primary when not committed yet,
//!   `PrepareReplica{adopt_vm_disks}` to the former primary (its disks become the
//!   replica), `StartReplication{resync_initial}` to the new primary; a new relationship
//!   with the roles swapped replaces the old one.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;
use tonic::Status;

use crate::agents::AgentErrorKind;

use crate::error::store_err;
use crate::inventory::{FailoverRecord as VmFailover, HostRecord, VmRecord};
use crate::jobs::{Claim, JobKind, JobRecord, JobState, now_ms};
use crate::network::{self, NetworkStore, NicIn, Reservation, TestNetwork};
use crate::policy::{self, PolicyRecord};
use crate::relationship::{
    Core, Event, FailoverRecord, InvalidTransition, RelationshipRecord, ReplicationState, StatusRecord,
    TestFailoverRecord, Wait, claim, fail_job, host_name, hosts, progress_detail, protected, relationship_id, save_job,
    wait_step,
};
use crate::store::{POLICIES, VMS};

/// The kind of a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverType {
    Test,
    Planned,
    Unplanned,
}

impl FailoverType {
    /// The wire's `FailoverKind` (local failovers are not requested, only reported).
    pub fn from_wire(v: i32) -> Option<Self> {
        match siterecovery_proto::model::FailoverKind::try_from(v).ok()? {
            siterecovery_proto::model::FailoverKind::Test => Some(Self::Test),
            siterecovery_proto::model::FailoverKind::Planned => Some(Self::Planned),
            siterecovery_proto::model::FailoverKind::Unplanned => Some(Self::Unplanned),
            siterecovery_proto::model::FailoverKind::Local => None,
        }
    }

    pub fn to_wire(self) -> i32 {
        use siterecovery_proto::model::FailoverKind as K;
        i32::from(match self {
            Self::Test => K::Test,
            Self::Planned => K::Planned,
            Self::Unplanned => K::Unplanned,
        })
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "test" => Self::Test,
            "planned" => Self::Planned,
            "unplanned" => Self::Unplanned,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Planned => "planned",
            Self::Unplanned => "unplanned",
        }
    }

    fn job_kind(self) -> JobKind {
        match self {
            Self::Test => JobKind::TestFailover,
            Self::Planned => JobKind::PlannedFailover,
            Self::Unplanned => JobKind::UnplannedFailover,
        }
    }

    fn steps(self) -> &'static [&'static str] {
        match self {
            Self::Test => &TEST_STEPS,
            Self::Planned => &PLANNED_STEPS,
            Self::Unplanned => &UNPLANNED_STEPS,
        }
    }
}

const CHECK: &str = "Check prerequisites";
const START_ON_REPLICA: &str = "Start the VM on the replica host";
const TEST_STEPS: [&str; 2] = [CHECK, "Start the test VM on the replica host"];
const PLANNED_STEPS: [&str; 5] = [
    CHECK,
    "Shut down the primary VM and ship its last changes",
    START_ON_REPLICA,
    "Commit",
    "Start reverse replication",
];
const UNPLANNED_STEPS: [&str; 3] = [CHECK, "Shut down the primary VM (best effort)", START_ON_REPLICA];
const COMMIT_STEPS: [&str; 1] = ["Commit on the replica host"];
const CHANGE_POINT_STEPS: [&str; 1] = ["Restart the VM from another point"];
const CLEANUP_STEPS: [&str; 1] = ["Delete the test VM and its overlay"];
const REPROTECT_STEPS: [&str; 5] = [
    CHECK,
    "Commit failover",
    "Prepare the former primary host as replica (its disks are reused)",
    "Start reverse replication",
    "Resynchronise",
];

/// What a failover is asked to do.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub kind: FailoverType,
    /// `latest` (or empty), `latest-app-consistent` or a point id.
    pub point: String,
    pub test_network: TestNetwork,
    /// Unplanned: try to stop the primary VM first.
    pub shutdown_primary: bool,
    /// Recovery plans: the plan's shutdown step already prepared (planned: the point it
    /// returned) or stopped (unplanned) the primary.
    pub prepared: Option<String>,
}

/// A reservation in one line, for job details and plan scripts.
pub fn describe_reservation(r: &Reservation) -> String {
    let net =
        |n: &Option<siterecovery_proto::model::NetworkName>| n.as_ref().map(|n| n.to_string()).unwrap_or_default();
    let Some(target_network) = &r.target_network else {
        return format!("nic{} {}: {}", r.nic, net(&r.source_network), r.note);
    };
    let (from, to) = if r.dhcp {
        ("dhcp".to_string(), "dhcp".to_string())
    } else {
        (if r.source_ip.is_empty() { "-".into() } else { r.source_ip.clone() }, r.target_ip.clone())
    };
    format!("nic{} {} {from} → {target_network} {to} ({})", r.nic, net(&r.source_network), r.note)
}

/// Reserves target addresses for the NICs of `vm`: addresses of other VMs' NICs and
/// other relationships' reservations are taken.
pub fn reserve_addresses(state: &Core, vm: &VmRecord, _why: Option<&str>) -> Result<Vec<Reservation>, Status> {
    let ns = NetworkStore::new(&state.store);
    let networks = ns.networks().map_err(store_err)?;
    let mappings = ns.mappings().map_err(store_err)?;
    let mut taken: HashMap<siterecovery_proto::model::NetworkName, HashSet<Ipv4Addr>> = HashMap::new();
    for r in state.protection.all().iter().filter(|r| vm.name != r.vm.as_str()) {
        for a in &r.addresses {
            if let (Ok(ip), Some(net)) = (a.target_ip.parse(), &a.target_network) {
                taken.entry(net.clone()).or_default().insert(ip);
            }
        }
    }
    for other in state.store.list::<VmRecord>(VMS).map_err(store_err)?.iter().filter(|v| v.name != vm.name) {
        for n in other.nics.iter().filter(|n| !n.dhcp) {
            if let (Ok(ip), Some(net)) = (n.ip.parse(), &n.network) {
                taken.entry(net.clone()).or_default().insert(ip);
            }
        }
    }
    let nics: Vec<NicIn> =
        vm.nics.iter().map(|n| NicIn { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp }).collect();
    network::plan_addresses(&nics, &networks, &mappings, &mut taken)
        .map_err(|e| Status::failed_precondition(format!("addresses of VM {} at the target site: {e}", vm.name)))
}

fn refuse(vm: &str, e: InvalidTransition, hint: &str) -> Status {
    let hint = if hint.is_empty() { String::new() } else { format!("; {hint}") };
    Status::failed_precondition(format!("VM {vm}: {e}{hint}"))
}

fn connected(state: &Core, host_id: &str) -> bool {
    state.agents.connected(host_id)
}

fn require_connected(state: &Core, hosts: &[HostRecord], host_id: &str, role: &str) -> Result<(), Status> {
    if connected(state, host_id) {
        Ok(())
    } else {
        Err(Status::unavailable(format!("{role} host {} is not connected", host_name(hosts, host_id))))
    }
}

/// Stores the VM an agent returned (it now runs on `host_id`), filling in what a
/// minimal agent leaves out: the NICs it was given and how it came to run.
fn record_vm(
    state: &Core,
    res: &v1::CommandResult,
    host_id: &str,
    nics: &[v1::Nic],
    failover: Option<VmFailover>,
) -> Option<VmRecord> {
    let vm = res.vm.as_ref()?;
    let rec = siterecovery_proto::model::HostId::new(host_id)
        .map_err(|source| siterecovery_proto::model::WireError::Invalid { field: "host_id".into(), source })
        .and_then(|host_id| VmRecord::from_report(vm, &host_id));
    let mut rec = match rec {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(vm = %vm.name.chars().take(80).collect::<String>(), "agent returned an invalid VM: {e}");
            return None;
        }
    };
    if rec.nics.is_empty() && !nics.is_empty() {
        match nics
            .iter()
            .enumerate()
            .map(|(i, n)| crate::inventory::NicRecord::from_wire(n, &format!("nics[{i}]")))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(n) => rec.nics = n,
            Err(e) => tracing::warn!(vm = %rec.name, "NICs not recorded: {e}"),
        }
    }
    if rec.failover.is_none() {
        rec.failover = failover;
    }
    if let Err(e) = state.store.put(VMS, &rec.name, &rec) {
        tracing::error!(vm = %rec.name, "cannot record the failed-over VM: {e:#}");
    }
    Some(rec)
}

fn vm_failover(
    rel: &RelationshipRecord,
    kind: FailoverKind,
    point: &str,
    committed: bool,
    test_of: &str,
) -> Option<VmFailover> {
    use siterecovery_proto::model::wire;
    let f = (|| {
        Ok::<_, siterecovery_proto::model::WireError>(VmFailover {
            relationship_id: wire::field("relationship_id", &rel.id)?,
            point_id: wire::field("point_id", point)?,
            kind,
            committed,
            test_of: wire::optional("test_of", test_of)?,
            started_unix_ms: now_ms(),
        })
    })();
    f.map_err(|e| tracing::warn!(vm = %rel.vm, "failover not recorded on the VM: {e}")).ok()
}

fn disks_text(v: Option<&VmRecord>) -> String {
    let Some(v) = v else { return String::new() };
    let uris: Vec<&str> = v
        .disks
        .iter()
        .map(|d| if d.nbd_tcp_uri.is_empty() { d.nbd_unix_uri.as_str() } else { d.nbd_tcp_uri.as_str() })
        .filter(|u| !u.is_empty())
        .collect();
    if uris.is_empty() { String::new() } else { format!("; disks {}", uris.join(" ")) }
}

fn nics_text(nics: &[v1::Nic]) -> String {
    let parts: Vec<String> = nics
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = if n.dhcp {
                "dhcp".to_string()
            } else if n.ip.is_empty() {
                "-".into()
            } else {
                n.ip.clone()
            };
            let net = if n.network.is_empty() { "disconnected" } else { n.network.as_str() };
            format!("nic{i} {net} {addr}")
        })
        .collect();
    if parts.is_empty() { String::new() } else { format!("; {}", parts.join(", ")) }
}

/// Resolves `latest-app-consistent` to a point id on the replica host; other values
/// go to the agent as they are.
async fn resolve_point(state: &Core, rel: &RelationshipRecord, point: &str) -> Result<String, String> {
    match point {
        "" | "latest" => Ok("latest".into()),
        "latest-app-consistent" => {
            let res = state
                .agents
                .command(
                    &rel.replica_host_id,
                    Command::ListPoints(v1::ListPoints { vm: rel.vm.clone() }),
                    state.protection.config.command_timeout,
                )
                .await
                .map_err(|s| format!("replica host: {}", s.message()))?;
            res.points
                .iter()
                .filter(|p| p.app_consistent)
                .max_by_key(|p| (p.created_unix_ms, p.seq))
                .map(|p| p.id.clone())
                .ok_or_else(|| format!("VM {} has no app-consistent recovery point (see `points {}`)", rel.vm, rel.vm))
        }
        id => Ok(id.to_owned()),
    }
}

/// `Failover` RPC.
pub async fn start_failover(state: &Arc<Core>, r: &v1::FailoverRequest) -> Result<JobRecord, Status> {
    let kind = FailoverType::from_wire(r.r#type).ok_or_else(|| {
        Status::invalid_argument(format!("failover type {}: use test, planned or unplanned", r.r#type))
    })?;
    let test_network = TestNetwork::from_wire(r.test_network).ok_or_else(|| {
        Status::invalid_argument(format!("test network {}: use mapped, isolated or none", r.test_network))
    })?;
    if kind != FailoverType::Test && r.test_network != 0 {
        return Err(Status::invalid_argument("--test-network is for test failover only"));
    }
    if kind == FailoverType::Planned && !r.point.is_empty() && r.point != "latest" {
        return Err(Status::invalid_argument(
            "a planned failover always uses the last point shipped from the stopped primary; --point is for test and unplanned failover",
        ));
    }
    if kind != FailoverType::Unplanned && r.shutdown_primary {
        return Err(Status::invalid_argument("--shutdown-primary is for unplanned failover only"));
    }
    let opts = FailoverOptions {
        kind,
        point: r.point.clone(),
        test_network,
        shutdown_primary: r.shutdown_primary,
        prepared: None,
    };
    start_vm_failover(state, &r.vm, opts).await
}

/// Checks that `vm` may fail over as asked, then starts the job.
pub async fn start_vm_failover(state: &Arc<Core>, vm: &str, opts: FailoverOptions) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let hosts = hosts(state)?;
    let primary = host_name(&hosts, &rel.primary_host_id);
    match opts.kind {
        FailoverType::Test => {
            if let Some(t) = &rel.test_failover {
                return Err(Status::failed_precondition(format!(
                    "a test failover of VM {vm} is running (test VM {}, job {}): `failover cleanup {vm}` first",
                    t.test_vm, t.job_id
                )));
            }
            rel.state.next(Event::TestFailover).map_err(|e| refuse(vm, e, ""))?;
        }
        FailoverType::Planned | FailoverType::Unplanned => {
            let planned = opts.kind == FailoverType::Planned;
            if let Some(t) = &rel.test_failover {
                return Err(Status::failed_precondition(format!(
                    "a test failover of VM {vm} is running (test VM {}): `failover cleanup {vm}` first",
                    t.test_vm
                )));
            }
            rel.state.next(Event::FailoverStarted { planned }).map_err(|e| {
                let hint = if planned && !rel.state.in_failover() {
                    format!("a planned failover needs replication running; `failover unplanned {vm}` starts from a recovery point")
                } else {
                    String::new()
                };
                refuse(vm, e, &hint)
            })?;
            if planned && opts.prepared.is_none() && !connected(state, &rel.primary_host_id) {
                return Err(Status::failed_precondition(format!(
                    "primary host {primary} is not connected: a planned failover needs it to stop VM {vm} and ship its last changes; \
                     use `failover unplanned {vm}` (changes since the last recovery point are lost)"
                )));
            }
        }
    }
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job =
        state.protection.jobs.create(&state.store, opts.kind.job_kind(), vm, opts.kind.steps()).map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    job.start_step(CHECK, "", now_ms());
    if opts.kind != FailoverType::Test {
        let planned = opts.kind == FailoverType::Planned;
        if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
            r.state = r.state.next(Event::FailoverStarted { planned })?;
            Ok(())
        }) {
            fail_job(state, &mut job, s.message());
            return Err(Status::new(s.code(), format!("{} (job {})", s.message(), job.id)));
        }
    }
    job.succeed_step(
        CHECK,
        &format!(
            "{} failover of {vm}: primary {primary}, replica {}; replication was {}",
            opts.kind.as_str(),
            host_name(&hosts, &rel.replica_host_id),
            rel.state.as_str()
        ),
        now_ms(),
    );
    save_job(state, &job);
    tokio::spawn(run_failover(state.clone(), job.clone(), rel, opts, claim));
    Ok(job)
}

fn abort(state: &Core, rel_id: &str) {
    if let Err(s) = state.protection.update(&state.store, rel_id, |r| {
        r.state = r.state.next(Event::FailoverAborted)?;
        Ok(())
    }) {
        tracing::warn!(relationship = rel_id, "cannot record the aborted failover: {}", s.message());
    }
}

async fn run_failover(
    state: Arc<Core>,
    mut job: JobRecord,
    rel: RelationshipRecord,
    opts: FailoverOptions,
    claim: Claim,
) {
    let cfg = state.protection.config.clone();
    let hosts = hosts(&state).unwrap_or_default();
    let (pname, rname) = (host_name(&hosts, &rel.primary_host_id), host_name(&hosts, &rel.replica_host_id));
    let vm = rel.vm.clone();
    let macs: Vec<String> = state
        .store
        .get::<VmRecord>(VMS, &vm)
        .ok()
        .flatten()
        .map(|v| v.nics.iter().map(|n| n.mac.clone()).collect())
        .unwrap_or_default();
    let failover_nics: Vec<v1::Nic> = rel
        .addresses
        .iter()
        .map(|r| r.failover_nic(macs.get(r.nic as usize).map(String::as_str).unwrap_or("")))
        .collect();
    match opts.kind {
        FailoverType::Test => {
            let step = TEST_STEPS[1];
            job.start_step(step, &format!("on {rname}"), now_ms());
            save_job(&state, &job);
            let point = match resolve_point(&state, &rel, &opts.point).await {
                Ok(p) => p,
                Err(e) => return fail_job(&state, &mut job, &e),
            };
            let test_vm = format!("{vm}-test");
            let nics = network::test_nics(&rel.addresses, &macs, opts.test_network);
            let cmd = Command::Failover(v1::Failover {
                relationship_id: rel.id.clone(),
                vm: vm.clone(),
                point: point.clone(),
                nics: nics.clone(),
                test: true,
                test_vm_name: test_vm.clone(),
                planned: false,
            });
            let res = match state.agents.command(&rel.replica_host_id, cmd, cfg.command_timeout).await {
                Ok(r) => r,
                Err(s) => return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message())),
            };
            let point_id = reported_point(&res, &point);
            let rec = record_vm(
                &state,
                &res,
                &rel.replica_host_id,
                &nics,
                vm_failover(&rel, FailoverKind::Test, &point_id, false, &vm),
            );
            let job_id = job.id.clone();
            let mode = opts.test_network.as_str();
            let t = TestFailoverRecord {
                test_vm: test_vm.clone(),
                point_id: point_id.clone(),
                network: mode.into(),
                job_id,
                started_unix_ms: now_ms(),
            };
            if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
                r.test_failover = Some(t);
                Ok(())
            }) {
                return fail_job(&state, &mut job, s.message());
            }
            job.succeed_step(
                step,
                &format!(
                    "test VM {test_vm} runs on {rname} from point {point_id} (network {mode}){}{}; replication goes on; \
                     remove it with `failover cleanup {vm}`",
                    nics_text(&nics),
                    disks_text(rec.as_ref())
                ),
                now_ms(),
            );
        }
        FailoverType::Planned => {
            let step = PLANNED_STEPS[1];
            let point = match &opts.prepared {
                Some(p) => {
                    job.start_step(step, "", now_ms());
                    job.succeed_step(step, &format!("done by the plan's shutdown step; last point {p}"), now_ms());
                    p.clone()
                }
                None => {
                    job.start_step(step, &format!("on {pname}"), now_ms());
                    save_job(&state, &job);
                    match prepare_primary(&state, &rel).await {
                        Ok(p) => {
                            job.succeed_step(
                                step,
                                &format!(
                                    "VM {vm} stopped on {pname} (writes refused), every log shipped; last acknowledged point {p}"
                                ),
                                now_ms(),
                            );
                            p
                        }
                        Err(e) => {
                            abort(&state, &rel.id);
                            return fail_job(
                                &state,
                                &mut job,
                                &format!(
                                    "primary host {pname}: {e}; the VM may be stopped there: retry `failover planned {vm}`, \
                                     or `failover unplanned {vm}`"
                                ),
                            );
                        }
                    }
                }
            };
            job.start_step(START_ON_REPLICA, &format!("on {rname} from point {point}"), now_ms());
            save_job(&state, &job);
            // Planned: the primary is drained, so the replica's latest point holds every
            // acknowledged write; asking for it (not the point the primary reported, which
            // a late status could make stale) never goes back in time.
            let cmd = Command::Failover(v1::Failover {
                relationship_id: rel.id.clone(),
                vm: vm.clone(),
                point: "latest".into(),
                nics: failover_nics.clone(),
                test: false,
                test_vm_name: String::new(),
                planned: true,
            });
            let res = match state.agents.command(&rel.replica_host_id, cmd, cfg.command_timeout).await {
                Ok(r) => r,
                Err(s) => {
                    abort(&state, &rel.id);
                    return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message()));
                }
            };
            let point_id = reported_point(&res, &point);
            let rec = record_vm(
                &state,
                &res,
                &rel.replica_host_id,
                &failover_nics,
                vm_failover(&rel, FailoverKind::Planned, &point_id, true, ""),
            );
            job.succeed_step(
                START_ON_REPLICA,
                &format!(
                    "VM {vm} runs on {rname} from point {point_id}{}{}",
                    nics_text(&failover_nics),
                    disks_text(rec.as_ref())
                ),
                now_ms(),
            );
            let step = PLANNED_STEPS[3];
            job.start_step(step, "", now_ms());
            let job_id = job.id.clone();
            if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
                r.state = r.state.next(Event::FailoverDone { committed: true })?;
                r.failover = Some(FailoverRecord {
                    kind: FailoverKind::Planned,
                    point_id: point_id.clone(),
                    job_id,
                    started_unix_ms: now_ms(),
                    committed_unix_ms: now_ms(),
                });
                Ok(())
            }) {
                return fail_job(&state, &mut job, s.message());
            }
            job.succeed_step(step, "committed: no acknowledged write lost", now_ms());
            save_job(&state, &job);
            drop(claim);
            let step = PLANNED_STEPS[4];
            job.start_step(step, "", now_ms());
            let detail = match start_reprotect(&state, &vm).await {
                Ok(j) => format!("job {} ({}): {rname} → {pname}", j.id, j.kind),
                Err(s) => format!("not started: {}; run `reprotect {vm}`", s.message()),
            };
            job.succeed_step(step, &detail, now_ms());
        }
        FailoverType::Unplanned => {
            let step = UNPLANNED_STEPS[1];
            if opts.prepared.is_some() {
                job.skip_step(step, "done by the plan's shutdown step", now_ms());
            } else if !opts.shutdown_primary {
                job.skip_step(step, "not asked (--shutdown-primary)", now_ms());
            } else {
                job.start_step(step, &format!("on {pname}"), now_ms());
                save_job(&state, &job);
                let detail = stop_primary(&state, &rel, &pname).await;
                job.succeed_step(step, &detail, now_ms());
            }
            save_job(&state, &job);
            let point = match resolve_point(&state, &rel, &opts.point).await {
                Ok(p) => p,
                Err(e) => {
                    abort(&state, &rel.id);
                    return fail_job(&state, &mut job, &e);
                }
            };
            job.start_step(START_ON_REPLICA, &format!("on {rname} from point {point}"), now_ms());
            save_job(&state, &job);
            let cmd = Command::Failover(v1::Failover {
                relationship_id: rel.id.clone(),
                vm: vm.clone(),
                point: point.clone(),
                nics: failover_nics.clone(),
                test: false,
                test_vm_name: String::new(),
                planned: false,
            });
            let res = match state.agents.command(&rel.replica_host_id, cmd, cfg.command_timeout).await {
                Ok(r) => r,
                Err(s) => {
                    abort(&state, &rel.id);
                    return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message()));
                }
            };
            let point_id = reported_point(&res, &point);
            let rec = record_vm(
                &state,
                &res,
                &rel.replica_host_id,
                &failover_nics,
                vm_failover(&rel, FailoverKind::Unplanned, &point_id, false, ""),
            );
            let job_id = job.id.clone();
            if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
                r.state = r.state.next(Event::FailoverDone { committed: false })?;
                r.failover = Some(FailoverRecord {
                    kind: FailoverKind::Unplanned,
                    point_id: point_id.clone(),
                    job_id,
                    started_unix_ms: now_ms(),
                    committed_unix_ms: 0,
                });
                Ok(())
            }) {
                return fail_job(&state, &mut job, s.message());
            }
            job.succeed_step(
                START_ON_REPLICA,
                &format!(
                    "VM {vm} runs on {rname} from point {point_id}{}{}; not protected: `failover change-point {vm} --point ID` \
                     or `failover commit {vm}`, then `reprotect {vm}`",
                    nics_text(&failover_nics),
                    disks_text(rec.as_ref())
                ),
                now_ms(),
            );
        }
    }
    job.succeed(now_ms());
    save_job(&state, &job);
    tracing::info!(job = %job.id, vm = %vm, kind = opts.kind.as_str(), "failover done");
}

fn reported_point(res: &v1::CommandResult, asked: &str) -> String {
    res.vm
        .as_ref()
        .and_then(|v| v.failover.as_ref())
        .map(|f| f.point_id.clone())
        .filter(|p| !p.is_empty())
        .or_else(|| res.points.first().map(|p| p.id.clone()))
        .unwrap_or_else(|| asked.to_owned())
}

/// `PrepareFailover` to the primary host; the last point the replica acknowledged.
pub(crate) async fn prepare_primary(state: &Core, rel: &RelationshipRecord) -> Result<String, String> {
    let cmd = Command::PrepareFailover(v1::PrepareFailover { relationship_id: rel.id.clone(), vm: rel.vm.clone() });
    let res = state
        .agents
        .command(&rel.primary_host_id, cmd, state.protection.config.command_timeout)
        .await
        .map_err(|s| s.message().to_owned())?;
    Ok(res.points.first().map(|p| p.id.clone()).filter(|p| !p.is_empty()).unwrap_or_else(|| "latest".into()))
}

/// Best-effort `StopVm` to the primary host; says what happened.
pub(crate) async fn stop_primary(state: &Core, rel: &RelationshipRecord, pname: &str) -> String {
    let timeout = state.protection.config.command_timeout.min(Duration::from_secs(30));
    let cmd = Command::StopVm(v1::StopVm { name: rel.vm.clone() });
    match state.agents.command(&rel.primary_host_id, cmd, timeout).await {
        Ok(_) => format!("VM {} stopped on {pname}", rel.vm),
        Err(s) => format!("could not stop VM {} on {pname} ({}); failover goes on", rel.vm, s.message()),
    }
}

/// `CommitFailover` RPC.
pub async fn start_commit(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    rel.state.next(Event::Committed).map_err(|e| {
        let hint = match rel.state {
            ReplicationState::Committed => "the failover is already committed".to_string(),
            ReplicationState::FailoverInProgress => "wait for the failover job to end".into(),
            _ => format!("VM {vm} has no failover waiting for commit (`failover unplanned {vm}` first)"),
        };
        refuse(vm, e, &hint)
    })?;
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::CommitFailover, vm, &COMMIT_STEPS).map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(COMMIT_STEPS[0], &rname, now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        match commit_on_replica(&state, &rel).await {
            Ok(()) => {
                let point = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
                job.succeed_step(
                    COMMIT_STEPS[0],
                    &format!(
                        "VM {vm} keeps point {point} and the writes since on {rname}; the other recovery points are \
                         discarded; protect it again with `reprotect {vm}`",
                        vm = rel.vm
                    ),
                    now_ms(),
                );
                job.succeed(now_ms());
                save_job(&state, &job);
            }
            Err(e) => fail_job(&state, &mut job, &e),
        }
    });
    Ok(ret)
}

async fn commit_on_replica(state: &Core, rel: &RelationshipRecord) -> Result<(), String> {
    let cmd = Command::CommitFailover(v1::CommitFailover { vm: rel.vm.clone() });
    let res = state
        .agents
        .command(&rel.replica_host_id, cmd, state.protection.config.command_timeout)
        .await
        .map_err(|s| format!("replica host: {}", s.message()))?;
    let point = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
    let kind = rel.failover.as_ref().map_or(FailoverKind::Unplanned, |f| f.kind);
    let nics: Vec<v1::Nic> = Vec::new();
    record_vm(state, &res, &rel.replica_host_id, &nics, vm_failover(rel, kind, &point, true, ""));
    state
        .protection
        .update(&state.store, &rel.id, |r| {
            r.state = r.state.next(Event::Committed)?;
            if let Some(f) = &mut r.failover {
                f.committed_unix_ms = now_ms();
            }
            Ok(())
        })
        .map(|_| ())
        .map_err(|s| s.message().to_owned())
}

/// `ChangePoint` RPC.
pub async fn start_change_point(state: &Arc<Core>, vm: &str, point: &str) -> Result<JobRecord, Status> {
    if point.is_empty() {
        return Err(Status::invalid_argument("--point is required (see `points VM`)"));
    }
    let rel = protected(state, vm)?;
    rel.state.next(Event::PointChanged).map_err(|e| {
        let hint = if rel.state == ReplicationState::Committed {
            "the failover is committed: its recovery point can no longer be changed".to_string()
        } else {
            format!("only a failed-over VM waiting for commit can change its point (`failover unplanned {vm}` first)")
        };
        refuse(vm, e, &hint)
    })?;
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::ChangePoint, vm, &CHANGE_POINT_STEPS).map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(CHANGE_POINT_STEPS[0], &format!("point {point} on {rname}"), now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    let point = point.to_owned();
    tokio::spawn(async move {
        let _claim = claim;
        let point = match resolve_point(&state, &rel, &point).await {
            Ok(p) => p,
            Err(e) => return fail_job(&state, &mut job, &e),
        };
        let cmd = Command::ChangePoint(v1::ChangePoint { vm: rel.vm.clone(), point: point.clone() });
        let res = match state.agents.command(&rel.replica_host_id, cmd, state.protection.config.command_timeout).await {
            Ok(r) => r,
            Err(s) => return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message())),
        };
        let point_id = reported_point(&res, &point);
        let before = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
        let kind = rel.failover.as_ref().map_or(FailoverKind::Unplanned, |f| f.kind);
        record_vm(&state, &res, &rel.replica_host_id, &[], vm_failover(&rel, kind, &point_id, false, ""));
        if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
            r.state = r.state.next(Event::PointChanged)?;
            if let Some(f) = &mut r.failover {
                f.point_id = point_id.clone();
            }
            Ok(())
        }) {
            return fail_job(&state, &mut job, s.message());
        }
        job.succeed_step(
            CHANGE_POINT_STEPS[0],
            &format!(
                "VM {} restarted on {rname} from point {point_id} (was {before}); writes since the failover discarded",
                rel.vm
            ),
            now_ms(),
        );
        job.succeed(now_ms());
        save_job(&state, &job);
    });
    Ok(ret)
}

/// `CleanupTestFailover` RPC.
pub async fn start_cleanup(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let Some(test) = rel.test_failover.clone() else {
        return Err(Status::failed_precondition(format!(
            "VM {vm} has no test failover to clean up (`failover test {vm}` starts one)"
        )));
    };
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job = state
        .protection
        .jobs
        .create(&state.store, JobKind::CleanupTestFailover, vm, &CLEANUP_STEPS)
        .map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(CLEANUP_STEPS[0], &format!("{} on {rname}", test.test_vm), now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let cmd = Command::CleanupTestFailover(v1::CleanupTestFailover {
            vm: rel.vm.clone(),
            test_vm_name: test.test_vm.clone(),
        });
        let note = match state.agents.command(&rel.replica_host_id, cmd, state.protection.config.command_timeout).await
        {
            Ok(_) => String::new(),
            Err(s) if s.kind() == AgentErrorKind::NotFound => format!(" (the host had no such VM: {})", s.message()),
            Err(s) => return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message())),
        };
        if let Err(e) = state.store.delete(VMS, &test.test_vm) {
            tracing::warn!(vm = %test.test_vm, "cannot forget the test VM: {e:#}");
        }
        if let Err(s) = state.protection.update(&state.store, &rel.id, |r| {
            r.test_failover = None;
            Ok(())
        }) {
            return fail_job(&state, &mut job, s.message());
        }
        job.succeed_step(
            CLEANUP_STEPS[0],
            &format!("test VM {} and its overlay removed from {rname}{note}", test.test_vm),
            now_ms(),
        );
        job.succeed(now_ms());
        save_job(&state, &job);
    });
    Ok(ret)
}

/// `Reprotect` RPC: reverse replication after a failover.
pub async fn start_reprotect(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    rel.state.next(Event::Reprotected).map_err(|e| {
        refuse(
            vm,
            e,
            &format!("reverse replication follows a failover (`failover planned {vm}` or `failover unplanned {vm}`)"),
        )
    })?;
    let hosts = hosts(state)?;
    let (new_primary, new_replica) = (rel.replica_host_id.clone(), rel.primary_host_id.clone());
    require_connected(state, &hosts, &new_primary, "new primary (former replica)")?;
    if !connected(state, &new_replica) {
        return Err(Status::unavailable(format!(
            "former primary host {} is not connected: reverse replication reuses its disks",
            host_name(&hosts, &new_replica)
        )));
    }
    let policy = state.store.get::<PolicyRecord>(POLICIES, &rel.policy).map_err(store_err)?.ok_or_else(|| {
        Status::failed_precondition(format!("policy {:?} of VM {vm}'s protection no longer exists", rel.policy))
    })?;
    let vm_rec = state
        .store
        .get::<VmRecord>(VMS, vm)
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found(format!("no VM {vm:?} (see `vm list`)")))?;
    let claim = claim(state, vm)?;
    let mut job = state
        .protection
        .jobs
        .create(&state.store, JobKind::ReverseReplication, vm, &REPROTECT_STEPS)
        .map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    job.total_bytes = vm_rec.disks.iter().map(|d| d.size_bytes).sum();
    job.start_step(CHECK, "", now_ms());
    job.succeed_step(
        CHECK,
        &format!(
            "new primary {}, new replica {} (policy {}); replaces relationship {}",
            host_name(&hosts, &new_primary),
            host_name(&hosts, &new_replica),
            policy.name,
            rel.id
        ),
        now_ms(),
    );
    save_job(state, &job);
    let ret = job.clone();
    tokio::spawn(run_reprotect(state.clone(), job, rel, policy, vm_rec, claim));
    Ok(ret)
}

async fn run_reprotect(
    state: Arc<Core>,
    mut job: JobRecord,
    old: RelationshipRecord,
    policy: PolicyRecord,
    vm: VmRecord,
    claim: Claim,
) {
    let cfg = state.protection.config.clone();
    let hosts = hosts(&state).unwrap_or_default();
    let (new_primary, new_replica) = (old.replica_host_id.clone(), old.primary_host_id.clone());
    let (pname, rname) = (host_name(&hosts, &new_primary), host_name(&hosts, &new_replica));
    let step = REPROTECT_STEPS[1];
    let mut old = old;
    if old.state == ReplicationState::FailedOver {
        job.start_step(step, &pname, now_ms());
        save_job(&state, &job);
        if let Err(e) = commit_on_replica(&state, &old).await {
            return fail_job(&state, &mut job, &e);
        }
        old = state.protection.get(&old.id).unwrap_or(old);
        job.succeed_step(step, "failover committed", now_ms());
    } else {
        job.skip_step(step, "already committed", now_ms());
    }
    save_job(&state, &job);

    let (addresses, note) = match reserve_addresses(&state, &vm, None) {
        Ok(a) => (a, String::new()),
        Err(s) => (vec![], format!("; addresses not reserved: {}", s.message())),
    };
    let mut new = RelationshipRecord {
        id: relationship_id(),
        vm: vm.name.to_string(),
        primary_host_id: new_primary.clone(),
        replica_host_id: new_replica.clone(),
        policy: policy.name.to_string(),
        interval_ms: policy.interval_ms,
        state: ReplicationState::NotEnabled,
        created_unix_ms: now_ms(),
        total_bytes: vm.disks.iter().map(|d| d.size_bytes).sum(),
        status: StatusRecord::default(),
        replicating_since_unix_ms: 0,
        resyncs_completed: 0,
        rate_bytes_per_sec: 0,
        samples: vec![],
        addresses,
        test_failover: None,
        failover: None,
        reversed_from: old.id.clone(),
    };
    new.state = ReplicationState::NotEnabled.next(Event::Enabled).unwrap_or(ReplicationState::WaitingForInitial);
    let restore = |state: &Core, new_id: &str, old: &RelationshipRecord| {
        let _ = state.protection.remove(&state.store, new_id);
        if let Err(e) = state.protection.save(&state.store, old.clone()) {
            tracing::error!(relationship = %old.id, "cannot restore the relationship: {e:#}");
        }
    };
    let step = REPROTECT_STEPS[2];
    job.start_step(step, &rname, now_ms());
    // The old relationship ends; the reversed one takes the VM.
    if let Err(e) = state.protection.remove(&state.store, &old.id) {
        return fail_job(&state, &mut job, &format!("cannot end relationship {}: {e}", old.id));
    }
    if let Err(e) = state.protection.save(&state.store, new.clone()) {
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("cannot record the reversed relationship: {e}"));
    }
    job.relationship_id = new.id.clone();
    save_job(&state, &job);
    let settings = policy::replication_settings(&policy, cfg.test_intervals);
    let prepare = Command::PrepareReplica(v1::PrepareReplica {
        relationship_id: new.id.clone(),
        vm: vm.name.to_string(),
        primary_host_id: new_primary.clone(),
        disks: vm.disks.iter().map(|d| v1::DiskSize { id: d.id.to_string(), size_bytes: d.size_bytes }).collect(),
        settings: Some(settings),
        adopt_vm_disks: true,
    });
    if let Err(s) = state.agents.command(&new_replica, prepare, cfg.command_timeout).await {
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("former primary host {rname} refused: {}", s.message()));
    }
    job.succeed_step(
        step,
        &format!("relationship {}: {pname} → {rname}; {rname} reuses its disks{note}", new.id),
        now_ms(),
    );
    let step = REPROTECT_STEPS[3];
    job.start_step(step, &pname, now_ms());
    save_job(&state, &job);
    let replica_address =
        hosts.iter().find(|h| h.id.as_str() == new_replica).map(|h| h.address.clone()).unwrap_or_default();
    let start = Command::StartReplication(v1::StartReplication {
        relationship_id: new.id.clone(),
        vm: vm.name.to_string(),
        replica_host_id: new_replica.clone(),
        replica_address: replica_address.clone(),
        settings: Some(settings),
        resync_initial: true,
    });
    if let Err(s) = state.agents.command(&new_primary, start, cfg.command_timeout).await {
        // Keep the former primary's disks: they are the VM's older copy.
        let stop = Command::StopReplication(v1::StopReplication {
            relationship_id: new.id.clone(),
            vm: vm.name.to_string(),
            remove_replica: false,
        });
        let _ = state.agents.command(&new_replica, stop, cfg.command_timeout).await;
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("new primary host {pname} refused: {}", s.message()));
    }
    job.succeed_step(step, &format!("{pname} replicating to {rname} ({replica_address}), resync first"), now_ms());
    job.start_step(REPROTECT_STEPS[4], "", now_ms());
    save_job(&state, &job);
    drop(claim);
    let ok = wait_step(&state, &mut job, REPROTECT_STEPS[4], |rel, connected| {
        let s = &rel.status;
        let blocks = format!(
            "{} blocks compared, {} sent (4 KiB sub-blocks), {} on the wire",
            s.resync_blocks_compared,
            s.resync_blocks_sent,
            siterecovery_proto::model::units::human_size(s.resync_wire_bytes)
        );
        match rel.state {
            ReplicationState::Replicating => Wait::Done(format!("reverse replication running: {blocks}")),
            ReplicationState::StoppedOnError => Wait::Failed(if s.error.is_empty() {
                "replication stopped on an error".into()
            } else {
                s.error.clone()
            }),
            _ => Wait::Progress { detail: format!("{}; {blocks}", progress_detail(rel, connected, "compared")) },
        }
    })
    .await;
    if ok {
        job.succeed(now_ms());
        save_job(&state, &job);
        tracing::info!(vm = %vm.name, "reverse replication running");
    }
}

/// Failovers the replica host reports that the provider did not make (an agent failed
/// the VM over on its own while the provider was down, or a failover job was cut by a
/// provider restart): the relationship follows and a job records it.
pub fn on_inventory(state: &Core, host: &HostRecord, vms: &[VmRecord]) {
    for vm in vms {
        let Some(f) = &vm.failover else { continue };
        if f.kind == FailoverKind::Test || f.test_of.is_some() {
            continue;
        }
        let rel = state.protection.get(f.relationship_id.as_str()).or_else(|| state.protection.of_vm(vm.name.as_str()));
        let Some(rel) = rel else { continue };
        if host.id != rel.replica_host_id.as_str() || vm.name != rel.vm.as_str() {
            continue;
        }
        let known = match rel.state {
            ReplicationState::Committed => true,
            ReplicationState::FailedOver => !f.committed,
            _ => false,
        };
        if known || state.protection.busy(vm.name.as_str()) {
            continue;
        }
        let now = now_ms();
        let updated = state.protection.update(&state.store, &rel.id, |r| {
            r.state = r.state.next(Event::LocalFailover { committed: f.committed })?;
            let mut rec = r.failover.clone().unwrap_or(FailoverRecord {
                kind: f.kind,
                point_id: f.point_id.to_string(),
                job_id: String::new(),
                started_unix_ms: if f.started_unix_ms > 0 { f.started_unix_ms } else { now },
                committed_unix_ms: 0,
            });
            rec.point_id = f.point_id.to_string();
            if f.committed && rec.committed_unix_ms == 0 {
                rec.committed_unix_ms = now;
            }
            r.failover = Some(rec);
            Ok(())
        });
        let rel = match updated {
            Ok(r) => r,
            Err(s) => {
                tracing::warn!(vm = %vm.name, "reported failover not applied: {}", s.message());
                continue;
            }
        };
        let step = "Local failover detected";
        let mut job =
            match state.protection.jobs.create(&state.store, JobKind::LocalFailover, vm.name.as_str(), &[step]) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(vm = %vm.name, "cannot record the local failover job: {e:#}");
                    continue;
                }
            };
        job.relationship_id = rel.id.clone();
        job.start_step(step, "", now);
        let next = if f.committed {
            format!("protect it again with `reprotect {}`", vm.name)
        } else {
            format!("`failover commit {}`, then `reprotect {}`", vm.name, vm.name)
        };
        job.succeed_step(
            step,
            &format!(
                "host {} reports VM {} failed over on its own ({} failover from point {}{}); replication is now {}; {next}",
                host.name,
                vm.name,
                f.kind,
                f.point_id,
                if f.committed { ", committed" } else { "" },
                rel.state.as_str()
            ),
            now,
        );
        job.succeed(now);
        save_job(state, &job);
        tracing::warn!(vm = %vm.name, host = %host.name, "local failover detected");
    }
}

/// Waits until job `id` ends; the job as it ended.
pub(crate) async fn wait_job_end(state: &Core, id: &str) -> Option<JobRecord> {
    let mut rx = state.protection.jobs.subscribe();
    loop {
        match state.protection.jobs.get(&state.store, id) {
            Ok(Some(j)) if j.state != JobState::Running => return Some(j),
            Ok(Some(_)) => {}
            _ => return None,
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = state.shutdown.cancelled() => return None,
        }
    }
}

#[cfg(test)]
mod tests;
