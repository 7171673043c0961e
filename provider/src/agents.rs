//! How orchestration reaches the agents: send a command to a host and await its
//! result, and whether a host is connected. The control sessions implement it
//! ([`crate::control::Sessions`]); tests use [`fake::FakeAgents`].

use std::time::Duration;

use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use crate::control::Sessions;

/// Why a command to an agent did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentErrorKind {
    /// The host is not connected, or went away before answering.
    Unavailable,
    /// The host did not answer in time.
    Timeout,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    /// Anything else the agent reported.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: AgentErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn kind(&self) -> AgentErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The agents as orchestration sees them.
#[tonic::async_trait]
pub trait Agents: Send + Sync {
    /// Sends `cmd` to host `host_id` and waits up to `timeout` for its result.
    async fn command(&self, host_id: &str, cmd: Command, timeout: Duration) -> Result<v1::CommandResult, AgentError>;

    /// Whether host `host_id` has a live control session.
    fn connected(&self, host_id: &str) -> bool;

    /// Free space the host last reported, in bytes.
    fn free_bytes(&self, host_id: &str) -> u64;
}

#[tonic::async_trait]
impl Agents for Sessions {
    async fn command(&self, host_id: &str, cmd: Command, timeout: Duration) -> Result<v1::CommandResult, AgentError> {
        use tonic::Code;
        Sessions::command(self, host_id, cmd, timeout).await.map_err(|s| {
            let kind = match s.code() {
                Code::Unavailable => AgentErrorKind::Unavailable,
                Code::DeadlineExceeded => AgentErrorKind::Timeout,
                Code::InvalidArgument => AgentErrorKind::InvalidArgument,
                Code::NotFound => AgentErrorKind::NotFound,
                Code::AlreadyExists => AgentErrorKind::AlreadyExists,
                Code::FailedPrecondition => AgentErrorKind::FailedPrecondition,
                Code::ResourceExhausted => AgentErrorKind::ResourceExhausted,
                _ => AgentErrorKind::Internal,
            };
            AgentError::new(kind, s.message())
        })
    }

    fn connected(&self, host_id: &str) -> bool {
        self.status(host_id).connected
    }

    fn free_bytes(&self, host_id: &str) -> u64 {
        self.status(host_id).free_bytes
    }
}

#[cfg(test)]
pub mod fake {
    //! Agents in memory: connected hosts, a log of every command, and a reply per
    //! command kind (success with an empty result unless told otherwise).

    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    use super::*;

    type Reply = Box<dyn Fn(&Command) -> Result<v1::CommandResult, AgentError> + Send + Sync>;

    #[derive(Default)]
    pub struct FakeAgents {
        connected: Mutex<HashSet<String>>,
        log: Mutex<Vec<(String, String)>>,
        replies: Mutex<HashMap<(String, &'static str), Reply>>,
    }

    /// The command's name as logged (`Failover`, `PrepareFailover`, ...).
    pub fn name(cmd: &Command) -> &'static str {
        match cmd {
            Command::PrepareReplica(_) => "PrepareReplica",
            Command::StartReplication(_) => "StartReplication",
            Command::StopReplication(_) => "StopReplication",
            Command::RequestResync(_) => "RequestResync",
            Command::ListPoints(_) => "ListPoints",
            Command::ExportPoint(_) => "ExportPoint",
            Command::UnexportPoint(_) => "UnexportPoint",
            Command::Failover(f) if f.test => "Failover(test)",
            Command::Failover(f) if f.planned => "Failover(planned)",
            Command::Failover(_) => "Failover",
            Command::PrepareFailover(_) => "PrepareFailover",
            Command::CommitFailover(_) => "CommitFailover",
            Command::ChangePoint(_) => "ChangePoint",
            Command::CleanupTestFailover(_) => "CleanupTestFailover",
            Command::StopVm(_) => "StopVm",
            Command::ExportInitial(_) => "ExportInitial",
            Command::ImportInitial(_) => "ImportInitial",
            _ => "other",
        }
    }

    impl FakeAgents {
        pub fn connect(&self, host: &str) {
            self.connected.lock().expect("lock").insert(host.to_owned());
        }

        pub fn disconnect(&self, host: &str) {
            self.connected.lock().expect("lock").remove(host);
        }

        /// Answers command `name` to `host` with `f`.
        pub fn reply(
            &self,
            host: &str,
            name: &'static str,
            f: impl Fn(&Command) -> Result<v1::CommandResult, AgentError> + Send + Sync + 'static,
        ) {
            self.replies.lock().expect("lock").insert((host.to_owned(), name), Box::new(f));
        }

        /// `host:Command` for every command sent, in order.
        pub fn log(&self) -> Vec<String> {
            self.log.lock().expect("lock").iter().map(|(h, c)| format!("{h}:{c}")).collect()
        }
    }

    #[tonic::async_trait]
    impl Agents for FakeAgents {
        async fn command(
            &self,
            host_id: &str,
            cmd: Command,
            _timeout: Duration,
        ) -> Result<v1::CommandResult, AgentError> {
            let n = name(&cmd);
            self.log.lock().expect("lock").push((host_id.to_owned(), n.to_owned()));
            if !self.connected(host_id) {
                return Err(AgentError::new(AgentErrorKind::Unavailable, format!("host {host_id} is not connected")));
            }
            match self.replies.lock().expect("lock").get(&(host_id.to_owned(), n)) {
                Some(f) => f(&cmd),
                None => Ok(v1::CommandResult { ok: true, ..Default::default() }),
            }
        }

        fn connected(&self, host_id: &str) -> bool {
            self.connected.lock().expect("lock").contains(host_id)
        }

        fn free_bytes(&self, _host_id: &str) -> u64 {
            1 << 40
        }
    }
}
