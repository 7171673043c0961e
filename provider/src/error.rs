//! How a provider error is classified for the operator, once, so that every service
//! maps its area's typed errors to `tonic::Status` the same way.
//!
//! Each area has its own `thiserror` enum (`ProtectionError`, `FailoverError`,
//! `PlanError`, `InventoryError`, ...) and says which [`ErrorClass`] each variant is;
//! the service layer turns it into a `Status` with [`status`] and nothing else.

use siterecovery_proto::model::WireError;

/// What an operator (or an agent) can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is malformed or breaks a rule (fix the request).
    InvalidArgument,
    /// What the request names does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Not possible in the current state (wait, or do something else first).
    FailedPrecondition,
    /// A host or the store is unreachable for now (retry later).
    Unavailable,
    /// A host did not answer in time.
    DeadlineExceeded,
    /// A host ran out of something (space, addresses).
    ResourceExhausted,
    /// The caller may not do this.
    PermissionDenied,
    /// A bug or a broken invariant (look at the provider's log).
    Internal,
}

/// An error that knows its [`ErrorClass`].
pub trait Classify: std::fmt::Display {
    fn class(&self) -> ErrorClass;
}

impl Classify for WireError {
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidArgument
    }
}

impl Classify for crate::store::StoreError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
}

/// A store error as a status (logged once, here): for code that still answers with
/// `Status` directly.
pub fn store_err(e: crate::store::StoreError) -> tonic::Status {
    status(&e)
}

/// The one mapping from a classified error to a gRPC status.
pub fn status<E: Classify + ?Sized>(e: &E) -> tonic::Status {
    let msg = e.to_string();
    match e.class() {
        ErrorClass::InvalidArgument => tonic::Status::invalid_argument(msg),
        ErrorClass::NotFound => tonic::Status::not_found(msg),
        ErrorClass::AlreadyExists => tonic::Status::already_exists(msg),
        ErrorClass::FailedPrecondition => tonic::Status::failed_precondition(msg),
        ErrorClass::Unavailable => tonic::Status::unavailable(msg),
        ErrorClass::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
        ErrorClass::ResourceExhausted => tonic::Status::resource_exhausted(msg),
        ErrorClass::PermissionDenied => tonic::Status::permission_denied(msg),
        ErrorClass::Internal => {
            tracing::error!("internal error: {msg}");
            tonic::Status::internal(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_errors_are_invalid_arguments_naming_the_field() {
        let e = siterecovery_proto::model::wire::field::<siterecovery_proto::model::VmName>("vm", "../x")
            .expect_err("hostile");
        let s = status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("vm: "), "{}", s.message());
    }
}
