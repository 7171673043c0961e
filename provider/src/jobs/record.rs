//! The record of one job as stored (table `jobs`) and shown: its kind, steps with
//! their state and detail, progress and outcome. Pure: no I/O.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

use super::kind::JobKind;
use super::steps::{
    ChangePointStep, CleanupStep, CommitStep, DisableStep, EnableStep, FinalizeStep, LocalFailoverStep, PlanStep,
    PlannedFailoverStep, ReprotectStep, ResyncStep, Step, TestFailoverStep, UnplannedFailoverStep,
};

/// Anything that names a step: a step enum, or the words of a plan's step.
pub trait AsStepName {
    fn step_name(&self) -> Cow<'_, str>;
}

impl AsStepName for &str {
    fn step_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsStepName for String {
    fn step_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsStepName for &String {
    fn step_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsStepName for PlanStep {
    fn step_name(&self) -> Cow<'_, str> {
        self.name()
    }
}

impl AsStepName for &PlanStep {
    fn step_name(&self) -> Cow<'_, str> {
        self.name()
    }
}

impl AsStepName for Step {
    fn step_name(&self) -> Cow<'_, str> {
        self.name()
    }
}

macro_rules! step_names {
    ($($t:ty),+) => {$(
        impl AsStepName for $t {
            fn step_name(&self) -> Cow<'_, str> {
                Cow::Borrowed(self.name())
            }
        }
    )+};
}

step_names!(
    EnableStep,
    FinalizeStep,
    DisableStep,
    ResyncStep,
    TestFailoverStep,
    PlannedFailoverStep,
    UnplannedFailoverStep,
    CommitStep,
    ChangePointStep,
    CleanupStep,
    ReprotectStep,
    LocalFailoverStep
);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl JobState {
    pub fn to_wire(self) -> v1::JobState {
        match self {
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
        }
    }

    /// The word of the wire's job state.
    pub fn name_of(v: i32) -> &'static str {
        match v1::JobState::try_from(v) {
            Ok(v1::JobState::Running) => "running",
            Ok(v1::JobState::Succeeded) => "succeeded",
            Ok(v1::JobState::Failed) => "failed",
            _ => "unknown",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

impl StepState {
    pub fn to_wire(self) -> v1::StepState {
        match self {
            StepState::Pending => v1::StepState::Pending,
            StepState::Running => v1::StepState::Running,
            StepState::Succeeded => v1::StepState::Succeeded,
            StepState::Failed => v1::StepState::Failed,
            StepState::Skipped => v1::StepState::Skipped,
        }
    }

    /// The word of the wire's step state.
    pub fn name_of(v: i32) -> &'static str {
        match v1::StepState::try_from(v) {
            Ok(v1::StepState::Pending) => "pending",
            Ok(v1::StepState::Running) => "running",
            Ok(v1::StepState::Succeeded) => "succeeded",
            Ok(v1::StepState::Failed) => "failed",
            Ok(v1::StepState::Skipped) => "skipped",
            _ => "unknown",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    pub detail: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub vm: String,
    pub state: JobState,
    pub steps: Vec<StepRecord>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub created_unix_ms: i64,
    pub ended_unix_ms: i64,
    pub error: String,
    /// The relationship the job acts on, once known.
    #[serde(default)]
    pub relationship_id: String,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl JobRecord {
    pub fn new<S: AsStepName>(id: String, kind: JobKind, vm: &str, steps: &[S], now: i64) -> Self {
        Self {
            id,
            kind,
            vm: vm.into(),
            state: JobState::Running,
            steps: steps
                .iter()
                .map(|n| StepRecord {
                    name: n.step_name().into_owned(),
                    state: StepState::Pending,
                    detail: String::new(),
                    started_unix_ms: 0,
                    ended_unix_ms: 0,
                })
                .collect(),
            done_bytes: 0,
            total_bytes: 0,
            rate_bytes_per_sec: 0,
            created_unix_ms: now,
            ended_unix_ms: 0,
            error: String::new(),
            relationship_id: String::new(),
        }
    }

    /// The step now running, if any.
    pub fn running_step(&self) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.state == StepState::Running)
    }

    /// The typed step now running; `None` when none runs or its words are not a step
    /// of this job's kind.
    pub fn running(&self) -> Option<Step> {
        self.running_step().and_then(|s| Step::parse(self.kind, &s.name))
    }

    fn step_mut(&mut self, step: impl AsStepName) -> Option<&mut StepRecord> {
        let name = step.step_name();
        self.steps.iter_mut().find(|s| s.name == name)
    }

    pub fn start_step(&mut self, name: impl AsStepName, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Running;
            s.started_unix_ms = now;
            s.detail = detail.into();
        }
    }

    pub fn set_detail(&mut self, name: impl AsStepName, detail: &str) {
        if let Some(s) = self.step_mut(name) {
            s.detail = detail.into();
        }
    }

    pub fn succeed_step(&mut self, name: impl AsStepName, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Succeeded;
            s.ended_unix_ms = now;
            if !detail.is_empty() {
                s.detail = detail.into();
            }
        }
    }

    /// Marks a step skipped (with why).
    pub fn skip_step(&mut self, name: impl AsStepName, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Skipped;
            s.started_unix_ms = now;
            s.ended_unix_ms = now;
            s.detail = detail.into();
        }
    }

    /// Ends a step as failed without ending the job (a plan goes on with the other VMs
    /// of a group before it fails).
    pub fn fail_step(&mut self, name: impl AsStepName, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Failed;
            if s.started_unix_ms == 0 {
                s.started_unix_ms = now;
            }
            s.ended_unix_ms = now;
            s.detail = detail.into();
        }
    }

    /// Ends the job as succeeded (pending steps, if any, are skipped).
    pub fn succeed(&mut self, now: i64) {
        for s in &mut self.steps {
            if s.state == StepState::Pending {
                s.state = StepState::Skipped;
            }
        }
        self.state = JobState::Succeeded;
        self.ended_unix_ms = now;
    }

    /// Ends the job as failed: the running step (or the first pending one) fails with
    /// `error`, the later ones are skipped.
    pub fn fail(&mut self, error: &str, now: i64) {
        let idx = self.steps.iter().position(|s| s.state == StepState::Running).or_else(|| {
            // A step that already failed (a plan's VM) is the failure's place.
            if self.steps.iter().any(|s| s.state == StepState::Failed) {
                None
            } else {
                self.steps.iter().position(|s| s.state == StepState::Pending)
            }
        });
        if let Some(i) = idx {
            let s = &mut self.steps[i];
            s.state = StepState::Failed;
            if s.started_unix_ms == 0 {
                s.started_unix_ms = now;
            }
            s.ended_unix_ms = now;
            s.detail = if s.detail.is_empty() { error.into() } else { format!("{}; {error}", s.detail) };
        }
        for s in &mut self.steps {
            if s.state == StepState::Pending {
                s.state = StepState::Skipped;
            }
        }
        self.state = JobState::Failed;
        self.error = error.into();
        self.ended_unix_ms = now;
    }

    pub fn to_proto(&self) -> v1::Job {
        v1::Job {
            id: self.id.clone(),
            kind: i32::from(self.kind),
            vm: self.vm.clone(),
            state: self.state.to_wire().into(),
            steps: self
                .steps
                .iter()
                .map(|s| v1::JobStep {
                    name: s.name.clone(),
                    state: s.state.to_wire().into(),
                    detail: s.detail.clone(),
                    started_unix_ms: s.started_unix_ms,
                    ended_unix_ms: s.ended_unix_ms,
                })
                .collect(),
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            rate_bytes_per_sec: self.rate_bytes_per_sec,
            created_unix_ms: self.created_unix_ms,
            ended_unix_ms: self.ended_unix_ms,
            error: self.error.clone(),
        }
    }
}
