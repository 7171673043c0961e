//! Which points a replica keeps ([`retained`]) and pruning the others, merging their
//! undo records so the remaining points stay readable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::state::{PointInfo, save_state};
use super::store::{Inner, Replica};
use super::undo::{load_undo, merge_undo};
use super::{ReplicaError, now_ms};

impl Replica {
    /// Drops points outside the retention policy: keeps the latest, the newest point of
    /// every hour and every app-consistent point within the window, and pinned points.
    pub(super) fn prune(&self, inner: &mut Inner) -> Result<(), ReplicaError> {
        let now = now_ms();
        let keep = retained(
            &inner.state.points.iter().map(|m| m.info.clone()).collect::<Vec<_>>(),
            self.spec.retention_ms,
            self.spec.bucket_ms,
            now,
        );
        let mut i = 0;
        while i < inner.state.points.len() {
            let seq = inner.state.points[i].info.seq;
            if keep.contains(&seq) || inner.pins.get(&seq).copied().unwrap_or(0) > 0 {
                i += 1;
                continue;
            }
            let removed = inner.state.points.remove(i);
            inner.undo.remove(&seq);
            if i == 0 {
                // The oldest went: the next one's undo now leads nowhere.
                if let Some(next) = inner.state.points.get_mut(0)
                    && let Some(u) = next.undo.take()
                {
                    inner.undo.remove(&next.info.seq);
                    save_state(&self.dir, &inner.state)?;
                    let _ = std::fs::remove_file(self.dir.join(u));
                }
            } else if let Some(next) = inner.state.points.get(i).cloned() {
                // Merge the removed undo into the next point's: older before-images win.
                inner.state.merges += 1;
                let name = format!("undo-{}-m{}.undo", next.info.seq, inner.state.merges);
                merge_undo(
                    &self.dir,
                    removed.undo.as_deref(),
                    next.undo.as_deref(),
                    &self.dir.join(&name),
                    next.info.seq,
                    self.images.len(),
                )?;
                let loaded = Arc::new(load_undo(&self.dir.join(&name), self.images.len())?);
                inner.state.points[i].undo = Some(name);
                inner.undo.insert(next.info.seq, loaded);
                save_state(&self.dir, &inner.state)?;
                if let Some(u) = next.undo {
                    let _ = std::fs::remove_file(self.dir.join(u));
                }
            } else {
                save_state(&self.dir, &inner.state)?;
            }
            if let Some(u) = removed.undo {
                let _ = std::fs::remove_file(self.dir.join(u));
            }
            tracing::debug!(vm = %self.spec.vm, seq, "recovery point pruned");
        }
        Ok(())
    }
}

/// The seqs a retention policy keeps: the latest point; within `retention_ms` of now,
/// the newest point of each hour and every app-consistent point.
pub fn retained(points: &[PointInfo], retention_ms: u64, bucket_ms: u64, now_ms: i64) -> BTreeSet<u64> {
    let mut keep = BTreeSet::new();
    if let Some(last) = points.last() {
        keep.insert(last.seq);
    }
    let horizon = now_ms.saturating_sub(retention_ms.min(i64::MAX as u64) as i64);
    let mut newest_of_hour: BTreeMap<i64, u64> = BTreeMap::new();
    for p in points.iter().filter(|p| p.created_unix_ms >= horizon) {
        newest_of_hour.insert(p.created_unix_ms.div_euclid(bucket_ms.clamp(1, i64::MAX as u64) as i64), p.seq);
        if p.app_consistent {
            keep.insert(p.seq);
        }
    }
    keep.extend(newest_of_hour.values());
    keep
}
