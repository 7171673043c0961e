//! The replication state machine of a relationship: [`ReplicationState`], the
//! [`Event`]s that move it, and [`ReplicationState::next`], the pure transition
//! function (refused transitions are [`InvalidTransition`]s).

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

/// Replication state of a relationship, as the provider sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationState {
    NotEnabled,
    WaitingForInitial,
    InitialInProgress,
    Replicating,
    ResyncRequired,
    Resynchronising,
    Paused,
    /// A planned or unplanned failover job is running.
    FailoverInProgress,
    /// Failed over, waiting for commit (the point can still be changed).
    FailedOver,
    /// The failed-over VM owns its disks; protect it again with reprotect.
    Committed,
    StoppedOnError,
}

impl ReplicationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotEnabled => "not enabled",
            Self::WaitingForInitial => "waiting for initial replication",
            Self::InitialInProgress => "initial replication in progress",
            Self::Replicating => "replicating",
            Self::ResyncRequired => "resync required",
            Self::Resynchronising => "resynchronising",
            Self::Paused => "paused",
            Self::FailoverInProgress => "failover in progress",
            Self::FailedOver => "failed over (waiting for commit)",
            Self::Committed => "committed",
            Self::StoppedOnError => "stopped on error",
        }
    }

    /// Every state, in wire order.
    pub const ALL: [Self; 11] = [
        Self::NotEnabled,
        Self::WaitingForInitial,
        Self::InitialInProgress,
        Self::Replicating,
        Self::ResyncRequired,
        Self::Resynchronising,
        Self::Paused,
        Self::FailoverInProgress,
        Self::FailedOver,
        Self::Committed,
        Self::StoppedOnError,
    ];

    pub fn in_failover(self) -> bool {
        matches!(self, Self::FailoverInProgress | Self::FailedOver | Self::Committed)
    }
}

impl From<ReplicationState> for v1::ReplicationState {
    fn from(s: ReplicationState) -> Self {
        use ReplicationState as S;
        match s {
            S::NotEnabled => Self::NotEnabled,
            S::WaitingForInitial => Self::WaitingForInitial,
            S::InitialInProgress => Self::InitialInProgress,
            S::Replicating => Self::Replicating,
            S::ResyncRequired => Self::ResyncRequired,
            S::Resynchronising => Self::Resynchronising,
            S::Paused => Self::Paused,
            S::FailoverInProgress => Self::FailoverInProgress,
            S::FailedOver => Self::FailedOver,
            S::Committed => Self::Committed,
            S::StoppedOnError => Self::StoppedOnError,
        }
    }
}

impl TryFrom<i32> for ReplicationState {
    type Error = i32;
    /// The wire's value (the CLI prints the words); unspecified and unknown refused.
    fn try_from(v: i32) -> Result<Self, i32> {
        Self::ALL.iter().copied().find(|s| i32::from(v1::ReplicationState::from(*s)) == v).ok_or(v)
    }
}

/// The phase an agent's `ReplicationStatus` reports.
pub use siterecovery_proto::model::SenderState as AgentState;

/// What happens to a relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The relationship was created (Enable protection).
    Enabled,
    /// A status from the primary agent. `error` is whether it carries an error.
    Agent { state: AgentState, error: bool, recoverable: bool },
    /// The operator asked for a resync.
    ResyncRequested,
    /// Protection was removed.
    Disabled,
    /// A test failover starts (the state stays; checked only).
    TestFailover,
    /// A planned or unplanned failover starts.
    FailoverStarted { planned: bool },
    /// The VM runs on the replica host; `committed` for a planned failover.
    FailoverDone { committed: bool },
    /// The failover job failed before the VM ran on the replica host.
    FailoverAborted,
    /// The operator chose another point before commit.
    PointChanged,
    /// The operator committed the failover.
    Committed,
    /// The replica host reports a VM it failed over on its own (provider down).
    LocalFailover { committed: bool },
    /// Reverse replication replaced this relationship by a reversed one.
    Reprotected,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not possible while replication is {from}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

impl ReplicationState {
    /// The transition function: the next state, or why the event does not apply.
    pub fn next(self, ev: Event) -> Result<Self, InvalidTransition> {
        use ReplicationState as S;
        let invalid = |event| Err(InvalidTransition { from: self.as_str(), event });
        match ev {
            Event::Disabled => Ok(S::NotEnabled),
            Event::Enabled => match self {
                S::NotEnabled => Ok(S::WaitingForInitial),
                _ => invalid("enable protection"),
            },
            Event::ResyncRequested => match self {
                S::Replicating | S::ResyncRequired | S::Paused | S::StoppedOnError => Ok(S::ResyncRequired),
                S::Resynchronising => Ok(S::Resynchronising),
                _ => invalid("resync"),
            },
            Event::TestFailover => match self {
                S::Replicating | S::Paused | S::ResyncRequired | S::Resynchronising | S::StoppedOnError => Ok(self),
                _ => invalid("a test failover"),
            },
            Event::FailoverStarted { planned: true } => match self {
                // Planned failover ships every remaining log: the chain must be whole.
                S::Replicating | S::Paused => Ok(S::FailoverInProgress),
                _ => invalid("a planned failover"),
            },
            Event::FailoverStarted { planned: false } => match self {
                S::Replicating | S::Paused | S::ResyncRequired | S::Resynchronising | S::StoppedOnError => {
                    Ok(S::FailoverInProgress)
                }
                _ => invalid("an unplanned failover"),
            },
            Event::FailoverDone { committed } => match self {
                S::FailoverInProgress => Ok(if committed { S::Committed } else { S::FailedOver }),
                _ => invalid("ending a failover"),
            },
            // Replication is held after a failed failover: statuses from the primary (when
            // it still replicates) move it on again.
            Event::FailoverAborted => match self {
                S::FailoverInProgress => Ok(S::Paused),
                _ => invalid("aborting a failover"),
            },
            Event::PointChanged => match self {
                S::FailedOver => Ok(S::FailedOver),
                _ => invalid("changing the recovery point"),
            },
            Event::Committed => match self {
                S::FailedOver => Ok(S::Committed),
                _ => invalid("commit"),
            },
            Event::LocalFailover { committed } => match self {
                S::NotEnabled | S::Committed => invalid("a local failover"),
                S::FailedOver if !committed => Ok(S::FailedOver),
                _ => Ok(if committed { S::Committed } else { S::FailedOver }),
            },
            Event::Reprotected => match self {
                S::FailedOver | S::Committed => Ok(S::NotEnabled),
                _ => invalid("reverse replication"),
            },
            Event::Agent { state, error, recoverable } => {
                if self == S::NotEnabled || self.in_failover() {
                    return invalid("a replication status");
                }
                // A non-recoverable error stops replication whatever phase it reports.
                if error && !recoverable {
                    return Ok(S::StoppedOnError);
                }
                Ok(match state {
                    AgentState::Waiting | AgentState::WaitingForImport => S::WaitingForInitial,
                    AgentState::Initial => S::InitialInProgress,
                    AgentState::Replicating => S::Replicating,
                    AgentState::ResyncRequired => S::ResyncRequired,
                    AgentState::Resynchronising => S::Resynchronising,
                    AgentState::Paused => S::Paused,
                    // Stopped without an unrecoverable error: held, not broken.
                    AgentState::Stopped => S::Paused,
                    // A recoverable error is retried in the phase it happened in.
                    AgentState::Error => self,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn agent(state: AgentState) -> Event {
        Event::Agent { state, error: false, recoverable: false }
    }

    #[test]
    fn enable_then_initial_then_replicating() {
        let s = S::NotEnabled.next(Event::Enabled).expect("enable");
        assert_eq!(s, S::WaitingForInitial);
        let s = s.next(agent(AgentState::Initial)).expect("initial");
        assert_eq!(s, S::InitialInProgress);
        let s = s.next(agent(AgentState::Replicating)).expect("replicating");
        assert_eq!(s, S::Replicating);
        assert!(s.next(Event::Enabled).is_err(), "cannot enable twice");
        assert_eq!(s.next(Event::Disabled), Ok(S::NotEnabled));
    }

    #[test]
    fn errors_recoverable_keep_the_phase_unrecoverable_stop() {
        let rec = Event::Agent { state: AgentState::Error, error: true, recoverable: true };
        assert_eq!(S::InitialInProgress.next(rec), Ok(S::InitialInProgress));
        assert_eq!(S::Replicating.next(rec), Ok(S::Replicating));
        let fatal = Event::Agent { state: AgentState::Error, error: true, recoverable: false };
        assert_eq!(S::Replicating.next(fatal), Ok(S::StoppedOnError));
        let fatal_stopped = Event::Agent { state: AgentState::Stopped, error: true, recoverable: false };
        assert_eq!(S::InitialInProgress.next(fatal_stopped), Ok(S::StoppedOnError));
        assert_eq!(S::Replicating.next(agent(AgentState::Stopped)), Ok(S::Paused));
        // An operator resync is the way out of a broken chain.
        assert_eq!(S::StoppedOnError.next(Event::ResyncRequested), Ok(S::ResyncRequired));
    }

    #[test]
    fn resync_cycle() {
        assert!(S::WaitingForInitial.next(Event::ResyncRequested).is_err());
        assert!(S::InitialInProgress.next(Event::ResyncRequested).is_err());
        let s = S::Replicating.next(Event::ResyncRequested).expect("resync");
        assert_eq!(s, S::ResyncRequired);
        let s = s.next(agent(AgentState::Resynchronising)).expect("resynchronising");
        assert_eq!(s, S::Resynchronising);
        assert_eq!(s.next(Event::ResyncRequested), Ok(S::Resynchronising));
        assert_eq!(s.next(agent(AgentState::Replicating)), Ok(S::Replicating));
        assert_eq!(S::Replicating.next(agent(AgentState::ResyncRequired)), Ok(S::ResyncRequired));
        assert_eq!(S::Replicating.next(agent(AgentState::Paused)), Ok(S::Paused));
        assert_eq!(S::Paused.next(agent(AgentState::Replicating)), Ok(S::Replicating));
    }

    #[test]
    fn failover_states_and_not_enabled_ignore_statuses() {
        for s in [S::NotEnabled, S::FailoverInProgress, S::FailedOver, S::Committed] {
            assert!(s.next(agent(AgentState::Replicating)).is_err(), "{s:?}");
        }
        assert!(S::FailedOver.next(Event::ResyncRequested).is_err());
    }

    #[test]
    fn failover_lifecycle_transitions() {
        let planned = Event::FailoverStarted { planned: true };
        let unplanned = Event::FailoverStarted { planned: false };
        // Planned: only with a whole chain.
        assert_eq!(S::Replicating.next(planned), Ok(S::FailoverInProgress));
        assert_eq!(S::Paused.next(planned), Ok(S::FailoverInProgress));
        assert!(S::ResyncRequired.next(planned).is_err());
        assert!(S::InitialInProgress.next(planned).is_err());
        // Unplanned: from any state with a recovery point.
        for s in [S::Replicating, S::Paused, S::ResyncRequired, S::Resynchronising, S::StoppedOnError] {
            assert_eq!(s.next(unplanned), Ok(S::FailoverInProgress), "{s:?}");
            assert_eq!(s.next(Event::TestFailover), Ok(s), "{s:?}");
        }
        for s in [
            S::NotEnabled,
            S::WaitingForInitial,
            S::InitialInProgress,
            S::FailoverInProgress,
            S::FailedOver,
            S::Committed,
        ] {
            assert!(s.next(unplanned).is_err(), "{s:?}");
            assert!(s.next(Event::TestFailover).is_err(), "{s:?}");
        }
        let p = S::FailoverInProgress;
        assert_eq!(p.next(Event::FailoverDone { committed: true }), Ok(S::Committed));
        assert_eq!(p.next(Event::FailoverDone { committed: false }), Ok(S::FailedOver));
        assert_eq!(p.next(Event::FailoverAborted), Ok(S::Paused));
        assert!(p.next(Event::Committed).is_err(), "commit while the failover runs");
        // Before commit: change the point, then commit; after: no more changes.
        assert_eq!(S::FailedOver.next(Event::PointChanged), Ok(S::FailedOver));
        assert_eq!(S::FailedOver.next(Event::Committed), Ok(S::Committed));
        assert!(S::Committed.next(Event::PointChanged).is_err());
        assert!(S::Committed.next(Event::Committed).is_err());
        // Commit without a failover.
        assert!(S::Replicating.next(Event::Committed).is_err());
        assert!(S::Replicating.next(Event::PointChanged).is_err());
        // Reprotect ends the failed-over relationship only.
        assert_eq!(S::Committed.next(Event::Reprotected), Ok(S::NotEnabled));
        assert_eq!(S::FailedOver.next(Event::Reprotected), Ok(S::NotEnabled));
        assert!(S::Replicating.next(Event::Reprotected).is_err());
        assert!(S::FailoverInProgress.next(Event::Reprotected).is_err());
        // Local failover seen in an inventory.
        assert_eq!(S::Replicating.next(Event::LocalFailover { committed: false }), Ok(S::FailedOver));
        assert_eq!(S::FailoverInProgress.next(Event::LocalFailover { committed: true }), Ok(S::Committed));
        assert_eq!(S::FailedOver.next(Event::LocalFailover { committed: true }), Ok(S::Committed));
        assert!(S::Committed.next(Event::LocalFailover { committed: true }).is_err());
        assert!(S::NotEnabled.next(Event::LocalFailover { committed: false }).is_err());
        let e = S::Replicating.next(Event::Committed).expect_err("commit");
        assert_eq!(e.to_string(), "commit is not possible while replication is replicating");
    }

    #[test]
    fn agent_state_strings() {
        for (s, want) in [
            ("waiting", AgentState::Waiting),
            ("initial", AgentState::Initial),
            ("replicating", AgentState::Replicating),
            ("resync-required", AgentState::ResyncRequired),
            ("resynchronising", AgentState::Resynchronising),
            ("paused", AgentState::Paused),
            ("stopped", AgentState::Stopped),
            ("error", AgentState::Error),
        ] {
            assert_eq!(AgentState::from_word(s), Some(want));
            assert_eq!(AgentState::try_from(i32::from(want)), Ok(want));
        }
        assert_eq!(AgentState::from_word("bogus"), None);
    }
}
