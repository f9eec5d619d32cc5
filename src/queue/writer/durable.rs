//! Making a commit durable, and what happens when that fails.
//!
//! Each database a commit touches is applied, `flush()`ed (sled's flush is not an fsync), its
//! new blob files fsynced, then its data file fsynced. A failure once anything was applied
//! stops the writer for good (`docs/reliability.md`, "What happens on a failed fsync").
//!
//! A generation's writes are applied as one sled batch when the commit holds an
//! acknowledgement (a chunk rewritten or removed must change with its lane's counters and
//! watermark), and key by key when it holds a few appends alone: every sled batch is a second
//! log write, handed to sled's I/O threads and waited for, which cost single-event requests
//! about a seventh of their CPU ([`KEY_BY_KEY_MAX_OPS`]). Key by key, a crash before the fsync leaves a prefix of the writes
//! (sled recovers its log in order): some new chunks, perhaps without the lane record that
//! counts them. None of them was acknowledged; the record's `end_seq` lets the next open count
//! them in (`record/mod.rs`, lane record v3; `load.rs`).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Staged, Writer};
use crate::crash_point;
use crate::queue::generation::{self, GenDb};
use crate::queue::record;
use crate::queue::QueueError;

impl Writer {
    /// Applies each database's batch and makes it durable: meta first, then the generations.
    pub(super) fn apply_and_sync(
        &mut self,
        staged: &mut Staged,
        batches: Vec<(u64, Arc<GenDb>, GenWrites)>,
    ) -> Result<(), QueueError> {
        if staged.meta_dirty {
            self.meta.db.apply_batch(std::mem::take(&mut staged.meta))?;
            self.sync_meta()?;
        }
        for (gen, db, writes) in batches {
            writes.apply(&db.db, staged.atomic)?;
            crash_point!("queue-after-apply");
            self.flush(&db)?;
            crash_point!("queue-after-flush");
            self.sync_blobs(gen)?;
            self.sync_data_file(&db)?;
            crash_point!("queue-after-fsync");
        }
        Ok(())
    }

    /// Makes what was applied to the meta database durable.
    pub(super) fn sync_meta(&mut self) -> Result<(), QueueError> {
        self.flush(&self.meta)?;
        self.sync_meta_blobs()?;
        crate::io_point!("queue-fsync", &self.shared.path);
        self.meta.sync_data_file()?;
        self.shared
            .stats
            .meta_fsyncs
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// sled's `flush()`: writes its buffers to the files (not an fsync).
    fn flush(&self, db: &GenDb) -> Result<(), QueueError> {
        crate::io_point!("queue-flush", &self.shared.path);
        db.db.flush()?;
        Ok(())
    }

    /// The store failed after part of a commit may have reached sled: a failed flush or
    /// fsync, as databases learned from "fsyncgate", means that nothing written since the last
    /// good fsync may be assumed durable, and that retrying the fsync proves nothing (the
    /// kernel may have dropped the pages and cleared the error). So the writer stops for good:
    /// every sender of this group and every later operation is refused with
    /// [`QueueError::RestartNeeded`], and the process is to exit so that recovery reads what
    /// is really on disk.
    ///
    /// The chunks of the failed group may be in sled and visible to readers; their sequence
    /// numbers and lane ids are never handed out again in this process (the state moves past
    /// them), so a delivery of those chunks can only ever remove those chunks.
    pub(super) fn break_down(&mut self, staged: &Staged, e: QueueError) -> QueueError {
        for (id, lane) in &staged.touched {
            if let Some(mine) = self.state.lanes.get_mut(*id as usize) {
                mine.next_seq = mine.next_seq.max(lane.next_seq);
            }
        }
        let mut new_lanes = staged.new_lanes.clone();
        new_lanes.sort_unstable();
        for id in new_lanes {
            if let Some(lane) = staged.touched.get(&id) {
                if id as usize == self.state.lanes.len() {
                    self.state.by_key.insert(lane.intake_key.clone(), id);
                    self.state.lanes.push(lane.clone());
                }
            }
        }
        self.state.next_dead_seq = self.state.next_dead_seq.max(staged.next_dead_seq);
        self.fail(e)
    }

    /// Marks the store as failed (once), says so loudly, and returns the error to answer.
    pub(super) fn fail(&mut self, e: QueueError) -> QueueError {
        let why = match e {
            QueueError::RestartNeeded(why) => why,
            e => e.to_string(),
        };
        if self.shared.failure.set(why.clone()).is_ok() {
            tracing::error!(
                error = %why,
                "queue storage failed after a write had begun; nothing written since the last \
                 good fsync can be trusted. Refusing every operation; the process must restart"
            );
        }
        QueueError::RestartNeeded(why)
    }

    /// fsyncs a generation's data file, and counts it: the count is what the fsync-regression
    /// test compares with the number of commits, so it must be taken here and nowhere else.
    pub(super) fn sync_data_file(&self, db: &GenDb) -> Result<(), QueueError> {
        crate::io_point!("queue-fsync", &self.shared.path);
        db.sync_data_file()?;
        self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// fsyncs the files sled wrote to a generation's `blobs/` since the last commit, and the
    /// directory.
    pub(super) fn sync_blobs(&mut self, gen: u64) -> Result<(), QueueError> {
        crate::io_point!("queue-blob-sync", &self.shared.path);
        let Some(g) = self.state.gens.get(&gen) else {
            return Ok(());
        };
        let synced = sync_new_blobs(&g.handle.dir, self.synced_blobs.entry(gen).or_default())?;
        self.shared
            .stats
            .blob_fsyncs
            .fetch_add(synced, Ordering::Relaxed);
        Ok(())
    }

    /// The same for the meta database, whose nodes grow over sled's blob threshold with dead
    /// letters of large events (or very many lanes).
    fn sync_meta_blobs(&mut self) -> Result<(), QueueError> {
        crate::io_point!("queue-blob-sync", &self.shared.path);
        let dir = self.shared.path.join(generation::META_DIR);
        let synced = sync_new_blobs(&dir, &mut self.meta_synced_blobs)?;
        let stats = &self.shared.stats;
        stats.blob_fsyncs.fetch_add(synced, Ordering::Relaxed);
        stats.meta_blob_fsyncs.fetch_add(synced, Ordering::Relaxed);
        Ok(())
    }
}

/// Commits of appends with fewer writes than this to a generation are applied key by key;
/// bigger ones as a batch all the same. The batch's extra log write is small beside theirs,
/// and key by key sled wrote more bytes for them: filling a backlog (about a hundred chunks
/// per commit) wrote 1.43x the payload key by key, 1.36x in batches (measured, not explained;
/// `docs/performance.md`). Single-event requests from 8 connections make commits of ~9 writes,
/// 100-event requests ~17.
const KEY_BY_KEY_MAX_OPS: usize = 32;

/// What one commit writes to one generation, in the order it was staged: appended chunks
/// before the lane records that count them (the records are staged last, `Writer::write`).
#[derive(Default)]
pub(super) struct GenWrites {
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
}

impl GenWrites {
    pub(super) fn insert(&mut self, key: &[u8], value: Vec<u8>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub(super) fn remove(&mut self, key: &[u8]) {
        self.ops.push((key.into(), None));
    }

    /// Applies the writes to `db`: as one batch if `atomic` or many, else one by one, in
    /// order.
    fn apply(self, db: &sled::Db, atomic: bool) -> Result<(), QueueError> {
        if atomic || self.ops.len() >= KEY_BY_KEY_MAX_OPS {
            let mut batch = sled::Batch::default();
            for (key, value) in self.ops {
                match value {
                    Some(v) => batch.insert(key, v),
                    None => batch.remove(key),
                }
            }
            db.apply_batch(batch)?;
            return Ok(());
        }
        for (key, value) in self.ops {
            if key.first() == Some(&record::LANE_PREFIX) {
                // The worst a crash can leave: the commit's chunks on disk, their lane
                // records not.
                fail::fail_point!("queue-append-before-records", |_| {
                    let _ = db.flush();
                    crate::failpoint::crash("queue-append-before-records")
                });
            }
            match value {
                Some(v) => db.insert(key, v)?,
                None => db.remove(key)?,
            };
        }
        Ok(())
    }
}

/// fsyncs the files in the `blobs/` directory of the database at `db_dir` that are not in
/// `synced` (the names fsynced before), then the directories; returns how many it fsynced.
///
/// sled writes pages too large for its log segments to one file each under `blobs/`, without
/// any fsync (`shared/notes/measurements.md`); what such a page holds would not survive a
/// power cut. The directory is normally empty, so listing it is cheap.
pub(super) fn sync_new_blobs(
    db_dir: &Path,
    synced: &mut HashSet<OsString>,
) -> Result<u64, QueueError> {
    let dir = db_dir.join("blobs");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut present = HashSet::new();
    let mut count = 0;
    for entry in entries {
        let name = entry?.file_name();
        if !synced.contains(&name) {
            match File::open(dir.join(&name)) {
                Ok(f) => f.sync_all()?,
                // sled removed it meanwhile: nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
            count += 1;
        }
        present.insert(name);
    }
    if count > 0 {
        generation::sync_dir(&dir)?;
        generation::sync_dir(db_dir)?;
    }
    *synced = present;
    Ok(count)
}
