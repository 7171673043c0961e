//! The domain model shared by the provider and the agent: validated names and ids
//! ([`names`]), the enums both ends of a wire use ([`enums`]), and the conversion
//! errors of wire messages ([`wire`]), and the operator's size and duration
//! grammar ([`units`]), and its bandwidth windows ([`bandwidth`]).
//!
//! Receivers convert every message from the wire into these types once (`TryFrom`),
//! so nothing deeper handles raw strings, unknown enum values or `Option`s from the
//! network.

pub mod bandwidth;
pub mod enums;
pub mod names;
pub mod units;
pub mod wire;

pub use enums::{FailoverKind, PointKind, SenderState};
pub use names::{
    CloudName, DiskId, HostId, HostName, JobId, NameError, NetworkName, PlanName, PointId, PointSelector, PointSeq,
    PolicyName, RelationshipId, SiteName, VmName,
};
pub use wire::WireError;
