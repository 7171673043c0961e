//! A recovery plan as the operator gives it and as it is stored: the requests
//! converted once from the wire ([`PlanSpec`], [`PlanFailover`], [`ConfirmAction`]),
//! the rules a plan obeys, the stored records, and the steps a run of it has.
//!
//! Names and ids are converted into domain types naming the field after the RPC
//! (`create_plan.groups[0].vms[1]`, as the rest of the Protection service does); the
//! rules between fields (groups numbered from 1, a VM in one group only, actions after
//! an existing group) are [`PlanError`] variants. A script is named relative to the
//! provider's scripts directory ([`ScriptName`]); any other value of a script's
//! command is refused naming the field (`create_plan.actions[0].command`). All are
//! `InvalidArgument`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::{JobId, PlanName, VmName, WireError, wire};
use siterecovery_proto::v1;

use super::PlanError;
use super::script::ScriptName;
use crate::failover::FailoverType;
use crate::jobs::PlanStep;

/// A plan holds at most this many VMs.
pub const MAX_VMS: usize = 100;
/// A script's timeout when the plan gives none.
pub const DEFAULT_SCRIPT_TIMEOUT_SECS: u32 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// A program on the provider host, run with a timeout.
    Script,
    /// An instruction to the operator; the run waits for `plan confirm`.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// 1-based; groups run in this order.
    pub order: u32,
    pub vms: Vec<VmName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// 0 = before the first group.
    pub after_group: u32,
    pub kind: ActionKind,
    /// The script's name in the scripts directory (a [`ScriptName`]), or the manual
    /// instruction.
    pub command: String,
    /// Scripts only; never 0 once validated.
    pub timeout_secs: u32,
}

/// A recovery plan, as stored (`meta` key `recovery_plans`). Groups sorted by order;
/// actions by the group they follow, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub name: PlanName,
    pub groups: Vec<GroupRecord>,
    pub actions: Vec<ActionRecord>,
}

/// A validated `CreatePlan` request: what [`PlanRecord`] stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSpec {
    pub name: PlanName,
    pub groups: Vec<GroupRecord>,
    pub actions: Vec<ActionRecord>,
}

impl From<PlanSpec> for PlanRecord {
    fn from(s: PlanSpec) -> Self {
        Self { name: s.name, groups: s.groups, actions: s.actions }
    }
}

impl TryFrom<&v1::RecoveryPlan> for PlanSpec {
    type Error = PlanError;

    fn try_from(p: &v1::RecoveryPlan) -> Result<Self, PlanError> {
        let name: PlanName = wire::field("create_plan.name", &p.name)?;
        if p.groups.is_empty() {
            return Err(PlanError::NoGroups);
        }
        let mut groups: Vec<GroupRecord> = Vec::new();
        let mut seen: HashSet<VmName> = HashSet::new();
        for (gi, g) in p.groups.iter().enumerate() {
            if g.order == 0 {
                return Err(PlanError::ZeroGroup);
            }
            if groups.iter().any(|x| x.order == g.order) {
                return Err(PlanError::DuplicateGroup(g.order));
            }
            if g.vms.is_empty() {
                return Err(PlanError::EmptyGroup(g.order));
            }
            let vms: Vec<VmName> = wire::each(&format!("create_plan.groups[{gi}].vms"), &g.vms)?;
            for v in &vms {
                if !seen.insert(v.clone()) {
                    return Err(PlanError::DuplicateVm(v.clone()));
                }
            }
            groups.push(GroupRecord { order: g.order, vms });
        }
        if seen.len() > MAX_VMS {
            return Err(PlanError::TooManyVms(seen.len()));
        }
        groups.sort_by_key(|g| g.order);
        let mut actions = Vec::new();
        for (ai, a) in p.actions.iter().enumerate() {
            if a.after_group != 0 && !groups.iter().any(|g| g.order == a.after_group) {
                return Err(PlanError::UnknownGroup(a.after_group));
            }
            let kind = match wire::enumeration::<v1::PlanActionKind>(
                &format!("create_plan.actions[{ai}].kind"),
                a.kind,
                "script or manual",
            )? {
                v1::PlanActionKind::Script => ActionKind::Script,
                v1::PlanActionKind::Manual => ActionKind::Manual,
                v1::PlanActionKind::Unspecified => {
                    return Err(WireError::Enum {
                        field: format!("create_plan.actions[{ai}].kind"),
                        value: a.kind,
                        allowed: "script or manual",
                    }
                    .into());
                }
            };
            if a.command.trim().is_empty() {
                return Err(PlanError::EmptyAction(a.after_group));
            }
            if kind == ActionKind::Script {
                let field = format!("create_plan.actions[{ai}].command");
                a.command.parse::<ScriptName>().map_err(|e| WireError::rule(field, e.to_string()))?;
            }
            let timeout_secs = if a.timeout_secs == 0 { DEFAULT_SCRIPT_TIMEOUT_SECS } else { a.timeout_secs };
            actions.push(ActionRecord { after_group: a.after_group, kind, command: a.command.clone(), timeout_secs });
        }
        // Stable: actions after one group keep the order given.
        actions.sort_by_key(|a| a.after_group);
        Ok(Self { name, groups, actions })
    }
}

/// A validated `PlanFailover` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFailover {
    pub plan: PlanName,
    pub kind: FailoverType,
}

impl TryFrom<&v1::PlanFailoverRequest> for PlanFailover {
    type Error = WireError;

    fn try_from(r: &v1::PlanFailoverRequest) -> Result<Self, WireError> {
        let plan = wire::field("plan_failover.plan", &r.plan)?;
        let kind = FailoverType::from_wire(r.r#type).ok_or(WireError::Enum {
            field: "plan_failover.type".into(),
            value: r.r#type,
            allowed: "test, planned or unplanned",
        })?;
        Ok(Self { plan, kind })
    }
}

/// A validated `ConfirmPlanAction` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmAction {
    pub job: JobId,
}

impl TryFrom<&v1::ConfirmPlanActionRequest> for ConfirmAction {
    type Error = WireError;

    fn try_from(r: &v1::ConfirmPlanActionRequest) -> Result<Self, WireError> {
        Ok(Self { job: wire::field("confirm_plan_action.job_id", &r.job_id)? })
    }
}

impl PlanRecord {
    pub fn to_proto(&self) -> v1::RecoveryPlan {
        v1::RecoveryPlan {
            name: self.name.to_string(),
            groups: self
                .groups
                .iter()
                .map(|g| v1::PlanGroup { order: g.order, vms: g.vms.iter().map(ToString::to_string).collect() })
                .collect(),
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

    pub fn vms(&self) -> impl Iterator<Item = &VmName> {
        self.groups.iter().flat_map(|g| g.vms.iter())
    }
}

/// A `plan create` flag the CLI could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// `--group` without `N:VMS`, a group number that is not one, or no VM.
    #[error("--group {given:?}: {reason}")]
    Group { given: String, reason: String },
    /// `--script` / `--manual` without `N=...`, or nothing after `=`.
    #[error("--{flag} {given:?}: {reason}")]
    Action { flag: String, given: String, reason: String },
}

/// The CLI reports a flag error as its usage error text.
impl From<FlagError> for String {
    fn from(e: FlagError) -> Self {
        e.to_string()
    }
}

/// `--group 1:V1,V2` → (1, [V1, V2]); names are checked by the provider.
pub fn parse_group(s: &str) -> Result<(u32, Vec<String>), FlagError> {
    let err = |reason: String| FlagError::Group { given: s.to_owned(), reason };
    let (n, vms) = s.split_once(':').ok_or_else(|| err("expected N:VM1,VM2".into()))?;
    let n: u32 = n.trim().parse().map_err(|_| err(format!("{n:?} is not a group number")))?;
    let vms: Vec<String> = vms.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect();
    if vms.is_empty() {
        return Err(err("no VM".into()));
    }
    Ok((n, vms))
}

/// `--script 1=PATH` / `--manual 1=TEXT` → (1, PATH).
pub fn parse_action(flag: &str, s: &str) -> Result<(u32, String), FlagError> {
    let err = |reason: String| FlagError::Action { flag: flag.to_owned(), given: s.to_owned(), reason };
    let (n, rest) = s.split_once('=').ok_or_else(|| err("expected AFTER_GROUP=...".into()))?;
    let n: u32 = n.trim().parse().map_err(|_| err(format!("{n:?} is not a group number")))?;
    if rest.trim().is_empty() {
        return Err(err("nothing after '='".into()));
    }
    Ok((n, rest.to_owned()))
}

/// One stage of a plan run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// The group at this index of [`PlanRecord::groups`].
    Group(usize),
    /// The action at `index` of [`PlanRecord::actions`], and its step.
    Action { index: usize, step: PlanStep },
}

fn action_step(a: &ActionRecord, nth: usize) -> PlanStep {
    let when = if a.after_group == 0 {
        "Before the first group".to_string()
    } else {
        format!("After group {}", a.after_group)
    };
    PlanStep::Action(match a.kind {
        ActionKind::Script => format!("{when}, action {nth}: script {}", a.command),
        ActionKind::Manual => format!("{when}, action {nth}: manual action"),
    })
}

/// The step of VM `vm` of group `group`.
pub fn vm_step(group: u32, vm: &VmName) -> PlanStep {
    PlanStep::Vm { group, vm: vm.to_string() }
}

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

/// The steps of a run's job: the shutdown first (planned and unplanned), then every
/// stage's.
pub fn steps(p: &PlanRecord, kind: FailoverType) -> Vec<PlanStep> {
    let mut out = Vec::new();
    if kind != FailoverType::Test {
        out.push(PlanStep::Shutdown);
    }
    for s in stages(p) {
        match s {
            Stage::Group(gi) => {
                let g = &p.groups[gi];
                out.extend(g.vms.iter().map(|v| vm_step(g.order, v)));
            }
            Stage::Action { step, .. } => out.push(step),
        }
    }
    out
}

/// The words of [`steps`].
pub fn step_names(p: &PlanRecord, kind: FailoverType) -> Vec<String> {
    steps(p, kind).iter().map(|s| s.name().into_owned()).collect()
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

    fn validate(p: &v1::RecoveryPlan) -> Result<PlanRecord, PlanError> {
        PlanSpec::try_from(p).map(PlanRecord::from)
    }

    #[test]
    fn parse_flags() {
        assert_eq!(parse_group("1:a,b"), Ok((1, vec!["a".to_string(), "b".to_string()])));
        assert_eq!(parse_group(" 2 : c "), Ok((2, vec!["c".to_string()])));
        assert!(parse_group("x:a").is_err());
        assert!(parse_group("1:").is_err());
        assert!(parse_group("1").is_err());
        assert_eq!(parse_action("script", "1=dns.sh"), Ok((1, "dns.sh".to_string())));
        assert_eq!(parse_action("manual", "0=check the=switch"), Ok((0, "check the=switch".to_string())));
        assert!(parse_action("script", "1=").is_err());
        assert!(parse_action("script", "/x").is_err());
        assert_eq!(String::from(parse_group("1:").expect_err("no VM")), "--group \"1:\": no VM");
    }

    #[test]
    fn validation_and_order() {
        let p = v1::RecoveryPlan {
            name: "dc".into(),
            groups: vec![group(2, &["web"]), group(1, &["db", "dns"])],
            actions: vec![
                action(1, "script", "a.sh"),
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
                PlanStep::SHUTDOWN.to_string(),
                "Before the first group, action 1: manual action".into(),
                "Group 1: db".into(),
                "Group 1: dns".into(),
                "After group 1, action 1: script a.sh".into(),
                "After group 1, action 2: manual action".into(),
                "Group 2: web".into(),
            ]
        );
        assert_eq!(step_names(&rec, FailoverType::Test)[0], "Before the first group, action 1: manual action");
        // The stored shape keeps plain strings.
        let v = serde_json::to_value(&rec).expect("json");
        assert_eq!(v["name"], "dc");
        assert_eq!(v["groups"][0]["vms"][1], "dns");
        assert_eq!(serde_json::from_value::<PlanRecord>(v).expect("back"), rec);

        let bad = |groups: Vec<v1::PlanGroup>, actions: Vec<v1::PlanAction>| {
            validate(&v1::RecoveryPlan { name: "p".into(), groups, actions }).expect_err("invalid")
        };
        assert!(matches!(bad(vec![], vec![]), PlanError::NoGroups));
        assert!(matches!(bad(vec![group(0, &["a"])], vec![]), PlanError::ZeroGroup));
        assert!(matches!(bad(vec![group(1, &["a"]), group(1, &["b"])], vec![]), PlanError::DuplicateGroup(1)));
        assert!(
            matches!(bad(vec![group(1, &["a"]), group(2, &["a"])], vec![]), PlanError::DuplicateVm(v) if v.as_str() == "a")
        );
        assert!(matches!(bad(vec![group(1, &[])], vec![]), PlanError::EmptyGroup(1)));
        assert!(matches!(bad(vec![group(1, &["a"])], vec![action(3, "script", "x")]), PlanError::UnknownGroup(3)));
        assert!(matches!(bad(vec![group(1, &["a"])], vec![action(1, "manual", "  ")]), PlanError::EmptyAction(1)));
        let many: Vec<String> = (0..101).map(|i| format!("vm{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(bad(vec![group(1, &refs)], vec![]), PlanError::TooManyVms(101)));
        for e in [bad(vec![], vec![]), bad(vec![group(1, &["a"])], vec![action(1, "script", "/x.sh")])] {
            assert_eq!(crate::error::status(&e).code(), tonic::Code::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn a_hostile_value_in_each_plan_field_is_refused_naming_it() {
        let good = || v1::RecoveryPlan {
            name: "dc".into(),
            groups: vec![group(1, &["db", "dns"]), group(2, &["web"])],
            actions: vec![action(1, "script", "a.sh")],
        };
        let cases: Vec<(&str, v1::RecoveryPlan)> = vec![
            ("create_plan.name", v1::RecoveryPlan { name: "../etc".into(), ..good() }),
            ("create_plan.name", v1::RecoveryPlan { name: String::new(), ..good() }),
            ("create_plan.name", v1::RecoveryPlan { name: "a/b".into(), ..good() }),
            ("create_plan.groups[0].vms[1]", v1::RecoveryPlan { groups: vec![group(1, &["db", ".."])], ..good() }),
            (
                "create_plan.groups[1].vms[0]",
                v1::RecoveryPlan { groups: vec![group(1, &["db"]), group(2, &["../../x"])], ..good() },
            ),
            ("create_plan.groups[0].vms[0]", v1::RecoveryPlan { groups: vec![group(1, &["a b"])], ..good() }),
            ("create_plan.actions[0].kind", v1::RecoveryPlan { actions: vec![action(1, "email", "x")], ..good() }),
            (
                "create_plan.actions[0].command",
                v1::RecoveryPlan { actions: vec![action(1, "script", "/usr/local/bin/dns.sh")], ..good() },
            ),
            (
                "create_plan.actions[1].command",
                v1::RecoveryPlan {
                    actions: vec![action(1, "script", "ok.sh"), action(1, "script", "../../bin/sh")],
                    ..good()
                },
            ),
            (
                "create_plan.actions[0].command",
                v1::RecoveryPlan { actions: vec![action(0, "script", "a b")], ..good() },
            ),
            (
                "create_plan.actions[0].kind",
                v1::RecoveryPlan { actions: vec![v1::PlanAction { kind: 42, ..action(1, "script", "/x") }], ..good() },
            ),
        ];
        for (field, p) in cases {
            let e = PlanSpec::try_from(&p).expect_err(field);
            match &e {
                PlanError::Request(w) => assert_eq!(w.field(), field, "{p:?}: {e}"),
                other => panic!("{field}: {other:?}"),
            }
            let s = crate::error::status(&e);
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with(field), "{}", s.message());
        }
    }

    #[test]
    fn failover_and_confirm_requests_refuse_hostile_fields() {
        let ok = PlanFailover::try_from(&v1::PlanFailoverRequest {
            plan: "dc".into(),
            r#type: v1::FailoverKind::Planned.into(),
        })
        .expect("valid");
        assert_eq!((ok.plan.as_str(), ok.kind), ("dc", FailoverType::Planned));
        for (field, plan, kind) in [
            ("plan_failover.plan", "../dc", v1::FailoverKind::Test),
            ("plan_failover.plan", "", v1::FailoverKind::Test),
            ("plan_failover.type", "dc", v1::FailoverKind::Local),
            ("plan_failover.type", "dc", v1::FailoverKind::Unspecified),
        ] {
            let e = PlanFailover::try_from(&v1::PlanFailoverRequest { plan: plan.into(), r#type: kind.into() })
                .expect_err(field);
            assert_eq!(e.field(), field, "{e}");
        }
        assert_eq!(
            ConfirmAction::try_from(&v1::ConfirmPlanActionRequest { job_id: "j-000007".into() })
                .expect("valid")
                .job
                .as_str(),
            "j-000007"
        );
        for bad in ["", "../j-1", "j-1/x", "job"] {
            let e = ConfirmAction::try_from(&v1::ConfirmPlanActionRequest { job_id: bad.into() }).expect_err("hostile");
            assert_eq!(e.field(), "confirm_plan_action.job_id", "{bad:?}: {e}");
        }
    }
}
