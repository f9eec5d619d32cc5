//! Loading the writer's state at open: the lane map, the active generation, the summaries of
//! sealed ones; and creating a generation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{storage, GenCount, GenState, LaneState, WriterState};
use crate::queue::generation::{self, CorruptNote, GenDb, GenSummary, Generation, RootListing};
use crate::queue::record::{self, ChunkHeader, LaneRecord, Watermark};
use crate::queue::QueueError;

/// Counts of one generation read from the generation itself.
pub(super) struct Loaded {
    pub lanes: HashMap<u32, GenCount>,
    pub marks: HashMap<u32, Watermark>,
    pub names: Vec<(u32, String)>,
}

/// Reads a generation's lane records (counters, watermarks and intake keys) and, for each
/// lane, where its last chunk is. O(lanes), not O(events): the counters already leave
/// delivered chunks out.
///
/// Chunks that no lane record counts (at or past its `end_seq`, or of a lane without a record
/// here) are of an append commit that a crash cut short (`durable.rs`): none was acknowledged,
/// but they are stored and delivery reads them, so they are counted in.
pub(super) fn load_generation(db: &sled::Db, dir: &Path) -> Result<Loaded, QueueError> {
    check_gen_format(db, dir)?;
    let mut records = BTreeMap::new();
    for item in db.scan_prefix([record::LANE_PREFIX]) {
        let (key, value) = item?;
        let id = record::parse_lane_key(&key).map_err(storage)?;
        records.insert(id, Some(LaneRecord::decode(&value).map_err(storage)?));
    }
    for id in lanes_with_chunks(db)? {
        records.entry(id).or_insert(None);
    }
    let mut loaded = Loaded {
        lanes: HashMap::new(),
        marks: HashMap::new(),
        names: Vec::new(),
    };
    let mut uncounted = Uncounted::default();
    for (id, rec) in records {
        let chunks = record::chunk_key(id, 0)..=record::chunk_key(id, u64::MAX);
        let last_stored = first_seq(db.range(chunks.clone()).next_back())?;
        let rec = match rec {
            Some(rec) => {
                loaded.names.push((id, rec.intake_key.clone()));
                rec
            }
            // Its first commit here was cut short: everything stored of it is uncounted.
            None => {
                let first_stored = first_seq(db.range(chunks).next())?.unwrap_or(0);
                LaneRecord {
                    watermark: Watermark::starting_at(first_stored),
                    end_seq: Some(first_stored),
                    ..LaneRecord::default()
                }
            }
        };
        let (mut events, mut bytes) = (rec.events, rec.bytes);
        if let Some(end) = rec.end_seq {
            let (e, b) = uncounted.count(db, id, end)?;
            events += e;
            bytes += b;
        }
        // Delivered chunks are stored, but the last ones may have been removed (past
        // `MAX_ACKED`): the next sequence number must not fall below the watermark, or a new
        // chunk would be taken for a delivered one.
        let end_seq = last_stored
            .map_or(0, |s| s + 1)
            .max(rec.watermark.acked_below);
        loaded.marks.insert(id, rec.watermark);
        loaded.lanes.insert(
            id,
            GenCount {
                events,
                bytes,
                end_seq,
            },
        );
    }
    if uncounted.chunks > 0 {
        tracing::info!(dir = %dir.display(), chunks = uncounted.chunks, events = uncounted.events,
            "found chunks of an append that a crash cut short (never acknowledged to their \
             senders); they stay queued and are delivered");
    }
    Ok(loaded)
}

/// Chunks found past their lane record's count, over one generation.
#[derive(Default)]
struct Uncounted {
    chunks: u64,
    events: u64,
}

impl Uncounted {
    /// Events and payload bytes of lane `id`'s chunks at or after `from`. A chunk whose header
    /// cannot be read counts nothing, as when delivery quarantines it.
    fn count(&mut self, db: &sled::Db, id: u32, from: u64) -> Result<(u64, u64), QueueError> {
        let (mut events, mut bytes) = (0, 0);
        for item in db.range(record::chunk_key(id, from)..=record::chunk_key(id, u64::MAX)) {
            let (_, value) = item?;
            let header = ChunkHeader::decode(&value).unwrap_or_default();
            events += u64::from(header.events);
            bytes += u64::from(header.payload_bytes);
            self.chunks += 1;
        }
        self.events += events;
        Ok((events, bytes))
    }
}

/// The sequence number of the chunk a range read found, if any.
fn first_seq(
    item: Option<sled::Result<(sled::IVec, sled::IVec)>>,
) -> Result<Option<u64>, QueueError> {
    match item {
        Some(item) => Ok(Some(record::parse_chunk_key(&item?.0).map_err(storage)?.1)),
        None => Ok(None),
    }
}

/// The lanes that have chunks in the generation: one seek per lane, whatever their chunks.
fn lanes_with_chunks(db: &sled::Db) -> Result<Vec<u32>, QueueError> {
    let mut lanes = Vec::new();
    let mut from = record::chunk_key(0, 0);
    while let Some(item) = db.range(from..).next() {
        let (key, _) = item?;
        if key.first() != Some(&record::CHUNK_PREFIX) {
            break;
        }
        let (lane, _) = record::parse_chunk_key(&key).map_err(storage)?;
        lanes.push(lane);
        match lane.checked_add(1) {
            Some(next) => from = record::chunk_key(next, 0),
            None => break,
        }
    }
    Ok(lanes)
}

/// Checks a generation's format marker. Every generation is created with one (made durable
/// before it gets its name), so a generation without it is one whose contents sled lost at
/// open: damage that sled took for the end of its log. Generation 0, moved from the first
/// layout, may lack it.
fn check_gen_format(db: &sled::Db, dir: &Path) -> Result<(), QueueError> {
    let legacy = dir.file_name() == generation::gen_dir(Path::new(""), 0).file_name();
    if !legacy && db.get(record::META_FORMAT_KEY)?.is_none() {
        return Err(QueueError::Corrupt(
            "the generation's format marker is gone: sled lost its contents".into(),
        ));
    }
    crate::queue::check_format(db, dir, record::FORMAT_VERSION)?;
    mark_current_format(db)
}

/// Marks a generation of an older format with this release's: its lane records become v2 at
/// the next acknowledgement, which a release before v2 lane records cannot read. It refuses
/// the generation at once ("newer format") instead of failing on its first lane record.
/// Durable with the first commit to the generation (sled flushes its log in order), which is
/// the first that can write a v2 lane record in it.
fn mark_current_format(db: &sled::Db) -> Result<(), QueueError> {
    let current = record::FORMAT_VERSION.to_be_bytes();
    if db.get(record::META_FORMAT_KEY)?.as_deref() != Some(&current[..]) {
        db.insert(record::META_FORMAT_KEY, &current)?;
    }
    Ok(())
}

/// Moves dead letters found in a generation (a queue of the first layout kept them there) into
/// the meta database, durably, then removes them from the generation.
pub(super) fn import_dead_letters(
    gen: &GenDb,
    meta: &GenDb,
    next_dead_seq: &mut u64,
) -> Result<u64, QueueError> {
    let mut to_meta = sled::Batch::default();
    let mut from_gen = sled::Batch::default();
    let mut moved = 0;
    for item in gen.db.scan_prefix([record::DEAD_PREFIX]) {
        let (key, value) = item?;
        to_meta.insert(&record::dead_key(*next_dead_seq), value);
        from_gen.remove(key);
        *next_dead_seq += 1;
        moved += 1;
    }
    if moved > 0 {
        // Once a batch is applied, a failure is a failed write: fatal (`Writer::break_down`).
        let write = || -> Result<(), QueueError> {
            meta.db.apply_batch(to_meta)?;
            meta.db.flush()?;
            meta.sync_data_file()?;
            gen.db.apply_batch(from_gen)?;
            gen.db.flush()?;
            gen.sync_data_file()
        };
        write().map_err(|e| QueueError::RestartNeeded(e.to_string()))?;
    }
    Ok(moved)
}

/// A generation's counts as its summary gives them (an upper bound).
fn summary_counts(summary: &GenSummary) -> HashMap<u32, GenCount> {
    summary
        .lanes
        .iter()
        .map(|l| {
            let count = GenCount {
                events: l.events,
                bytes: l.bytes,
                end_seq: l.end_seq,
            };
            (l.lane, count)
        })
        .collect()
}

/// Moves aside a generation found damaged while the queue opens, noting what its summary (if
/// any) says it held. The active generation has no summary: what it held is not known.
fn set_aside_at_open(
    root: &Path,
    handle: &Generation,
    summary: Option<&GenSummary>,
    error: &QueueError,
) -> Result<CorruptNote, QueueError> {
    if let Some(Some(db)) = handle.retire() {
        // Closing a damaged database may panic in sled too.
        let _ = generation::guard("closing a damaged generation", || {
            drop(db);
            Ok(())
        });
    }
    let mut note = CorruptNote {
        generation: Some(handle.id),
        events: summary.map(|s| s.lanes.iter().map(|l| l.events).sum()),
        bytes: summary.map(|s| s.lanes.iter().map(|l| l.bytes).sum()),
        reason: error.to_string(),
        moved_at_ms: crate::queue::now_ms(),
        ..CorruptNote::default()
    };
    generation::move_aside(root, &handle.dir, &mut note)?;
    tracing::error!(generation = handle.id, dir = %note.dir.display(), events = ?note.events,
        "damaged queue generation moved aside; run `sekoia-forwarder salvage` on the stopped forwarder to recover what it still holds");
    Ok(note)
}

impl WriterState {
    /// Loads lanes and counters: the meta database, the active (newest) generation, and the
    /// summaries of sealed ones. A sealed generation without a summary is opened once to count
    /// it. Creates the first generation of a new queue.
    ///
    /// A generation that sled cannot open or read here is moved aside (see
    /// [`generation::move_aside`]) and left out; its note is added to `listing.corrupt`.
    pub fn load(
        root: &Path,
        meta: &GenDb,
        listing: &mut RootListing,
        cache_bytes: u64,
    ) -> Result<WriterState, QueueError> {
        let gen_ids = listing.gens.clone();
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for item in meta.db.scan_prefix([record::LANE_PREFIX]) {
            let (key, value) = item?;
            let id = record::parse_lane_key(&key).map_err(storage)?;
            names.insert(id, record::decode_value(&value).map_err(storage)?);
        }
        let mut next_dead_seq = match meta.db.scan_prefix([record::DEAD_PREFIX]).next_back() {
            Some(item) => record::parse_dead_key(&item?.0).map_err(storage)? + 1,
            None => 0,
        };
        let mut summaries = HashMap::new();
        let mut stale = Vec::new();
        for item in meta.db.scan_prefix([generation::SUMMARY_PREFIX]) {
            let (key, value) = item?;
            let Some(id) = generation::parse_summary_key(&key) else {
                continue;
            };
            if gen_ids.binary_search(&id).is_ok() {
                let summary: GenSummary = record::decode_value(&value).map_err(storage)?;
                summaries.insert(id, summary);
            } else {
                stale.push(key);
            }
        }

        let mut gens = BTreeMap::new();
        let mut found_names = Vec::new();
        let newest = listing.gens.last().copied();
        for &id in &listing.gens {
            let handle = Arc::new(Generation::new(root, id, cache_bytes));
            let summary = summaries.remove(&id);
            let is_active = Some(id) == newest;
            let (lanes, marks, exact) = match summary.as_ref().filter(|_| !is_active) {
                Some(summary) => (summary_counts(summary), HashMap::new(), false),
                None => {
                    let read = generation::guard("loading a generation", || {
                        let db = handle.db()?.ok_or_else(|| storage("generation deleted"))?;
                        let loaded = load_generation(&db.db, &handle.dir)?;
                        import_dead_letters(&db, meta, &mut next_dead_seq)?;
                        Ok(loaded)
                    });
                    let loaded = match read {
                        Ok(loaded) => loaded,
                        Err(e) if e.is_corrupt() => {
                            handle.mark_damaged(&e);
                            let note = set_aside_at_open(root, &handle, summary.as_ref(), &e)?;
                            listing.corrupt.push(note);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    found_names.extend(loaded.names);
                    if !is_active {
                        drop(handle.close_if_idle(Duration::ZERO));
                    }
                    (loaded.lanes, loaded.marks, true)
                }
            };
            let mut state = GenState::new(handle, lanes, exact);
            state.marks = marks;
            if is_active {
                // What it holds counts as appended, so that it is sealed on time, and rotated
                // away once delivered (which gives its space back).
                state.appended = state.lanes.values().map(|c| c.bytes).sum();
            }
            gens.insert(id, state);
        }
        // A new queue, or one whose newest generation was moved aside: appends go to a fresh
        // generation, with an id never used before.
        let active = match newest.filter(|id| gens.contains_key(id)) {
            Some(id) => id,
            None => {
                let id = listing.max_id + 1;
                let handle = Arc::new(Generation::new(root, id, cache_bytes));
                generation::create_generation(root, &handle, record::FORMAT_VERSION)?;
                gens.insert(id, GenState::new(handle, HashMap::new(), true));
                listing.gens.push(id);
                listing.max_id = id;
                id
            }
        };

        // The lane map: the meta database's, plus lanes that only a generation names (a queue
        // of the first layout, or a crash between the two).
        let mut meta_batch = sled::Batch::default();
        for (id, key) in found_names {
            match names.get(&id) {
                Some(known) if *known != key => {
                    return Err(storage(format!(
                        "lane {id} has two intake keys in the queue's records"
                    )))
                }
                Some(_) => {}
                None => {
                    meta_batch.insert(&record::lane_key(id), record::encode_value(&key));
                    names.insert(id, key);
                }
            }
        }
        for key in stale {
            meta_batch.remove(key);
        }
        meta.db.apply_batch(meta_batch)?;
        meta.db.flush()?;
        meta.sync_data_file()?;

        let mut lanes = Vec::with_capacity(names.len());
        let mut by_key = HashMap::new();
        // Lane ids are dense. A gap is a lane that only a lost meta database knew (its events
        // all delivered or moved aside): it keeps its id, under a name no sender can use, so
        // that the next new intake key does not take an id that a moved-aside generation
        // (and so `salvage`) may still use.
        let mut gaps = sled::Batch::default();
        let mut gapped = false;
        let last = names.keys().next_back().copied();
        for id in 0..last.map_or(0, |l| l + 1) {
            if let std::collections::btree_map::Entry::Vacant(e) = names.entry(id) {
                let name = format!("\u{0}lost-lane-{id}");
                gaps.insert(&record::lane_key(id), record::encode_value(&name));
                e.insert(name);
                gapped = true;
            }
        }
        if gapped {
            meta.db.apply_batch(gaps)?;
            meta.db.flush()?;
            meta.sync_data_file()?;
        }
        for (id, intake_key) in names {
            if id as usize != lanes.len() {
                return Err(storage(format!(
                    "lane {id} found where lane {} was expected",
                    lanes.len()
                )));
            }
            let mut lane = LaneState {
                intake_key: intake_key.clone(),
                next_seq: 0,
                events: 0,
                bytes: 0,
            };
            for g in gens.values() {
                if let Some(c) = g.lanes.get(&id) {
                    lane.events += c.events;
                    lane.bytes += c.bytes;
                    lane.next_seq = lane.next_seq.max(c.end_seq);
                }
            }
            by_key.insert(intake_key, id);
            lanes.push(lane);
        }
        // Dead letters are few (events refused for good); counting them once at open is cheap.
        let dead_letters = meta.db.scan_prefix([record::DEAD_PREFIX]).count() as u64;
        let checkpoints_used = super::checkpoints::used(meta)?;
        let checkpoints = if checkpoints_used {
            super::checkpoints::load(&gens, active)?
        } else {
            HashMap::new()
        };
        Ok(WriterState {
            lanes,
            by_key,
            gens,
            active,
            next_dead_seq,
            dead_letters,
            cache_bytes,
            checkpoints_used,
            checkpoints,
        })
    }
}
