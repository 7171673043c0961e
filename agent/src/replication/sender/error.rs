//! Why a replication step failed ([`ReplicationError`]) and what the sender does about
//! it ([`ErrorClass`]: retry with backoff, resynchronise, or stop until an operator acts).

use std::io;

use tonic::Code;

use crate::hrl::HrlError;
use crate::persist::PersistError;
use crate::tracker::TrackerError;

/// Why a replication step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The replica host could not be reached (refused, TLS, timeout): the reason in full.
    #[error("connect to the replica host {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The replica host answered with an error.
    #[error("replica host: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The certificate of the peer at the replica address names another identity than
    /// the relationship's replica host (`found`: what the handshake refused, naming it).
    #[error("the replica host {expected} was expected at {address}, but its certificate was refused: {found}")]
    WrongPeer { address: String, expected: String, found: String },
    /// A tracked disk failed (seal, delete).
    #[error("tracker: {0}")]
    Tracker(#[from] TrackerError),
    /// A log to ship is missing or damaged: the chain is broken, only a resync helps.
    #[error("HRL log {disk} seq {seq}: {source}")]
    BrokenLog { disk: String, seq: u64, source: HrlError },
    /// Local I/O (image read).
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The state file cannot be read or written.
    #[error("state file: {0}")]
    State(#[from] PersistError),
    /// Delta replication cannot continue (reason given).
    #[error("resync required: {0}")]
    ResyncRequired(String),
    /// The replica answered something this sender does not expect.
    #[error("replica protocol: {0}")]
    Protocol(String),
    /// The outbound stream was closed by the RPC side (its error is reported instead).
    #[error("stream closed")]
    StreamClosed,
    /// The task is shutting down.
    #[error("cancelled")]
    Cancelled,
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff (network, low disk space, low memory).
    Recoverable,
    /// Delta replication cannot continue: resynchronise.
    Resync,
    /// Stop replicating until an operator acts.
    Fatal,
}

/// Classification of a status from the replica host.
pub fn classify_code(code: Code) -> ErrorClass {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => ErrorClass::Recoverable,
        Code::FailedPrecondition | Code::DataLoss => ErrorClass::Resync,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::NotFound
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Unimplemented
        | Code::Ok => ErrorClass::Fatal,
    }
}

/// Classification of a local I/O error: low space or memory passes, anything else
/// (EIO, permissions) needs an operator.
pub fn classify_io(e: &io::Error) -> ErrorClass {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(
            Errno::ENOSPC
            | Errno::EDQUOT
            | Errno::ENOMEM
            | Errno::EAGAIN
            | Errno::EINTR
            | Errno::EMFILE
            | Errno::ENFILE,
        ) => ErrorClass::Recoverable,
        _ if matches!(
            e.kind(),
            io::ErrorKind::OutOfMemory | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        ) =>
        {
            ErrorClass::Recoverable
        }
        _ => ErrorClass::Fatal,
    }
}

impl ReplicationError {
    pub fn class(&self) -> ErrorClass {
        match self {
            // Another host at the replica's address: nothing is sent to it, and the real
            // replica host may be back there (a move, a restart) by the next try.
            ReplicationError::Connect { .. }
            | ReplicationError::WrongPeer { .. }
            | ReplicationError::StreamClosed
            | ReplicationError::Cancelled => ErrorClass::Recoverable,
            ReplicationError::Rpc(s) => classify_code(s.code()),
            ReplicationError::Protocol(_) => ErrorClass::Fatal,
            ReplicationError::State(PersistError::Io { source, .. }) => classify_io(source),
            ReplicationError::State(_) => ErrorClass::Fatal,
            ReplicationError::Tracker(TrackerError::Stopped) => ErrorClass::Recoverable,
            ReplicationError::Tracker(TrackerError::Image { source, .. } | TrackerError::Dir { source, .. }) => {
                classify_io(source)
            }
            ReplicationError::Tracker(TrackerError::Log { source: HrlError::Io(e), .. }) => classify_io(e),
            ReplicationError::Tracker(TrackerError::Log { .. }) => ErrorClass::Resync,
            ReplicationError::BrokenLog { .. } | ReplicationError::ResyncRequired(_) => ErrorClass::Resync,
            ReplicationError::Io { source, .. } => classify_io(source),
        }
    }
}

/// Backoff after `failures` consecutive failed cycles (1-based), in retry units:
/// 1, 2, 4, 8, 10, then every 30.
pub fn retry_delay_units(failures: u32) -> u64 {
    match failures {
        0 | 1 => 1,
        2 => 2,
        3 => 4,
        4 => 8,
        5 => 10,
        _ => 30,
    }
}

pub(crate) fn io_err(what: String, source: io::Error) -> ReplicationError {
    ReplicationError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let units: Vec<u64> = (1..=8).map(retry_delay_units).collect();
        assert_eq!(units, vec![1, 2, 4, 8, 10, 30, 30, 30]);
        assert_eq!(retry_delay_units(1000), 30);
    }

    #[test]
    fn status_codes_are_classified() {
        for c in [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Unknown] {
            assert_eq!(classify_code(c), ErrorClass::Recoverable, "{c:?}");
        }
        for c in [Code::PermissionDenied, Code::Unauthenticated, Code::NotFound, Code::InvalidArgument] {
            assert_eq!(classify_code(c), ErrorClass::Fatal, "{c:?}");
        }
        assert_eq!(classify_code(Code::FailedPrecondition), ErrorClass::Resync);
    }

    #[test]
    fn local_errors_are_classified() {
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::ENOSPC)), ErrorClass::Recoverable);
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::ENOMEM)), ErrorClass::Recoverable);
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::EIO)), ErrorClass::Fatal);
        let broken =
            ReplicationError::BrokenLog { disk: "d".into(), seq: 3, source: HrlError::NotSealed { valid_len: 0 } };
        assert_eq!(broken.class(), ErrorClass::Resync);
        assert_eq!(ReplicationError::Tracker(TrackerError::Stopped).class(), ErrorClass::Recoverable);
        // An impostor at the replica's address: retried (the real replica may be back).
        let impostor = ReplicationError::WrongPeer {
            address: "127.0.0.1:1".into(),
            expected: "hv-b-1".into(),
            found: "server is host/hv-c-2, not host/hv-b-1".into(),
        };
        assert_eq!(impostor.class(), ErrorClass::Recoverable);
        assert!(impostor.to_string().contains("hv-b-1") && impostor.to_string().contains("hv-c-2"));
        let denied = ReplicationError::Rpc(tonic::Status::permission_denied("no"));
        assert_eq!(denied.class(), ErrorClass::Fatal);
        let enospc = ReplicationError::Io { what: "x".into(), source: io::Error::from_raw_os_error(nix::libc::ENOSPC) };
        assert_eq!(enospc.class(), ErrorClass::Recoverable);
        let full = ReplicationError::State(PersistError::Io {
            path: "x".into(),
            source: io::Error::from_raw_os_error(nix::libc::ENOSPC),
        });
        assert_eq!(full.class(), ErrorClass::Recoverable);
    }
}
