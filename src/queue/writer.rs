//! The one thread that changes the store: group commit.
//!
//! It takes every operation waiting in its channel (up to `COMMIT_MAX_BYTES` of appends),
//! applies them as one atomic sled batch, then `flush()`es sled and fsyncs its data file, and
//! only then answers. So one fsync covers every sender of the group, and no sender hears "done"
//! before its events would survive a power cut.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::record::{self, Chunk, ChunkHeader, LaneRecord};
use super::{Ack, Lane, QueueError, Shared, COMMIT_MAX_BYTES};
use crate::crash_point;

/// Bytes of disk sled takes per byte of payload while it is queued. sled rewrites a B-tree
/// node on consolidation and keeps the old versions until its segments are cleaned: measured
/// here at 3.4x to 4.7x (8 MB of 200-byte events took 27 to 41 MB, whatever the chunk size).
const SLED_AMPLIFICATION: u64 = 4;

/// A chunk encoded by the sender's task, so that the writer only stores bytes.
#[derive(Debug)]
pub struct EncodedChunk {
    bytes: Vec<u8>,
    header: ChunkHeader,
}

impl EncodedChunk {
    pub fn new(chunk: &Chunk) -> EncodedChunk {
        EncodedChunk {
            bytes: chunk.encode(),
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
    /// Measure disk use and free space again (sent every second by the monitor thread).
    Refresh,
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append { groups, .. } => groups
                .iter()
                .flat_map(|g| &g.chunks)
                .map(|c| c.bytes.len())
                .sum(),
            Op::Ack { ack, .. } => ack.rewrite.len() * 1024 + ack.remove.len() * 16,
            Op::Close { .. } | Op::Refresh => 0,
        }
    }
}

/// The writer's own view of a lane; readers see it through [`Lane`]'s atomics.
#[derive(Debug, Clone)]
struct LaneState {
    intake_key: String,
    next_seq: u64,
    events: u64,
    bytes: u64,
}

/// What the store holds, as loaded at open and kept by the writer.
#[derive(Debug)]
pub struct WriterState {
    lanes: Vec<LaneState>,
    by_key: HashMap<String, u32>,
    next_dead_seq: u64,
    /// Dead letters in the store at open.
    pub dead_letters: u64,
}

impl WriterState {
    /// Loads lanes and counters from the store: O(lanes), not O(events), so a large backlog
    /// opens at once.
    pub fn load(db: &sled::Db) -> Result<WriterState, QueueError> {
        let mut lanes = Vec::new();
        let mut by_key = HashMap::new();
        for item in db.scan_prefix([record::LANE_PREFIX]) {
            let (key, value) = item?;
            let id = record::parse_lane_key(&key).map_err(storage)?;
            let rec: LaneRecord = record::decode_value(&value).map_err(storage)?;
            if id as usize != lanes.len() {
                return Err(QueueError::Storage(format!(
                    "lane {id} found where lane {} was expected",
                    lanes.len()
                )));
            }
            let next_seq = match db
                .range(record::chunk_key(id, 0)..=record::chunk_key(id, u64::MAX))
                .next_back()
            {
                Some(item) => record::parse_chunk_key(&item?.0).map_err(storage)?.1 + 1,
                None => 0,
            };
            by_key.insert(rec.intake_key.clone(), id);
            lanes.push(LaneState {
                intake_key: rec.intake_key,
                next_seq,
                events: rec.events,
                bytes: rec.bytes,
            });
        }
        let next_dead_seq = match db.scan_prefix([record::DEAD_PREFIX]).next_back() {
            Some(item) => record::parse_dead_key(&item?.0).map_err(storage)? + 1,
            None => 0,
        };
        // Dead letters are few (events refused for good); counting them once at open is cheap.
        let dead_letters = db.scan_prefix([record::DEAD_PREFIX]).count() as u64;
        Ok(WriterState {
            lanes,
            by_key,
            next_dead_seq,
            dead_letters,
        })
    }

    pub fn lanes_for_readers(&self) -> Vec<Arc<Lane>> {
        self.lanes
            .iter()
            .enumerate()
            .map(|(id, l)| new_lane(id as u32, l))
            .collect()
    }
}

fn new_lane(id: u32, state: &LaneState) -> Arc<Lane> {
    Arc::new(Lane {
        id,
        intake_key: state.intake_key.clone(),
        events: state.events.into(),
        bytes: state.bytes.into(),
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
    data_file: File,
    last_disk_check: Instant,
    /// Names of the files in sled's `blobs/` directory already fsynced.
    synced_blobs: HashSet<OsString>,
}

/// Changes staged for one commit, made visible only if the commit succeeds.
struct Staged {
    batch: sled::Batch,
    touched: HashMap<u32, LaneState>,
    new_lanes: Vec<u32>,
    appended: HashMap<u32, u64>,
    acked_events: u64,
    dead: u64,
    next_dead_seq: u64,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, state: WriterState, data_file: File) -> Writer {
        Writer {
            shared,
            state,
            data_file,
            last_disk_check: Instant::now(),
            synced_blobs: HashSet::new(),
        }
    }

    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            let mut bytes = ops[0].bytes();
            let mut closing = matches!(ops[0], Op::Close { .. });
            while !closing && bytes < COMMIT_MAX_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        closing = matches!(op, Op::Close { .. });
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            ops.retain(|op| !matches!(op, Op::Refresh));
            let ops = self.refuse_appends_if_disk_low(ops);
            if ops.is_empty() {
                self.update_disk_usage();
            } else {
                self.commit(ops);
            }
            if closing {
                break;
            }
        }
        rx.close();
        while let Ok(op) = rx.try_recv() {
            answer(op, Err(QueueError::Closed));
        }
    }

    fn commit(&mut self, mut ops: Vec<Op>) {
        let mut staged = Staged {
            batch: sled::Batch::default(),
            touched: HashMap::new(),
            new_lanes: Vec::new(),
            appended: HashMap::new(),
            acked_events: 0,
            dead: 0,
            next_dead_seq: self.state.next_dead_seq,
        };
        let mut result = Ok(());
        for op in &mut ops {
            let step = match op {
                Op::Append { groups, .. } => self.stage_append(&mut staged, groups),
                Op::Ack { lane, ack, .. } => self.stage_ack(&mut staged, *lane, ack),
                Op::Close { .. } | Op::Refresh => Ok(()),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
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
            tracing::error!(error = %e, "queue commit failed; nothing of it was acknowledged");
        }
        for op in ops {
            let r = match &result {
                Ok(()) => Ok(()),
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

    /// Stages the chunks of `groups`, moving their bytes into the batch (the sender only
    /// waits for the answer; it does not need them back).
    fn stage_append(&self, staged: &mut Staged, groups: &mut [Group]) -> Result<(), QueueError> {
        for group in groups {
            let id = match self.state.by_key.get(&group.intake_key) {
                Some(id) => *id,
                None => {
                    // A lane created earlier in this same commit?
                    let pending = staged.new_lanes.iter().copied().find(|id| {
                        staged
                            .touched
                            .get(id)
                            .is_some_and(|l| l.intake_key == group.intake_key)
                    });
                    match pending {
                        Some(id) => id,
                        None => {
                            let id = (self.state.lanes.len() + staged.new_lanes.len()) as u32;
                            staged.new_lanes.push(id);
                            staged.touched.insert(
                                id,
                                LaneState {
                                    intake_key: group.intake_key.clone(),
                                    next_seq: 0,
                                    events: 0,
                                    bytes: 0,
                                },
                            );
                            id
                        }
                    }
                }
            };
            let mut appended = 0;
            let mut inserts = Vec::with_capacity(group.chunks.len());
            {
                let lane = self
                    .lane_state(staged, id)
                    .ok_or_else(|| QueueError::Storage(format!("lane {id} vanished")))?;
                for chunk in &mut group.chunks {
                    let bytes = std::mem::take(&mut chunk.bytes);
                    inserts.push((record::chunk_key(id, lane.next_seq), bytes));
                    lane.next_seq += 1;
                    lane.events += u64::from(chunk.header.events);
                    lane.bytes += u64::from(chunk.header.payload_bytes);
                    appended += u64::from(chunk.header.events);
                }
            }
            for (k, v) in inserts {
                staged.batch.insert(&k, v);
            }
            *staged.appended.entry(id).or_default() += appended;
        }
        Ok(())
    }

    fn stage_ack(&self, staged: &mut Staged, id: u32, ack: &Ack) -> Result<(), QueueError> {
        let tree = &self.shared.tree;
        let mut removed_events = 0u64;
        let mut removed_bytes = 0u64;
        let mut changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for seq in &ack.remove {
            let key = record::chunk_key(id, *seq);
            // A chunk that is not there (already removed) changes nothing: counters follow the
            // store, so they can never go below zero.
            if let Some(old) = tree.get(key)? {
                let h = ChunkHeader::decode(&old).unwrap_or_default();
                removed_events += u64::from(h.events);
                removed_bytes += u64::from(h.payload_bytes);
                changes.push((key.to_vec(), None));
            }
        }
        for (seq, chunk) in &ack.rewrite {
            let key = record::chunk_key(id, *seq);
            if let Some(old) = tree.get(key)? {
                let h = ChunkHeader::decode(&old).unwrap_or_default();
                let kept_events = chunk.events.len() as u64;
                let kept_bytes = chunk.payload_bytes() as u64;
                removed_events += u64::from(h.events).saturating_sub(kept_events);
                removed_bytes += u64::from(h.payload_bytes).saturating_sub(kept_bytes);
                changes.push((key.to_vec(), Some(chunk.encode())));
            }
        }
        for dead in &ack.dead {
            changes.push((
                record::dead_key(staged.next_dead_seq).to_vec(),
                Some(record::encode_value(dead)),
            ));
            staged.next_dead_seq += 1;
            staged.dead += 1;
        }
        let dead_events = ack.dead.len() as u64;
        let lane = self
            .lane_state(staged, id)
            .ok_or_else(|| QueueError::Storage(format!("ack for unknown lane {id}")))?;
        lane.events = lane.events.saturating_sub(removed_events);
        lane.bytes = lane.bytes.saturating_sub(removed_bytes);
        for (k, v) in changes {
            match v {
                Some(v) => staged.batch.insert(k, v),
                None => staged.batch.remove(k),
            }
        }
        staged.acked_events += removed_events.saturating_sub(dead_events);
        Ok(())
    }

    /// Applies the staged batch atomically, makes it durable, then publishes it.
    fn write(&mut self, mut staged: Staged) -> Result<(), QueueError> {
        for (id, lane) in &staged.touched {
            let rec = LaneRecord {
                intake_key: lane.intake_key.clone(),
                events: lane.events,
                bytes: lane.bytes,
            };
            staged
                .batch
                .insert(&record::lane_key(*id), record::encode_value(&rec));
        }
        crash_point!("queue-before-apply");
        self.shared.tree.apply_batch(staged.batch)?;
        crash_point!("queue-after-apply");
        self.shared.tree.flush()?;
        crash_point!("queue-after-flush");
        self.sync_blobs()?;
        self.sync_data_file()?;
        crash_point!("queue-after-fsync");
        self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.publish(
            staged.touched,
            staged.new_lanes,
            &staged.appended,
            staged.acked_events,
            staged.dead,
        );
        self.state.next_dead_seq = staged.next_dead_seq;
        if self.last_disk_check.elapsed() >= Duration::from_millis(100) {
            self.update_disk_usage();
        }
        Ok(())
    }

    fn publish(
        &mut self,
        touched: HashMap<u32, LaneState>,
        mut new_lanes: Vec<u32>,
        appended: &HashMap<u32, u64>,
        acked: u64,
        dead: u64,
    ) {
        new_lanes.sort_unstable();
        let mut readers = match self.shared.lanes.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        for id in &new_lanes {
            if let Some(state) = touched.get(id) {
                self.state.by_key.insert(state.intake_key.clone(), *id);
                self.state.lanes.push(state.clone());
                readers.push(new_lane(*id, state));
            }
        }
        for (id, state) in touched {
            if let (Some(mine), Some(theirs)) = (
                self.state.lanes.get_mut(id as usize),
                readers.get(id as usize),
            ) {
                theirs.events.store(state.events, Ordering::Release);
                theirs.bytes.store(state.bytes, Ordering::Release);
                *mine = state;
            }
        }
        let stats = &self.shared.stats;
        for (id, n) in appended {
            if let Some(lane) = readers.get(*id as usize) {
                lane.appended.fetch_add(*n, Ordering::AcqRel);
                stats.appended_events.fetch_add(*n, Ordering::Relaxed);
                lane.notify.notify_one();
            }
        }
        stats.acked_events.fetch_add(acked, Ordering::Relaxed);
        stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
        drop(readers);
        if !new_lanes.is_empty() {
            self.shared.lanes_changed.notify_waiters();
        }
    }

    /// fsyncs sled's data file, and counts it: the count is what the fsync-regression test
    /// compares with the number of commits, so it must be taken here and nowhere else.
    fn sync_data_file(&self) -> Result<(), QueueError> {
        self.data_file.sync_all()?;
        self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// fsyncs the files sled wrote to `blobs/` since the last commit, and the directory.
    ///
    /// sled writes pages too large for its log segments to one file each under `blobs/`,
    /// without any fsync (`shared/notes/measurements.md`); an acknowledged event in such a page
    /// would not survive a power cut. The directory is normally empty, so listing it is cheap.
    fn sync_blobs(&mut self) -> Result<(), QueueError> {
        let dir = self.shared.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut present = HashSet::new();
        let mut synced = 0;
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it meanwhile: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                synced += 1;
            }
            present.insert(name);
        }
        if synced > 0 {
            File::open(&dir)?.sync_all()?;
            File::open(&self.shared.path)?.sync_all()?;
            self.shared
                .stats
                .blob_fsyncs
                .fetch_add(synced, Ordering::Relaxed);
        }
        self.synced_blobs = present;
        Ok(())
    }

    /// Answers `Full` to the appends of this group if writing them could fill the disk.
    ///
    /// sled does not recover well from a full disk (it may retry a write for ever), and
    /// removals need space too, so the writer refuses to eat into `min_free_bytes`.
    fn refuse_appends_if_disk_low(&mut self, ops: Vec<Op>) -> Vec<Op> {
        let append_bytes: u64 = ops
            .iter()
            .filter(|op| matches!(op, Op::Append { .. }))
            .map(|op| op.bytes() as u64)
            .sum();
        if append_bytes == 0 {
            return ops;
        }
        let free = self.usable_space();
        if free
            >= self
                .shared
                .min_free_bytes
                .saturating_add(append_bytes * SLED_AMPLIFICATION)
        {
            return ops;
        }
        self.update_disk_usage();
        self.shared.full.store(true, Ordering::Release);
        let mut kept = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Append { done, .. } => {
                    let _ = done.send(Err(QueueError::Full));
                }
                other => kept.push(other),
            }
        }
        kept
    }

    /// Measures what the queue holds on disk and the free space left, and sets the
    /// back-pressure flag.
    ///
    /// sled keeps freed space for reuse rather than shrinking its file, so a file at its high
    /// water mark with little queued is not full: sources are held back when the disk use
    /// reaches `max_bytes` while at least half of it is queued payload, when the queued
    /// payload alone reaches `max_bytes`, or when the file system has less than
    /// `min_free_bytes` free (removals need space too: a disk filled to the last byte could
    /// not even record what was delivered).
    pub fn update_disk_usage(&mut self) {
        self.last_disk_check = Instant::now();
        let disk = self.shared.tree.size_on_disk().unwrap_or(0);
        self.shared.stats.disk_bytes.store(disk, Ordering::Relaxed);
        let free = self.usable_space();
        let queued = self.queued_bytes();
        let max = self.shared.max_bytes;
        let full = queued >= max
            || (disk >= max && queued >= max / 2)
            || free < self.shared.min_free_bytes;
        self.shared.stats.free_bytes.store(free, Ordering::Relaxed);
        let was = self.shared.full.swap(full, Ordering::AcqRel);
        if full != was {
            if full {
                tracing::warn!(
                    disk_bytes = disk,
                    queued_bytes = queued,
                    max_bytes = max,
                    free_bytes = free,
                    min_free_bytes = self.shared.min_free_bytes,
                    "queue full: sources get back-pressure until delivery catches up"
                );
            } else {
                tracing::info!(
                    disk_bytes = disk,
                    queued_bytes = queued,
                    free_bytes = free,
                    "queue below its limits again"
                );
            }
        }
    }
}

impl Writer {
    fn queued_bytes(&self) -> u64 {
        self.state.lanes.iter().map(|l| l.bytes).sum()
    }

    /// Space the queue can still write to: free space on the file system, plus the part of
    /// sled's files not taken by queued events, which sled reuses (it does not shrink its files
    /// after removals). Live data is counted [`SLED_AMPLIFICATION`] times over.
    fn usable_space(&self) -> u64 {
        let free = free_space(&self.shared.path).unwrap_or(u64::MAX);
        let disk = self.shared.stats.disk_bytes.load(Ordering::Relaxed);
        let live = self.queued_bytes().saturating_mul(SLED_AMPLIFICATION);
        free.saturating_add(disk.saturating_sub(live))
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_space(path: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn answer(op: Op, result: Result<(), QueueError>) {
    let done = match op {
        Op::Append { done, .. } | Op::Ack { done, .. } | Op::Close { done } => done,
        Op::Refresh => return,
    };
    let _ = done.send(result);
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
