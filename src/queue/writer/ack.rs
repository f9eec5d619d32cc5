//! Acknowledgements: what the intake confirmed leaves the counters of its generation and lane,
//! in the same atomic batch as the lane record that marks its chunks delivered.
//!
//! Delivered chunks are not removed from the store one by one: each removal is a sled fragment,
//! and sled rewrites whole leaves as fragments pile up, so removals cost about half of all the
//! bytes the queue wrote. They are marked in their lane's [`Watermark`] instead (its record is
//! rewritten by this commit anyway, for the counters), and go when their generation is deleted
//! whole. Partial deliveries still rewrite their chunk with the events left.

use super::{drift, storage, Staged, Writer};
use crate::queue::generation::{self, GenDb};
use crate::queue::record::{self, ChunkHeader, Watermark};
use crate::queue::{Ack, QueueError};

/// What an ack changes in one generation: per chunk rewritten or newly delivered, its new
/// value (`None`: delivered) and header; the lane's watermark after it; chunks to remove
/// from the store (past [`record::MAX_ACKED`]); and the events and bytes that leave the queue.
pub(super) struct AckChanges {
    chunks: Vec<(u64, Option<Vec<u8>>, Option<ChunkHeader>)>,
    watermark: Watermark,
    remove: Vec<u64>,
    removed_events: u64,
    removed_bytes: u64,
}

impl Writer {
    pub(super) fn stage_ack(
        &mut self,
        staged: &mut Staged,
        id: u32,
        ack: &Ack,
    ) -> Result<(), QueueError> {
        // Every read comes before anything is staged, so that an ack that cannot be read (a
        // damaged generation) leaves the group's other operations as they were.
        let changes = self.ack_changes(staged, id, ack)?;
        staged.atomic = true;
        for dead in &ack.dead {
            staged.meta.insert(
                &record::dead_key(staged.next_dead_seq),
                record::encode_value(dead),
            );
            staged.meta_dirty = true;
            staged.next_dead_seq += 1;
            staged.dead += 1;
        }
        let gen = ack.gen;
        staged.reached.push(drift::Reached {
            lane: id,
            gen,
            last_removed: ack.remove.iter().max().copied(),
        });
        let Some(changes) = changes else {
            return Ok(());
        };
        let batch = staged.gens.entry(gen).or_default();
        for (seq, value, header) in changes.chunks {
            // A delivered chunk stays: the watermark, in this batch's lane record, marks it.
            if let Some(v) = value {
                batch.insert(&record::chunk_key(id, seq), v);
            }
            staged.changed.insert((gen, id, seq), header);
        }
        for seq in changes.remove {
            batch.remove(&record::chunk_key(id, seq));
            staged.changed.insert((gen, id, seq), None);
        }
        staged.marks.insert((gen, id), changes.watermark);
        let count = self.gen_count(staged, gen, id);
        count.events = count.events.saturating_sub(changes.removed_events);
        count.bytes = count.bytes.saturating_sub(changes.removed_bytes);
        let lane = self
            .lane_state(staged, id)
            .ok_or_else(|| storage(format!("ack for unknown lane {id}")))?;
        lane.events = lane.events.saturating_sub(changes.removed_events);
        lane.bytes = lane.bytes.saturating_sub(changes.removed_bytes);
        staged.acked_events += changes.removed_events.saturating_sub(ack.dead.len() as u64);
        Ok(())
    }

    /// The watermark of `lane` in `gen` as this commit leaves it so far.
    pub(super) fn watermark(&self, staged: &Staged, gen: u64, lane: u32) -> Watermark {
        staged
            .marks
            .get(&(gen, lane))
            .or_else(|| self.state.gens.get(&gen)?.marks.get(&lane))
            .cloned()
            .unwrap_or_default()
    }

    /// What an ack changes in its generation, read from the store; `None` if the generation
    /// is gone (deleted: everything it held was acknowledged already; or moved aside as
    /// damaged: its events are counted there) or its records cannot be read (it is damaged,
    /// and moved aside at the next housekeeping: writing its lane record from what is not
    /// known could mark delivered chunks undelivered). A read that finds the generation
    /// damaged marks it so, for the writer to move it aside.
    fn ack_changes(
        &mut self,
        staged: &Staged,
        id: u32,
        ack: &Ack,
    ) -> Result<Option<AckChanges>, QueueError> {
        let gen = ack.gen;
        if !self.state.gens.contains_key(&gen) {
            return Ok(None);
        }
        let read = self.make_exact(gen).and_then(|()| {
            let Some(g) = self.state.gens.get(&gen).filter(|g| g.exact) else {
                return Ok(None);
            };
            // Appends staged earlier in this commit are not in the store yet: the watermark
            // must not take their absence for delivery.
            let end = g.lanes.get(&id).map_or(0, |c| c.end_seq);
            let watermark = self.watermark(staged, gen, id);
            match self.gen_db(gen)? {
                // sled may panic on a damaged leaf instead of reporting it: the writer must not
                // die of it.
                Some(db) => generation::guard("reading chunks to acknowledge", || {
                    ack_changes_in(&db, staged, (gen, id, end), watermark, ack)
                })
                .map(Some),
                None => Ok(None),
            }
        });
        if let Err(e) = &read {
            if e.is_corrupt() {
                if let Some(g) = self.state.gens.get(&gen) {
                    g.handle.mark_damaged(e);
                }
            }
        }
        read
    }
}

/// [`Writer::ack_changes`] in the generation's database `db`, for lane `id` whose next
/// sequence number there is `end` (as committed).
fn ack_changes_in(
    db: &GenDb,
    staged: &Staged,
    (gen, id, end): (u64, u32, u64),
    mut watermark: Watermark,
    ack: &Ack,
) -> Result<AckChanges, QueueError> {
    let mut changes = AckChanges {
        chunks: Vec::new(),
        watermark: Watermark::default(),
        remove: Vec::new(),
        removed_events: 0,
        removed_bytes: 0,
    };
    // A chunk already delivered (marked, or absent) changes nothing: counters follow the
    // store, so they can never go below zero.
    let header_now = |seq: u64, marked: &Watermark| -> Result<Option<ChunkHeader>, QueueError> {
        if let Some(h) = staged.changed.get(&(gen, id, seq)) {
            return Ok(*h);
        }
        if marked.is_acked(seq) {
            return Ok(None);
        }
        Ok(db
            .db
            .get(record::chunk_key(id, seq))?
            .map(|old| ChunkHeader::decode(&old).unwrap_or_default()))
    };
    for seq in &ack.remove {
        if let Some(h) = header_now(*seq, &watermark)? {
            changes.removed_events += u64::from(h.events);
            changes.removed_bytes += u64::from(h.payload_bytes);
            changes.chunks.push((*seq, None, None));
            watermark.add(*seq);
        }
    }
    for (seq, chunk) in &ack.rewrite {
        if let Some(h) = header_now(*seq, &watermark)? {
            let kept_events = chunk.events.len() as u64;
            let kept_bytes = chunk.payload_bytes() as u64;
            changes.removed_events += u64::from(h.events).saturating_sub(kept_events);
            changes.removed_bytes += u64::from(h.payload_bytes).saturating_sub(kept_bytes);
            let header = ChunkHeader {
                events: kept_events as u32,
                payload_bytes: kept_bytes as u32,
            };
            changes
                .chunks
                // The rest of a half-delivered chunk, about to be sent: plain.
                .push((*seq, Some(chunk.encode_plain()), Some(header)));
        }
    }
    watermark.advance(end, &mut |from| next_stored(&db.db, id, from))?;
    changes.remove = watermark.overflow();
    changes.watermark = watermark;
    Ok(changes)
}

/// The first chunk of `lane` stored at or after `seq`.
fn next_stored(db: &sled::Db, lane: u32, seq: u64) -> Result<Option<u64>, sled::Error> {
    let range = record::chunk_key(lane, seq)..=record::chunk_key(lane, u64::MAX);
    match db.range(range).next() {
        None => Ok(None),
        // A key that does not parse is taken for a chunk at `seq`: the watermark stops there
        // rather than take anything for delivered.
        Some(item) => Ok(Some(
            record::parse_chunk_key(&item?.0).map_or(seq, |(_, s)| s),
        )),
    }
}
