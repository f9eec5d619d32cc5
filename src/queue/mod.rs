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
//!   answered with one id per event.
//!
//! Events are stored in chunks (one sled value holds many events of one intake key), in one
//! *lane* per intake key. See [`record`] for the layout.

pub mod record;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::QueueConfig;
use crate::intake_api::IncomingEvent;
pub use record::{Chunk, DeadLetter};

/// sled segment size. sled writes a page (a node of up to ~17 keys) that is larger than a
/// quarter of a segment to a `blobs/` file of its own, which sled never fsyncs. With 8 MiB
/// segments that threshold is 2 MiB: a leaf of 17 chunks of `chunk_bytes` (at most 64 KiB)
/// stays well below it, so blobs are rare (large events only); the writer fsyncs those it
/// finds (`Writer::sync_blobs`).
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
/// How many bytes of appends one group commit gathers at most.
const COMMIT_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full (max_bytes reached); retry later")]
    Full,
    #[error("the queue is closed")]
    Closed,
    #[error("the queue directory {0} is in use by another sekoia-forwarder")]
    Locked(PathBuf),
    #[error("queue storage error: {0}")]
    Storage(String),
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

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        QueueError::Storage(e.to_string())
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

/// Counters shown by metrics and `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub commits: AtomicU64,
    pub fsyncs: AtomicU64,
    pub appended_events: AtomicU64,
    pub acked_events: AtomicU64,
    /// Dead letters kept in the store.
    pub dead_letters: AtomicU64,
    pub disk_bytes: AtomicU64,
    pub free_bytes: AtomicU64,
    /// Blob files of sled fsynced by the writer.
    pub blob_fsyncs: AtomicU64,
    pub storage_errors: AtomicU64,
}

/// State shared by the queue handle, the writer thread and readers.
#[derive(Debug)]
struct Shared {
    tree: sled::Db,
    path: PathBuf,
    max_bytes: u64,
    min_free_bytes: u64,
    lanes: RwLock<Vec<Arc<Lane>>>,
    lanes_changed: Notify,
    full: AtomicBool,
    stats: Stats,
}

/// A handle on the queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    shared: Arc<Shared>,
    ops: mpsc::Sender<writer::Op>,
    chunk_bytes: usize,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// A chunk read from a lane, with its place.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub seq: u64,
    pub chunk: Chunk,
}

/// What [`Queue::read`] found: chunks in order, and chunks whose bytes could not be decoded.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub chunks: Vec<StoredChunk>,
    /// Sequence numbers and raw bytes of undecodable chunks found on the way.
    pub corrupt: Vec<(u64, Vec<u8>)>,
    /// Sequence number after the last entry read (where the next read starts).
    pub next_seq: u64,
}

impl ReadBatch {
    pub fn events(&self) -> usize {
        self.chunks.iter().map(|c| c.chunk.events.len()).sum()
    }
}

/// What delivery reports for a lane once the intake answered.
#[derive(Debug, Default, Clone)]
pub struct Ack {
    /// Chunks whose every event is acknowledged (or dead-lettered).
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
    pub lanes: Vec<LaneStatus>,
}

/// Shows enough of an intake key to tell keys apart, never enough to use it.
pub fn redact_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() >= 16 {
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("…{tail}")
    } else {
        "…".to_owned()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Queue {
    /// Opens (or creates) the queue described by `config`.
    pub fn open(config: &QueueConfig) -> Result<Queue, QueueError> {
        let path = config.path.clone();
        prepare_dir(&path)?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache_capacity_bytes)
            .segment_size(SEGMENT_SIZE)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    QueueError::Locked(path.clone())
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                    QueueError::Locked(path.clone())
                }
                other => QueueError::from(other),
            })?;
        check_format(&db, &path)?;
        let state = writer::WriterState::load(&db)?;
        let lanes: Vec<Arc<Lane>> = state.lanes_for_readers();
        let shared = Arc::new(Shared {
            tree: db,
            path: path.clone(),
            max_bytes: config.max_bytes,
            min_free_bytes: config.min_free_bytes,
            lanes: RwLock::new(lanes),
            lanes_changed: Notify::new(),
            full: AtomicBool::new(false),
            stats: Stats {
                dead_letters: state.dead_letters.into(),
                ..Stats::default()
            },
        });
        let data_file = std::fs::File::open(path.join("db"))?;
        sync_dir(&path)?;
        let (tx, rx) = mpsc::channel(4096);
        let mut writer = writer::Writer::new(shared.clone(), state, data_file);
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
        })
    }

    /// Appends `events` and returns once they are durable (fsynced). Order is kept per intake
    /// key. Either all the events are durable or, on error, the caller must assume none is.
    pub async fn append(&self, events: Vec<IncomingEvent>) -> Result<(), QueueError> {
        if self.is_full() {
            return Err(QueueError::Full);
        }
        let groups = chunk_events(events, self.chunk_bytes, now_ms());
        let (done, wait) = oneshot::channel();
        self.ops
            .send(writer::Op::Append { groups, done })
            .await
            .map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    /// Records what the intake acknowledged in `lane`: removes, rewrites, dead-letters.
    pub async fn ack(&self, lane: u32, ack: Ack) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.ops
            .send(writer::Op::Ack { lane, ack, done })
            .await
            .map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    /// Reads chunks of `lane` from `from_seq` on, in order: at least one chunk if there is any,
    /// then more while they fit in `max_events` and `max_bytes` (payload) and share the first
    /// chunk's event date (one request carries one date).
    pub fn read(
        &self,
        lane: u32,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, QueueError> {
        let start = record::chunk_key(lane, from_seq);
        let end = record::chunk_key(lane, u64::MAX);
        let mut batch = ReadBatch {
            next_seq: from_seq,
            ..Default::default()
        };
        let (mut events, mut bytes) = (0usize, 0usize);
        for item in self.shared.tree.range(start..=end) {
            let (key, value) = item?;
            let (_, seq) =
                record::parse_chunk_key(&key).map_err(|e| QueueError::Storage(e.to_string()))?;
            let chunk = match Chunk::decode(&value) {
                Ok(chunk) => chunk,
                Err(_) => {
                    batch.corrupt.push((seq, value.to_vec()));
                    batch.next_seq = seq + 1;
                    continue;
                }
            };
            let (n, b) = (chunk.events.len(), chunk.payload_bytes());
            if let Some(first) = batch.chunks.first() {
                if events + n > max_events
                    || bytes + b > max_bytes
                    || first.chunk.timestamp != chunk.timestamp
                {
                    break;
                }
            }
            events += n;
            bytes += b;
            batch.next_seq = seq + 1;
            batch.chunks.push(StoredChunk { seq, chunk });
            if events >= max_events || bytes >= max_bytes {
                break;
            }
        }
        Ok(batch)
    }

    /// The lanes known now.
    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        self.shared
            .lanes
            .read()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Resolves when a lane is created after this call started waiting.
    pub async fn lanes_changed(&self) {
        self.shared.lanes_changed.notified().await
    }

    /// Whether sources must hold off (max_bytes reached).
    pub fn is_full(&self) -> bool {
        self.shared.full.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Events and payload bytes queued, over all lanes.
    pub fn totals(&self) -> (u64, u64) {
        self.lanes()
            .iter()
            .fold((0, 0), |(e, b), l| (e + l.events(), b + l.bytes()))
    }

    /// A snapshot for `status` and metrics.
    pub fn status(&self) -> QueueStatus {
        let lanes: Vec<LaneStatus> = self
            .lanes()
            .iter()
            .map(|l| LaneStatus {
                lane: l.id,
                intake_key: redact_key(&l.intake_key),
                events: l.events(),
                bytes: l.bytes(),
            })
            .collect();
        QueueStatus {
            path: self.shared.path.clone(),
            events: lanes.iter().map(|l| l.events).sum(),
            bytes: lanes.iter().map(|l| l.bytes).sum(),
            disk_bytes: self.shared.stats.disk_bytes.load(Ordering::Relaxed),
            max_bytes: self.shared.max_bytes,
            free_bytes: self.shared.stats.free_bytes.load(Ordering::Relaxed),
            full: self.is_full(),
            dead_letters: self.dead_letter_count(),
            lanes,
        }
    }

    /// Stores raw bytes as a chunk of `lane`, bypassing the writer: how tests make a corrupt
    /// queue.
    #[cfg(test)]
    pub(crate) fn insert_raw_chunk(&self, lane: u32, seq: u64, bytes: &[u8]) {
        self.shared
            .tree
            .insert(record::chunk_key(lane, seq), bytes)
            .expect("insert");
    }

    /// Dead letters kept in the queue.
    pub fn dead_letter_count(&self) -> u64 {
        self.shared.stats.dead_letters.load(Ordering::Relaxed)
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.shared
            .tree
            .scan_prefix([record::DEAD_PREFIX])
            .map(|item| {
                let (_, v) = item?;
                record::decode_value(&v).map_err(|e| QueueError::Storage(e.to_string()))
            })
            .collect()
    }

    /// Commits everything sent so far, fsyncs, and stops the writer. Later calls fail with
    /// [`QueueError::Closed`].
    pub async fn close(&self) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        if self.ops.send(writer::Op::Close { done }).await.is_ok() {
            wait.await.map_err(|_| QueueError::Closed)??;
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        Ok(())
    }
}

/// Groups events into chunks: runs of one intake key and one event date, at most
/// `chunk_bytes` of payload each (a larger event gets a chunk of its own).
fn chunk_events(events: Vec<IncomingEvent>, chunk_bytes: usize, now: u64) -> Vec<writer::Group> {
    let mut groups: Vec<writer::Group> = Vec::new();
    let mut current: Option<Chunk> = None;
    let mut current_bytes = 0;
    let flush = |chunk: Chunk, groups: &mut Vec<writer::Group>| {
        let encoded = writer::EncodedChunk::new(&chunk);
        match groups.last_mut() {
            Some(g) if g.intake_key == chunk.intake_key => g.chunks.push(encoded),
            _ => groups.push(writer::Group {
                intake_key: chunk.intake_key,
                chunks: vec![encoded],
            }),
        }
    };
    for event in events {
        let fits = current.as_ref().is_some_and(|c| {
            c.intake_key == event.intake_key
                && c.timestamp == event.timestamp
                && current_bytes + event.raw.len() <= chunk_bytes
        });
        if !fits {
            if let Some(done) = current.take() {
                flush(done, &mut groups);
            }
            current_bytes = 0;
            current = Some(Chunk {
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

/// Creates the queue directory private to the service user (0700), or makes it so.
fn prepare_dir(path: &Path) -> Result<(), QueueError> {
    let err = |source| QueueError::Dir {
        path: path.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(path).map_err(err)?;
    Ok(())
}

/// Makes the directory's entries (sled's files) durable.
fn sync_dir(path: &Path) -> Result<(), QueueError> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn check_format(db: &sled::Db, path: &Path) -> Result<(), QueueError> {
    match db.get(record::META_FORMAT_KEY)? {
        Some(v) => {
            let found = v
                .as_ref()
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| QueueError::Storage("bad format marker".into()))?;
            if found > record::FORMAT_VERSION {
                return Err(QueueError::NewerFormat {
                    path: path.to_owned(),
                    found,
                    supported: record::FORMAT_VERSION,
                });
            }
        }
        None => {
            db.insert(
                record::META_FORMAT_KEY,
                &record::FORMAT_VERSION.to_be_bytes(),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
