//! Reading a lane for delivery: from a [`Position`] (generation, sequence number) on, one
//! generation at a time, each chunk handed over as a [`ChunkView`] that borrows the stored
//! bytes. Reads never change the store; what delivery makes of them comes back through
//! [`Queue::ack`]. A chunk that does not decode is skipped and reported to the writer, which
//! moves it to the dead letters (`writer/quarantine.rs`): readers never see stored bytes.

use super::delivered;
use super::fresh::FreshBodies;
use super::generation;
use super::record::{self, Chunk, ChunkView};
use super::{writer, Queue, QueueError};

/// A place in a lane: generation, then sequence number. Reading from a position returns the
/// chunks at or after it, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub gen: u64,
    pub seq: u64,
}

/// A chunk read from a lane, with its sequence number in its generation.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub seq: u64,
    pub chunk: Chunk,
}

/// What one read of a lane covered, all in one generation ([`Queue::read_with`]).
#[derive(Debug, Default)]
pub struct ReadSpan {
    pub gen: u64,
    /// Chunks handed to the reader, their events and payload bytes.
    pub chunks: usize,
    pub events: usize,
    pub bytes: usize,
    /// Undecodable chunks found on the way: skipped, and quarantined by the queue (moved to
    /// the dead letters, `writer/quarantine.rs`).
    pub undecodable: usize,
    /// Where the next read starts.
    pub next: Position,
    /// Read from a sealed generation: nothing more will be appended after these chunks in it,
    /// so waiting for a fuller batch (linger) would wait for nothing.
    pub sealed: bool,
    /// The read stopped at a chunk that cannot join the batch (another event date, or
    /// received too long after the batch's first chunk: [`BatchDate::admits`]). Every later
    /// chunk of the lane comes after that one, so the batch is complete: waiting for more
    /// (linger) would wait for nothing. (A backlog of events received over hours would
    /// otherwise linger at every batch.)
    pub cut: bool,
    /// The read stopped at a chunk that would take the batch past its limits: the batch is
    /// as full as chunks make it (a chunk of 81 events never fills a batch of 10,000 to the
    /// event), and lingering would wait for room that never comes.
    pub full: bool,
}

/// The date every chunk of one batch shares, since one request carries one
/// `X-SEKOIAIO-EVENT-TIMESTAMP`: the sender's event date, or, for events without one, the
/// reception time of the batch's first chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchDate<'a> {
    /// The sender's event date of the batch's chunks.
    pub timestamp: Option<&'a str>,
    /// When the batch's first chunk was received (ms since the Unix epoch; 0: unknown).
    pub received_at_ms: u64,
}

impl BatchDate<'_> {
    /// Whether a chunk of event date `timestamp` received at `received_at_ms` may join the
    /// batch: the same sender's date and, for undated events when reception times are sent
    /// (`tolerance`: `event_time_tolerance_ms`, `None` with `event_time = "intake"`), received
    /// within `tolerance` ms of the batch's first chunk, either side of it (a wall clock
    /// stepped back must cut a batch too, or its events would be dated by a time far from
    /// theirs). Chunks with a date of their own keep it: their reception time does not matter.
    pub fn admits(
        &self,
        timestamp: Option<&str>,
        received_at_ms: u64,
        tolerance: Option<u64>,
    ) -> bool {
        if self.timestamp != timestamp {
            return false;
        }
        match (timestamp, tolerance) {
            (None, Some(tolerance)) => self.received_at_ms.abs_diff(received_at_ms) <= tolerance,
            _ => true,
        }
    }
}

/// What [`Queue::read`] found: the chunks, owned.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub span: ReadSpan,
    pub chunks: Vec<StoredChunk>,
}

impl ReadBatch {
    pub fn events(&self) -> usize {
        self.span.events
    }
}

impl Queue {
    /// Reads chunks of `lane` from `from` on, in order and from one generation: at least one
    /// chunk if there is any, then more while they fit in `max_events` and `max_bytes`
    /// (payload) and share the first chunk's event date (one request carries one date:
    /// [`BatchDate::admits`], with `limits.reception_tolerance_ms`). Each
    /// chunk is handed to `reader` as a [`ChunkView`] that borrows the stored bytes: nothing is
    /// copied that the reader does not copy.
    ///
    /// Sealed generations that hold nothing of the lane are skipped without being opened.
    pub fn read_with(
        &self,
        lane: u32,
        from: Position,
        limits: ReadLimits,
        reader: &mut dyn FnMut(u64, &ChunkView<'_>),
    ) -> Result<ReadSpan, QueueError> {
        let (gens, active) = self.shared.gens_snapshot();
        let mut next = from;
        for gen in gens.iter().filter(|g| g.id >= from.gen) {
            let start = if gen.id == from.gen { from.seq } else { 0 };
            next = Position {
                gen: gen.id,
                seq: start,
            };
            if gen.is_damaged() || (gen.id != active && !gen.may_hold(lane)) {
                continue;
            }
            // Damage that sled finds (or panics on) in this generation must not stop the lane:
            // the generation is marked damaged (the writer moves it aside) and the read goes
            // on with the next one. Unless the reader already took chunks of it: they would
            // be taken for chunks of the next one (same sequence numbers, another
            // generation), so the read fails instead, the reader drops them, and the next
            // read skips the generation.
            let mut handed = 0usize;
            let read = match gen.db() {
                Ok(Some(db)) => generation::guard("reading a generation", || {
                    let counting = &mut |seq: u64, view: &ChunkView<'_>| {
                        handed += 1;
                        reader(seq, view)
                    };
                    let from = Start {
                        gen: gen.id,
                        lane,
                        seq: start,
                    };
                    let (span, undecodable) =
                        read_generation(&db.db, &self.shared.fresh, from, limits, None, counting)?;
                    self.quarantine(gen.id, lane, &undecodable);
                    Ok(span)
                }),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
            let mut span = match read {
                Ok(span) => span,
                Err(e) if e.is_corrupt() => {
                    gen.mark_damaged(&e);
                    if handed > 0 {
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if span.chunks > 0 || span.undecodable > 0 {
                span.sealed = gen.id != active;
                return Ok(span);
            }
        }
        Ok(ReadSpan {
            gen: next.gen,
            next,
            ..ReadSpan::default()
        })
    }

    /// Reads on for a batch already begun with [`Queue::read_with`]: from `from`, in its
    /// generation only, chunks that `date` (the batch's) admits only, within `limits` (what
    /// the batch has left) from the first chunk on. So a batch that waits for more events (linger) reads
    /// each chunk once instead of reading them all again; an empty span if the generation is
    /// gone or damaged (the batch then goes as it is: `sealed`).
    pub fn read_on(
        &self,
        lane: u32,
        from: Position,
        limits: ReadLimits,
        date: BatchDate<'_>,
        reader: &mut dyn FnMut(u64, &ChunkView<'_>),
    ) -> Result<ReadSpan, QueueError> {
        let (gens, active) = self.shared.gens_snapshot();
        let nothing = ReadSpan {
            gen: from.gen,
            next: from,
            sealed: true,
            ..ReadSpan::default()
        };
        let Some(gen) = gens.iter().find(|g| g.id == from.gen) else {
            return Ok(nothing);
        };
        if gen.is_damaged() {
            return Ok(nothing);
        }
        let db = match gen.db()? {
            Some(db) => db,
            None => return Ok(nothing),
        };
        let start = Start {
            gen: gen.id,
            lane,
            seq: from.seq,
        };
        let read = generation::guard("reading a generation", || {
            let fresh = &self.shared.fresh;
            let (span, undecodable) =
                read_generation(&db.db, fresh, start, limits, Some(date), reader)?;
            self.quarantine(gen.id, lane, &undecodable);
            Ok(span)
        });
        // The batch holds chunks of this generation already: a damaged one fails the read
        // (as in `read_with`), the batch is dropped and read again from its start.
        let mut span = read.inspect_err(|e| {
            if e.is_corrupt() {
                gen.mark_damaged(e)
            }
        })?;
        span.sealed = gen.id != active;
        Ok(span)
    }

    /// [`Queue::read_with`], collecting owned copies of the chunks (for tests and tools).
    pub fn read(
        &self,
        lane: u32,
        from: Position,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, QueueError> {
        let mut chunks = Vec::new();
        let limits = ReadLimits {
            max_events,
            max_bytes,
            reception_tolerance_ms: None,
        };
        let span = self.read_with(lane, from, limits, &mut |seq, view| {
            chunks.push(StoredChunk {
                seq,
                chunk: view.to_chunk(),
            })
        })?;
        Ok(ReadBatch { span, chunks })
    }

    /// Hands the undecodable chunks `seqs` of `lane` in `gen` to the writer, which moves them
    /// to the dead letters. Never waits: a read must not wait for a commit.
    fn quarantine(&self, gen: u64, lane: u32, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        self.shared.undecodable.report(gen, lane, seqs);
        // Full: the writer has operations to commit, and takes the report with them.
        let _ = self.ops.try_send(writer::Op::Quarantine);
    }
}

/// How much one read may cover (payload bytes), and how far apart the reception times of
/// its undated events may be.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// `event_time_tolerance_ms` when undated events are sent with their reception time;
    /// `None` (`event_time = "intake"`): reception times do not cut a read.
    pub reception_tolerance_ms: Option<u64>,
}

/// Where one generation's read starts.
struct Start {
    gen: u64,
    lane: u32,
    seq: u64,
}

/// Reads the undelivered chunks of a lane from `from` on in one generation's database;
/// chunks whose bodies `fresh` still keeps are not decompressed. `date`: the date of the
/// batch this read continues (`None`: a new batch, whose first chunk sets it). Returns
/// the span and the sequence numbers of the undecodable chunks skipped.
fn read_generation(
    db: &sled::Db,
    fresh: &FreshBodies,
    from: Start,
    limits: ReadLimits,
    date: Option<BatchDate<'_>>,
    reader: &mut dyn FnMut(u64, &ChunkView<'_>),
) -> Result<(ReadSpan, Vec<u64>), QueueError> {
    let Start {
        gen,
        lane,
        seq: start,
    } = from;
    // Delivered chunks stay stored until the generation goes: start past the contiguous ones,
    // skip the others (a reopened queue reads each lane from its start).
    let watermark = delivered::lane_watermark(db, lane)?;
    let start = start.max(watermark.acked_below);
    let range = record::chunk_key(lane, start)..=record::chunk_key(lane, u64::MAX);
    let mut span = ReadSpan {
        gen,
        next: Position { gen, seq: start },
        ..Default::default()
    };
    // The date of the batch's first chunk: one request carries one date.
    let mut date: Option<(Option<String>, u64)> =
        date.map(|d| (d.timestamp.map(str::to_owned), d.received_at_ms));
    let mut scratch = Vec::new();
    let mut undecodable = Vec::new();
    // A chunk whose kept body was taken, then not read (it cannot join the batch).
    let mut given_back = None;
    for item in db.range(range) {
        let (key, value) = item?;
        let (_, seq) =
            record::parse_chunk_key(&key).map_err(|e| QueueError::Storage(e.to_string()))?;
        if watermark.is_acked(seq) {
            span.next.seq = seq + 1;
            continue;
        }
        let header = record::ChunkHeader::decode(&value);
        if let (Ok(h), Some(_)) = (&header, &date) {
            if span.events + h.events as usize > limits.max_events
                || span.bytes + h.payload_bytes as usize > limits.max_bytes
            {
                span.full = true;
                break;
            }
        }
        // Only a compressed chunk can have a body kept: a plain one is read as stored, without
        // a look (and a lock) in `fresh`.
        let compressed = record::is_compressed(&value);
        let kept = match (&header, compressed) {
            (Ok(h), true) => fresh.take((gen, lane, seq)).and_then(|body| {
                scratch = body;
                ChunkView::from_body(*h, &scratch)
            }),
            _ => None,
        };
        if compressed {
            fresh.count_read(kept.is_some());
        }
        let from_fresh = kept.is_some();
        let view = match kept {
            Some(view) => Ok(view),
            None => header.and_then(|_| ChunkView::decode(&value, &mut scratch)),
        };
        let view = match view {
            Ok(view) => view,
            Err(_) => {
                undecodable.push(seq);
                span.undecodable += 1;
                span.next.seq = seq + 1;
                continue;
            }
        };
        match &date {
            Some((timestamp, received_at_ms)) => {
                let first = BatchDate {
                    timestamp: timestamp.as_deref(),
                    received_at_ms: *received_at_ms,
                };
                if !first.admits(
                    view.timestamp,
                    view.received_at_ms,
                    limits.reception_tolerance_ms,
                ) {
                    span.cut = true;
                    // The chunk begins the next batch: a body taken from the kept ones goes
                    // back for that read, which would otherwise decompress it from the store.
                    if from_fresh {
                        given_back = Some(seq);
                    }
                    break;
                }
            }
            None => date = Some((view.timestamp.map(str::to_owned), view.received_at_ms)),
        }
        span.chunks += 1;
        span.events += view.events.len();
        span.bytes += view.payload_bytes();
        span.next.seq = seq + 1;
        reader(seq, &view);
        if span.events >= limits.max_events || span.bytes >= limits.max_bytes {
            break;
        }
    }
    if let Some(seq) = given_back {
        fresh.insert([((gen, lane, seq), std::mem::take(&mut scratch))]);
    }
    Ok((span, undecodable))
}
