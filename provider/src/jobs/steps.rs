//! The steps of every kind of job: one enum per kind, each step with the words the
//! CLI prints. [`Step`] joins them, keyed by the job's kind, for the restart rule.
//!
//! A recovery plan's steps are built from the plan (its groups' VMs and its actions),
//! so [`PlanStep`] carries the parts of the name.

use std::borrow::Cow;

use super::kind::JobKind;

macro_rules! steps {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $words:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every step of the kind, in the order they run.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The words the CLI prints.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $words,)+
                }
            }

            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|x| x.name() == s)
            }
        }

        impl From<$name> for Cow<'static, str> {
            fn from(s: $name) -> Self {
                Cow::Borrowed(s.name())
            }
        }
    };
}

pub const CHECK_PREREQUISITES: &str = "Check prerequisites";

steps!(
    /// Enable protection (online or offline initial replication).
    EnableStep {
        CheckPrerequisites => "Check prerequisites",
        CreateRelationship => "Create replication relationship",
        StartInitialReplication => "Start initial replication",
        /// Offline: the initial copy goes to a directory on the primary host.
        ExportInitialCopy => "Export the initial copy",
        /// Offline: until `protect-import` copied the export into the replica.
        WaitingForImport => "Waiting for import",
        InitialReplication => "Initial replication",
    }
);

impl EnableStep {
    /// The steps with the initial copy over the network.
    pub const ONLINE: [Self; 4] =
        [Self::CheckPrerequisites, Self::CreateRelationship, Self::StartInitialReplication, Self::InitialReplication];
    /// The steps of offline initial replication.
    pub const OFFLINE: [Self; 5] = [
        Self::CheckPrerequisites,
        Self::CreateRelationship,
        Self::ExportInitialCopy,
        Self::WaitingForImport,
        Self::InitialReplication,
    ];
}

steps!(
    /// Finalize protection (the first recovery point arrived).
    FinalizeStep {
        CheckRecoveryPoints => "Check recovery points",
    }
);

steps!(
    /// Disable protection.
    DisableStep {
        StopOnReplica => "Stop replication on the replica host",
        StopOnPrimary => "Stop replication on the primary host",
        DeleteRelationship => "Delete replication relationship",
    }
);

steps!(
    /// Resync.
    ResyncStep {
        RequestResync => "Request resync",
        Resynchronise => "Resynchronise",
    }
);

steps!(
    /// Test failover.
    TestFailoverStep {
        CheckPrerequisites => "Check prerequisites",
        StartTestVm => "Start the test VM on the replica host",
    }
);

steps!(
    /// Planned failover.
    PlannedFailoverStep {
        CheckPrerequisites => "Check prerequisites",
        ShutDownPrimary => "Shut down the primary VM and ship its last changes",
        StartOnReplica => "Start the VM on the replica host",
        Commit => "Commit",
        StartReverseReplication => "Start reverse replication",
    }
);

steps!(
    /// Unplanned failover.
    UnplannedFailoverStep {
        CheckPrerequisites => "Check prerequisites",
        ShutDownPrimary => "Shut down the primary VM (best effort)",
        StartOnReplica => "Start the VM on the replica host",
    }
);

steps!(
    /// Commit failover.
    CommitStep {
        CommitOnReplica => "Commit on the replica host",
    }
);

steps!(
    /// Change recovery point.
    ChangePointStep {
        Restart => "Restart the VM from another point",
    }
);

steps!(
    /// Cleanup test failover.
    CleanupStep {
        DeleteTestVm => "Delete the test VM and its overlay",
    }
);

steps!(
    /// Reverse replication (reprotect).
    ReprotectStep {
        CheckPrerequisites => "Check prerequisites",
        CommitFailover => "Commit failover",
        PrepareFormerPrimary => "Prepare the former primary host as replica (its disks are reused)",
        StartReverseReplication => "Start reverse replication",
        Resynchronise => "Resynchronise",
    }
);

steps!(
    /// A failover the replica host made on its own.
    LocalFailoverStep {
        Detected => "Local failover detected",
    }
);

/// A step of a recovery plan run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PlanStep {
    /// Planned and unplanned: every primary stops first.
    Shutdown,
    /// One VM of a group (its own failover job does the work).
    Vm { group: u32, vm: String },
    /// A script or manual action, named after where it runs (`After group 1, action 2: ...`).
    Action(String),
}

impl PlanStep {
    pub const SHUTDOWN: &'static str = "Shut down the primary VMs";

    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Shutdown => Cow::Borrowed(Self::SHUTDOWN),
            Self::Vm { group, vm } => Cow::Owned(format!("Group {group}: {vm}")),
            Self::Action(s) => Cow::Owned(s.clone()),
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        if s == Self::SHUTDOWN {
            return Some(Self::Shutdown);
        }
        if let Some(rest) = s.strip_prefix("Group ")
            && let Some((n, vm)) = rest.split_once(": ")
            && let Ok(group) = n.parse()
        {
            return Some(Self::Vm { group, vm: vm.to_owned() });
        }
        (s.starts_with("Before the first group, action ") || s.starts_with("After group "))
            .then(|| Self::Action(s.to_owned()))
    }
}

impl From<PlanStep> for Cow<'static, str> {
    fn from(s: PlanStep) -> Self {
        s.name()
    }
}

impl From<&PlanStep> for Cow<'static, str> {
    fn from(s: &PlanStep) -> Self {
        s.name()
    }
}

/// A step of a job of any kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    Enable(EnableStep),
    Finalize(FinalizeStep),
    Disable(DisableStep),
    Resync(ResyncStep),
    TestFailover(TestFailoverStep),
    PlannedFailover(PlannedFailoverStep),
    UnplannedFailover(UnplannedFailoverStep),
    Commit(CommitStep),
    ChangePoint(ChangePointStep),
    Cleanup(CleanupStep),
    Reprotect(ReprotectStep),
    LocalFailover(LocalFailoverStep),
    Plan(PlanStep),
}

impl Step {
    /// The step of a job of `kind` named `name`; `None` when that kind has no such step.
    pub fn parse(kind: JobKind, name: &str) -> Option<Self> {
        Some(match kind {
            JobKind::EnableProtection => Self::Enable(EnableStep::from_name(name)?),
            JobKind::FinalizeProtection => Self::Finalize(FinalizeStep::from_name(name)?),
            JobKind::DisableProtection => Self::Disable(DisableStep::from_name(name)?),
            JobKind::Resync => Self::Resync(ResyncStep::from_name(name)?),
            JobKind::TestFailover => Self::TestFailover(TestFailoverStep::from_name(name)?),
            JobKind::PlannedFailover => Self::PlannedFailover(PlannedFailoverStep::from_name(name)?),
            JobKind::UnplannedFailover => Self::UnplannedFailover(UnplannedFailoverStep::from_name(name)?),
            JobKind::CommitFailover => Self::Commit(CommitStep::from_name(name)?),
            JobKind::ChangePoint => Self::ChangePoint(ChangePointStep::from_name(name)?),
            JobKind::CleanupTestFailover => Self::Cleanup(CleanupStep::from_name(name)?),
            JobKind::ReverseReplication => Self::Reprotect(ReprotectStep::from_name(name)?),
            JobKind::LocalFailover => Self::LocalFailover(LocalFailoverStep::from_name(name)?),
            JobKind::RecoveryPlan => Self::Plan(PlanStep::from_name(name)?),
        })
    }

    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Enable(s) => (*s).into(),
            Self::Finalize(s) => (*s).into(),
            Self::Disable(s) => (*s).into(),
            Self::Resync(s) => (*s).into(),
            Self::TestFailover(s) => (*s).into(),
            Self::PlannedFailover(s) => (*s).into(),
            Self::UnplannedFailover(s) => (*s).into(),
            Self::Commit(s) => (*s).into(),
            Self::ChangePoint(s) => (*s).into(),
            Self::Cleanup(s) => (*s).into(),
            Self::Reprotect(s) => (*s).into(),
            Self::LocalFailover(s) => (*s).into(),
            Self::Plan(s) => s.name(),
        }
    }

    /// Every fixed step of `kind` (a plan's are built from the plan: examples).
    pub fn all_of(kind: JobKind) -> Vec<Self> {
        match kind {
            JobKind::EnableProtection => EnableStep::ALL.iter().map(|s| Self::Enable(*s)).collect(),
            JobKind::FinalizeProtection => FinalizeStep::ALL.iter().map(|s| Self::Finalize(*s)).collect(),
            JobKind::DisableProtection => DisableStep::ALL.iter().map(|s| Self::Disable(*s)).collect(),
            JobKind::Resync => ResyncStep::ALL.iter().map(|s| Self::Resync(*s)).collect(),
            JobKind::TestFailover => TestFailoverStep::ALL.iter().map(|s| Self::TestFailover(*s)).collect(),
            JobKind::PlannedFailover => PlannedFailoverStep::ALL.iter().map(|s| Self::PlannedFailover(*s)).collect(),
            JobKind::UnplannedFailover => {
                UnplannedFailoverStep::ALL.iter().map(|s| Self::UnplannedFailover(*s)).collect()
            }
            JobKind::CommitFailover => CommitStep::ALL.iter().map(|s| Self::Commit(*s)).collect(),
            JobKind::ChangePoint => ChangePointStep::ALL.iter().map(|s| Self::ChangePoint(*s)).collect(),
            JobKind::CleanupTestFailover => CleanupStep::ALL.iter().map(|s| Self::Cleanup(*s)).collect(),
            JobKind::ReverseReplication => ReprotectStep::ALL.iter().map(|s| Self::Reprotect(*s)).collect(),
            JobKind::LocalFailover => LocalFailoverStep::ALL.iter().map(|s| Self::LocalFailover(*s)).collect(),
            JobKind::RecoveryPlan => vec![
                Self::Plan(PlanStep::Shutdown),
                Self::Plan(PlanStep::Vm { group: 1, vm: "db".into() }),
                Self::Plan(PlanStep::Action("Before the first group, action 1: manual action".into())),
                Self::Plan(PlanStep::Action("After group 2, action 1: script /opt/dns.sh".into())),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_parses_back_from_its_words() {
        for kind in JobKind::ALL {
            let all = Step::all_of(kind);
            assert!(!all.is_empty(), "{kind}");
            for s in all {
                assert_eq!(Step::parse(kind, &s.name()), Some(s.clone()), "{kind}: {}", s.name());
            }
            assert_eq!(Step::parse(kind, "No such step"), None, "{kind}");
        }
        // The same words under another kind are that kind's step, or none.
        assert_eq!(Step::parse(JobKind::Resync, "Initial replication"), None);
        assert_eq!(PlanStep::from_name("Group 12: web-1"), Some(PlanStep::Vm { group: 12, vm: "web-1".into() }));
        assert_eq!(PlanStep::from_name("Group x: web"), None);
    }

    #[test]
    fn words_are_the_ones_printed_before() {
        assert_eq!(EnableStep::InitialReplication.name(), "Initial replication");
        assert_eq!(EnableStep::WaitingForImport.name(), "Waiting for import");
        assert_eq!(PlanStep::Vm { group: 1, vm: "db".into() }.name(), "Group 1: db");
        assert_eq!(PlanStep::Shutdown.name(), "Shut down the primary VMs");
    }
}
