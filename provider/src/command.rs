//! What sending a command to an agent can fail with: the host unreachable, silent, or
//! refusing with its error code. Below both the control sessions (which produce it)
//! and the services that pass an agent's answer on to the operator.

use std::time::Duration;

use siterecovery_proto::v1;
use tonic::Status;

/// Why a command did not succeed on its host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("host {0} is not connected")]
    NotConnected(String),
    #[error("host {0} disconnected")]
    Disconnected(String),
    #[error("host {0} disconnected before answering")]
    DisconnectedBeforeAnswer(String),
    #[error("host {host} did not answer within {after:?}")]
    Timeout { host: String, after: Duration },
    /// The agent carried the command out and failed, with its error code.
    #[error("host {host}: {message}")]
    Refused { host: String, code: v1::ErrorCode, message: String },
    #[error("sessions lock poisoned")]
    Poisoned,
}

impl CommandError {
    /// The message, as the operator sees it.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The gRPC code the operator gets: the agent's code, or unavailable when the host
    /// could not be reached.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::NotConnected(_) | Self::Disconnected(_) | Self::DisconnectedBeforeAnswer(_) => Code::Unavailable,
            Self::Timeout { .. } => Code::DeadlineExceeded,
            Self::Poisoned => Code::Internal,
            Self::Refused { code, .. } => match code {
                v1::ErrorCode::InvalidArgument => Code::InvalidArgument,
                v1::ErrorCode::NotFound => Code::NotFound,
                v1::ErrorCode::AlreadyExists => Code::AlreadyExists,
                v1::ErrorCode::FailedPrecondition => Code::FailedPrecondition,
                v1::ErrorCode::ResourceExhausted => Code::ResourceExhausted,
                _ => Code::Internal,
            },
        }
    }
}

/// The one mapping of command errors to gRPC statuses (for the services that pass an
/// agent's answer on to the operator).
impl From<CommandError> for Status {
    fn from(e: CommandError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
