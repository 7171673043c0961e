//! Recovery plans: ordered groups of VMs that fail over together, with scripted and
//! manual actions between groups.
//!
//! The API the Protection service calls, in domain types: [`create`], [`list`],
//! [`start_failover`] (checks every VM, then starts the run's job) and [`confirm`]
//! (a manual action waiting in a run). Errors are [`PlanError`]s; the service maps them
//! with [`crate::error::status`].
//!
//! Files: [`spec`] (the requests converted from the wire, the rules of a plan, the
//! stored records, a run's steps), [`run`] (the job), [`script`] (scripted actions:
//! names in the scripts directory, environment, timeout, output).
//!
//! Plans are stored as one JSON document in the `meta` table (`recovery_plans`).

use std::sync::{Arc, Mutex};

use siterecovery_proto::model::{JobId, PlanName, VmName, WireError};

use crate::error::{Classify, ErrorClass};
use crate::failover::FailoverType;
use crate::inventory::HostRecord;
use crate::jobs::{JobError, JobKind, JobRecord, JobRun, JobState, PlanStep, StepState};
use crate::relationship::{Core, Event, RelationshipRecord};
use crate::store::{HOSTS, META, StoreError};

pub mod run;
pub mod script;
pub mod spec;

pub use script::{MAX_OUTPUT, ScriptError, ScriptName, ScriptNameError};
pub use spec::{
    ActionKind, ActionRecord, ConfirmAction, DEFAULT_SCRIPT_TIMEOUT_SECS, FlagError, GroupRecord, MAX_VMS,
    PlanFailover, PlanRecord, PlanSpec, parse_action, parse_group, step_names,
};

/// `meta` key of the list of plans.
pub const PLANS_KEY: &str = "recovery_plans";

/// An error of the plan area: a plan refused at creation, a run refused before its job
/// starts, a confirm with nothing to confirm. What goes wrong inside a run ends the
/// run's job as its error text instead.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A name or enum field of the request breaks its rule (the field is named).
    #[error(transparent)]
    Request(#[from] WireError),
    /// The plan has no group.
    #[error("a plan needs at least one group (--group 1:VM1,VM2)")]
    NoGroups,
    /// A group is numbered 0.
    #[error("group numbers start at 1 (got 0)")]
    ZeroGroup,
    /// Two groups have the same number.
    #[error("group {0} is given twice")]
    DuplicateGroup(u32),
    /// A group lists no VM.
    #[error("group {0} has no VM")]
    EmptyGroup(u32),
    /// A VM is in two groups (or twice in one).
    #[error("VM {0} is in more than one group")]
    DuplicateVm(VmName),
    /// More than [`MAX_VMS`] VMs.
    #[error("a plan holds at most {MAX_VMS} VMs ({0} given)")]
    TooManyVms(usize),
    /// An action follows a group the plan does not have.
    #[error("action after group {0}: no such group")]
    UnknownGroup(u32),
    /// An action with no command (script) or text (manual).
    #[error("action after group {0} has no command or text")]
    EmptyAction(u32),
    /// A plan of that name exists.
    #[error("plan {0:?} already exists")]
    Exists(PlanName),
    /// No plan of that name.
    #[error("no recovery plan {0:?} (see `plan list`)")]
    NotFound(PlanName),
    /// Some VMs of the plan cannot fail over as asked; every problem is listed.
    #[error("plan {plan}: {}", problems.join("; "))]
    VmsRefused { plan: PlanName, problems: Vec<String> },
    /// The job to confirm does not exist, or the job store failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The job exists but no manual action of it is waiting.
    #[error("job {0} is not waiting for a manual action")]
    NotWaiting(JobId),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for PlanError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Request(_)
            | Self::NoGroups
            | Self::ZeroGroup
            | Self::DuplicateGroup(_)
            | Self::EmptyGroup(_)
            | Self::DuplicateVm(_)
            | Self::TooManyVms(_)
            | Self::UnknownGroup(_)
            | Self::EmptyAction(_) => ErrorClass::InvalidArgument,
            Self::Exists(_) => ErrorClass::AlreadyExists,
            Self::NotFound(_) | Self::Job(JobError::NotFound(_)) => ErrorClass::NotFound,
            Self::VmsRefused { .. } | Self::NotWaiting(_) | Self::Job(JobError::Busy(_)) => {
                ErrorClass::FailedPrecondition
            }
            Self::Job(JobError::Store(_)) | Self::Store(_) => ErrorClass::Internal,
        }
    }
}

/// Serialises read-modify-write of the plan list.
static WRITE: Mutex<()> = Mutex::new(());

/// Every plan, by name.
pub fn list(core: &Core) -> Result<Vec<PlanRecord>, PlanError> {
    Ok(core.store.get(META, PLANS_KEY)?.unwrap_or_default())
}

/// Stores a new plan (`CreatePlan`).
pub fn create(core: &Core, spec: PlanSpec) -> Result<PlanRecord, PlanError> {
    let rec = PlanRecord::from(spec);
    let _g = WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let mut all = list(core)?;
    if all.iter().any(|x| x.name == rec.name) {
        return Err(PlanError::Exists(rec.name));
    }
    all.push(rec.clone());
    all.sort_by(|a, b| a.name.cmp(&b.name));
    core.store.put(META, PLANS_KEY, &all)?;
    Ok(rec)
}

/// Checks every VM of the plan may fail over as asked; all problems in one error.
fn check_vms(core: &Core, plan: &PlanRecord, kind: FailoverType) -> Result<Vec<RelationshipRecord>, PlanError> {
    let hosts: Vec<HostRecord> = core.store.list(HOSTS)?;
    let name = |id: &str| crate::failover::common::host_name(&hosts, id);
    let mut rels = Vec::new();
    let mut problems = Vec::new();
    for vm in plan.vms() {
        let rel = match crate::failover::common::protected(core, vm) {
            Ok(r) => r,
            Err(e) => {
                problems.push(e.to_string());
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
        if core.protection.busy(vm.as_str()) {
            problems.push(format!("VM {vm}: another job is working on it"));
        }
        if kind == FailoverType::Planned && !core.agents.connected(&rel.primary_host_id) {
            problems.push(format!(
                "VM {vm}: primary host {} is not connected (use --type unplanned)",
                name(&rel.primary_host_id)
            ));
        }
        if !core.agents.connected(&rel.replica_host_id) {
            problems.push(format!("VM {vm}: replica host {} is not connected", name(&rel.replica_host_id)));
        }
        rels.push(rel);
    }
    if problems.is_empty() { Ok(rels) } else { Err(PlanError::VmsRefused { plan: plan.name.clone(), problems }) }
}

/// Starts a run of plan `name` (`PlanFailover`): every VM checked first, then the job.
pub async fn start_failover(core: &Arc<Core>, name: &PlanName, kind: FailoverType) -> Result<JobRecord, PlanError> {
    let plan = list(core)?.into_iter().find(|p| &p.name == name).ok_or_else(|| PlanError::NotFound(name.clone()))?;
    let rels = check_vms(core, &plan, kind)?;
    let steps = spec::steps(&plan, kind);
    // No claim: each VM's own failover job claims its VM.
    let job =
        JobRun::create(&core.store, &core.protection.jobs, JobKind::RecoveryPlan, plan.name.as_str(), &steps, None)?;
    let ret = job.record().clone();
    tokio::spawn(run::run(core.clone(), job, plan, kind, rels));
    Ok(ret)
}

/// Lets the manual action run `job` waits for go on (`ConfirmPlanAction`).
pub fn confirm(core: &Core, job: &JobId) -> Result<JobRecord, PlanError> {
    let rec = core.protection.jobs.find(&core.store, job.as_str())?;
    let waiting = rec.state == JobState::Running
        && rec.kind == JobKind::RecoveryPlan
        && rec.steps.iter().any(|s| {
            s.state == StepState::Running
                && matches!(PlanStep::from_name(&s.name), Some(PlanStep::Action(a)) if a.ends_with("manual action"))
        });
    let notify = core.protection.confirms.lock().ok().and_then(|m| m.get(job.as_str()).cloned());
    match notify {
        Some(n) if waiting => {
            n.notify_one();
            Ok(rec)
        }
        _ => Err(PlanError::NotWaiting(job.clone())),
    }
}

#[cfg(test)]
mod tests;
