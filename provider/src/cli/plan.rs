//! `plan create | list | failover | confirm`: recovery plans, ordered groups of VMs
//! that fail over together, with scripts and manual actions between the groups.

use std::time::Duration;

use clap::Subcommand;
use siterecovery_proto::model::units::parse_duration;
use siterecovery_proto::v1;

use super::jobs::started;
use super::output::{print_json, print_table};
use super::views::{self, JobView, PlanView};
use super::words::{action_kind, failover_type};
use super::{CliError, Operator};

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Create a recovery plan.
    Create {
        name: String,
        /// N:VM1,VM2 — group N fails over after group N-1; repeat for more groups.
        #[arg(long = "group", value_name = "N:VM1,VM2", required = true)]
        groups: Vec<String>,
        /// AFTER_GROUP=NAME — a script of the provider's scripts directory (`serve
        /// --scripts-dir`, named relative to it) run after that group (0 = before the first).
        #[arg(long = "script", value_name = "AFTER_GROUP=NAME")]
        scripts: Vec<String>,
        /// AFTER_GROUP=TEXT — a manual action the run waits on until `plan confirm JOB`.
        #[arg(long = "manual", value_name = "AFTER_GROUP=TEXT")]
        manuals: Vec<String>,
        /// Timeout of each script.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        script_timeout: Duration,
    },
    /// List recovery plans.
    List,
    /// Fail a plan over: shutdown step, then groups in order.
    Failover {
        plan: String,
        /// test, planned or unplanned.
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        wait: bool,
    },
    /// Confirm the manual action a plan job waits for.
    Confirm { job_id: String },
}

/// Builds a plan from `plan create` flags.
pub fn plan_from_flags(
    name: String,
    groups: &[String],
    scripts: &[String],
    manuals: &[String],
    script_timeout: Duration,
) -> Result<v1::RecoveryPlan, String> {
    use crate::plan::{parse_action, parse_group};
    let mut plan = v1::RecoveryPlan { name, groups: vec![], actions: vec![] };
    for g in groups {
        let (order, vms) = parse_group(g)?;
        plan.groups.push(v1::PlanGroup { order, vms });
    }
    for (flag, kind, list) in
        [("script", v1::PlanActionKind::Script, scripts), ("manual", v1::PlanActionKind::Manual, manuals)]
    {
        for a in list {
            let (after_group, command) = parse_action(flag, a)?;
            plan.actions.push(v1::PlanAction {
                after_group,
                kind: kind.into(),
                command,
                timeout_secs: script_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            });
        }
    }
    Ok(plan)
}

/// `plan create | list | failover | confirm`.
pub async fn run(op: &mut Operator, cmd: PlanCmd) -> Result<(), CliError> {
    match cmd {
        PlanCmd::Create { name, groups, scripts, manuals, script_timeout } => {
            let plan = plan_from_flags(name, &groups, &scripts, &manuals, script_timeout).map_err(CliError::Usage)?;
            let p = op.prot.create_plan(plan).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                return print_json(&PlanView::from(&p));
            }
            let vms: usize = p.groups.iter().map(|g| g.vms.len()).sum();
            println!(
                "recovery plan {} created: {} group(s), {vms} VM(s), {} action(s)",
                p.name,
                p.groups.len(),
                p.actions.len()
            );
        }
        PlanCmd::List => {
            let plans = op.prot.list_plans(v1::ListPlansRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().plans;
            if op.json {
                return print_json(&views::all::<_, PlanView>(&plans));
            }
            let rows: Vec<_> = plans
                .iter()
                .map(|p| {
                    let groups: Vec<String> =
                        p.groups.iter().map(|g| format!("{}:{}", g.order, g.vms.join(","))).collect();
                    let actions: Vec<String> = p
                        .actions
                        .iter()
                        .map(|a| format!("{}@{} {}", action_kind(a.kind), a.after_group, a.command))
                        .collect();
                    vec![
                        p.name.clone(),
                        groups.join(" "),
                        if actions.is_empty() { "-".into() } else { actions.join("; ") },
                    ]
                })
                .collect();
            print_table(&["PLAN", "GROUPS", "ACTIONS"], &rows);
        }
        PlanCmd::Failover { plan, kind, wait } => {
            let req = v1::PlanFailoverRequest { plan, r#type: failover_type(&kind)? };
            let job = op.prot.plan_failover(req).await.map_err(|s| op.rpc(s))?.into_inner();
            return started(op, job, wait).await;
        }
        PlanCmd::Confirm { job_id } => {
            let req = v1::ConfirmPlanActionRequest { job_id };
            let j = op.prot.confirm_plan_action(req).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                return print_json(&JobView::from(&j));
            }
            println!("{}: manual action confirmed; the plan goes on", j.id);
        }
    }
    Ok(())
}
