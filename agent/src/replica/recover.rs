//! Opening a replica folder: reading its state file, then finishing what a crash
//! interrupted — an apply marked in the state (rolled forward from its durable spool) or
//! a rollback — and removing what the crash left: spools never marked as applying (the
//! sender re-ships them, it got no ack), undo records no point references, temporaries of
//! the state file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use super::image::{self, Image};
use super::state::{PointMeta, STATE_FILE, load_state, save_state};
use super::store::{Inner, Replica};
use super::undo::load_undo;
use super::{ReplicaError, io_at, spool};
use crate::persist;

impl Replica {
    /// Opens the replica in `dir`, finishing an apply or a rollback a crash interrupted.
    pub(super) fn open(dir: &Path) -> Result<Self, ReplicaError> {
        let mut state = load_state(dir)?;
        let mut images = Vec::new();
        for d in &state.spec.disks {
            let p = dir.join(format!("{}.img", d.id));
            let file = crate::files::open_existing(&p, true).map_err(io_at(&p))?;
            images.push(Image { id: d.id.clone(), path: p, file, size: d.size_bytes });
        }
        let spec = state.spec.clone();
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            spec,
            images,
            inner: RwLock::new(Inner { state: state.clone(), undo: BTreeMap::new(), pins: HashMap::new() }),
        };
        // Roll forward an interrupted apply: the spool is durable and extents are
        // absolute, so applying it again is idempotent.
        if let Some(a) = state.applying.take() {
            tracing::warn!(replica = %dir.display(), seq = a.seq, "finishing a point interrupted mid-apply");
            spool::apply(&replica.images, &dir.join(&a.spool))?;
            image::sync_all(&replica.images)?;
            state.points.push(PointMeta { info: a.info, undo: a.undo });
            save_state(dir, &state)?;
            let _ = std::fs::remove_file(dir.join(&a.spool));
        }
        // Spools never marked as applying were not acknowledged: the sender re-ships them.
        for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let p = e.map_err(io_at(dir))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let referenced = state.points.iter().any(|m| m.undo.as_deref() == Some(name.as_str()));
            if name.starts_with("spool-")
                || (name.ends_with(".undo") && !referenced)
                || persist::is_leftover_tmp(&name, STATE_FILE)
            {
                let _ = std::fs::remove_file(&p);
            }
        }
        let mut undo = BTreeMap::new();
        for m in &state.points {
            if let Some(u) = &m.undo {
                undo.insert(m.info.seq, Arc::new(load_undo(&dir.join(u), replica.images.len())?));
            }
        }
        if let Some(seq) = state.rollback_to {
            tracing::warn!(replica = %dir.display(), seq, "finishing an interrupted rollback");
            let mut inner = Inner { state, undo, pins: HashMap::new() };
            replica.rollback_locked(&mut inner, seq)?;
            replica.inner = RwLock::new(inner);
            return Ok(replica);
        }
        replica.inner = RwLock::new(Inner { state, undo, pins: HashMap::new() });
        Ok(replica)
    }
}
