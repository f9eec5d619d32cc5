//! Opening the queue directory: its permissions and lock, the meta database (moved aside and
//! rebuilt if damaged), the format markers, and the state loaded from every generation, as
//! [`Queue::open`](super::Queue::open) and
//! [`Queue::open_read_only`](super::Queue::open_read_only) share it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::compression::Compression;
use super::generation::{self, GenDb};
use super::LAYOUT_VERSION;
use super::{checkpoint, fresh, now_ms, record, writer, GenList, Lane, QueueError, Shared, Stats};
use crate::config::QueueConfig;

/// Page cache of the meta database, which holds little.
const META_CACHE_BYTES: u64 = 1024 * 1024;

/// A queue loaded from its directory, with nothing running on it yet: what [`super::Queue::open`]
/// and [`super::Queue::open_read_only`] share.
pub(super) struct Loaded {
    pub shared: Arc<Shared>,
    pub state: writer::WriterState,
    pub meta: GenDb,
    /// The flock on `<path>/lock`.
    pub lock: std::fs::File,
}

/// Loads the queue in `config.path` (which exists): takes its lock, opens the meta database
/// and reads the state of every generation, recovering what a crash or damage left as a
/// start must (`writer/load.rs`), all of it durable before this returns.
pub(super) fn load(config: &QueueConfig) -> Result<Loaded, QueueError> {
    let path = config.path.clone();
    let lock = lock_dir(&path)?;
    let mut listing = generation::scan_root(&path)?;
    let meta_dir = path.join(generation::META_DIR);
    let meta = open_meta(&path, &meta_dir, &mut listing)?;
    // The entries sled made in meta/ (its data file above all) must survive a power cut
    // too; the queue directory's own entries are synced below, once loading is done.
    meta.db.flush()?;
    meta.sync_data_file()?;
    generation::sync_dir(&meta_dir)?;
    let cache = (config.cache_capacity_bytes / 4).max(1024 * 1024);
    let mut state = writer::WriterState::load(&path, &meta, &mut listing, cache)?;
    let lanes: Vec<Arc<Lane>> = state.lanes_for_readers();
    let keys: HashSet<String> = lanes.iter().map(|l| l.intake_key.clone()).collect();
    let queued_events = lanes.iter().map(|l| l.events()).sum::<u64>();
    let queued_bytes = lanes.iter().map(|l| l.bytes()).sum::<u64>();
    let shared = Arc::new(Shared {
        meta: meta.db.clone(),
        gens: RwLock::new(GenList {
            gens: state.generations(),
            active: state.active(),
        }),
        path: path.clone(),
        max_bytes: config.max_bytes,
        min_free_bytes: config.min_free_bytes,
        lanes: RwLock::new(lanes),
        lanes_changed: Notify::new(),
        queued_events: queued_events.into(),
        queued_bytes: queued_bytes.into(),
        keys: Mutex::new(keys),
        max_intake_keys: config.max_intake_keys,
        full: AtomicBool::new(false),
        stats: Stats {
            dead_letters: state.dead_letters.into(),
            ..Stats::default()
        },
        corrupt: Mutex::new(listing.corrupt),
        failure: std::sync::OnceLock::new(),
        senders: writer::Senders::default(),
        undecodable: writer::Undecodable::default(),
        compression: Compression::new(config.chunk_compression),
        fresh: fresh::FreshBodies::new(config.delivery_cache_bytes),
        checkpoints: checkpoint::Checkpoints::new(std::mem::take(&mut state.checkpoints)),
    });
    generation::sync_dir(&path)?;
    Ok(Loaded {
        shared,
        state,
        meta,
        lock,
    })
}

/// Creates the queue directory private to the service user (0700), or makes it so.
pub(super) fn prepare_dir(path: &Path) -> Result<(), QueueError> {
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

/// Opens the meta database and reads it through once; if sled cannot (damage, or a panic), it
/// is moved aside to `meta.corrupt` (kept: its dead letters stay readable by forensic tools)
/// and a new one is made. The lane map is then rebuilt from the generations' own lane records
/// (each generation names the intake key of every lane it holds), and since the summaries are
/// gone with it, every generation is opened once and counted exactly.
fn open_meta(
    root: &Path,
    meta_dir: &Path,
    listing: &mut generation::RootListing,
) -> Result<GenDb, QueueError> {
    // A meta database that held anything holds its format marker (written, and fsynced, at
    // its first open): if sled opens it without one, sled took damage for the end of its log
    // and dropped everything.
    let existed = std::fs::metadata(meta_dir.join("db")).is_ok_and(|m| m.len() > 0);
    let check = |existed: bool| -> Result<GenDb, QueueError> {
        let meta = GenDb::open(meta_dir, META_CACHE_BYTES)?;
        generation::guard("reading the meta database", || {
            if existed && meta.db.get(record::META_FORMAT_KEY)?.is_none() {
                return Err(QueueError::Corrupt(
                    "the format marker is gone: sled lost its contents".into(),
                ));
            }
            check_format(&meta.db, meta_dir, LAYOUT_VERSION)?;
            for item in meta.db.iter() {
                item?;
            }
            Ok(())
        })?;
        Ok(meta)
    };
    match check(existed) {
        Err(e) if e.is_corrupt() => {
            tracing::error!(dir = %meta_dir.display(), error = %e,
                "the queue's meta database is damaged: moving it aside and rebuilding the lane map from the generations (dead letters stay in the moved-aside copy)");
            let mut note = generation::CorruptNote {
                reason: e.to_string(),
                moved_at_ms: now_ms(),
                ..Default::default()
            };
            generation::move_aside(root, meta_dir, &mut note)?;
            listing.corrupt.push(note);
            check(false)
        }
        other => other,
    }
}

/// Takes the queue directory's lock: one forwarder per queue.
fn lock_dir(path: &Path) -> Result<std::fs::File, QueueError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join("lock"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(QueueError::Locked(path.to_owned())),
        Err(e) => Err(QueueError::Storage(format!("cannot lock the queue: {e}"))),
    }
}

/// Checks (or writes, in a new database) the format marker of a database of the queue.
pub(crate) fn check_format(db: &sled::Db, path: &Path, supported: u32) -> Result<(), QueueError> {
    match db.get(record::META_FORMAT_KEY)? {
        Some(v) => {
            let found = v
                .as_ref()
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| QueueError::Storage("bad format marker".into()))?;
            if found > supported {
                return Err(QueueError::NewerFormat {
                    path: path.to_owned(),
                    found,
                    supported,
                });
            }
        }
        None => {
            db.insert(record::META_FORMAT_KEY, &supported.to_be_bytes())?;
        }
    }
    Ok(())
}
