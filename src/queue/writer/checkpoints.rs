//! The writer's side of sources' checkpoints (`queue/checkpoint.rs`): staged with the events
//! of their append in the active generation (as one batch), copied into each new generation
//! before it is used, and loaded at open.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::durable::sync_new_blobs;
use super::{storage, GenState, Staged, Writer};
use crate::queue::checkpoint::Checkpoint;
use crate::queue::generation::{self, GenDb, Generation};
use crate::queue::record;
use crate::queue::QueueError;

impl Writer {
    /// Stages `checkpoints` in the active generation, with the events of the same commit.
    pub(super) fn stage_checkpoints(&self, staged: &mut Staged, checkpoints: &mut Vec<Checkpoint>) {
        if checkpoints.is_empty() {
            return;
        }
        // One batch: applied key by key, a crash could keep the events and lose the
        // checkpoint (read again at restart) or the reverse (lost).
        staged.atomic = true;
        if !self.state.checkpoints_used {
            staged
                .meta
                .insert(record::CHECKPOINTS_KEY, vec![record::VALUE_V1]);
            staged.meta_dirty = true;
            staged.checkpoints_used = true;
        }
        let writes = staged.gens.entry(self.state.active).or_default();
        for c in checkpoints.drain(..) {
            writes.insert(
                &record::checkpoint_key(&c.name),
                record::encode_checkpoint(c.state.as_deref()),
            );
            staged.checkpoints.push(c);
        }
    }

    /// Copies every checkpoint into generation `gen` (about to become the active one), with
    /// the marker that says it holds them all, and makes that durable: the generations that
    /// held them can then be deleted. A no-op on a queue that never had a checkpoint.
    pub(super) fn carry_checkpoints(&mut self, handle: &Generation) -> Result<(), QueueError> {
        if !self.state.checkpoints_used {
            return Ok(());
        }
        // Any failure is a failed write: the summary sealing the old generation is on disk
        // already, and the new one may hold part of the copy.
        let batch = carried(&self.shared.checkpoints.lock());
        let written = handle
            .db()
            .and_then(|db| db.ok_or_else(|| storage("the new queue generation is gone")))
            .and_then(|db| {
                db.db.apply_batch(batch)?;
                db.db.flush()?;
                sync_new_blobs(&handle.dir, &mut HashSet::new())?;
                self.sync_data_file(&db)
            });
        written.map_err(|e| self.fail(e))?;
        tracing::debug!(
            generation = handle.id,
            "checkpoints carried into the new queue generation"
        );
        Ok(())
    }
}

/// The batch that gives a generation every checkpoint of `map`, and its marker.
fn carried(map: &HashMap<Vec<u8>, Vec<u8>>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (name, state) in map {
        batch.insert(
            record::checkpoint_key(name),
            record::encode_checkpoint(Some(state)),
        );
    }
    batch.insert(record::CHECKPOINTS_KEY, vec![record::VALUE_V1]);
    batch
}

/// Whether any checkpoint was ever written to this queue (the meta database's marker).
pub(super) fn used(meta: &GenDb) -> Result<bool, QueueError> {
    Ok(meta.db.get(record::CHECKPOINTS_KEY)?.is_some())
}

/// The checkpoints at open: the newest generation's, and older ones' until one that holds them
/// all (a crash can come between a generation's creation and the copy into it). Then the
/// active generation is given them all if it was not, so that the next open reads it alone.
pub(super) fn load(
    gens: &BTreeMap<u64, GenState>,
    active: u64,
) -> Result<HashMap<Vec<u8>, Vec<u8>>, QueueError> {
    let mut found: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    // Whether the active generation holds them all already.
    let mut active_complete = false;
    for (id, g) in gens.range(..=active).rev() {
        let read = generation::guard("reading checkpoints", || {
            let Some(db) = g.handle.db()? else {
                return Ok(true);
            };
            for item in db.db.scan_prefix([record::CHECKPOINT_PREFIX]) {
                let (key, value) = item?;
                let state = record::decode_checkpoint(&value).map_err(|e| {
                    QueueError::Storage(format!("checkpoint in generation {id}: {e}"))
                })?;
                found
                    .entry(key[1..].to_vec())
                    .or_insert_with(|| state.map(<[u8]>::to_vec));
            }
            Ok(db.db.get(record::CHECKPOINTS_KEY)?.is_some())
        });
        if *id != active {
            drop(g.handle.close_if_idle(std::time::Duration::ZERO));
        }
        // A generation that cannot be read is skipped: its checkpoints are lost (the files are
        // then read as if new), not the queue.
        match read {
            Ok(true) => {
                active_complete = *id == active;
                break;
            }
            Ok(false) => {}
            Err(e) if e.is_corrupt() => {
                tracing::warn!(generation = id, error = %e, "cannot read checkpoints of a queue generation");
            }
            Err(e) => return Err(e),
        }
    }
    let map: HashMap<Vec<u8>, Vec<u8>> = found
        .into_iter()
        .filter_map(|(name, state)| Some((name, state?)))
        .collect();
    if !active_complete {
        if let Some(g) = gens.get(&active) {
            if let Some(db) = g.handle.db()? {
                db.db.apply_batch(carried(&map))?;
                db.db.flush()?;
                sync_new_blobs(&g.handle.dir, &mut HashSet::new())?;
                db.sync_data_file()?;
            }
        }
    }
    Ok(map)
}
