//! The life of generations: sealing the active one, counting sealed ones exactly, closing idle
//! ones, deleting delivered ones.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{import_dead_letters, load_generation};
use super::{storage, GenCount, GenState, Writer, IDLE_CLOSE, ROTATE_EMPTY_AFTER};
use crate::crash_point;
use crate::queue::delivered;
use crate::queue::generation::{self, Generation};
use crate::queue::record::{self, ChunkHeader, Watermark};
use crate::queue::QueueError;

impl Writer {
    /// Housekeeping after each commit (rotation, deletion) and, on `refresh`, every second:
    /// disk measurement, closing idle generations, finishing counts of sealed generations.
    pub(super) fn maintain(&mut self, refresh: bool) {
        let active = self.state.gens.get(&self.state.active);
        let (appended, events) = active.map_or((0, 0), |g| (g.appended, g.events()));
        let rotate = appended >= self.generation_bytes
            || (refresh
                && events == 0
                && appended >= ROTATE_EMPTY_AFTER.min(self.generation_bytes));
        if rotate && Instant::now() >= self.rotate_retry_at {
            if let Err(e) = self.rotate() {
                self.shared
                    .stats
                    .storage_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.rotate_retry_at = Instant::now() + Duration::from_secs(1);
                tracing::error!(error = %e, "cannot start a new queue generation; appending to the current one, retrying in 1 s");
            }
        }
        self.set_aside_damaged();
        if let Err(e) = self.recount_passed() {
            tracing::warn!(error = %e, "cannot recount a delivered queue generation; will retry");
        }
        if let Err(e) = self.delete_delivered() {
            tracing::error!(error = %e, "cannot delete a delivered queue generation; will retry");
        }
        self.close_idle();
        if refresh {
            if let Err(e) = self.count_one_sealed() {
                tracing::warn!(error = %e, "cannot count a sealed queue generation; will retry");
            }
            self.update_disk_usage();
        }
    }

    /// Seals the active generation and starts the next one.
    fn rotate(&mut self) -> Result<(), QueueError> {
        let started = Instant::now();
        let old = self.state.active;
        let Some(g) = self.state.gens.get(&old) else {
            return Err(storage("no active generation"));
        };
        let summary = g.summary();
        let (sealed, queued, appended) = (
            g.handle.clone(),
            g.lanes.values().map(|c| c.bytes).sum::<u64>(),
            g.appended,
        );
        self.meta
            .db
            .insert(generation::summary_key(old), record::encode_value(&summary))?;
        // Applied: from here a failure is a failed write (`Writer::break_down`).
        if let Err(e) = self.sync_meta() {
            return Err(self.fail(e));
        }
        crash_point!("queue-rotate-after-summary");
        let id = old + 1;
        let root = self.shared.path.clone();
        let handle = match self.janitor.take_spare(id) {
            Some(handle) => handle,
            None => {
                let handle = Arc::new(Generation::new(&root, id, self.state.cache_bytes));
                generation::create_generation(&root, &handle, record::FORMAT_VERSION)?;
                handle
            }
        };
        crash_point!("queue-rotate-after-create");
        self.carry_checkpoints(&handle)?;
        // Delivery far behind (the sealed generation still holds most of what it received):
        // it will not read this generation for a while, so give its memory back now rather
        // than after IDLE_CLOSE, during which a fast ingest could fill another generation.
        if queued * 2 > appended {
            if let Some(db) = sealed.close_if_idle(Duration::ZERO) {
                self.janitor.close(db);
            }
        }
        self.state
            .gens
            .insert(id, GenState::new(handle, HashMap::new(), true));
        self.state.active = id;
        self.synced_blobs.remove(&old);
        self.publish_generations();
        self.janitor.prepare(Arc::new(Generation::new(
            &root,
            id + 1,
            self.state.cache_bytes,
        )));
        self.shared.stats.rotations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            sealed = old,
            active = id,
            elapsed_us = started.elapsed().as_micros() as u64,
            "queue generation sealed"
        );
        Ok(())
    }

    /// Deletes sealed generations whose every event was delivered.
    fn delete_delivered(&mut self) -> Result<(), QueueError> {
        let done: Vec<u64> = self
            .state
            .gens
            .iter()
            .filter(|(id, g)| **id != self.state.active && g.exact && g.events() == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(g) = self.state.gens.get(&id) else {
                continue;
            };
            let handle = g.handle.clone();
            // Counters say empty; the store must agree before its files go: every chunk it
            // still holds is delivered (one seek per lane). (A closed generation is not opened
            // for this: its counters were read from it.)
            if let Some(db) = handle.open_db() {
                if delivered::holds_undelivered(&db.db)? {
                    tracing::error!(
                        generation = id,
                        "queue counters say a generation is empty but it holds chunks; recounting it"
                    );
                    drop(db);
                    self.recount(id)?;
                    continue;
                }
            }
            let started = Instant::now();
            let Some(db) = handle.retire() else {
                continue; // a reader holds it: next time
            };
            // Retired: gone for this process whatever happens next. If the rename fails the
            // directory stays, empty, and the next start deletes it.
            self.state.gens.remove(&id);
            self.synced_blobs.remove(&id);
            self.publish_generations();
            let doomed = generation::commit_deletion(&self.shared.path, &handle)?;
            self.janitor.remove(db, doomed);
            // A summary left behind is ignored and removed at the next open.
            self.meta.db.remove(generation::summary_key(id))?;
            self.shared
                .stats
                .deleted_generations
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                generation = id,
                elapsed_us = started.elapsed().as_micros() as u64,
                "delivered queue generation deleted"
            );
        }
        Ok(())
    }

    /// Moves aside every generation that sled could not open or read (marked damaged by a
    /// reader or by the writer itself): its events leave the counters (they are noted in the
    /// moved-aside directory, and shown by `status`), and the rest of the queue flows on. The
    /// active generation is sealed first, so that appends go on in a fresh one.
    fn set_aside_damaged(&mut self) {
        let damaged: Vec<u64> = self
            .state
            .gens
            .iter()
            .filter(|(_, g)| g.handle.is_damaged())
            .map(|(id, _)| *id)
            .collect();
        for id in damaged {
            if id == self.state.active {
                if Instant::now() < self.rotate_retry_at {
                    continue;
                }
                if let Err(e) = self.rotate() {
                    self.rotate_retry_at = Instant::now() + Duration::from_secs(1);
                    tracing::error!(error = %e, "cannot start a new queue generation in place of a damaged one; retrying in 1 s");
                    continue;
                }
            }
            if let Err(e) = self.set_aside(id) {
                tracing::error!(generation = id, error = %e, "cannot move a damaged queue generation aside; will retry");
            }
        }
    }

    fn set_aside(&mut self, id: u64) -> Result<(), QueueError> {
        let Some(g) = self.state.gens.get(&id) else {
            return Ok(());
        };
        let handle = g.handle.clone();
        let (events, bytes) = g
            .lanes
            .values()
            .fold((0, 0), |(e, b), c| (e + c.events, b + c.bytes));
        let Some(db) = handle.retire() else {
            return Ok(()); // a reader holds it: next time
        };
        if let Some(db) = db {
            // Closing a damaged database may panic in sled too.
            let _ = generation::guard("closing a damaged generation", || {
                drop(db);
                Ok(())
            });
        }
        self.replace_counts(id, HashMap::new(), None);
        self.state.gens.remove(&id);
        self.synced_blobs.remove(&id);
        self.publish_generations();
        let mut note = generation::CorruptNote {
            generation: Some(id),
            events: Some(events),
            bytes: Some(bytes),
            reason: "sled cannot open or read it (see the log)".into(),
            moved_at_ms: crate::queue::now_ms(),
            ..Default::default()
        };
        generation::move_aside(&self.shared.path, &handle.dir, &mut note)?;
        self.meta.db.remove(generation::summary_key(id))?;
        tracing::error!(generation = id, dir = %note.dir.display(), events, bytes,
            "damaged queue generation moved aside; the rest of the queue goes on. Run `sekoia-forwarder salvage` on the stopped forwarder to recover what it still holds");
        self.shared.corrupt().push(note);
        Ok(())
    }

    /// Counts a generation from its undelivered chunks (the lane records disagreed with the
    /// store). Its watermarks stay as they are.
    pub(super) fn recount(&mut self, gen: u64) -> Result<(), QueueError> {
        let Some(db) = self.gen_db(gen)? else {
            return Ok(());
        };
        let mut lanes: HashMap<u32, GenCount> = HashMap::new();
        delivered::for_each_undelivered(&db.db, &mut |lane, seq, value| {
            let h = ChunkHeader::decode(value).unwrap_or(ChunkHeader {
                events: 1,
                payload_bytes: value.len() as u32,
            });
            let c = lanes.entry(lane).or_default();
            c.events += u64::from(h.events);
            c.bytes += u64::from(h.payload_bytes);
            c.end_seq = c.end_seq.max(seq + 1);
        })?;
        drop(db);
        // The next sequence number never goes back (a lane all delivered has no chunk left
        // to count, but its watermark is past them).
        if let Some(g) = self.state.gens.get(&gen) {
            for (lane, old) in g.lanes.iter() {
                let c = lanes.entry(*lane).or_default();
                c.end_seq = c.end_seq.max(old.end_seq);
            }
        }
        self.replace_counts(gen, lanes, None);
        Ok(())
    }

    /// Sets a generation's counts (and its watermarks, if given) to what was read from it,
    /// correcting the lanes' totals by the difference (for every lane named by either side).
    fn replace_counts(
        &mut self,
        gen: u64,
        counts: HashMap<u32, GenCount>,
        marks: Option<HashMap<u32, Watermark>>,
    ) {
        let Some(g) = self.state.gens.get_mut(&gen) else {
            return;
        };
        let readers = self.shared.lanes_read();
        let ids: HashSet<u32> = g.lanes.keys().chain(counts.keys()).copied().collect();
        for id in ids {
            let old = g.lanes.get(&id).copied().unwrap_or_default();
            let new = counts.get(&id).copied().unwrap_or_default();
            if let Some(lane) = self.state.lanes.get_mut(id as usize) {
                lane.events = (lane.events + new.events).saturating_sub(old.events);
                lane.bytes = (lane.bytes + new.bytes).saturating_sub(old.bytes);
                if let Some(reader) = readers.get(id as usize) {
                    self.shared.set_lane_counts(reader, lane.events, lane.bytes);
                }
            }
        }
        g.lanes = counts.into();
        if let Some(marks) = marks {
            g.marks = marks;
        }
        g.exact = true;
        g.publish();
    }

    fn close_idle(&mut self) {
        for (id, g) in &self.state.gens {
            if *id == self.state.active {
                continue;
            }
            if let Some(db) = g.handle.close_if_idle(IDLE_CLOSE) {
                tracing::trace!(generation = id, "idle queue generation closed");
                self.janitor.close(db);
            }
        }
    }

    /// Reads the real counts of one sealed generation still counted from its summary, so that
    /// a generation delivered before a crash is found empty and deleted even if delivery never
    /// needs to read it again.
    fn count_one_sealed(&mut self) -> Result<(), QueueError> {
        let Some(id) = self
            .state
            .gens
            .iter()
            .find(|(_, g)| !g.exact)
            .map(|(id, _)| *id)
        else {
            return Ok(());
        };
        self.make_exact(id)
    }

    fn publish_generations(&self) {
        let list = self.state.generations();
        let mut gens = self.shared.gens_write();
        *gens = crate::queue::GenList {
            gens: list,
            active: self.state.active,
        };
    }

    /// Replaces a sealed generation's counts from its summary (an upper bound) by its own
    /// records, and corrects the lanes' totals by the difference.
    pub(super) fn make_exact(&mut self, gen: u64) -> Result<(), QueueError> {
        let Some(g) = self.state.gens.get(&gen) else {
            return Ok(());
        };
        if g.exact {
            return Ok(());
        }
        let handle = g.handle.clone();
        let mut next_dead_seq = self.state.next_dead_seq;
        let meta = &self.meta;
        let read = generation::guard("loading a generation", || {
            let Some(db) = handle.db()? else {
                return Ok(None);
            };
            let loaded = load_generation(&db.db, &handle.dir)?;
            let moved = import_dead_letters(&db, meta, &mut next_dead_seq)?;
            Ok(Some((loaded, moved)))
        });
        let (loaded, moved) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(()),
            // Moved aside at the next housekeeping; nothing to count meanwhile.
            Err(e @ QueueError::RestartNeeded(_)) => return Err(self.fail(e)),
            Err(e) if e.is_corrupt() => {
                handle.mark_damaged(&e);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.state.next_dead_seq = next_dead_seq;
        self.state.dead_letters += moved;
        self.shared
            .stats
            .dead_letters
            .fetch_add(moved, Ordering::Relaxed);
        self.replace_counts(gen, loaded.lanes, Some(loaded.marks));
        Ok(())
    }
}
