//! Loading the writer's state at open: the lane map, the active generation, the summaries of
//! sealed ones; and creating a generation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{storage, GenCount, GenState, LaneState, WriterState};
use crate::queue::generation::{self, GenDb, GenSummary, Generation};
use crate::queue::record::{self, LaneRecord};
use crate::queue::QueueError;

/// Counts of one generation read from the generation itself.
pub(super) struct Loaded {
    pub lanes: HashMap<u32, GenCount>,
    pub names: Vec<(u32, String)>,
}

/// Reads a generation's lane records (counters and intake keys) and, for each lane, where its
/// last chunk is. O(lanes), not O(events).
pub(super) fn load_generation(db: &sled::Db, dir: &Path) -> Result<Loaded, QueueError> {
    check_gen_format(db, dir)?;
    let mut lanes = HashMap::new();
    let mut names = Vec::new();
    for item in db.scan_prefix([record::LANE_PREFIX]) {
        let (key, value) = item?;
        let id = record::parse_lane_key(&key).map_err(storage)?;
        let rec: LaneRecord = record::decode_value(&value).map_err(storage)?;
        let end_seq = match db
            .range(record::chunk_key(id, 0)..=record::chunk_key(id, u64::MAX))
            .next_back()
        {
            Some(item) => record::parse_chunk_key(&item?.0).map_err(storage)?.1 + 1,
            None => 0,
        };
        lanes.insert(
            id,
            GenCount {
                events: rec.events,
                bytes: rec.bytes,
                end_seq,
            },
        );
        names.push((id, rec.intake_key));
    }
    Ok(Loaded { lanes, names })
}

fn check_gen_format(db: &sled::Db, dir: &Path) -> Result<(), QueueError> {
    crate::queue::check_format(db, dir, record::FORMAT_VERSION)
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

impl WriterState {
    /// Loads lanes and counters: the meta database, the active (newest) generation, and the
    /// summaries of sealed ones. A sealed generation without a summary is opened once to count
    /// it. Creates the first generation of a new queue.
    pub fn load(
        root: &Path,
        meta: &GenDb,
        gen_ids: &[u64],
        cache_bytes: u64,
    ) -> Result<WriterState, QueueError> {
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

        let mut gen_ids = gen_ids.to_vec();
        let mut first = None;
        if gen_ids.is_empty() {
            gen_ids.push(1);
            let handle = Arc::new(Generation::new(root, 1, cache_bytes));
            generation::create_generation(root, &handle, record::FORMAT_VERSION)?;
            first = Some(handle);
        }
        let active = *gen_ids.last().unwrap_or(&1);
        let mut gens = BTreeMap::new();
        let mut found_names = Vec::new();
        for id in gen_ids {
            let handle = match first.take() {
                Some(handle) => handle,
                None => Arc::new(Generation::new(root, id, cache_bytes)),
            };
            let summary = summaries.remove(&id).filter(|_| id != active);
            let (lanes, exact) = match summary {
                Some(summary) => {
                    let lanes = summary
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
                        .collect();
                    (lanes, false)
                }
                None => {
                    let db = handle.db()?.ok_or_else(|| storage("generation deleted"))?;
                    let loaded = load_generation(&db.db, &handle.dir)?;
                    import_dead_letters(&db, meta, &mut next_dead_seq)?;
                    found_names.extend(loaded.names);
                    drop(db);
                    if id != active {
                        drop(handle.close_if_idle(Duration::ZERO));
                    }
                    (loaded.lanes, true)
                }
            };
            let mut state = GenState::new(handle, lanes, exact);
            if id == active {
                // What it holds counts as appended, so that it is sealed on time, and rotated
                // away once delivered (which gives its space back).
                state.appended = state.lanes.values().map(|c| c.bytes).sum();
            }
            gens.insert(id, state);
        }

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
        Ok(WriterState {
            lanes,
            by_key,
            gens,
            active,
            next_dead_seq,
            dead_letters,
            cache_bytes,
        })
    }
}
