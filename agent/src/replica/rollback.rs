//! Rolling a replica back to a retained point, destructively (committing a failover to
//! an older point): the undo records of the later points are written into the images.

use std::os::unix::fs::FileExt;

use super::state::{PointInfo, PointMeta, save_state};
use super::store::{Inner, Replica};
use super::{ReplicaError, io_at};
use crate::zeroes::{ZeroMode, zero_range};

impl Replica {
    /// Rolls the images back to a retained point, destructively: later points are
    /// dropped (committing a failover to an older point). Crash-safe: the target is
    /// recorded first and the rollback re-done on open.
    pub fn rollback_to(&self, point: &str) -> Result<PointInfo, ReplicaError> {
        let mut inner = self.write();
        let meta = inner
            .state
            .find_point(point)
            .ok_or_else(|| ReplicaError::NotFound(format!("point {point:?} of {}", self.spec.vm)))?;
        let info = meta.info.clone();
        if inner.state.points.last().is_some_and(|m| m.info.seq == info.seq) {
            return Ok(info);
        }
        inner.state.rollback_to = Some(info.seq);
        save_state(&self.dir, &inner.state)?;
        self.rollback_locked(&mut inner, info.seq)?;
        Ok(info)
    }

    pub(super) fn rollback_locked(&self, inner: &mut Inner, seq: u64) -> Result<(), ReplicaError> {
        let later: Vec<u64> = inner.undo.range(seq + 1..).map(|(s, _)| *s).rev().collect();
        let mut buf = Vec::new();
        for s in later {
            let Some(undo) = inner.undo.get(&s).cloned() else { continue };
            for (disk, ranges) in undo.ranges.iter().enumerate() {
                let img = &self.images[disk];
                for &(off, len, pos) in ranges {
                    let Some(pos) = pos else {
                        // The before-image was zeroes: punched, not written.
                        zero_range(&img.file, off, len, ZeroMode::Punch).map_err(io_at(&img.path))?;
                        continue;
                    };
                    buf.resize(len as usize, 0);
                    undo.file.read_exact_at(&mut buf, pos).map_err(io_at(&img.path))?;
                    img.file.write_all_at(&buf, off).map_err(io_at(&img.path))?;
                }
            }
        }
        self.sync_images()?;
        let dropped: Vec<PointMeta> = inner.state.points.iter().filter(|m| m.info.seq > seq).cloned().collect();
        inner.state.points.retain(|m| m.info.seq <= seq);
        inner.undo.retain(|s, _| *s <= seq);
        inner.state.rollback_to = None;
        save_state(&self.dir, &inner.state)?;
        for m in dropped {
            if let Some(u) = m.undo {
                let _ = std::fs::remove_file(self.dir.join(u));
            }
        }
        tracing::info!(vm = %self.spec.vm, seq, "replica rolled back");
        Ok(())
    }
}
