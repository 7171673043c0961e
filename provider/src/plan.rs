//! Recovery plans: ordered groups of VMs that fail over together, with scripted and
//! manual actions between groups.
//!
//! A plan run is one job ("Recovery plan failover"). For planned and unplanned
//! failover a shutdown step comes first (planned: `PrepareFailover` on every primary, in
//! parallel, so each VM stops and ships its last log; unplanned: a best-effort `StopVm`).
//! Then the stages in order: actions before the first group (`after_group` 0), each
//! group with its VMs in parallel (each VM is an ordinary failover job, named in the
//! VM's step), then the actions after that group. Group N+1 starts only when every VM
//! of group N is up; a failing VM fails the plan once the rest of its group ended, and
//! a failing or timed-out script fails it at once. Manual actions wait for
//! `plan confirm JOB`.
//!
//! Scripts run on the provider host with a timeout (default 5 minutes) and this
//! environment: `SITERECOVERY_PLAN`, `SITERECOVERY_GROUP` (the group it runs after, 0
//! before the first), `SITERECOVERY_FAILOVER_TYPE` (test, planned, unplanned) and
//! `SITERECOVERY_IP_CHANGES` (one line `VM NIC OLD_IP NEW_IP` per static NIC of the VMs
//! failed over so far). Their stdout and stderr go to the step's detail (at most 64 KiB).
//!
//! Plans are stored as one JSON document in the `meta` table (`recovery_plans`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use siterecovery_certs::identity::is_token;
use siterecovery_proto::v1;
use tonic::Status;

use crate::error::store_err;
use crate::failover::{self, FailoverError, FailoverOptions, FailoverType};
use crate::jobs::{JobKind, JobRecord, JobState, StepState, now_ms};
use crate::network::TestNetwork;
use crate::relationship::{Core, Event, RelationshipRecord, fail_job, host_name, hosts, protected, save_job};
use crate::store::{META, Store, StoreError};

/// `meta` key of the list of plans.
pub const PLANS_KEY: &str = "recovery_plans";
pub const MAX_VMS: usize = 100;
pub const DEFAULT_SCRIPT_TIMEOUT_SECS: u32 = 300;
/// Script output kept in a step's detail.
pub const MAX_OUTPUT: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid plan name {0:?}: use 1-64 of A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    #[error("a plan needs at least one group (--group 1:VM1,VM2)")]
    NoGroups,
    #[error("group numbers start at 1 (got 0)")]
    ZeroGroup,
    #[error("group {0} is given twice")]
    DuplicateGroup(u32),
    #[error("group {0} has no VM")]
    EmptyGroup(u32),
    #[error("VM {0} is in more than one group")]
    DuplicateVm(String),
    #[error("invalid VM name {0:?}")]
    InvalidVm(String),
    #[error("a plan holds at most {MAX_VMS} VMs ({0} given)")]
    TooManyVms(usize),
    #[error("action after group {0}: no such group")]
    UnknownGroup(u32),
    #[error("action kind {0:?}: use script or manual")]
    UnknownKind(String),
    #[error("action after group {0} has no command or text")]
    EmptyAction(u32),
    #[error("script {0:?}: give an absolute path (it runs on the provider host)")]
    RelativeScript(String),
    #[error("plan {0:?} already exists")]
    Exists(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    Script,
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub order: u32,
    pub vms: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// 0 = before the first group.
    pub after_group: u32,
    pub kind: ActionKind,
    /// Script path, or the manual instruction.
    pub command: String,
    pub timeout_secs: u32,
}

/// A recovery plan, as stored. Groups sorted by order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub name: String,
    pub groups: Vec<GroupRecord>,
    pub actions: Vec<ActionRecord>,
}

impl PlanRecord {
    pub fn to_proto(&self) -> v1::RecoveryPlan {
        v1::RecoveryPlan {
            name: self.name.clone(),
            groups: self.groups.iter().map(|g| v1::PlanGroup { order: g.order, vms: g.vms.clone() }).collect(),
            actions: self
                .actions
                .iter()
                .map(|a| v1::PlanAction {
                    after_group: a.after_group,
                    kind: match a.kind {
                        ActionKind::Script => v1::PlanActionKind::Script,
                        ActionKind::Manual => v1::PlanActionKind::Manual,
                    }
                    .into(),
                    command: a.command.clone(),
                    timeout_secs: a.timeout_secs,
                })
                .collect(),
        }
    }

    pub fn vms(&self) -> impl Iterator<Item = &String> {
        self.groups.iter().flat_map(|g| g.vms.iter())
    }
}

/// `--group 1:V1,V2` → (1, [V1, V2]).
pub fn parse_group(s: &str) -> Result<(u32, Vec<String>), String> {
    let (n, vms) = s.split_once(':').ok_or_else(|| format!("--group {s:?}: expected N:VM1,VM2"))?;
    let n: u32 = n.trim().parse().map_err(|_| format!("--group {s:?}: {n:?} is not a group number"))?;
    let vms: Vec<String> = vms.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect();
    if vms.is_empty() {
        return Err(format!("--group {s:?}: no VM"));
    }
    Ok((n, vms))
}

/// `--script 1=PATH` / `--manual 1=TEXT` → (1, PATH).
pub fn parse_action(flag: &str, s: &str) -> Result<(u32, String), String> {
    let (n, rest) = s.split_once('=').ok_or_else(|| format!("--{flag} {s:?}: expected AFTER_GROUP=..."))?;
    let n: u32 = n.trim().parse().map_err(|_| format!("--{flag} {s:?}: {n:?} is not a group number"))?;
    if rest.trim().is_empty() {
        return Err(format!("--{flag} {s:?}: nothing after '='"));
    }
    Ok((n, rest.to_owned()))
}

/// Validates a plan from the wire into its stored form.
pub fn validate(p: &v1::RecoveryPlan) -> Result<PlanRecord, PlanError> {
    if !is_token(&p.name) {
        return Err(PlanError::InvalidName(p.name.clone()));
    }
    if p.groups.is_empty() {
        return Err(PlanError::NoGroups);
    }
    let mut groups: Vec<GroupRecord> = Vec::new();
    let mut seen = HashSet::new();
    for g in &p.groups {
        if g.order == 0 {
            return Err(PlanError::ZeroGroup);
        }
        if groups.iter().any(|x| x.order == g.order) {
            return Err(PlanError::DuplicateGroup(g.order));
        }
        if g.vms.is_empty() {
            return Err(PlanError::EmptyGroup(g.order));
        }
        for v in &g.vms {
            if !is_token(v) {
                return Err(PlanError::InvalidVm(v.clone()));
            }
            if !seen.insert(v.clone()) {
                return Err(PlanError::DuplicateVm(v.clone()));
            }
        }
        groups.push(GroupRecord { order: g.order, vms: g.vms.clone() });
    }
    if seen.len() > MAX_VMS {
        return Err(PlanError::TooManyVms(seen.len()));
    }
    groups.sort_by_key(|g| g.order);
    let mut actions = Vec::new();
    for a in &p.actions {
        if a.after_group != 0 && !groups.iter().any(|g| g.order == a.after_group) {
            return Err(PlanError::UnknownGroup(a.after_group));
        }
        let kind = match v1::PlanActionKind::try_from(a.kind) {
            Ok(v1::PlanActionKind::Script) => ActionKind::Script,
            Ok(v1::PlanActionKind::Manual) => ActionKind::Manual,
            _ => return Err(PlanError::UnknownKind(a.kind.to_string())),
        };
        if a.command.trim().is_empty() {
            return Err(PlanError::EmptyAction(a.after_group));
        }
        if kind == ActionKind::Script && !a.command.starts_with('/') {
            return Err(PlanError::RelativeScript(a.command.clone()));
        }
        let timeout_secs = if a.timeout_secs == 0 { DEFAULT_SCRIPT_TIMEOUT_SECS } else { a.timeout_secs };
        actions.push(ActionRecord { after_group: a.after_group, kind, command: a.command.clone(), timeout_secs });
    }
    // Stable: actions after one group keep the order given.
    actions.sort_by_key(|a| a.after_group);
    Ok(PlanRecord { name: p.name.clone(), groups, actions })
}

/// One stage of a plan run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Group(usize),
    Action { index: usize, step: String },
}

fn action_step(a: &ActionRecord, nth: usize) -> String {
    let when = if a.after_group == 0 {
        "Before the first group".to_string()
    } else {
        format!("After group {}", a.after_group)
    };
    match a.kind {
        ActionKind::Script => format!("{when}, action {nth}: script {}", a.command),
        ActionKind::Manual => format!("{when}, action {nth}: manual action"),
    }
}

fn vm_step(group: u32, vm: &str) -> String {
    format!("Group {group}: {vm}")
}

pub const SHUTDOWN_STEP: &str = "Shut down the primary VMs";

/// The stages of a run, in order.
pub fn stages(p: &PlanRecord) -> Vec<Stage> {
    let mut out = Vec::new();
    let push_actions = |out: &mut Vec<Stage>, after: u32| {
        let mut nth = 0;
        for (i, a) in p.actions.iter().enumerate().filter(|(_, a)| a.after_group == after) {
            nth += 1;
            out.push(Stage::Action { index: i, step: action_step(a, nth) });
        }
    };
    push_actions(&mut out, 0);
    for (gi, g) in p.groups.iter().enumerate() {
        out.push(Stage::Group(gi));
        push_actions(&mut out, g.order);
    }
    out
}

/// The step names of a run's job.
pub fn step_names(p: &PlanRecord, kind: FailoverType) -> Vec<String> {
    let mut names = Vec::new();
    if kind != FailoverType::Test {
        names.push(SHUTDOWN_STEP.to_string());
    }
    for s in stages(p) {
        match s {
            Stage::Group(gi) => {
                let g = &p.groups[gi];
                names.extend(g.vms.iter().map(|v| vm_step(g.order, v)));
            }
            Stage::Action { step, .. } => names.push(step),
        }
    }
    names
}

static WRITE: Mutex<()> = Mutex::new(());

pub fn list(store: &Store) -> Result<Vec<PlanRecord>, StoreError> {
    Ok(store.get(META, PLANS_KEY)?.unwrap_or_default())
}

/// `CreatePlan` RPC.
pub fn create(state: &Core, p: &v1::RecoveryPlan) -> Result<PlanRecord, Status> {
    let rec = validate(p).map_err(plan_status)?;
    let _g = WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let mut all = list(&state.store).map_err(store_err)?;
    if all.iter().any(|x| x.name == rec.name) {
        return Err(plan_status(PlanError::Exists(rec.name)));
    }
    all.push(rec.clone());
    all.sort_by(|a, b| a.name.cmp(&b.name));
    state.store.put(META, PLANS_KEY, &all).map_err(store_err)?;
    Ok(rec)
}

fn plan_status(e: PlanError) -> Status {
    match e {
        PlanError::Exists(_) => Status::already_exists(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// Checks every VM of the plan may fail over as asked; all problems in one message.
fn check_vms(state: &Core, plan: &PlanRecord, kind: FailoverType) -> Result<Vec<RelationshipRecord>, Status> {
    let hosts = hosts(state)?;
    let mut rels = Vec::new();
    let mut problems = Vec::new();
    for vm in plan.vms() {
        let rel = match protected(state, vm) {
            Ok(r) => r,
            Err(s) => {
                problems.push(s.message().to_owned());
                continue;
            }
        };
        let ev = match kind {
            FailoverType::Test => Event::TestFailover,
            FailoverType::Planned => Event::FailoverStarted { planned: true },
            FailoverType::Unplanned => Event::FailoverStarted { planned: false },
        };
        if let Err(e) = rel.state.next(ev) {
            problems.push(format!("VM {vm}: {e}"));
        }
        if rel.test_failover.is_some() {
            problems.push(format!("VM {vm}: a test failover is running (`failover cleanup {vm}` first)"));
        }
        if state.protection.busy(vm) {
            problems.push(format!("VM {vm}: another job is working on it"));
        }
        if kind == FailoverType::Planned && !state.agents.connected(&rel.primary_host_id) {
            problems.push(format!(
                "VM {vm}: primary host {} is not connected (use --type unplanned)",
                host_name(&hosts, &rel.primary_host_id)
            ));
        }
        if !state.agents.connected(&rel.replica_host_id) {
            problems
                .push(format!("VM {vm}: replica host {} is not connected", host_name(&hosts, &rel.replica_host_id)));
        }
        rels.push(rel);
    }
    if problems.is_empty() {
        Ok(rels)
    } else {
        Err(Status::failed_precondition(format!("plan {}: {}", plan.name, problems.join("; "))))
    }
}

/// `PlanFailover` RPC.
pub async fn start_failover(state: &Arc<Core>, name: &str, kind: i32) -> Result<JobRecord, Status> {
    let kind = FailoverType::from_wire(kind)
        .ok_or_else(|| Status::invalid_argument(format!("failover type {kind}: use test, planned or unplanned")))?;
    let plan = list(&state.store)
        .map_err(store_err)?
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Status::not_found(format!("no recovery plan {name:?} (see `plan list`)")))?;
    let rels = check_vms(state, &plan, kind)?;
    let names = step_names(&plan, kind);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let job =
        state.protection.jobs.create(&state.store, JobKind::RecoveryPlan, &plan.name, &refs).map_err(store_err)?;
    let ret = job.clone();
    tokio::spawn(run(state.clone(), job, plan, kind, rels));
    Ok(ret)
}

/// `ConfirmPlanAction` RPC.
pub fn confirm(state: &Core, job_id: &str) -> Result<JobRecord, Status> {
    let job = state
        .protection
        .jobs
        .get(&state.store, job_id)
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found(format!("no job {job_id:?} (see `job list`)")))?;
    let waiting = job.state == JobState::Running
        && job.steps.iter().any(|s| s.state == StepState::Running && s.name.ends_with("manual action"));
    let notify = state.protection.confirms.lock().ok().and_then(|m| m.get(job_id).cloned());
    match notify {
        Some(n) if waiting => {
            n.notify_one();
            Ok(job)
        }
        _ => Err(Status::failed_precondition(format!("job {job_id} is not waiting for a manual action"))),
    }
}

/// `VM NIC OLD NEW` lines of the VMs failed over so far.
pub fn ip_changes(rels: &[RelationshipRecord], done: &HashSet<String>) -> String {
    let mut out = String::new();
    for r in rels.iter().filter(|r| done.contains(&r.vm)) {
        for a in r.addresses.iter().filter(|a| !a.dhcp && !a.target_ip.is_empty()) {
            let old = if a.source_ip.is_empty() { "-" } else { &a.source_ip };
            out.push_str(&format!("{} nic{} {old} {}\n", r.vm, a.nic, a.target_ip));
        }
    }
    out
}

/// Truncates to at most `max` bytes on a char boundary, saying so.
pub fn truncate_output(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[output truncated to {} KiB]", &s[..end], max / 1024)
}

/// Runs a script; Ok(detail) when it exits 0, Err(detail) otherwise.
pub async fn run_script(path: &str, env: &[(&str, String)], timeout: Duration) -> Result<String, String> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(path);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("cannot run {path}: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(format!("{path}: {e}")),
        Err(_) => return Err(format!("{path} timed out after {}s and was killed", timeout.as_secs())),
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        text.push_str("\n[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let text = truncate_output(&text, MAX_OUTPUT);
    let took = format!("{:.1}s", started.elapsed().as_secs_f64());
    if out.status.success() {
        Ok(format!("exit status 0 after {took}\n{text}"))
    } else {
        Err(format!("{path} failed ({}) after {took}\n{text}", out.status))
    }
}

async fn run(
    state: Arc<Core>,
    mut job: JobRecord,
    plan: PlanRecord,
    kind: FailoverType,
    rels: Vec<RelationshipRecord>,
) {
    let hosts = hosts(&state).unwrap_or_default();
    let mut prepared: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    if kind != FailoverType::Test {
        job.start_step(SHUTDOWN_STEP, &format!("{} VM(s)", rels.len()), now_ms());
        save_job(&state, &job);
        let mut futs: FuturesUnordered<_> = rels
            .iter()
            .map(|rel| {
                let state = state.clone();
                let pname = host_name(&hosts, &rel.primary_host_id);
                async move {
                    let r = if kind == FailoverType::Planned {
                        failover::prepare_primary(&state, rel, &pname).await.map_err(|e| e.to_string())
                    } else {
                        Ok(failover::stop_primary(&state, rel, &pname).await)
                    };
                    (rel.vm.clone(), pname, r)
                }
            })
            .collect();
        let mut lines = Vec::new();
        let mut failed = Vec::new();
        while let Some((vm, pname, r)) = futs.next().await {
            match r {
                Ok(p) if kind == FailoverType::Planned => {
                    lines.push(format!("{vm}: stopped on {pname}, last point {p}"));
                    prepared.insert(vm, p);
                }
                Ok(d) => {
                    lines.push(d);
                    prepared.insert(vm, String::new());
                }
                Err(e) => failed.push(format!("{vm} on {pname}: {e}")),
            }
        }
        drop(futs);
        if !failed.is_empty() {
            job.set_detail(SHUTDOWN_STEP, &lines.join("; "));
            return fail_job(
                &state,
                &mut job,
                &format!(
                    "shutdown failed for {}; stopped primaries stay stopped: retry, or run the plan with --type unplanned",
                    failed.join("; ")
                ),
            );
        }
        job.succeed_step(SHUTDOWN_STEP, &lines.join("; "), now_ms());
        save_job(&state, &job);
    }
    let mut done: HashSet<String> = HashSet::new();
    for stage in stages(&plan) {
        match stage {
            Stage::Group(gi) => {
                let g = &plan.groups[gi];
                let now = now_ms();
                for vm in &g.vms {
                    job.start_step(vm_step(g.order, vm), "", now);
                }
                save_job(&state, &job);
                let mut futs: FuturesUnordered<_> = g
                    .vms
                    .iter()
                    .map(|vm| {
                        let state = state.clone();
                        let opts = FailoverOptions {
                            kind,
                            point: siterecovery_proto::model::PointSelector::Latest,
                            test_network: TestNetwork::Mapped,
                            shutdown_primary: false,
                            prepared: match kind {
                                FailoverType::Test => None,
                                _ => prepared.get(vm).cloned(),
                            },
                        };
                        let vm = vm.clone();
                        async move {
                            let started = match siterecovery_proto::model::VmName::new(vm.as_str()) {
                                Ok(name) => failover::start_vm_failover(&state, &name, opts).await,
                                Err(e) => Err(FailoverError::Request(siterecovery_proto::model::WireError::Invalid {
                                    field: "vm".into(),
                                    source: e,
                                })),
                            };
                            let r = match started {
                                Err(e) => Err(e.to_string()),
                                Ok(child) => match failover::wait_job_end(&state, &child.id).await {
                                    Some(j) if j.state == JobState::Succeeded => {
                                        let last = j
                                            .steps
                                            .iter()
                                            .rev()
                                            .find(|s| s.state == StepState::Succeeded)
                                            .map(|s| s.detail.clone())
                                            .unwrap_or_default();
                                        Ok(format!("job {}: {last}", j.id))
                                    }
                                    Some(j) => Err(format!("job {}: {}", j.id, j.error)),
                                    None => Err(format!("job {} did not end (provider stopping?)", child.id)),
                                },
                            };
                            (vm, r)
                        }
                    })
                    .collect();
                let mut failed = Vec::new();
                while let Some((vm, r)) = futs.next().await {
                    let step = vm_step(g.order, &vm);
                    match r {
                        Ok(d) => {
                            job.succeed_step(&step, &d, now_ms());
                            done.insert(vm);
                        }
                        Err(e) => {
                            job.fail_step(&step, &e, now_ms());
                            failed.push(format!("{vm} ({e})"));
                        }
                    }
                    save_job(&state, &job);
                }
                drop(futs);
                if !failed.is_empty() {
                    return fail_job(
                        &state,
                        &mut job,
                        &format!(
                            "group {}: {} of {} VM(s) failed: {}",
                            g.order,
                            failed.len(),
                            g.vms.len(),
                            failed.join("; ")
                        ),
                    );
                }
            }
            Stage::Action { index, step } => {
                let a = &plan.actions[index];
                match a.kind {
                    ActionKind::Script => {
                        job.start_step(&step, "running", now_ms());
                        save_job(&state, &job);
                        // Addresses as reserved now (reprotect may have replaced relationships).
                        let current: Vec<RelationshipRecord> = rels
                            .iter()
                            .map(|r| {
                                state
                                    .protection
                                    .of_vm(&r.vm)
                                    .filter(|n| n.reversed_from == r.id)
                                    .map(|n| {
                                        // A reversed relationship holds the way back: report the failover's addresses.
                                        let mut x = n;
                                        x.addresses = r.addresses.clone();
                                        x
                                    })
                                    .unwrap_or_else(|| r.clone())
                            })
                            .collect();
                        let env = [
                            ("SITERECOVERY_PLAN", plan.name.clone()),
                            ("SITERECOVERY_GROUP", a.after_group.to_string()),
                            ("SITERECOVERY_FAILOVER_TYPE", kind.as_str().to_string()),
                            ("SITERECOVERY_IP_CHANGES", ip_changes(&current, &done)),
                        ];
                        match run_script(&a.command, &env, Duration::from_secs(u64::from(a.timeout_secs))).await {
                            Ok(d) => job.succeed_step(&step, &d, now_ms()),
                            Err(e) => {
                                job.set_detail(&step, "");
                                let first = e.lines().next().unwrap_or_default().to_owned();
                                job.fail_step(&step, &e, now_ms());
                                return fail_job(
                                    &state,
                                    &mut job,
                                    &format!("script after group {}: {first}", a.after_group),
                                );
                            }
                        }
                        save_job(&state, &job);
                    }
                    ActionKind::Manual => {
                        let notify = Arc::new(tokio::sync::Notify::new());
                        if let Ok(mut m) = state.protection.confirms.lock() {
                            m.insert(job.id.clone(), notify.clone());
                        }
                        job.start_step(
                            &step,
                            &format!("waiting for `plan confirm {}`: {}", job.id, a.command),
                            now_ms(),
                        );
                        save_job(&state, &job);
                        tokio::select! {
                            _ = notify.notified() => {}
                            _ = state.shutdown.cancelled() => return,
                        }
                        if let Ok(mut m) = state.protection.confirms.lock() {
                            m.remove(&job.id);
                        }
                        job.succeed_step(&step, &format!("confirmed: {}", a.command), now_ms());
                        save_job(&state, &job);
                    }
                }
            }
        }
    }
    job.succeed(now_ms());
    save_job(&state, &job);
    tracing::info!(plan = %plan.name, kind = kind.as_str(), "recovery plan done");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(order: u32, vms: &[&str]) -> v1::PlanGroup {
        v1::PlanGroup { order, vms: vms.iter().map(|s| s.to_string()).collect() }
    }

    fn action(after: u32, kind: &str, cmd: &str) -> v1::PlanAction {
        let kind = match kind {
            "script" => v1::PlanActionKind::Script,
            "manual" => v1::PlanActionKind::Manual,
            _ => v1::PlanActionKind::Unspecified,
        };
        v1::PlanAction { after_group: after, kind: kind.into(), command: cmd.into(), timeout_secs: 0 }
    }

    #[test]
    fn parse_flags() {
        assert_eq!(parse_group("1:a,b"), Ok((1, vec!["a".to_string(), "b".to_string()])));
        assert_eq!(parse_group(" 2 : c "), Ok((2, vec!["c".to_string()])));
        assert!(parse_group("x:a").is_err());
        assert!(parse_group("1:").is_err());
        assert!(parse_group("1").is_err());
        assert_eq!(parse_action("script", "1=/bin/dns.sh"), Ok((1, "/bin/dns.sh".to_string())));
        assert_eq!(parse_action("manual", "0=check the=switch"), Ok((0, "check the=switch".to_string())));
        assert!(parse_action("script", "1=").is_err());
        assert!(parse_action("script", "/x").is_err());
    }

    #[test]
    fn validation_and_order() {
        let p = v1::RecoveryPlan {
            name: "dc".into(),
            groups: vec![group(2, &["web"]), group(1, &["db", "dns"])],
            actions: vec![
                action(1, "script", "/opt/a.sh"),
                action(0, "manual", "tell the team"),
                action(1, "manual", "check db"),
            ],
        };
        let rec = validate(&p).expect("valid");
        assert_eq!(rec.groups.iter().map(|g| g.order).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(rec.actions[0].after_group, 0);
        assert_eq!(rec.actions[1].timeout_secs, DEFAULT_SCRIPT_TIMEOUT_SECS);
        let names = step_names(&rec, FailoverType::Planned);
        assert_eq!(
            names,
            vec![
                SHUTDOWN_STEP.to_string(),
                "Before the first group, action 1: manual action".into(),
                "Group 1: db".into(),
                "Group 1: dns".into(),
                "After group 1, action 1: script /opt/a.sh".into(),
                "After group 1, action 2: manual action".into(),
                "Group 2: web".into(),
            ]
        );
        assert_eq!(step_names(&rec, FailoverType::Test)[0], "Before the first group, action 1: manual action");

        let bad = |groups: Vec<v1::PlanGroup>, actions: Vec<v1::PlanAction>| {
            validate(&v1::RecoveryPlan { name: "p".into(), groups, actions }).expect_err("invalid")
        };
        assert_eq!(bad(vec![], vec![]), PlanError::NoGroups);
        assert_eq!(bad(vec![group(0, &["a"])], vec![]), PlanError::ZeroGroup);
        assert_eq!(bad(vec![group(1, &["a"]), group(1, &["b"])], vec![]), PlanError::DuplicateGroup(1));
        assert_eq!(bad(vec![group(1, &["a"]), group(2, &["a"])], vec![]), PlanError::DuplicateVm("a".into()));
        assert_eq!(bad(vec![group(1, &[])], vec![]), PlanError::EmptyGroup(1));
        assert_eq!(bad(vec![group(1, &["a"])], vec![action(3, "script", "/x")]), PlanError::UnknownGroup(3));
        assert_eq!(
            bad(vec![group(1, &["a"])], vec![action(1, "script", "x.sh")]),
            PlanError::RelativeScript("x.sh".into())
        );
        assert_eq!(bad(vec![group(1, &["a"])], vec![action(1, "email", "x")]), PlanError::UnknownKind("0".into()));
        let many: Vec<String> = (0..101).map(|i| format!("vm{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(bad(vec![group(1, &refs)], vec![]), PlanError::TooManyVms(101));
    }

    #[test]
    fn output_truncation_and_ip_lines() {
        let long = "é".repeat(40_000);
        let t = truncate_output(&long, MAX_OUTPUT);
        assert!(t.len() < MAX_OUTPUT + 64 && t.ends_with("[output truncated to 64 KiB]"));
        assert_eq!(truncate_output("short", MAX_OUTPUT), "short");
    }

    #[tokio::test]
    async fn scripts_run_with_env_and_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok.sh");
        std::fs::write(&ok, "#!/bin/sh\necho plan=$SITERECOVERY_PLAN\necho oops >&2\n").expect("write");
        let slow = dir.path().join("slow.sh");
        std::fs::write(&slow, "#!/bin/sh\nsleep 5\n").expect("write");
        let bad = dir.path().join("bad.sh");
        std::fs::write(&bad, "#!/bin/sh\necho broken\nexit 3\n").expect("write");
        for p in [&ok, &slow, &bad] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let env = [("SITERECOVERY_PLAN", "dc".to_string())];
        let out = run_script(ok.to_str().expect("path"), &env, Duration::from_secs(5)).await.expect("ok");
        assert!(out.contains("plan=dc") && out.contains("[stderr]\noops"), "{out}");
        let e = run_script(slow.to_str().expect("path"), &env, Duration::from_millis(200)).await.expect_err("slow");
        assert!(e.contains("timed out"), "{e}");
        let e = run_script(bad.to_str().expect("path"), &env, Duration::from_secs(5)).await.expect_err("bad");
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
    }
}
