//! The `siterecovery.v1` wire protocol: generated tonic/prost code and the encoded
//! file descriptor set served by gRPC reflection. Nothing else lives here.

#![allow(clippy::all, clippy::unwrap_used, missing_docs)]

/// Package `siterecovery.v1`.
pub mod v1 {
    tonic::include_proto!("siterecovery.v1");
}

/// Encoded `FileDescriptorSet` of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("siterecovery_descriptor");
