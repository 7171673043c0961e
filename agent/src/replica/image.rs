//! The replica images: one raw file per disk, always at the latest applied point.

use std::fs::File;
use std::path::PathBuf;

use super::{ReplicaError, io_at};
use crate::disk::check_range;

/// A replica image, open for reading and writing.
pub(super) struct Image {
    pub(super) id: String,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) size: u64,
}

/// Checks an extent against an image, as a replica error naming the disk.
pub(super) fn check(img: &Image, what: &'static str, offset: u64, len: u64) -> Result<(), ReplicaError> {
    check_range(offset, len, img.size).map_err(|_| ReplicaError::OutOfRange {
        what,
        disk: img.id.clone(),
        offset,
        len,
        size: img.size,
    })
}

/// Makes the data written to every image durable.
pub(super) fn sync_all(images: &[Image]) -> Result<(), ReplicaError> {
    for img in images {
        img.file.sync_data().map_err(io_at(&img.path))?;
    }
    Ok(())
}
