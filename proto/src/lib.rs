//! The `siterecovery.v1` wire protocol: the generated tonic/prost code ([`v1`]), the
//! encoded file descriptor set served by gRPC reflection, and the validated domain
//! model ([`model`]) that receivers convert wire messages into; with feature `daemon`,
//! the process set-up both binaries share ([`daemon`]) and the layers of their
//! settings ([`settings`]).

#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod lifecycle;
#[cfg(feature = "daemon")]
pub mod metrics;
pub mod model;
#[cfg(feature = "daemon")]
pub mod settings;

/// Package `siterecovery.v1`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("siterecovery.v1");
}

/// Encoded `FileDescriptorSet` of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("siterecovery_descriptor");
