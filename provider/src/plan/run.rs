//! A plan run: one job ("Recovery plan failover") whose steps are the plan's.
//!
//! For planned and unplanned failover the shutdown step comes first (planned:
//! `PrepareFailover` on every primary, in parallel, so each VM stops and ships its last
//! log; unplanned: a best-effort `StopVm`). Then the stages in order: actions before
//! the first group, each group with its VMs in parallel (each VM is an ordinary
//! failover job, named in the VM's step), then the actions after that group. Group N+1
//! starts only when every VM of group N is up; a failing VM fails the plan once the
//! rest of its group ended (the later steps are skipped), and a failing or timed-out
//! script fails it at once. A manual action waits for `plan confirm JOB`
//! ([`super::confirm`]); at provider shutdown the run stops there and the restart rule
//! decides the job's fate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use siterecovery_proto::model::{PointSelector, VmName};

use super::script::{environment, ip_changes, run_script};
use super::spec::{ActionKind, ActionRecord, GroupRecord, PlanRecord, Stage, stages, vm_step};
use crate::failover::common::host_name;
use crate::failover::{self, FailoverOptions, FailoverType};
use crate::inventory::HostRecord;
use crate::jobs::{JobRun, JobState, PlanStep, StepState};
use crate::network::TestNetwork;
use crate::relationship::{Core, RelationshipRecord};
use crate::store::HOSTS;

/// Runs `plan` as `job` to its end; `rels` are the plan's VMs' relationships as
/// checked before the job started.
pub(crate) async fn run(
    state: Arc<Core>,
    mut job: JobRun,
    plan: PlanRecord,
    kind: FailoverType,
    rels: Vec<RelationshipRecord>,
) {
    let hosts: Vec<HostRecord> = state.store.list(HOSTS).unwrap_or_default();
    let mut prepared: HashMap<String, String> = HashMap::new();
    if kind != FailoverType::Test && !shut_down(&state, &mut job, kind, &rels, &hosts, &mut prepared).await {
        return;
    }
    let mut done: HashSet<VmName> = HashSet::new();
    for stage in stages(&plan) {
        let go_on = match stage {
            Stage::Group(gi) => run_group(&state, &mut job, &plan.groups[gi], kind, &prepared, &mut done).await,
            Stage::Action { index, step } => {
                let a = &plan.actions[index];
                match a.kind {
                    ActionKind::Script => run_script_step(&state, &mut job, &plan, a, step, kind, &rels, &done).await,
                    ActionKind::Manual => wait_confirm(&state, &mut job, a, step).await,
                }
            }
        };
        if !go_on {
            return;
        }
    }
    job.finish();
    tracing::info!(plan = %plan.name, kind = kind.as_str(), "recovery plan done");
}

/// The shutdown step: every primary prepared (planned) or stopped (unplanned), in
/// parallel; `prepared` gets each VM's last point (planned). False when the job failed.
async fn shut_down(
    state: &Arc<Core>,
    job: &mut JobRun,
    kind: FailoverType,
    rels: &[RelationshipRecord],
    hosts: &[HostRecord],
    prepared: &mut HashMap<String, String>,
) -> bool {
    job.start(PlanStep::Shutdown, &format!("{} VM(s)", rels.len()));
    let mut futs: FuturesUnordered<_> = rels
        .iter()
        .map(|rel| {
            let pname = host_name(hosts, &rel.primary_host_id);
            async move {
                let r = if kind == FailoverType::Planned {
                    failover::prepare_primary(state, rel, &pname).await
                } else {
                    Ok(failover::stop_primary(state, rel, &pname).await)
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
        job.detail(PlanStep::Shutdown, &lines.join("; "));
        job.fail(&format!(
            "shutdown failed for {}; stopped primaries stay stopped: retry, or run the plan with --type unplanned",
            failed.join("; ")
        ));
        return false;
    }
    job.succeed(PlanStep::Shutdown, &lines.join("; "));
    true
}

/// One group: every VM's failover job in parallel, each awaited to its end. False
/// when a VM failed (the job failed once the whole group ended).
async fn run_group(
    state: &Arc<Core>,
    job: &mut JobRun,
    g: &GroupRecord,
    kind: FailoverType,
    prepared: &HashMap<String, String>,
    done: &mut HashSet<VmName>,
) -> bool {
    let now = crate::jobs::now_ms();
    for vm in &g.vms {
        job.record_mut().start_step(vm_step(g.order, vm), "", now);
    }
    job.save();
    let mut futs: FuturesUnordered<_> = g
        .vms
        .iter()
        .map(|vm| {
            let opts = FailoverOptions {
                kind,
                point: PointSelector::Latest,
                test_network: TestNetwork::Mapped,
                shutdown_primary: false,
                prepared: match kind {
                    FailoverType::Test => None,
                    _ => prepared.get(vm.as_str()).cloned(),
                },
            };
            async move { (vm, fail_over_vm(state, vm, opts).await) }
        })
        .collect();
    let mut failed = Vec::new();
    while let Some((vm, r)) = futs.next().await {
        let step = vm_step(g.order, vm);
        match r {
            Ok(d) => {
                job.succeed(&step, &d);
                done.insert(vm.clone());
            }
            Err(e) => {
                job.fail_step(&step, &e);
                failed.push(format!("{vm} ({e})"));
            }
        }
    }
    drop(futs);
    if failed.is_empty() {
        return true;
    }
    job.fail(&format!("group {}: {} of {} VM(s) failed: {}", g.order, failed.len(), g.vms.len(), failed.join("; ")));
    false
}

/// One VM's failover job, started and awaited; the VM step's detail, or why it failed.
async fn fail_over_vm(state: &Arc<Core>, vm: &VmName, opts: FailoverOptions) -> Result<String, String> {
    let child = failover::start_vm_failover(state, vm, opts).await.map_err(|e| e.to_string())?;
    match failover::wait_job_end(state, &child.id).await {
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
    }
}

/// A scripted action. False when it failed (the job failed at once).
#[allow(clippy::too_many_arguments)]
async fn run_script_step(
    state: &Core,
    job: &mut JobRun,
    plan: &PlanRecord,
    a: &ActionRecord,
    step: PlanStep,
    kind: FailoverType,
    rels: &[RelationshipRecord],
    done: &HashSet<VmName>,
) -> bool {
    job.start(&step, "running");
    let env = environment(plan.name.as_str(), a.after_group, kind, ip_changes(&current(state, rels), done));
    let dir = &state.protection.config.scripts_dir;
    match run_script(dir, &a.command, &env, Duration::from_secs(u64::from(a.timeout_secs))).await {
        Ok(d) => {
            job.succeed(&step, &d);
            true
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default().to_owned();
            job.fail_step(&step, &text);
            job.fail(&format!("script after group {}: {first}", a.after_group));
            false
        }
    }
}

/// The relationships as they are now, with the failover's addresses: reverse
/// replication may have replaced one, and a reversed relationship holds the way back.
fn current(state: &Core, rels: &[RelationshipRecord]) -> Vec<RelationshipRecord> {
    rels.iter()
        .map(|r| {
            state
                .protection
                .of_vm(&r.vm)
                .filter(|n| n.reversed_from == r.id)
                .map(|mut n| {
                    n.addresses = r.addresses.clone();
                    n
                })
                .unwrap_or_else(|| r.clone())
        })
        .collect()
}

/// A manual action: waits for `plan confirm`. False when the provider stops first
/// (the job stays running; the restart rule decides).
async fn wait_confirm(state: &Core, job: &mut JobRun, a: &ActionRecord, step: PlanStep) -> bool {
    let notify = Arc::new(tokio::sync::Notify::new());
    if let Ok(mut m) = state.protection.confirms.lock() {
        m.insert(job.id().to_owned(), notify.clone());
    }
    job.start(&step, &format!("waiting for `plan confirm {}`: {}", job.id(), a.command));
    tokio::select! {
        _ = notify.notified() => {}
        _ = state.shutdown.cancelled() => return false,
    }
    if let Ok(mut m) = state.protection.confirms.lock() {
        m.remove(job.id());
    }
    job.succeed(&step, &format!("confirmed: {}", a.command));
    true
}
