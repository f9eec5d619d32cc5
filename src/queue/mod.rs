//! The durable write-ahead queue between sources and delivery.
//!
//! Invariants (the promise of the whole program rests on them):
//! - [`Queue::append`] returns `Ok` only once its events are in sled *and* sled's data file has
//!   been fsynced: sled's own `flush()` is not enough to survive a power cut
//!   (`shared/notes/measurements.md`). Many appends share one flush + fsync (group commit).
//! - Every change to the store goes through one writer thread ([`writer`]), which applies it as
//!   one atomic sled batch together with the counters it changes. Counters on disk therefore
//!   always match the chunks on disk, even after a crash, and cannot underflow: a removal
//!   subtracts what it reads from the store, not what a caller claims.
//! - Events leave the queue only through [`Queue::ack`], which delivery calls after the intake
//!   answered with one id per event, or as dead letters: those delivery gives in an ack, and
//!   chunks that no longer decode, which the queue moves there itself (`writer/quarantine.rs`).
//!
//! Events are stored in chunks (one sled value holds many events of one intake key), in one
//! *lane* per intake key, in a series of sled databases ([`generation`]) so that delivered
//! space is given back whole. See [`record`] for the layout of one database.

mod checkpoint;
mod compression;
mod delivered;
mod fresh;
#[doc(hidden)]
pub mod fuzzing;
mod generation;
mod open;
mod order;
mod read;
mod read_only;
mod record;
pub mod salvage;
mod writer;

use compression::Compression;

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::QueueConfig;
use crate::intake_api::{redact_key, IncomingEvent};
pub use checkpoint::Checkpoint;
pub use generation::CorruptNote;
use generation::Generation;
pub(crate) use open::check_format;
use open::{load, prepare_dir, Loaded};
pub use order::AppendOrder;
pub use read::{BatchDate, Position, ReadBatch, ReadLimits, ReadSpan, StoredChunk};
pub use read_only::ReadOnlyQueue;
pub use record::{Chunk, ChunkView, DeadLetter};

/// How many bytes of appends one group commit gathers at most.
const COMMIT_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Version of the queue directory's layout, kept in the meta database: 2 = generations. (A
/// directory of layout 1, one sled database at the root, is moved into generation 0.)
pub const LAYOUT_VERSION: u32 = 2;

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full (max_bytes reached); retry later")]
    Full,
    #[error("the queue is closed")]
    Closed,
    #[error(
        "this forwarder takes at most {max} intake keys (queue.max_intake_keys) and knows {known}; \
         the request brings {new} more. Nothing of it was stored"
    )]
    TooManyKeys {
        max: usize,
        known: usize,
        new: usize,
    },
    #[error("the queue directory {0} is in use by another sekoia-forwarder")]
    Locked(PathBuf),
    /// A read-only open ([`Queue::open_read_only`]) found no queue.
    #[error("no queue at {}: the forwarder has not run with this configuration", .0.display())]
    Missing(PathBuf),
    #[error("queue storage error: {0}")]
    Storage(String),
    /// An earlier append carrying the same [`AppendOrder`] failed: this one was not stored
    /// either, so that the stream's events stay in order (`queue/order.rs`).
    #[error("an earlier append of the same stream failed; this one was not stored either")]
    EarlierAppendFailed,
    /// sled found its own data damaged (a checksum failed) or panicked on it.
    #[error("queue database damaged: {0}")]
    Corrupt(String),
    /// A write to the store failed after part of it may have reached sled (a failed flush or
    /// fsync): nothing written since the last good fsync can be trusted, and retrying proves
    /// nothing. The writer has stopped; the process must restart so that recovery reads what
    /// is really on disk (`docs/reliability.md`, "What happens on a failed fsync").
    #[error("queue storage failed, restart needed: {0}")]
    RestartNeeded(String),
    #[error("the queue at {path} was written by a newer release (format {found}, this release reads {supported})")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot prepare the queue directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl QueueError {
    /// Whether the error says a database is damaged (rather than, say, the disk full).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, QueueError::Corrupt(_))
    }
}

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => {
                QueueError::Corrupt(e.to_string())
            }
            _ => QueueError::Storage(e.to_string()),
        }
    }
}

impl From<std::io::Error> for QueueError {
    fn from(e: std::io::Error) -> Self {
        QueueError::Storage(e.to_string())
    }
}

/// The events of one intake key, in order. Lanes are created by the first append for a key
/// and live as long as the queue.
#[derive(Debug)]
pub struct Lane {
    pub id: u32,
    pub intake_key: String,
    events: AtomicU64,
    bytes: AtomicU64,
    /// Events appended since the process started; delivery watches it to end a linger early.
    appended: AtomicU64,
    /// Woken after each commit that appended to this lane.
    pub notify: Notify,
}

impl Lane {
    /// Events queued (not yet acknowledged by the intake).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Acquire)
    }
    /// Payload bytes queued.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
    /// Events appended since start.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }
}

crate::stats::stats_table! {
    /// The queue's counters, shown by `/status` and `/metrics`.
    pub struct Stats => StatsSnapshot, metrics "queue" {
        appended_events: counter, "Events made durable in the queue";
        acked_events: counter, "Events removed from the queue once the intake acknowledged them";
        commits: counter, "Group commits";
        group_waits: counter, "Times a commit waited a moment for more appends";
        group_wait_gained_ops: counter, "Operations those waits gained";
        fsyncs: counter, "fsyncs of the queue's data file";
        blob_fsyncs: counter, "Blob files (large events) of the queue fsynced";
        meta_fsyncs: counter,
            "fsyncs of the queue's meta database (new intake keys, dead letters)";
        meta_blob_fsyncs: counter,
            "Blob files of the queue's meta database fsynced (dead letters of large events)";
        storage_errors: counter, "Failed queue commits";
        rotations: counter, "Queue generations sealed";
        deleted_generations: counter,
            "Delivered queue generations deleted (their disk space given back)";
        disk_bytes: gauge, "Bytes the queue holds on disk";
        free_bytes: gauge, "Free bytes on the queue's file system";
        dead_letters: gauge, "Dead letters kept in the queue";
        generations: gauge, "sled databases (generations) the queue is split into";
        open_generations: gauge, "Queue generations open (in memory) now";
    }
}

crate::stats::stats_snapshot! {
    /// What the queue holds now and how delivery read it, computed when asked
    /// ([`Queue::levels`]).
    pub struct QueueLevels, metrics "queue" {
        events: gauge, "Events waiting in the queue";
        bytes: gauge, "Payload bytes waiting in the queue";
        full: gauge, "1 while sources get back-pressure";
        corrupt_generations: gauge,
            "Damaged queue generations moved aside (gen-N.corrupt), waiting for `salvage`";
        corrupt_events: gauge, "Events the moved-aside generations were known to hold";
        chunks_read_from_memory: counter,
            "Compressed chunks read for delivery from the bodies kept since their commit";
        chunks_decompressed: counter,
            "Compressed chunks read for delivery and decompressed from the store";
    }
}

/// One sender that may append again soon ([`Queue::sender`]).
#[derive(Debug)]
pub struct SenderGuard {
    shared: Arc<Shared>,
}

impl Drop for SenderGuard {
    fn drop(&mut self) {
        self.shared.senders.remove();
    }
}

/// The generations as readers see them.
#[derive(Debug, Default)]
pub(crate) struct GenList {
    /// Oldest first.
    pub gens: Vec<Arc<Generation>>,
    pub active: u64,
}

/// State shared by the queue handle, the writer thread and readers.
#[derive(Debug)]
struct Shared {
    meta: sled::Db,
    gens: RwLock<GenList>,
    path: PathBuf,
    max_bytes: u64,
    min_free_bytes: u64,
    lanes: RwLock<Vec<Arc<Lane>>>,
    lanes_changed: Notify,
    /// Events and payload bytes queued over all lanes, kept in step with the lanes' own
    /// counters ([`Shared::set_lane_counts`]) so that reading them costs the same whatever the
    /// number of lanes.
    queued_events: AtomicU64,
    queued_bytes: AtomicU64,
    /// Every intake key that has a lane or is about to get one ([`Queue::admit_keys`]), and
    /// how many there may be.
    keys: Mutex<HashSet<String>>,
    max_intake_keys: usize,
    full: AtomicBool,
    stats: Stats,
    /// Generations (and meta databases) moved aside as damaged, on disk now.
    corrupt: Mutex<Vec<CorruptNote>>,
    /// Set once by the writer when the store can no longer be trusted
    /// ([`QueueError::RestartNeeded`]); the writer stops then.
    failure: std::sync::OnceLock<String>,
    /// Senders that may append again soon ([`SenderGuard`]): how many appends a commit may
    /// wait for.
    senders: writer::Senders,
    /// Undecodable chunks found by reads, for the writer to quarantine.
    undecodable: writer::Undecodable,
    /// Whether compressing chunks pays.
    compression: Compression,
    /// Bodies of chunks just committed, for delivery to read without decompressing.
    fresh: fresh::FreshBodies,
    /// Sources' checkpoints, as durable.
    checkpoints: checkpoint::Checkpoints,
}

impl Shared {
    fn lanes_read(&self) -> RwLockReadGuard<'_, Vec<Arc<Lane>>> {
        self.lanes.read().unwrap_or_else(|p| p.into_inner())
    }
    fn lanes_write(&self) -> RwLockWriteGuard<'_, Vec<Arc<Lane>>> {
        self.lanes.write().unwrap_or_else(|p| p.into_inner())
    }
    fn corrupt(&self) -> std::sync::MutexGuard<'_, Vec<CorruptNote>> {
        self.corrupt.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn gens_write(&self) -> RwLockWriteGuard<'_, GenList> {
        self.gens.write().unwrap_or_else(|p| p.into_inner())
    }
    /// Sets what a lane holds and moves the queue's totals by the difference. Called by the
    /// writer thread only, which is what keeps the totals exact.
    fn set_lane_counts(&self, lane: &Lane, events: u64, bytes: u64) {
        fn shift(total: &AtomicU64, old: u64, new: u64) {
            if new >= old {
                total.fetch_add(new - old, Ordering::AcqRel);
            } else {
                total.fetch_sub(old - new, Ordering::AcqRel);
            }
        }
        shift(
            &self.queued_events,
            lane.events.swap(events, Ordering::AcqRel),
            events,
        );
        shift(
            &self.queued_bytes,
            lane.bytes.swap(bytes, Ordering::AcqRel),
            bytes,
        );
    }
    /// The error every operation gets once the store failed, if it did.
    fn failed(&self) -> Result<(), QueueError> {
        match self.failure.get() {
            Some(why) => Err(QueueError::RestartNeeded(why.clone())),
            None => Ok(()),
        }
    }
    /// The generations now, oldest first, and the active one's id.
    fn gens_snapshot(&self) -> (Vec<Arc<Generation>>, u64) {
        let list = self.gens.read().unwrap_or_else(|p| p.into_inner());
        (list.gens.clone(), list.active)
    }
    /// [`Queue::status`].
    fn status(&self) -> QueueStatus {
        let lanes: Vec<LaneStatus> = self
            .lanes_read()
            .iter()
            .map(|l| LaneStatus {
                lane: l.id,
                intake_key: redact_key(&l.intake_key),
                events: l.events(),
                bytes: l.bytes(),
            })
            .collect();
        let stats = &self.stats;
        QueueStatus {
            path: self.path.clone(),
            events: lanes.iter().map(|l| l.events).sum(),
            bytes: lanes.iter().map(|l| l.bytes).sum(),
            disk_bytes: stats.disk_bytes.load(Ordering::Relaxed),
            max_bytes: self.max_bytes,
            free_bytes: stats.free_bytes.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Acquire),
            dead_letters: stats.dead_letters.load(Ordering::Relaxed),
            generations: stats.generations.load(Ordering::Relaxed),
            open_generations: stats.open_generations.load(Ordering::Relaxed),
            corrupt_generations: self.corrupt().clone(),
            lanes,
        }
    }
    /// [`Queue::dead_letters`].
    fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.meta
            .scan_prefix([record::DEAD_PREFIX])
            .map(|item| {
                let (_, v) = item?;
                record::decode_value(&v).map_err(|e| QueueError::Storage(e.to_string()))
            })
            .collect()
    }
}

/// What one append brings: events of any keys and dates (the HTTP source), or lines of one
/// key with no date of their own (the reading sources).
enum Batch<'a> {
    Events(&'a [IncomingEvent]),
    Lines {
        intake_key: &'a str,
        lines: &'a [Cow<'a, str>],
    },
}

/// One event of a [`Batch`], borrowed until its chunk is encoded.
struct EventRef<'a> {
    intake_key: &'a str,
    timestamp: Option<&'a str>,
    raw: &'a str,
}

/// An append the writer has, not yet known durable ([`Queue::submit_lines`]).
#[derive(Debug)]
pub struct Submitted {
    wait: oneshot::Receiver<Result<(), QueueError>>,
    shared: Arc<Shared>,
}

/// Once the append is durable: `Ok`, or why it was not stored. Cancel-safe (polled by
/// reference, it keeps waiting for the same answer).
impl std::future::Future for Submitted {
    type Output = Result<(), QueueError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.wait).poll(cx).map(|answer| {
            answer.unwrap_or_else(|_| Err(self.shared.failed().err().unwrap_or(QueueError::Closed)))
        })
    }
}

/// A handle on the queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    shared: Arc<Shared>,
    ops: mpsc::Sender<writer::Op>,
    chunk_bytes: usize,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// The flock on `<path>/lock`, held as long as a handle lives.
    _lock: Arc<std::fs::File>,
}

/// What delivery reports for a lane once the intake answered.
#[derive(Debug, Default, Clone)]
pub struct Ack {
    /// The generation of the chunks named below ([`ReadSpan::gen`]).
    pub gen: u64,
    /// Chunks whose every event is acknowledged (or dead-lettered): marked delivered in their
    /// lane's watermark (they stay stored until their generation is deleted).
    pub remove: Vec<u64>,
    /// Chunks of which only some events are done: the rest, to keep.
    pub rewrite: Vec<(u64, Chunk)>,
    /// Events refused for good, to keep aside.
    pub dead: Vec<DeadLetter>,
}

/// One lane as `status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LaneStatus {
    pub lane: u32,
    /// The intake key, redacted.
    pub intake_key: String,
    pub events: u64,
    pub bytes: u64,
}

/// The queue as `status` and metrics show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueueStatus {
    pub path: PathBuf,
    pub events: u64,
    pub bytes: u64,
    pub disk_bytes: u64,
    pub max_bytes: u64,
    /// Free space on the queue's file system.
    pub free_bytes: u64,
    pub full: bool,
    pub dead_letters: u64,
    /// sled databases the queue is split into, and how many are open now.
    #[serde(default)]
    pub generations: u64,
    #[serde(default)]
    pub open_generations: u64,
    /// Generations moved aside as damaged (`gen-….corrupt`), waiting for `salvage`.
    #[serde(default)]
    pub corrupt_generations: Vec<CorruptNote>,
    pub lanes: Vec<LaneStatus>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Queue {
    /// Opens (or creates) the queue described by `config`: the meta database and the active
    /// generation. Sealed generations are opened later, when delivery reads them.
    pub fn open(config: &QueueConfig) -> Result<Queue, QueueError> {
        prepare_dir(&config.path)?;
        let Loaded {
            shared,
            state,
            meta,
            lock,
        } = load(config)?;
        let (tx, rx) = mpsc::channel(4096);
        // A generation is at most an eighth of max_bytes, so that sealed generations can be
        // deleted long before the limit.
        let generation_bytes = config.generation_bytes.min(config.max_bytes / 8).max(1);
        let mut writer = writer::Writer::new(shared.clone(), state, meta, generation_bytes)?;
        writer.update_disk_usage();
        let handle = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer.run(rx))?;
        writer::spawn_monitor(tx.downgrade())?;
        Ok(Queue {
            shared,
            ops: tx,
            chunk_bytes: config.chunk_bytes,
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            _lock: Arc::new(lock),
        })
    }

    /// Appends `events` and returns once they are durable (fsynced). Order is kept per intake
    /// key. Either all the events are durable or, on error, the caller must assume none is.
    /// Events of an intake key the queue does not know yet are refused, all of them, with
    /// [`QueueError::TooManyKeys`] if the new keys would bring it over `max_intake_keys`.
    pub async fn append(&self, events: Vec<IncomingEvent>) -> Result<(), QueueError> {
        self.append_with_checkpoints(events, Vec::new()).await
    }

    /// [`Queue::append`], storing `checkpoints` in the same atomic commit as the events: after
    /// a crash the queue holds both or neither (`queue/checkpoint.rs`). `events` may be empty
    /// (a checkpoint that moved past lines that make no event, or let go of).
    pub async fn append_with_checkpoints(
        &self,
        events: Vec<IncomingEvent>,
        checkpoints: Vec<Checkpoint>,
    ) -> Result<(), QueueError> {
        self.append_at(events, checkpoints, now_ms()).await
    }

    /// [`Queue::append`] with the reception time given rather than read from the clock: for
    /// benchmarks and tools that rebuild the queue an outage leaves (events received over
    /// hours, `benches/end_to_end/event_time.rs`). The forwarder itself never calls it.
    #[doc(hidden)]
    pub async fn append_received_at(
        &self,
        events: Vec<IncomingEvent>,
        received_at_ms: u64,
    ) -> Result<(), QueueError> {
        self.append_at(events, Vec::new(), received_at_ms).await
    }

    /// Appends `events` received at `received_at_ms` (wall clock, ms since the Unix epoch):
    /// the reception time stored with their chunks, which delivery sends as their event date
    /// when they have none of their own (`event_time = "reception"`).
    async fn append_at(
        &self,
        events: Vec<IncomingEvent>,
        checkpoints: Vec<Checkpoint>,
        received_at_ms: u64,
    ) -> Result<(), QueueError> {
        self.hand_over(Batch::Events(&events), checkpoints, received_at_ms, None)
            .await?
            .await
    }

    /// Hands `lines` of one intake key with no date of their own (what the reading sources
    /// append; each is encoded straight from the bytes read, with no copy of its own) and
    /// `checkpoints` (one atomic commit, as [`Queue::append_with_checkpoints`]) to the writer,
    /// and returns without waiting for them to be durable, so that the stream can read its
    /// next batch meanwhile: the [`Submitted`] future says when they are. Appends submitted
    /// with the same `order` become durable in the order they were submitted or not at all:
    /// once one fails, the later ones fail with [`QueueError::EarlierAppendFailed`] until
    /// `order` is mended (`queue/order.rs`).
    pub async fn submit_lines(
        &self,
        intake_key: &str,
        lines: &[Cow<'_, str>],
        checkpoints: Vec<Checkpoint>,
        order: &AppendOrder,
    ) -> Result<Submitted, QueueError> {
        if order.is_broken() {
            return Err(QueueError::EarlierAppendFailed);
        }
        let batch = Batch::Lines { intake_key, lines };
        self.hand_over(batch, checkpoints, now_ms(), Some(order.clone()))
            .await
    }

    /// [`Queue::append_with_checkpoints`] for `lines` of one intake key with no date of their
    /// own ([`Queue::submit_lines`]).
    pub async fn append_lines(
        &self,
        intake_key: &str,
        lines: &[Cow<'_, str>],
        checkpoints: Vec<Checkpoint>,
    ) -> Result<(), QueueError> {
        let batch = Batch::Lines { intake_key, lines };
        self.hand_over(batch, checkpoints, now_ms(), None)
            .await?
            .await
    }

    async fn hand_over(
        &self,
        batch: Batch<'_>,
        checkpoints: Vec<Checkpoint>,
        received_at_ms: u64,
        order: Option<AppendOrder>,
    ) -> Result<Submitted, QueueError> {
        self.shared.failed()?;
        if self.is_full() {
            return Err(QueueError::Full);
        }
        let (chunk_bytes, shared) = (self.chunk_bytes, &*self.shared);
        let groups = match batch {
            Batch::Events(events) => {
                self.admit_keys(events.iter().map(|e| e.intake_key.as_str()))?;
                let refs = events.iter().map(|e| EventRef {
                    intake_key: &e.intake_key,
                    timestamp: e.timestamp.as_deref(),
                    raw: &e.raw,
                });
                chunk_events(refs, chunk_bytes, received_at_ms, shared)
            }
            Batch::Lines { intake_key, lines } => {
                if !lines.is_empty() {
                    self.admit_keys(std::iter::once(intake_key))?;
                }
                let refs = lines.iter().map(|line| EventRef {
                    intake_key,
                    timestamp: None,
                    raw: line,
                });
                chunk_events(refs, chunk_bytes, received_at_ms, shared)
            }
        };
        let (done, wait) = oneshot::channel();
        self.ops
            .send(writer::Op::Append {
                groups,
                checkpoints,
                order,
                done,
            })
            .await
            .map_err(|_| self.closed())?;
        self.shared.senders.wake_writer();
        Ok(Submitted {
            wait,
            shared: Arc::clone(&self.shared),
        })
    }

    /// The checkpoint stored under `name`, as durable now.
    pub fn checkpoint(&self, name: &[u8]) -> Option<Vec<u8>> {
        self.shared.checkpoints.lock().get(name).cloned()
    }

    /// Every checkpoint whose name starts with `prefix` (a source's own), by name.
    pub fn checkpoints_with_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.shared.checkpoints.with_prefix(prefix)
    }

    /// Says that appends may keep coming from one more sender until the guard is dropped: a
    /// source holds one per client that waits for each answer before sending again (an HTTP
    /// keep-alive connection). A commit then waits a moment for such senders' next appends
    /// instead of committing each cohort apart (`writer/gather.rs`).
    pub fn sender(&self) -> SenderGuard {
        self.shared.senders.add();
        SenderGuard {
            shared: self.shared.clone(),
        }
    }

    /// Why the writer is gone: it failed, or the queue was closed.
    fn closed(&self) -> QueueError {
        self.shared.failed().err().unwrap_or(QueueError::Closed)
    }

    /// Why the store failed, once it did: the writer has stopped and the process must restart
    /// ([`QueueError::RestartNeeded`]).
    pub fn failure(&self) -> Option<&str> {
        self.shared.failure.get().map(String::as_str)
    }

    /// Admits the intake keys of `events` that the queue does not know yet, or refuses them
    /// all if they would bring it over `max_intake_keys`: before anything is sent to the
    /// writer, so that nothing of a refused request is stored.
    ///
    /// A key is admitted for good, even if the append then fails: its lane may be created by
    /// a retry, and admitting it twice would cost a slot for nothing.
    fn admit_keys<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Result<(), QueueError> {
        let mut distinct: HashSet<&str> = HashSet::new();
        let mut last: Option<&str> = None;
        for key in keys {
            if last != Some(key) {
                distinct.insert(key);
                last = Some(key);
            }
        }
        let mut known = self.shared.keys.lock().unwrap_or_else(|p| p.into_inner());
        distinct.retain(|k| !known.contains(*k));
        if distinct.is_empty() {
            return Ok(());
        }
        let max = self.shared.max_intake_keys;
        if known.len() + distinct.len() > max {
            return Err(QueueError::TooManyKeys {
                max,
                known: known.len(),
                new: distinct.len(),
            });
        }
        known.extend(distinct.into_iter().map(str::to_owned));
        Ok(())
    }

    /// Records what the intake acknowledged in `lane`: marks delivered, rewrites, dead-letters.
    pub async fn ack(&self, lane: u32, ack: Ack) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.shared.failed()?;
        self.ops
            .send(writer::Op::Ack { lane, ack, done })
            .await
            .map_err(|_| self.closed())?;
        wait.await.map_err(|_| self.closed())?
    }

    /// The lanes known now.
    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        self.shared.lanes_read().clone()
    }

    /// Resolves when a lane is created after *this call* (not after its first poll): call it
    /// before reading [`Queue::lanes`], and a lane created in between is not missed.
    pub fn lanes_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.lanes_changed.notified()
    }

    /// Resolves when the writer thread has ended, whatever ended it (a close, a panic, an
    /// error it cannot go on after), with why. Without the writer nothing can be stored or
    /// removed: the process must stop, so that its supervisor restarts it.
    pub async fn writer_stopped(&self) -> String {
        // The writer's receiver is closed when it returns and dropped when it unwinds.
        self.ops.closed().await;
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        let Some(handle) = handle else {
            return "the queue was closed".to_owned();
        };
        match tokio::task::spawn_blocking(move || handle.join()).await {
            Ok(Ok(())) => "the writer thread returned".to_owned(),
            Ok(Err(panic)) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                format!("the writer thread panicked: {text}")
            }
            Err(e) => format!("the writer thread could not be joined: {e}"),
        }
    }

    /// Whether the writer thread still runs (false once closed, too).
    pub fn writer_alive(&self) -> bool {
        !self.ops.is_closed()
    }

    /// Whether sources must hold off (max_bytes reached).
    pub fn is_full(&self) -> bool {
        self.shared.full.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// What the queue holds now, and how delivery read its compressed chunks: from the bodies
    /// kept since their commit, or decompressed from the store (`fresh.rs`).
    pub fn levels(&self) -> QueueLevels {
        let (events, bytes) = self.totals();
        let corrupt = self.shared.corrupt();
        let aside = corrupt.iter().filter(|n| n.generation.is_some());
        let (corrupt_generations, corrupt_events) =
            aside.fold((0, 0), |(g, e), n| (g + 1, e + n.events.unwrap_or(0)));
        let (chunks_read_from_memory, chunks_decompressed) = self.fresh_reads();
        QueueLevels {
            events,
            bytes,
            full: u64::from(self.is_full()),
            corrupt_generations,
            corrupt_events,
            chunks_read_from_memory,
            chunks_decompressed,
        }
    }

    /// Compressed chunks read for delivery: from the bodies kept since their commit, and
    /// decompressed from the store (`fresh.rs`).
    pub fn fresh_reads(&self) -> (u64, u64) {
        let fresh = &self.shared.fresh;
        (
            fresh.hits.load(Ordering::Relaxed),
            fresh.misses.load(Ordering::Relaxed),
        )
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Events and payload bytes queued, over all lanes.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.shared.queued_events.load(Ordering::Acquire),
            self.shared.queued_bytes.load(Ordering::Acquire),
        )
    }

    /// A snapshot for `status` and metrics.
    pub fn status(&self) -> QueueStatus {
        self.shared.status()
    }

    /// Stores raw bytes as chunk `seq` of `lane` (over the chunk if a generation holds it, else
    /// in the active generation), bypassing the writer: how tests make a corrupt queue.
    #[cfg(test)]
    pub(crate) fn insert_raw_chunk(&self, lane: u32, seq: u64, bytes: &[u8]) {
        let key = record::chunk_key(lane, seq);
        let (gens, active) = self.shared.gens_snapshot();
        let open = |g: &Arc<Generation>| g.db().expect("open").expect("not deleted");
        // The generation that holds the chunk, else the active one.
        let db = gens
            .iter()
            .map(open)
            .find(|db| db.db.contains_key(key).expect("read"))
            .unwrap_or_else(|| open(gens.iter().find(|g| g.id == active).expect("active")));
        db.db.insert(key, bytes).expect("insert");
    }

    /// Stores `chunk` as chunk `seq` of `lane`, compressed, like [`Queue::insert_raw_chunk`].
    #[cfg(test)]
    pub(crate) fn insert_chunk(&self, lane: u32, seq: u64, chunk: &Chunk) {
        self.insert_raw_chunk(lane, seq, &chunk.encode_compressed(record::Codec::Lz4));
    }

    /// Stores dead letters that no queued chunk holds: read back from a moved-aside meta
    /// database (`salvage`), or events a source keeps aside instead of sending (over-long
    /// messages, `oversize = "dead_letter"`). An acknowledgement for no generation
    /// (`u64::MAX` is never one) records only its dead letters, durably, like any other.
    pub async fn add_dead_letters(&self, dead: Vec<DeadLetter>) -> Result<(), QueueError> {
        let ack = Ack {
            gen: u64::MAX,
            dead,
            ..Ack::default()
        };
        self.ack(0, ack).await
    }

    /// Generations (and meta databases) moved aside as damaged.
    pub fn corrupt_generations(&self) -> Vec<CorruptNote> {
        self.shared.corrupt().clone()
    }

    /// Dead letters kept in the queue.
    pub fn dead_letter_count(&self) -> u64 {
        self.shared.stats.dead_letters.load(Ordering::Relaxed)
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.shared.dead_letters()
    }

    /// Commits everything sent so far, fsyncs, and stops the writer. Later calls fail with
    /// [`QueueError::Closed`]. Fails with [`QueueError::RestartNeeded`] if the store failed
    /// at any time, so that the process ends with an error.
    pub async fn close(&self) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        if self.ops.send(writer::Op::Close { done }).await.is_ok() {
            wait.await.map_err(|_| self.closed())??;
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.shared.failed()
    }
}

/// Most events in one chunk. Chunks are cut by payload bytes, so without it a request of
/// tiny or empty events would make one huge chunk, and since a delivery batch is made of whole
/// chunks, a batch far over `batch_max_events`.
pub const MAX_CHUNK_EVENTS: usize = 4096;

/// Groups events into chunks: runs of one intake key and one event date, at most
/// `chunk_bytes` of payload and [`MAX_CHUNK_EVENTS`] events each (a larger event gets a chunk
/// of its own).
fn chunk_events<'a>(
    events: impl Iterator<Item = EventRef<'a>>,
    chunk_bytes: usize,
    now: u64,
    shared: &Shared,
) -> Vec<writer::Group> {
    let mut groups: Vec<writer::Group> = Vec::new();
    let mut current: Option<ChunkView<'a>> = None;
    let mut current_bytes = 0;
    let flush = |chunk: ChunkView<'a>, groups: &mut Vec<writer::Group>| {
        let encoded = writer::EncodedChunk::new(&chunk, &shared.compression, &shared.fresh);
        match groups.last_mut() {
            Some(g) if g.intake_key == chunk.intake_key => g.chunks.push(encoded),
            _ => groups.push(writer::Group {
                intake_key: chunk.intake_key.to_owned(),
                chunks: vec![encoded],
            }),
        }
    };
    for event in events {
        let fits = current.as_ref().is_some_and(|c| {
            c.intake_key == event.intake_key
                && c.timestamp == event.timestamp
                && current_bytes + event.raw.len() <= chunk_bytes
                && c.events.len() < MAX_CHUNK_EVENTS
        });
        if !fits {
            if let Some(done) = current.take() {
                flush(done, &mut groups);
            }
            current_bytes = 0;
            current = Some(ChunkView {
                intake_key: event.intake_key,
                timestamp: event.timestamp,
                received_at_ms: now,
                events: Vec::new(),
            });
        }
        current_bytes += event.raw.len();
        if let Some(c) = current.as_mut() {
            c.events.push(event.raw);
        }
    }
    if let Some(done) = current.take() {
        flush(done, &mut groups);
    }
    groups
}

#[cfg(test)]
mod tests;
