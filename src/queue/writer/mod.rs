//! The one thread that changes the store: group commit, rotation and deletion of generations.
//!
//! It takes every operation waiting in its channel (up to `COMMIT_MAX_BYTES` of appends, and
//! waiting a moment for more when that pays: [`gather`]), stages what they write per database
//! they touch, then for each database in turn applies it (one atomic sled batch, or key by key
//! for a few appends alone: [`durable`]), `flush()`es sled and fsyncs its data file, and only
//! then answers.
//! So one fsync covers every sender of the group, and no sender hears "done" before its events
//! would survive a power cut.
//!
//! The meta database (new lanes, dead letters) is made durable before any generation of the
//! same commit: a dead letter is on disk before the chunk it comes from is rewritten, so a
//! crash between the two duplicates a dead letter instead of losing an event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

mod ack;
mod checkpoints;
mod drift;
mod durable;
mod gather;
mod janitor;
mod lifecycle;
mod load;
mod quarantine;
mod space;

use super::checkpoint::Checkpoint;
use super::compression::Compression;
use super::fresh::{ChunkAt, FreshBodies};
use super::generation::{GenDb, GenLane, GenSummary, Generation};
use super::order::AppendOrder;
use super::record::{self, ChunkHeader, ChunkView, LaneRecord, Watermark};
use super::{Ack, Lane, QueueError, Shared};
use crate::crash_point;
use durable::GenWrites;
pub use gather::Senders;
pub use quarantine::Undecodable;
pub use space::measure_space;

/// Bytes of disk sled takes per byte of payload while it is queued: a generation's files reach
/// about 2x its payload (sled writes a value to its log, then again in the consolidated leaf
/// node). The writer refuses appends that could eat into the free-space reserve by this
/// estimate.
const SLED_AMPLIFICATION: u64 = 4;
/// A sealed generation nobody used for this long is closed (its memory given back). Short,
/// because sled keeps what was written to a database in memory while it is open: during a fast
/// ingest with the intake down, a generation is sealed every fraction of a second.
const IDLE_CLOSE: Duration = Duration::from_millis(250);
/// An active generation that has held at least this much and is now empty is rotated away on
/// the next refresh, so a drained queue gives its space back even with little traffic.
const ROTATE_EMPTY_AFTER: u64 = 1024 * 1024;

/// A chunk encoded by the sender's task, so that the writer only stores bytes.
#[derive(Debug)]
pub struct EncodedChunk {
    bytes: Vec<u8>,
    header: ChunkHeader,
    /// The v1 body of a compressed chunk, for delivery to read without decompressing
    /// ([`super::fresh`]).
    body: Option<Vec<u8>>,
}

impl EncodedChunk {
    /// Encodes `chunk`, compressed when that pays ([`Compression`]), with its body if it was
    /// compressed and `fresh` keeps bodies now.
    pub fn new(
        chunk: &ChunkView<'_>,
        compression: &Compression,
        fresh: &FreshBodies,
    ) -> EncodedChunk {
        let (bytes, body) = match compression.should_try() {
            Some(codec) => {
                let (bytes, body) = chunk.encode_keeping_body(codec);
                compression.record(body.is_some());
                (bytes, body)
            }
            None => (chunk.encode_plain(), None),
        };
        EncodedChunk {
            bytes,
            body: body.filter(|_| fresh.wants_body()),
            header: ChunkHeader {
                events: chunk.events.len() as u32,
                payload_bytes: chunk.payload_bytes() as u32,
            },
        }
    }
}

/// Chunks of one intake key, in order.
#[derive(Debug)]
pub struct Group {
    pub intake_key: String,
    pub chunks: Vec<EncodedChunk>,
}

type Done = oneshot::Sender<Result<(), QueueError>>;

#[derive(Debug)]
pub enum Op {
    Append {
        groups: Vec<Group>,
        /// Stored in the same batch as the chunks (`queue/checkpoint.rs`).
        checkpoints: Vec<Checkpoint>,
        /// The stream's order, if it has several appends in flight (`queue/order.rs`).
        order: Option<AppendOrder>,
        done: Done,
    },
    Ack {
        lane: u32,
        ack: Ack,
        done: Done,
    },
    Close {
        done: Done,
    },
    /// Housekeeping, sent every second by the monitor thread: measure the disk, close idle
    /// generations, delete delivered ones.
    Refresh,
    /// A read found undecodable chunks ([`Undecodable`]): quarantine them now.
    Quarantine,
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append {
                groups,
                checkpoints,
                ..
            } => {
                let chunks: usize = groups
                    .iter()
                    .flat_map(|g| &g.chunks)
                    .map(|c| c.bytes.len())
                    .sum();
                chunks + checkpoints.iter().map(Checkpoint::bytes).sum::<usize>()
            }
            Op::Ack { ack, .. } => ack.rewrite.len() * 1024 + ack.remove.len() * 16,
            Op::Close { .. } | Op::Refresh | Op::Quarantine => 0,
        }
    }
}

/// The writer's own view of a lane, over all generations; readers see it through [`Lane`]'s
/// atomics.
#[derive(Debug, Clone)]
struct LaneState {
    intake_key: String,
    next_seq: u64,
    events: u64,
    bytes: u64,
}

/// A lane's share of one generation.
#[derive(Debug, Clone, Copy, Default)]
struct GenCount {
    events: u64,
    bytes: u64,
    end_seq: u64,
}

/// The lanes' shares of one generation, with their sum kept in step, so that "is this
/// generation empty?" (asked after every commit) does not walk every lane.
#[derive(Debug, Default)]
struct LaneCounts {
    lanes: HashMap<u32, GenCount>,
    events: u64,
}

impl LaneCounts {
    /// Sets one lane's share.
    fn set(&mut self, lane: u32, count: GenCount) {
        let old = self.lanes.insert(lane, count).unwrap_or_default();
        self.events = (self.events + count.events).saturating_sub(old.events);
    }
}

impl From<HashMap<u32, GenCount>> for LaneCounts {
    fn from(lanes: HashMap<u32, GenCount>) -> LaneCounts {
        let events = lanes.values().map(|c| c.events).sum();
        LaneCounts { lanes, events }
    }
}

/// Read-only: every change goes through [`LaneCounts::set`] or a whole new `LaneCounts`.
impl std::ops::Deref for LaneCounts {
    type Target = HashMap<u32, GenCount>;
    fn deref(&self) -> &Self::Target {
        &self.lanes
    }
}

#[derive(Debug)]
struct GenState {
    handle: Arc<Generation>,
    lanes: LaneCounts,
    /// Counts read from the generation itself; false while they come from its summary (an
    /// upper bound), until the writer first touches it.
    exact: bool,
    /// Payload appended while it was active.
    appended: u64,
    /// Lanes whose delivery went past this (sealed) generation's end since it was last
    /// counted ([`drift`]).
    passed: HashSet<u32>,
    /// Each lane's watermark as its record in the generation holds it (known once `exact`).
    marks: HashMap<u32, Watermark>,
}

impl GenState {
    fn new(handle: Arc<Generation>, lanes: HashMap<u32, GenCount>, exact: bool) -> GenState {
        let state = GenState {
            handle,
            lanes: lanes.into(),
            exact,
            appended: 0,
            passed: HashSet::new(),
            marks: HashMap::new(),
        };
        state.publish();
        state
    }

    fn events(&self) -> u64 {
        self.lanes.events
    }

    /// Publishes every lane's events to readers (after the counts were replaced whole).
    fn publish(&self) {
        self.handle
            .set_lane_events(self.lanes.iter().map(|(l, c)| (*l, c.events)));
    }

    /// Sets one lane's share and publishes it: what a commit costs per lane it touched,
    /// whatever the number of lanes.
    fn set_count(&mut self, lane: u32, count: GenCount) {
        self.lanes.set(lane, count);
        self.handle.set_lane_event_count(lane, count.events);
    }

    fn summary(&self) -> GenSummary {
        let mut lanes: Vec<GenLane> = self
            .lanes
            .iter()
            .map(|(lane, c)| GenLane {
                lane: *lane,
                events: c.events,
                bytes: c.bytes,
                end_seq: c.end_seq,
            })
            .collect();
        lanes.sort_by_key(|l| l.lane);
        GenSummary { lanes }
    }
}

/// What the store holds, as loaded at open and kept by the writer.
#[derive(Debug)]
pub struct WriterState {
    lanes: Vec<LaneState>,
    by_key: HashMap<String, u32>,
    gens: BTreeMap<u64, GenState>,
    active: u64,
    next_dead_seq: u64,
    /// Dead letters in the store at open.
    pub dead_letters: u64,
    cache_bytes: u64,
    /// Whether a checkpoint was ever written (then each new generation gets a copy of them).
    checkpoints_used: bool,
    /// The checkpoints at open, for [`super::checkpoint::Checkpoints`].
    pub checkpoints: HashMap<Vec<u8>, Vec<u8>>,
}

impl WriterState {
    pub fn lanes_for_readers(&self) -> Vec<Arc<Lane>> {
        self.lanes
            .iter()
            .enumerate()
            .map(|(id, l)| new_lane(id as u32, &l.intake_key, l.events, l.bytes))
            .collect()
    }

    /// The generations, oldest first, for readers.
    pub fn generations(&self) -> Vec<Arc<Generation>> {
        self.gens.values().map(|g| g.handle.clone()).collect()
    }

    pub fn active(&self) -> u64 {
        self.active
    }
}

fn new_lane(id: u32, intake_key: &str, events: u64, bytes: u64) -> Arc<Lane> {
    Arc::new(Lane {
        id,
        intake_key: intake_key.to_owned(),
        events: events.into(),
        bytes: bytes.into(),
        appended: 0.into(),
        notify: Notify::new(),
    })
}

fn storage(e: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(e.to_string())
}

pub struct Writer {
    shared: Arc<Shared>,
    state: WriterState,
    meta: GenDb,
    /// Payload after which the active generation is sealed.
    generation_bytes: u64,
    last_disk_check: Instant,
    /// Names of the files in each generation's `blobs/` directory already fsynced.
    synced_blobs: HashMap<u64, HashSet<OsString>>,
    /// The same for the meta database.
    meta_synced_blobs: HashSet<OsString>,
    janitor: janitor::Janitor,
    /// After a failed rotation (a full disk, say), when to try again.
    rotate_retry_at: Instant,
    gatherer: gather::Gatherer,
}

/// Changes staged for one commit, made visible only if the commit succeeds.
#[derive(Default)]
struct Staged {
    meta: sled::Batch,
    meta_dirty: bool,
    gens: BTreeMap<u64, GenWrites>,
    /// Whether each generation's writes must be applied as one batch: the commit holds an
    /// acknowledgement ([`durable`]).
    atomic: bool,
    /// Per generation and lane, counts after this commit.
    counts: HashMap<(u64, u32), GenCount>,
    /// Chunks changed earlier in this commit: their header now (`None`: delivered).
    changed: HashMap<(u64, u32, u64), Option<ChunkHeader>>,
    /// Per generation and lane, watermarks changed by this commit.
    marks: HashMap<(u64, u32), Watermark>,
    touched: HashMap<u32, LaneState>,
    new_lanes: Vec<u32>,
    /// The intake keys of `new_lanes`: a request with many new keys must not look each one
    /// up among all the others.
    new_keys: HashMap<String, u32>,
    appended: HashMap<u32, u64>,
    appended_payload: u64,
    acked_events: u64,
    dead: u64,
    next_dead_seq: u64,
    /// How far each acknowledgement's lane got.
    reached: Vec<drift::Reached>,
    /// The v1 bodies of the compressed chunks appended, where they are stored.
    fresh: Vec<(ChunkAt, Vec<u8>)>,
    /// Checkpoints stored by this commit, in order.
    checkpoints: Vec<Checkpoint>,
    /// This commit writes the meta database's mark that checkpoints are used.
    checkpoints_used: bool,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        state: WriterState,
        meta: GenDb,
        generation_bytes: u64,
    ) -> Result<Writer, QueueError> {
        let mut janitor = janitor::Janitor::start(shared.path.clone())?;
        janitor.prepare(Arc::new(Generation::new(
            &shared.path,
            state.active + 1,
            state.cache_bytes,
        )));
        Ok(Writer {
            shared,
            state,
            meta,
            generation_bytes,
            last_disk_check: Instant::now(),
            synced_blobs: HashMap::new(),
            meta_synced_blobs: HashSet::new(),
            janitor,
            rotate_retry_at: Instant::now(),
            gatherer: gather::Gatherer::default(),
        })
    }

    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        // Senders unpark this thread while it waits for them.
        self.shared.senders.set_writer();
        while let Some(first) = rx.blocking_recv() {
            let shared = &self.shared;
            let group = self
                .gatherer
                .gather(&shared.senders, &shared.stats, &mut rx, first);
            let ops = refuse_out_of_order(group.ops);
            let mut ops = self.refuse_appends_if_disk_low(ops);
            let quarantines = self.stage_quarantines(&mut ops);
            if !ops.is_empty() {
                let started = Instant::now();
                self.commit(ops);
                self.gatherer.committed(started.elapsed());
            }
            quarantines.settle(&self.shared);
            if self.shared.failure.get().is_some() {
                break;
            }
            self.maintain(group.refresh);
            if group.closing || self.shared.failure.get().is_some() {
                break;
            }
        }
        self.janitor.discard_spare();
        rx.close();
        while let Ok(op) = rx.try_recv() {
            let err = self.shared.failed().err().unwrap_or(QueueError::Closed);
            answer(op, Err(err));
        }
    }

    fn commit(&mut self, mut ops: Vec<Op>) {
        let mut staged = Staged {
            next_dead_seq: self.state.next_dead_seq,
            ..Staged::default()
        };
        // Read the real counts of every generation acknowledged in this group before anything
        // is staged: reading them corrects the lanes' totals, and a lane staged earlier in the
        // group (an append) would otherwise write its stale total back.
        let mut result = ops.iter().try_for_each(|op| match op {
            Op::Ack { ack, .. } => self.make_exact(ack.gen),
            _ => Ok(()),
        });
        // An ack that finds its generation damaged fails alone: the group's appends and other
        // acks go on, and the generation is moved aside at the next housekeeping.
        let mut failed_alone: HashMap<usize, QueueError> = HashMap::new();
        if result.is_ok() {
            for (i, op) in ops.iter_mut().enumerate() {
                let step = match op {
                    Op::Append {
                        groups,
                        checkpoints,
                        ..
                    } => self.stage_append(&mut staged, groups).map(|()| {
                        self.stage_checkpoints(&mut staged, checkpoints);
                    }),
                    Op::Ack { lane, ack, .. } => match self.stage_ack(&mut staged, *lane, ack) {
                        Err(e) if e.is_corrupt() => {
                            failed_alone.insert(i, e);
                            Ok(())
                        }
                        other => other,
                    },
                    Op::Close { .. } | Op::Refresh | Op::Quarantine => Ok(()),
                };
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|()| self.write(staged));
        if let Err(e) = &result {
            self.shared
                .stats
                .storage_errors
                .fetch_add(1, Ordering::Relaxed);
            // Most likely the disk is full: hold sources back at once, not at the next check.
            self.update_disk_usage();
            if !matches!(e, QueueError::RestartNeeded(_)) {
                tracing::error!(error = %e, "queue commit failed; nothing of it was acknowledged");
            }
        }
        // Every operation of the group gets the same answer: none of its senders hears "done"
        // unless all of it is durable.
        for (i, op) in ops.into_iter().enumerate() {
            if let Some(e) = failed_alone.remove(&i) {
                answer(op, Err(e));
                continue;
            }
            let r = match &result {
                Ok(()) => Ok(()),
                Err(QueueError::RestartNeeded(why)) => Err(QueueError::RestartNeeded(why.clone())),
                Err(e) => Err(QueueError::Storage(e.to_string())),
            };
            answer(op, r);
        }
    }

    fn lane_state<'a>(&'a self, staged: &'a mut Staged, id: u32) -> Option<&'a mut LaneState> {
        match staged.touched.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                Some(e.insert(self.state.lanes.get(id as usize)?.clone()))
            }
        }
    }

    fn gen_count<'a>(&self, staged: &'a mut Staged, gen: u64, lane: u32) -> &'a mut GenCount {
        staged.counts.entry((gen, lane)).or_insert_with(|| {
            self.state
                .gens
                .get(&gen)
                .and_then(|g| g.lanes.get(&lane).copied())
                .unwrap_or_default()
        })
    }

    /// The lane of `intake_key`, created (in this commit) if it is new.
    fn lane_for(&self, staged: &mut Staged, intake_key: &str) -> u32 {
        if let Some(id) = self.state.by_key.get(intake_key) {
            return *id;
        }
        if let Some(id) = staged.new_keys.get(intake_key) {
            return *id;
        }
        let id = (self.state.lanes.len() + staged.new_lanes.len()) as u32;
        staged.new_lanes.push(id);
        staged.new_keys.insert(intake_key.to_owned(), id);
        staged.touched.insert(
            id,
            LaneState {
                intake_key: intake_key.to_owned(),
                next_seq: 0,
                events: 0,
                bytes: 0,
            },
        );
        staged.meta.insert(
            &record::lane_key(id),
            record::encode_value(&intake_key.to_owned()),
        );
        staged.meta_dirty = true;
        id
    }

    /// Stages the chunks of `groups` in the active generation, moving their bytes into the
    /// batch (the sender only waits for the answer; it does not need them back).
    fn stage_append(&self, staged: &mut Staged, groups: &mut [Group]) -> Result<(), QueueError> {
        let active = self.state.active;
        for group in groups {
            let id = self.lane_for(staged, &group.intake_key);
            let (mut events, mut bytes) = (0u64, 0u64);
            let mut inserts = Vec::with_capacity(group.chunks.len());
            let mut bodies = Vec::new();
            let first_here = !staged.marks.contains_key(&(active, id))
                && !self
                    .state
                    .gens
                    .get(&active)
                    .is_some_and(|g| g.marks.contains_key(&id));
            let (first_seq, end_seq) = {
                let lane = self
                    .lane_state(staged, id)
                    .ok_or_else(|| storage(format!("lane {id} vanished")))?;
                let first_seq = lane.next_seq;
                for chunk in &mut group.chunks {
                    let value = std::mem::take(&mut chunk.bytes);
                    if let Some(body) = chunk.body.take() {
                        bodies.push(((active, id, lane.next_seq), body));
                    }
                    inserts.push((record::chunk_key(id, lane.next_seq), value));
                    lane.next_seq += 1;
                    events += u64::from(chunk.header.events);
                    bytes += u64::from(chunk.header.payload_bytes);
                }
                lane.events += events;
                lane.bytes += bytes;
                (first_seq, lane.next_seq)
            };
            if first_here {
                // The lane's first chunk in this generation: its watermark starts there, so
                // that it compacts (nothing below it is of this generation).
                let mark = Watermark::starting_at(first_seq);
                staged.marks.insert((active, id), mark);
            }
            let count = self.gen_count(staged, active, id);
            count.events += events;
            count.bytes += bytes;
            count.end_seq = end_seq;
            let batch = staged.gens.entry(active).or_default();
            for (k, v) in inserts {
                batch.insert(&k, v);
            }
            *staged.appended.entry(id).or_default() += events;
            staged.appended_payload += bytes;
            staged.fresh.append(&mut bodies);
        }
        Ok(())
    }

    fn gen_db(&self, gen: u64) -> Result<Option<Arc<GenDb>>, QueueError> {
        match self.state.gens.get(&gen) {
            Some(g) => g.handle.db(),
            None => Ok(None),
        }
    }

    /// Applies the staged batches atomically per database, makes them durable, then publishes.
    ///
    /// A failure before anything is applied leaves the store as it was: the group fails and
    /// the writer goes on. A failure once a batch was applied is fatal ([`Writer::break_down`]).
    fn write(&mut self, mut staged: Staged) -> Result<(), QueueError> {
        let counts: Vec<((u64, u32), GenCount)> =
            staged.counts.iter().map(|(k, c)| (*k, *c)).collect();
        for ((gen, lane), count) in counts {
            let Some(state) = self.lane_state(&mut staged, lane).cloned() else {
                continue;
            };
            let rec = LaneRecord {
                intake_key: state.intake_key,
                events: count.events,
                bytes: count.bytes,
                watermark: self.watermark(&staged, gen, lane),
                end_seq: Some(count.end_seq),
            };
            staged
                .gens
                .entry(gen)
                .or_default()
                .insert(&record::lane_key(lane), rec.encode());
        }
        // Batches are staged only for open generations (appends go to the active one, acks to
        // deleted ones stage nothing); a database gone now must fail the commit rather than
        // answer its senders as if their events were stored. Checked before anything is
        // applied, so that such a commit leaves the store untouched.
        let mut batches = Vec::with_capacity(staged.gens.len());
        for (gen, batch) in std::mem::take(&mut staged.gens) {
            let db = self
                .gen_db(gen)?
                .ok_or_else(|| storage(format!("queue generation {gen} is gone")))?;
            batches.push((gen, db, batch));
        }
        // Kept before the chunks reach sled, where delivery may read them before their
        // fsync. Nothing can fail now without stopping the writer for good (`break_down`),
        // so these sequence numbers are never handed out again: a body kept here is always
        // that of the chunk stored, or about to be stored, under its key.
        self.shared.fresh.insert(std::mem::take(&mut staged.fresh));
        crash_point!("queue-before-apply");
        if let Err(e) = self.apply_and_sync(&mut staged, batches) {
            return Err(self.break_down(&staged, e));
        }
        self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.state.next_dead_seq = staged.next_dead_seq;
        let reached = std::mem::take(&mut staged.reached);
        self.publish(staged);
        self.note_reached(&reached);
        if self.last_disk_check.elapsed() >= Duration::from_millis(100) {
            self.update_disk_usage();
        }
        Ok(())
    }

    fn publish(&mut self, mut staged: Staged) {
        self.state.checkpoints_used |= staged.checkpoints_used;
        if !staged.checkpoints.is_empty() {
            self.shared
                .checkpoints
                .publish(std::mem::take(&mut staged.checkpoints));
        }
        for ((gen, lane), count) in staged.counts.drain() {
            if let Some(g) = self.state.gens.get_mut(&gen) {
                g.set_count(lane, count);
            }
        }
        for ((gen, lane), mark) in staged.marks.drain() {
            if let Some(g) = self.state.gens.get_mut(&gen) {
                g.marks.insert(lane, mark);
            }
        }
        if let Some(active) = self.state.gens.get_mut(&self.state.active) {
            active.appended += staged.appended_payload;
        }
        staged.new_lanes.sort_unstable();
        let mut readers = self.shared.lanes_write();
        for id in &staged.new_lanes {
            if let Some(state) = staged.touched.get(id) {
                self.state.by_key.insert(state.intake_key.clone(), *id);
                self.state.lanes.push(state.clone());
                // Its counts are set below, with the queue's totals.
                readers.push(new_lane(*id, &state.intake_key, 0, 0));
            }
        }
        for (id, state) in staged.touched {
            if let (Some(mine), Some(theirs)) = (
                self.state.lanes.get_mut(id as usize),
                readers.get(id as usize),
            ) {
                self.shared
                    .set_lane_counts(theirs, state.events, state.bytes);
                *mine = state;
            }
        }
        let stats = &self.shared.stats;
        for (id, n) in &staged.appended {
            if let Some(lane) = readers.get(*id as usize) {
                lane.appended.fetch_add(*n, Ordering::AcqRel);
                stats.appended_events.fetch_add(*n, Ordering::Relaxed);
                lane.notify.notify_one();
            }
        }
        stats
            .acked_events
            .fetch_add(staged.acked_events, Ordering::Relaxed);
        stats.dead_letters.fetch_add(staged.dead, Ordering::Relaxed);
        drop(readers);
        if !staged.new_lanes.is_empty() {
            self.shared.lanes_changed.notify_waiters();
        }
    }
}

/// Answers `op`; an append that fails breaks its stream's order, so that the writer refuses
/// the stream's later appends until the source has appended this one again.
fn answer(op: Op, result: Result<(), QueueError>) {
    let done = match op {
        Op::Append { done, order, .. } => {
            if let (Err(_), Some(order)) = (&result, order) {
                order.broke();
            }
            done
        }
        Op::Ack { done, .. } | Op::Close { done } => done,
        Op::Refresh | Op::Quarantine => return,
    };
    let _ = done.send(result);
}

/// Refuses the appends whose stream had an earlier append fail (`queue/order.rs`): before the
/// group is staged, so that none of them is stored ahead of the one that failed.
fn refuse_out_of_order(ops: Vec<Op>) -> Vec<Op> {
    let broken = |op: &Op| matches!(op, Op::Append { order: Some(o), .. } if o.is_broken());
    if !ops.iter().any(broken) {
        return ops;
    }
    let (refused, kept): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(broken);
    for op in refused {
        answer(op, Err(QueueError::EarlierAppendFailed));
    }
    kept
}

/// Asks the writer to measure the disk every second, so that back-pressure lifts when space is
/// freed even if nothing is committed. Holds only a weak sender: it stops when the queue does.
pub fn spawn_monitor(ops: mpsc::WeakSender<Op>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("queue-monitor".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(sender) = ops.upgrade() else { return };
            if sender.try_send(Op::Refresh).is_err() && sender.is_closed() {
                return;
            }
        })?;
    Ok(())
}
