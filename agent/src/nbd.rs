//! The NBD server (fixed newstyle) exporting [`crate::disk::BlockDevice`]s on tokio.
