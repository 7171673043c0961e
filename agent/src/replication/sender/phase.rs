//! The sender's state machine: where one VM's replication is ([`Phase`]), what can
//! happen to it ([`Event`]), and the pure transition function [`next`]. The task loop
//! (`task`) does the I/O and feeds the outcome in as events; what the provider sees
//! ([`model::SenderState`]) and what is persisted ([`Stage`]) are derived from the phase.
//!
//! ```text
//!   InitialCopy ──CopyDone──▶ Replicating ◀──ImportDone── WaitingForImport
//!       │  ▲                   │  ▲   ▲
//!  VmStopped VmRunning   ResyncNeeded │  └──ResyncDone── Resynchronising
//!       ▼  │                   ▼  │                         ▲
//!     Paused             ResyncRequired ──ResyncStarted─────┘
//!  any active ──FatalError──▶ Failed ──Retry──▶ (the phase it failed in)
//!  anything but Stopped ──Stop──▶ Stopped
//! ```

use serde::{Deserialize, Serialize};
use siterecovery_proto::model;

/// The persisted part of the phase (`replication.json`, field `phase`): what a restarted
/// sender resumes. The words are those of the files written before the state machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Stage {
    #[default]
    Initial,
    Replicating,
    /// `requested`: an operator asked (runs at once); otherwise detected (runs outside
    /// business hours).
    ResyncRequired {
        reason: String,
        requested: bool,
    },
}

/// What a paused sender goes back to when the VM runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    InitialCopy,
    Replicating,
}

/// Where the sender of one VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Copying the allocated ranges of each disk (resumable from the acknowledged offset).
    InitialCopy,
    /// Offline initial replication: the copy was exported; nothing ships until the
    /// replica host reports its copy complete.
    WaitingForImport,
    /// Shipping one recovery point per interval.
    Replicating,
    /// The VM is stopped: the copy waits; during replication what is sealed still ships.
    Paused(Resume),
    /// Delta replication cannot continue; the block comparison waits to run.
    ResyncRequired { reason: String, requested: bool },
    /// The block comparison is running.
    Resynchronising { reason: String, requested: bool },
    /// A fatal error: idle until an operator asks for a resync (or the task stops).
    Failed { error: String, resume: Box<Phase> },
    /// The task ended.
    Stopped,
}

/// What happened, as the task loop tells the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The VM's disks are gone (the VM stopped).
    VmStopped,
    /// The VM's disks are there.
    VmRunning,
    /// Every disk's initial copy is acknowledged complete.
    CopyDone,
    /// The replica host imported the offline copy.
    ImportDone,
    /// The replica acknowledged a point.
    PointAcknowledged,
    /// Delta replication cannot continue (`requested`: an operator asked).
    ResyncNeeded { reason: String, requested: bool },
    /// Business hours allow it (or an operator asked): the comparison starts.
    ResyncStarted,
    /// The resync point was acknowledged.
    ResyncDone,
    /// A step failed and will be retried with backoff.
    RecoverableError,
    /// A step failed in a way only an operator can fix.
    FatalError { error: String },
    /// An operator woke a failed sender: try again where it failed.
    Retry,
    /// The task is stopping.
    Stop,
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sender: {event} is not possible while {phase}")]
pub struct InvalidTransition {
    pub phase: String,
    pub event: String,
}

/// The phase after `event`, or why `event` cannot happen in `phase`.
pub fn next(phase: &Phase, event: Event) -> Result<Phase, InvalidTransition> {
    use Event as E;
    use Phase as P;
    let refuse = |event: &Event| InvalidTransition { phase: format!("{phase:?}"), event: format!("{event:?}") };
    let out = match (phase, event) {
        (P::Stopped, e) => return Err(refuse(&e)),
        (_, E::Stop) => P::Stopped,
        (P::InitialCopy, E::VmStopped) => P::Paused(Resume::InitialCopy),
        (P::Replicating, E::VmStopped) => P::Paused(Resume::Replicating),
        (P::Paused(Resume::InitialCopy), E::VmRunning) => P::InitialCopy,
        (P::Paused(Resume::Replicating), E::VmRunning) => P::Replicating,
        // Elsewhere the VM's state changes nothing (a resync waits for the VM itself).
        (p, E::VmStopped | E::VmRunning) => p.clone(),
        (P::InitialCopy, E::CopyDone) => P::Replicating,
        (P::WaitingForImport, E::ImportDone) => P::Replicating,
        (p @ (P::Replicating | P::Paused(Resume::Replicating)), E::PointAcknowledged) => p.clone(),
        // An operator's resync during the copy is ignored: the copy is resumable.
        (
            P::InitialCopy | P::WaitingForImport | P::Paused(Resume::InitialCopy),
            e @ E::ResyncNeeded { requested: true, .. },
        ) => return Err(refuse(&e)),
        // A resync that hits a broken chain cannot fix it: the caller makes it fatal.
        (P::Resynchronising { .. } | P::ResyncRequired { .. }, e @ E::ResyncNeeded { requested: false, .. }) => {
            return Err(refuse(&e));
        }
        (P::Failed { resume, .. }, e @ E::ResyncNeeded { requested: true, .. }) => return next(resume, e),
        (P::Failed { .. }, e @ E::ResyncNeeded { .. }) => return Err(refuse(&e)),
        (_, E::ResyncNeeded { reason, requested }) => P::ResyncRequired { reason, requested },
        (P::ResyncRequired { reason, requested }, E::ResyncStarted) => {
            P::Resynchronising { reason: reason.clone(), requested: *requested }
        }
        (P::Resynchronising { .. }, E::ResyncDone) => P::Replicating,
        // A failed comparison starts over (the hashes are fetched again).
        (P::Resynchronising { reason, requested }, E::RecoverableError) => {
            P::ResyncRequired { reason: reason.clone(), requested: *requested }
        }
        (P::Failed { .. }, e @ (E::RecoverableError | E::FatalError { .. })) => return Err(refuse(&e)),
        (p, E::RecoverableError) => p.clone(),
        (P::Resynchronising { reason, requested }, E::FatalError { error }) => {
            P::Failed { error, resume: Box::new(P::ResyncRequired { reason: reason.clone(), requested: *requested }) }
        }
        (p, E::FatalError { error }) => P::Failed { error, resume: Box::new(p.clone()) },
        (P::Failed { resume, .. }, E::Retry) => (**resume).clone(),
        (_, e) => return Err(refuse(&e)),
    };
    Ok(out)
}

impl Phase {
    /// The phase a sender resumes from its persisted state.
    pub fn from_stored(stage: &Stage, awaiting_import: bool) -> Phase {
        match stage {
            _ if awaiting_import => Phase::WaitingForImport,
            Stage::Initial => Phase::InitialCopy,
            Stage::Replicating => Phase::Replicating,
            Stage::ResyncRequired { reason, requested } => {
                Phase::ResyncRequired { reason: reason.clone(), requested: *requested }
            }
        }
    }

    /// What to persist: the stage and whether an import is awaited (`None` once
    /// stopped: the last persisted stage stays).
    pub fn stored(&self) -> Option<(Stage, bool)> {
        Some(match self {
            Phase::InitialCopy | Phase::Paused(Resume::InitialCopy) => (Stage::Initial, false),
            Phase::WaitingForImport => (Stage::Replicating, true),
            Phase::Replicating | Phase::Paused(Resume::Replicating) => (Stage::Replicating, false),
            // A crash during the comparison runs it again.
            Phase::ResyncRequired { reason, requested } | Phase::Resynchronising { reason, requested } => {
                (Stage::ResyncRequired { reason: reason.clone(), requested: *requested }, false)
            }
            Phase::Failed { resume, .. } => return resume.stored(),
            Phase::Stopped => return None,
        })
    }

    /// The state reported to the provider.
    pub fn reported(&self) -> model::SenderState {
        use model::SenderState as S;
        match self {
            Phase::InitialCopy => S::Initial,
            Phase::WaitingForImport => S::WaitingForImport,
            Phase::Replicating => S::Replicating,
            Phase::Paused(_) => S::Paused,
            Phase::ResyncRequired { .. } => S::ResyncRequired,
            Phase::Resynchronising { .. } => S::Resynchronising,
            Phase::Failed { .. } => S::Error,
            Phase::Stopped => S::Stopped,
        }
    }

    /// Whether the initial copy is not done yet (an operator's resync is ignored then).
    pub fn before_first_point(&self) -> bool {
        matches!(self, Phase::InitialCopy | Phase::WaitingForImport | Phase::Paused(Resume::InitialCopy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::SenderState as S;

    fn resync(requested: bool) -> Event {
        Event::ResyncNeeded { reason: "r".into(), requested }
    }
    fn required(requested: bool) -> Phase {
        Phase::ResyncRequired { reason: "r".into(), requested }
    }
    fn failed(resume: Phase) -> Phase {
        Phase::Failed { error: "e".into(), resume: Box::new(resume) }
    }

    #[test]
    fn the_happy_path() {
        let p = next(&Phase::InitialCopy, Event::CopyDone).expect("copy done");
        assert_eq!(p, Phase::Replicating);
        assert_eq!(next(&p, Event::PointAcknowledged), Ok(Phase::Replicating));
        assert_eq!(next(&Phase::WaitingForImport, Event::ImportDone), Ok(Phase::Replicating));
        let r = next(&p, resync(false)).expect("resync needed");
        assert_eq!(r, required(false));
        let s = next(&r, Event::ResyncStarted).expect("started");
        assert_eq!(s, Phase::Resynchronising { reason: "r".into(), requested: false });
        assert_eq!(next(&s, Event::ResyncDone), Ok(Phase::Replicating));
        assert_eq!(next(&s, Event::Stop), Ok(Phase::Stopped));
    }

    #[test]
    fn pausing_and_resuming_with_the_vm() {
        let p = next(&Phase::InitialCopy, Event::VmStopped).expect("pause");
        assert_eq!(p, Phase::Paused(Resume::InitialCopy));
        assert_eq!(next(&p, Event::VmRunning), Ok(Phase::InitialCopy));
        let p = next(&Phase::Replicating, Event::VmStopped).expect("pause");
        // What is sealed still ships while paused.
        assert_eq!(next(&p, Event::PointAcknowledged), Ok(p.clone()));
        assert_eq!(next(&p, Event::VmRunning), Ok(Phase::Replicating));
        // A resync and a wait for the import ignore the VM.
        assert_eq!(next(&required(true), Event::VmStopped), Ok(required(true)));
        assert_eq!(next(&Phase::WaitingForImport, Event::VmStopped), Ok(Phase::WaitingForImport));
    }

    #[test]
    fn errors_by_class() {
        assert_eq!(next(&Phase::Replicating, Event::RecoverableError), Ok(Phase::Replicating));
        assert_eq!(next(&Phase::InitialCopy, Event::RecoverableError), Ok(Phase::InitialCopy));
        let s = Phase::Resynchronising { reason: "r".into(), requested: true };
        assert_eq!(next(&s, Event::RecoverableError), Ok(required(true)));
        // A resync-class error during the copy needs a resync too.
        assert_eq!(next(&Phase::InitialCopy, resync(false)), Ok(required(false)));
        let f = next(&Phase::Replicating, Event::FatalError { error: "e".into() }).expect("fatal");
        assert_eq!(f, failed(Phase::Replicating));
        assert_eq!(next(&f, Event::Retry), Ok(Phase::Replicating));
        let f = next(&s, Event::FatalError { error: "e".into() }).expect("fatal");
        assert_eq!(next(&f, Event::Retry), Ok(required(true)));
    }

    #[test]
    fn an_operator_resync() {
        assert_eq!(next(&Phase::Replicating, resync(true)), Ok(required(true)));
        assert_eq!(next(&failed(Phase::Replicating), resync(true)), Ok(required(true)));
        assert_eq!(next(&required(false), resync(true)), Ok(required(true)));
    }

    #[test]
    fn refused_transitions() {
        let refused = [
            // An operator's resync during the copy: the copy is resumable.
            (Phase::InitialCopy, resync(true)),
            (Phase::WaitingForImport, resync(true)),
            (Phase::Paused(Resume::InitialCopy), resync(true)),
            (failed(Phase::InitialCopy), resync(true)),
            // A broken chain found by the resync itself.
            (required(false), resync(false)),
            (Phase::Resynchronising { reason: "r".into(), requested: true }, resync(false)),
            (failed(Phase::Replicating), resync(false)),
            // Out of order.
            (Phase::Replicating, Event::CopyDone),
            (Phase::InitialCopy, Event::ImportDone),
            (Phase::InitialCopy, Event::PointAcknowledged),
            (Phase::WaitingForImport, Event::PointAcknowledged),
            (required(true), Event::PointAcknowledged),
            (Phase::Replicating, Event::ResyncStarted),
            (required(true), Event::ResyncDone),
            (Phase::Replicating, Event::ResyncDone),
            (Phase::Replicating, Event::Retry),
            (failed(Phase::Replicating), Event::RecoverableError),
            (failed(Phase::Replicating), Event::FatalError { error: "again".into() }),
            (Phase::Paused(Resume::InitialCopy), Event::CopyDone),
            // Nothing after the end.
            (Phase::Stopped, Event::Stop),
            (Phase::Stopped, Event::VmRunning),
            (Phase::Stopped, Event::Retry),
        ];
        for (phase, event) in refused {
            let r = next(&phase, event.clone());
            assert!(r.is_err(), "{phase:?} + {event:?} gave {r:?}");
        }
    }

    #[test]
    fn reported_and_stored_forms() {
        assert_eq!(Phase::InitialCopy.reported(), S::Initial);
        assert_eq!(Phase::WaitingForImport.reported(), S::WaitingForImport);
        assert_eq!(Phase::Paused(Resume::Replicating).reported(), S::Paused);
        assert_eq!(failed(Phase::Replicating).reported(), S::Error);
        assert_eq!(Phase::Resynchronising { reason: "r".into(), requested: false }.reported(), S::Resynchronising);
        for p in [Phase::InitialCopy, Phase::WaitingForImport, Phase::Replicating, required(true), required(false)] {
            let (stage, awaiting) = p.stored().expect("stored");
            assert_eq!(Phase::from_stored(&stage, awaiting), p);
        }
        assert_eq!(failed(Phase::InitialCopy).stored(), Some((Stage::Initial, false)));
        assert_eq!(
            Phase::Resynchronising { reason: "r".into(), requested: true }.stored(),
            Some((Stage::ResyncRequired { reason: "r".into(), requested: true }, false))
        );
        assert_eq!(Phase::Stopped.stored(), None);
    }
}
