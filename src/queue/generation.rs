//! Generations: the queue is a series of sled databases, and old ones are deleted whole.
//!
//! sled 0.34 is a poor queue on its own: it keeps its files at their high-water mark after
//! removals, never deletes the `blobs/` files of large nodes, keeps inserted values in memory
//! while the database is open, and replays its whole log at open. So the queue directory holds
//! one sled database per *generation*:
//!
//! ```text
//! <path>/lock                  flock held by the running forwarder
//! <path>/meta/                 sled: format, lane map, dead letters, generation summaries
//! <path>/gen-00000000000000000001/   sled: chunks and per-generation lane counters
//! <path>/gen-00000000000000000002/   ... the newest is the *active* generation
//! ```
//!
//! Appends go to the active generation only; when it holds `generation_bytes` of payload the
//! writer *seals* it and starts the next one. Sealed generations only lose chunks (delivery's
//! acknowledgements). When a sealed generation holds no event any more its directory is
//! renamed to `gen-….deleted` and removed: the disk space, blobs included, is given back at
//! once, and a crash halfway through leaves a `.deleted` directory that the next open removes.
//!
//! Sealed generations are opened only while delivery reads them and closed when idle, which
//! bounds sled's memory and makes opening the queue cost one small database, not the backlog.
//!
//! A generation that sled cannot open or read (a torn sector, bit rot: sled's own checksums
//! fail, or sled panics) is *moved aside* whole to `gen-….corrupt`, with a note of what it was
//! known to hold, and never deleted: the rest of the queue flows on, and the `salvage` command
//! reads what it still can from it. Every call into sled that may meet such damage goes
//! through [`guard`], which turns sled's panics into [`QueueError::Corrupt`].

use std::collections::HashSet;
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::QueueError;

/// Directory of the meta database.
pub const META_DIR: &str = "meta";
const GEN_PREFIX: &str = "gen-";
const DELETED_SUFFIX: &str = ".deleted";
/// A generation sled cannot open or read, moved aside: kept, never deleted.
pub const CORRUPT_SUFFIX: &str = ".corrupt";
/// A moved-aside generation whose readable chunks `salvage` put back into the queue.
pub const SALVAGED_SUFFIX: &str = ".salvaged";
/// The note written into a moved-aside directory: what it was known to hold, and why.
pub const NOTE_FILE: &str = "moved-aside.json";
/// A generation being created: renamed to its name once complete.
const NEW_SUFFIX: &str = ".new";
/// Where a queue of the first layout (one sled database at the root) is moved, step by step.
const LEGACY_TMP: &str = "legacy-gen.tmp";
/// The files sled 0.34 keeps in its directory.
const SLED_FILES: [&str; 3] = ["db", "conf", "blobs"];

/// Meta key: generation summary, `G` + generation id (u64 BE).
pub const SUMMARY_PREFIX: u8 = b'G';

/// sled segment size. sled writes a page (a node of up to ~17 keys) that is larger than a
/// quarter of a segment to a `blobs/` file of its own, which sled never fsyncs (the writer
/// fsyncs those it finds) and never deletes (the generation's deletion does). With 2 MiB
/// segments that threshold is 512 KiB: a leaf of 17 chunks of the default 16 KiB stays below
/// it, so blobs come only from large events or `chunk_bytes` over 16 KiB.
///
/// Measured on 2,000,000 events of 200 bytes in 32 MiB generations: the files took 1.78x the
/// payload with 2 MiB segments, 1.96x with 4 MiB, 2.1x with 8 MiB (sled leaves the last
/// segments of a database partly used), for the same peak memory.
const SEGMENT_SIZE: usize = 2 * 1024 * 1024;

pub fn summary_key(gen: u64) -> [u8; 9] {
    let mut k = [SUMMARY_PREFIX; 9];
    k[1..].copy_from_slice(&gen.to_be_bytes());
    k
}

pub fn parse_summary_key(key: &[u8]) -> Option<u64> {
    match key {
        [SUMMARY_PREFIX, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// What a sealed generation held when it was sealed, kept in the meta database so that opening
/// the queue does not open every generation. Acknowledgements later only lower the counts, so
/// a summary is an upper bound; the generation's own lane records are the truth, read the first
/// time the writer touches the generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenSummary {
    pub lanes: Vec<GenLane>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenLane {
    pub lane: u32,
    pub events: u64,
    pub bytes: u64,
    /// Sequence number after the lane's last chunk in this generation.
    pub end_seq: u64,
}

/// What a moved-aside generation (or meta database) was known to hold when it was moved aside.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptNote {
    /// The generation's id; `None` for the meta database.
    pub generation: Option<u64>,
    /// The directory it now lives in.
    #[serde(default)]
    pub dir: PathBuf,
    /// Events and payload bytes it held by the queue's counters (its summary, or the writer's
    /// own counts); `None` when nothing readable said (the active generation found damaged at
    /// start: its counters were inside it).
    pub events: Option<u64>,
    pub bytes: Option<u64>,
    /// Bytes its files take on disk.
    pub disk_bytes: u64,
    pub reason: String,
    pub moved_at_ms: u64,
}

/// Runs a call into sled, turning a panic inside it into [`QueueError::Corrupt`].
///
/// sled 0.34 panics on some damaged files (at open: "tried to serialize Uninitialized") where
/// it should return an error. That is a bug of the dependency, but the forwarder must outlive
/// it: the panic is caught here, at the boundary where a generation is opened or read, and the
/// generation is then treated like one whose checksums failed. (The release profile keeps
/// `panic = "unwind"`, the default, for this.) The panic message is also printed on stderr by
/// the default hook.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, QueueError>) -> Result<T, QueueError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(QueueError::Corrupt(format!("sled panicked {what}: {msg}")))
        }
    }
}

/// Moves a damaged database's directory aside: writes `note` into it (fsynced), renames it to
/// `<name>.corrupt` (or `.corrupt-2`, ... if taken), and syncs the queue directory. Returns the
/// new path. The files are never deleted: `salvage` and forensic tools read them.
pub fn move_aside(root: &Path, dir: &Path, note: &mut CorruptNote) -> Result<PathBuf, QueueError> {
    let mut target = with_suffix(dir, CORRUPT_SUFFIX);
    let mut n = 2;
    while target.exists() {
        target = with_suffix(dir, &format!("{CORRUPT_SUFFIX}-{n}"));
        n += 1;
    }
    note.dir = target.clone();
    note.disk_bytes = disk_usage(dir);
    let text = serde_json::to_vec_pretty(note).map_err(|e| QueueError::Storage(e.to_string()))?;
    let note_path = dir.join(NOTE_FILE);
    std::fs::write(&note_path, text)?;
    File::open(&note_path)?.sync_all()?;
    std::fs::rename(dir, &target)?;
    sync_dir(root)?;
    Ok(target)
}

/// The note of a moved-aside directory; a default one (nothing known) if it cannot be read.
pub fn read_note(dir: &Path) -> CorruptNote {
    let note = std::fs::read(dir.join(NOTE_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice::<CorruptNote>(&t).ok());
    let mut note = note.unwrap_or_else(|| CorruptNote {
        reason: "moved aside (no readable note)".into(),
        ..CorruptNote::default()
    });
    note.dir = dir.to_owned();
    if note.generation.is_none() {
        // The name tells, if the note does not (`meta.corrupt` names none).
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        note.generation = parse_aside_name(name);
    }
    note
}

pub fn gen_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("{GEN_PREFIX}{id:020}"))
}

fn parse_gen_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(GEN_PREFIX)?;
    if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// Opens (or creates) a sled database the way the queue uses it: the writer flushes and
/// fsyncs itself, so sled's own periodic flush is off.
///
/// sled's background threads may hold a database that this process just closed for a few
/// moments more, and with it the database's file lock. The queue directory's own lock rules out
/// any other process, so a lock conflict here is such a moment: wait for it to pass.
pub fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, QueueError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .segment_size(SEGMENT_SIZE)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if is_lock_conflict(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.map_err(QueueError::from),
        }
    }
}

/// Whether sled failed to take its file lock. sled wraps the `WouldBlock` of `flock` in an
/// error of its own kind ("could not acquire lock on ..."), so the message is what tells.
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// An open generation: its database and the file whose fsync makes it durable.
#[derive(Debug)]
pub struct GenDb {
    pub db: sled::Db,
    data_file: File,
}

impl GenDb {
    /// Opens a database; damage that sled detects (or panics on) is [`QueueError::Corrupt`].
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<GenDb, QueueError> {
        let db = guard("opening a database", || open_sled(dir, cache_bytes))?;
        let data_file = File::open(dir.join("db"))?;
        Ok(GenDb { db, data_file })
    }

    /// fsyncs sled's data file (after a `flush()`, which is not an fsync).
    pub fn sync_data_file(&self) -> Result<(), QueueError> {
        self.data_file.sync_all()?;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Slot {
    open: Option<Arc<GenDb>>,
    /// Set once the directory is being removed: the generation must never be opened again
    /// (sled would create an empty database in its place).
    deleted: bool,
}

/// What [`Generation::db`] found.
pub type Opened = Result<Option<Arc<GenDb>>, QueueError>;

/// One generation, open or closed. Shared by the writer and readers.
#[derive(Debug)]
pub struct Generation {
    pub id: u64,
    pub dir: PathBuf,
    cache_bytes: u64,
    slot: Mutex<Slot>,
    /// When it was last used, on the process's monotonic clock ([`mono_ms`]): a wall clock
    /// stepped back would keep an idle generation open (and its memory held) for as long.
    last_used_ms: AtomicU64,
    /// The lanes that hold events in this generation, as the writer last published them (a
    /// sealed generation whose lane holds none need not be opened to read that lane). A set,
    /// so that a read and a commit cost the same however many lanes there are.
    lanes_holding: Mutex<HashSet<u32>>,
    /// sled could not open or read it: readers skip it, and the writer moves it aside.
    damaged: AtomicBool,
}

impl Generation {
    pub fn new(root: &Path, id: u64, cache_bytes: u64) -> Generation {
        Generation {
            id,
            dir: gen_dir(root, id),
            cache_bytes,
            slot: Mutex::default(),
            last_used_ms: AtomicU64::new(mono_ms()),
            lanes_holding: Mutex::default(),
            damaged: AtomicBool::new(false),
        }
    }

    /// Marks the generation damaged: it is not opened again, readers skip it, and the writer
    /// moves it aside at its next housekeeping (which logs it, once).
    pub fn mark_damaged(&self, error: &QueueError) {
        if !self.damaged.swap(true, Ordering::AcqRel) {
            tracing::debug!(generation = self.id, error = %error, "queue generation damaged");
        }
    }

    pub fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Acquire)
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, opening it if needed; `None` once the generation is deleted or
    /// found damaged. A failure to open it for damage marks it damaged.
    pub fn db(&self) -> Opened {
        self.last_used_ms.store(mono_ms(), Ordering::Relaxed);
        let mut slot = self.slot();
        if slot.deleted || self.is_damaged() {
            return Ok(None);
        }
        if let Some(db) = &slot.open {
            return Ok(Some(db.clone()));
        }
        let db = match GenDb::open(&self.dir, self.cache_bytes) {
            Ok(db) => Arc::new(db),
            Err(e) => {
                if e.is_corrupt() {
                    self.mark_damaged(&e);
                }
                return Err(e);
            }
        };
        slot.open = Some(db.clone());
        Ok(Some(db))
    }

    pub fn is_open(&self) -> bool {
        self.slot().open.is_some()
    }

    /// Closes the database if nobody else holds it and it was not used for `idle`.
    /// The database is handed back for the caller to drop where it likes.
    pub fn close_if_idle(&self, idle: Duration) -> Option<Arc<GenDb>> {
        let idle_ms = mono_ms().saturating_sub(self.last_used_ms.load(Ordering::Relaxed));
        if u128::from(idle_ms) < idle.as_millis() {
            return None;
        }
        let mut slot = self.slot();
        match &slot.open {
            Some(db) if Arc::strong_count(db) == 1 => slot.open.take(),
            _ => None,
        }
    }

    /// Marks the generation deleted, if nobody else holds it open, and hands back its open
    /// database (if any) for the caller to drop where it likes: closing sled takes a while.
    /// After `Some`, nobody can open it again.
    pub fn retire(&self) -> Option<Option<Arc<GenDb>>> {
        let mut slot = self.slot();
        if slot
            .open
            .as_ref()
            .is_some_and(|db| Arc::strong_count(db) > 1)
        {
            return None;
        }
        slot.deleted = true;
        Some(slot.open.take())
    }

    /// Whether the database is open now, without opening it.
    pub fn open_db(&self) -> Option<Arc<GenDb>> {
        self.slot().open.clone()
    }

    /// Whether `lane` may have chunks here (always true for the active generation, which the
    /// caller checks).
    pub fn may_hold(&self, lane: u32) -> bool {
        self.holding().contains(&lane)
    }

    /// Publishes the events of every lane in this generation (lanes not named hold none).
    pub fn set_lane_events(&self, counts: impl IntoIterator<Item = (u32, u64)>) {
        let holding = counts
            .into_iter()
            .filter(|(_, events)| *events > 0)
            .map(|(lane, _)| lane)
            .collect();
        *self.holding() = holding;
    }

    /// Publishes the events of one lane in this generation.
    pub fn set_lane_event_count(&self, lane: u32, events: u64) {
        let mut holding = self.holding();
        if events > 0 {
            holding.insert(lane);
        } else {
            holding.remove(&lane);
        }
    }

    fn holding(&self) -> MutexGuard<'_, HashSet<u32>> {
        self.lanes_holding.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Milliseconds on a monotonic clock that starts with the process: for ages and waits inside
/// it, which must not follow the wall clock when it is stepped.
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// What [`scan_root`] found in the queue directory.
#[derive(Debug, Default)]
pub struct RootListing {
    /// Generation ids, ascending.
    pub gens: Vec<u64>,
    /// Moved-aside generations (and meta databases), with their notes.
    pub corrupt: Vec<CorruptNote>,
    /// The highest generation id ever used, moved-aside ones included: a new generation takes
    /// a higher one, so that an id is never reused.
    pub max_id: u64,
}

/// The generation id in a moved-aside (or salvaged) directory's name.
fn parse_aside_name(name: &str) -> Option<u64> {
    let base = name.split('.').next()?;
    parse_gen_name(base)
}

/// Whether `root` holds a queue: a meta database (the generations layout), or a database of
/// the first layout at the root, which the open moves into generation 0.
pub fn holds_queue(root: &Path) -> bool {
    root.join(META_DIR).join("db").exists() || root.join("db").exists()
}

/// Lists the generations, finishing any deletion or migration a crash interrupted. Only at
/// open, before the queue's threads run: a `.new` or `.deleted` directory is then a leftover.
pub fn scan_root(root: &Path) -> Result<RootListing, QueueError> {
    finish_legacy_migration(root)?;
    list_root(root, true)
}

/// Lists the generations without changing anything: safe while the queue is open (its
/// janitor may be making a `.new` generation or removing a `.deleted` one right then).
pub fn list_root_read_only(root: &Path) -> Result<RootListing, QueueError> {
    list_root(root, false)
}

fn list_root(root: &Path, tidy: bool) -> Result<RootListing, QueueError> {
    let mut gens = Vec::new();
    let mut corrupt = Vec::new();
    let mut max_id = 0;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(NEW_SUFFIX) && name.starts_with(GEN_PREFIX) {
            // A generation whose creation a crash interrupted: it never held anything.
            if tidy {
                std::fs::remove_dir_all(entry.path())?;
            }
        } else if name.ends_with(DELETED_SUFFIX) {
            // A deletion that a crash interrupted: the rename was its commit point.
            if tidy {
                std::fs::remove_dir_all(entry.path())?;
                tracing::info!(dir = %entry.path().display(), "removed a delivered generation left by a crash");
            }
        } else if let Some(id) = parse_gen_name(name) {
            gens.push(id);
            max_id = max_id.max(id);
        } else if name.contains(CORRUPT_SUFFIX) || name.contains(SALVAGED_SUFFIX) {
            if let Some(id) = parse_aside_name(name) {
                max_id = max_id.max(id);
            }
            if name.contains(CORRUPT_SUFFIX) {
                corrupt.push(read_note(&entry.path()));
            }
        }
    }
    gens.sort_unstable();
    corrupt.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(RootListing {
        gens,
        corrupt,
        max_id,
    })
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("gen");
    dir.with_file_name(format!("{name}{suffix}"))
}

/// Creates a generation durably and opens it: its database with its format marker is built
/// under `gen-<id>.new`, fsynced, and renamed to its name (so a crash leaves either nothing or
/// a complete, empty generation), then the queue directory is fsynced.
pub fn create_generation(root: &Path, gen: &Generation, format: u32) -> Result<(), QueueError> {
    if gen.dir.exists() {
        // Made by an earlier attempt that failed after its rename: complete, and empty.
        sync_dir(root)?;
        gen.db()?;
        return Ok(());
    }
    let tmp = with_suffix(&gen.dir, NEW_SUFFIX);
    match std::fs::remove_dir_all(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    {
        let db = GenDb::open(&tmp, gen.cache_bytes)?;
        db.db
            .insert(super::record::META_FORMAT_KEY, &format.to_be_bytes())?;
        db.db.flush()?;
        db.sync_data_file()?;
    }
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, &gen.dir)?;
    sync_dir(root)?;
    gen.db()?;
    Ok(())
}

/// Commits the deletion of a retired generation: renames its directory to `gen-<id>.deleted`
/// (atomic) and syncs the queue directory. From here on the generation is gone, whatever
/// happens to the files; [`remove_deleted`] removes them.
pub fn commit_deletion(root: &Path, gen: &Generation) -> Result<PathBuf, QueueError> {
    let doomed = with_suffix(&gen.dir, DELETED_SUFFIX);
    crate::crash_point!("queue-delete-before-rename");
    std::fs::rename(&gen.dir, &doomed)?;
    sync_dir(root)?;
    crate::crash_point!("queue-delete-after-rename");
    Ok(doomed)
}

/// Removes the files of a generation whose deletion is committed. A failure only leaves files
/// that the next open removes.
pub fn remove_deleted(doomed: &Path) {
    if let Err(e) = std::fs::remove_dir_all(doomed) {
        tracing::warn!(dir = %doomed.display(), error = %e, "cannot remove a delivered generation's files; the next start will");
    }
    crate::crash_point!("queue-delete-after-remove");
}

/// Makes a directory's entries durable.
pub fn sync_dir(path: &Path) -> Result<(), QueueError> {
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Moves a queue of the first release's layout (one sled database at the root) into
/// generation 0, so that it is read and delivered like any other generation.
///
/// Each step is a rename, and the directory is renamed to its final name last, so a crash at
/// any point leaves either the old layout, or a `legacy-gen.tmp` that the next open completes.
fn finish_legacy_migration(root: &Path) -> Result<(), QueueError> {
    let tmp = root.join(LEGACY_TMP);
    let legacy = root.join("db").exists();
    if !legacy && !tmp.exists() {
        return Ok(());
    }
    if legacy {
        tracing::info!(path = %root.display(), "moving a queue of the previous layout into generation 0");
    }
    std::fs::create_dir_all(&tmp)?;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if SLED_FILES.contains(&name) || name.starts_with("snap.") {
            std::fs::rename(entry.path(), tmp.join(name))?;
        }
    }
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, gen_dir(root, 0))?;
    sync_dir(root)?;
    Ok(())
}

/// Gives the memory freed by closing generations back to the operating system.
///
/// sled allocates a buffer per page from whichever thread touches it; once a generation is
/// closed that memory is free but stays with the allocator, so the process would keep the
/// high-water mark of every generation it ever had open (measured with glibc: 294 MiB resident
/// with one generation open, 58 MiB after a trim). The binary runs on jemalloc, whose arenas
/// are purged; code linked with the system allocator (tests, benches) gets glibc's trim.
pub fn release_freed_memory() {
    #[cfg(not(target_env = "msvc"))]
    // SAFETY: "arena.<MALLCTL_ARENAS_ALL>.purge" takes no argument and returns nothing; the
    // name is NUL-terminated and every other pointer is null, as jemalloc requires.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes a directory tree really takes on disk (allocated blocks, not apparent sizes).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, depth: u32) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        let own = allocated(&meta);
        if !meta.is_dir() || depth == 0 {
            return own;
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            return own;
        };
        own + entries
            .flatten()
            .map(|e| walk(&e.path(), depth - 1))
            .sum::<u64>()
    }
    walk(path, 4)
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        let root = Path::new("/q");
        let name = |id| {
            gen_dir(root, id)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(parse_gen_name(&name(7)), Some(7));
        assert_eq!(parse_gen_name(&name(u64::MAX)), Some(u64::MAX));
        assert!(name(9) < name(10), "directory names sort like ids");
        assert_eq!(parse_gen_name("gen-1"), None);
        assert_eq!(parse_gen_name("gen-00000000000000000001.deleted"), None);
        assert_eq!(parse_summary_key(&summary_key(5)), Some(5));
        assert_eq!(parse_summary_key(b"Lxxxx"), None);
    }

    /// Creating a generation closes its database under `.new` and opens it again under its
    /// name at once, while sled's threads may still hold the first handle's file lock (it
    /// failed the first start of a forwarder in CI): the open must wait for the lock, not fail.
    #[test]
    fn an_open_waits_for_a_lock_held_a_moment_longer() {
        let dir = tempfile::tempdir().unwrap();
        let held = open_sled(dir.path(), 1 << 20).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let reopened = open_sled(dir.path(), 1 << 20);
        release.join().unwrap();
        reopened.expect("the open waited for the lock");
        for id in 1..=10 {
            let gen = Generation::new(dir.path(), id, 1 << 20);
            create_generation(dir.path(), &gen, 2).unwrap();
            drop(gen.close_if_idle(Duration::ZERO));
            gen.db().unwrap().expect("reopened");
        }
    }

    /// A moved-aside generation is listed with its note, or without one (a crash between the
    /// rename of a forwarder that wrote no note, or a hand-made one) with the id its name gives; `meta.corrupt` names none.
    /// Moved-aside ids count for the next id.
    #[test]
    fn moved_aside_directories_are_listed_and_their_ids_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(gen_dir(root, 3)).unwrap();
        let mut note = CorruptNote {
            generation: Some(3),
            events: Some(42),
            ..CorruptNote::default()
        };
        let moved = move_aside(root, &gen_dir(root, 3), &mut note).unwrap();
        assert!(moved.ends_with("gen-00000000000000000003.corrupt"));
        std::fs::create_dir_all(root.join("gen-00000000000000000007.corrupt")).unwrap();
        std::fs::create_dir_all(root.join("meta.corrupt")).unwrap();
        std::fs::create_dir_all(gen_dir(root, 5)).unwrap();
        let listing = scan_root(root).unwrap();
        assert_eq!(listing.gens, [5]);
        assert_eq!(listing.max_id, 7);
        let found: Vec<(Option<u64>, Option<u64>)> = listing
            .corrupt
            .iter()
            .map(|n| (n.generation, n.events))
            .collect();
        assert_eq!(found, [(Some(3), Some(42)), (Some(7), None), (None, None)]);
    }

    #[test]
    fn interrupted_deletions_are_finished() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(gen_dir(root, 3)).unwrap();
        let doomed = root.join("gen-00000000000000000002.deleted");
        std::fs::create_dir_all(doomed.join("blobs")).unwrap();
        std::fs::write(doomed.join("db"), b"x").unwrap();
        let listing = scan_root(root).unwrap();
        assert_eq!(listing.gens, [3]);
        assert!(!doomed.exists());
    }

    #[test]
    fn legacy_layout_moves_into_generation_zero_even_if_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("db"), b"data").unwrap();
        std::fs::write(root.join("conf"), b"conf").unwrap();
        std::fs::write(root.join("snap.0000001"), b"s").unwrap();
        // A crash after the first rename: `conf` already moved, `db` not yet.
        std::fs::create_dir_all(root.join(LEGACY_TMP)).unwrap();
        std::fs::rename(root.join("conf"), root.join(LEGACY_TMP).join("conf")).unwrap();
        let listing = scan_root(root).unwrap();
        assert_eq!(listing.gens, [0]);
        let g0 = gen_dir(root, 0);
        assert_eq!(std::fs::read(g0.join("db")).unwrap(), b"data");
        assert_eq!(std::fs::read(g0.join("conf")).unwrap(), b"conf");
        assert!(g0.join("snap.0000001").exists());
        assert!(!root.join("db").exists());
    }
}
