//! The replica store on the replica host: the copy of a protected VM's disks and its
//! recovery points.
//!
//! A replica lives in `<data-dir>/replicas/<vm>/`:
//!
//! | file | what |
//! | --- | --- |
//! | `replica.json` | [`ReplicaSpec`], initial-copy progress, retained points, the point being applied (in the [`crate::persist`] envelope) |
//! | `<disk>.img` | the replica image of each disk, always at the latest applied point |
//! | `spool-<seq>-<rand>.pt` | a received point, fsynced before it is applied (roll-forward source) |
//! | `undo-<seq>[-mN].undo` | before-images taking point `seq` back to the previous retained point |
//!
//! **Applying a point is atomic.** The spool is made durable first; then the
//! before-images of every range the point touches are written to an undo record and
//! fsynced; then `replica.json` records "applying seq"; then the extents are written to
//! the images and fsynced; then `replica.json` records the point. A crash before the
//! "applying" mark leaves the images untouched (the spool is dropped; the sender re-ships
//! because it got no ack); a crash after it rolls forward from the spool on the next
//! open. Either way the images are at exactly one point.
//!
//! **Reading an older point costs no copy.** The image holds the latest point; the undo
//! records of the points after the wanted one, applied newest first, give every byte its
//! value at that point ([`PointDevice`]). Pruning a point merges its undo record into
//! the next one's, so the chain stays valid for the points that remain.
//!
//! The parts, bottom up (each imports only those before it): `error`, `state` (the state
//! file), `image` (the images), `undo` (undo records), `spool` (the spool file), `store`
//! (an opened replica), then on top of it `view` (reading a point), `retention` (which
//! points stay), `rollback`, `receive` (receiving and applying a point), `initial` (the
//! initial copy), `hashes` (for resync), `recover` (opening a folder after a crash) and
//! `set` (every replica of the host). Formats: `docs/replica-format.md`.

mod error;
mod hashes;
mod image;
mod initial;
mod receive;
mod recover;
mod retention;
mod rollback;
mod set;
mod spool;
mod state;
mod store;
mod undo;
mod view;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod zero_tests;

use std::fs::File;
use std::path::Path;

pub use error::ReplicaError;
use error::io_at;
pub use receive::PointSpool;
pub use retention::retained;
pub use set::ReplicaSet;
pub use spool::ExtentData;
pub use state::{DiskCopyProgress, PointInfo, ReplicaDisk, ReplicaSpec, STATE_FILE};
pub use store::Replica;
pub use view::{PointDevice, PointView};

/// Largest extent accepted in a point (a coalesced write or a resync block).
pub const MAX_EXTENT: u64 = 64 << 20;
/// End marker of the records of a spool or an undo record (in the disk field).
const END: u32 = u32::MAX;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}
