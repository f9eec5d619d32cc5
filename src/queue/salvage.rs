//! `salvage`: reads what it still can from moved-aside generations (`gen-….corrupt`) back into
//! the queue, on a stopped forwarder.
//!
//! A moved-aside generation is one that sled could not open or read. sled reads a database a
//! leaf at a time, so damage usually costs the chunks of some leaves, not all: salvage walks the
//! chunk keys one at a time, each step under [`generation::guard`], and when a step fails it
//! skips one sequence number and tries again, so that what surrounds a damaged leaf is still
//! read. Each chunk read is appended to the queue again (as new events of its intake key, at
//! the end of its lane), then the directory is renamed `gen-….salvaged` (kept: only the
//! operator deletes it). sled is opened on a copy of the files, because its recovery at open
//! may rewrite the log: the moved-aside files stay as they were found.
//!
//! A moved-aside meta database (`meta.corrupt`) is salvaged the same way for its dead letters,
//! which go to the new meta database; the lane map and summaries it held were rebuilt when the
//! queue opened.
//!
//! Damage that stops sled from opening the database at all (sled panics or reports a corrupt
//! log during its recovery) leaves salvage nothing to read through sled; it then says so, and
//! the directory stays `.corrupt` for forensic tools.

use std::path::{Path, PathBuf};

use super::delivered;
use super::generation::{self, CorruptNote};
use super::record::{self, Chunk, DeadLetter};
use super::QueueError;

/// After this many failed steps in a row in one lane, salvage goes on with the next lane: the
/// rest of the lane is likely under a damaged inner node.
const LANE_SKIP: u64 = 4096;
/// After this many lanes skipped in a row without a chunk read, salvage stops.
const MAX_EMPTY_LANES: u32 = 64;

/// What salvaging one moved-aside generation gave.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    pub dir: PathBuf,
    /// Whether sled could open the database at all.
    pub opened: bool,
    /// Chunks and events read and put back into the queue.
    pub chunks: u64,
    pub events: u64,
    /// Reads that failed (damaged leaves, undecodable chunks).
    pub failed_reads: u64,
    /// Events the generation was known to hold that were not recovered (`None`: unknown).
    pub lost_events: Option<u64>,
}

/// The moved-aside meta databases under `root` (`meta.corrupt`, ...).
pub fn meta_candidates(root: &Path) -> Result<Vec<CorruptNote>, QueueError> {
    let listing = generation::list_root_read_only(root)?;
    Ok(listing
        .corrupt
        .into_iter()
        .filter(|n| n.generation.is_none())
        .filter(|n| {
            let name = n.dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(generation::META_DIR)
        })
        .collect())
}

/// Reads every dead letter still readable in a moved-aside meta database, handing each to
/// `sink`, then calls `done` (see [`salvage_generation`]). (`Outcome::events` counts dead
/// letters.) Renames the directory `.salvaged` if sled could open it and `done` succeeded.
pub fn salvage_dead_letters(
    note: &CorruptNote,
    sink: &mut dyn FnMut(DeadLetter) -> Result<(), QueueError>,
    done: &mut dyn FnMut() -> Result<(), QueueError>,
) -> Result<Outcome, QueueError> {
    salvage_dir(note, &mut |db, outcome| {
        let walked = walk_dead_letters(db, outcome, sink);
        walked.and(done())
    })
}

/// The moved-aside generations under `root` (all, or generation `only`).
pub fn candidates(root: &Path, only: Option<u64>) -> Result<Vec<CorruptNote>, QueueError> {
    let listing = generation::list_root_read_only(root)?;
    Ok(listing
        .corrupt
        .into_iter()
        .filter(|n| n.generation.is_some())
        .filter(|n| only.is_none() || n.generation == only)
        .collect())
}

/// Reads every chunk still readable in the moved-aside generation `note.dir`, handing each to
/// `sink` (which puts it back into the queue), and `progress` the number of chunks read so far
/// from time to time. Then calls `done`, also after a walk that failed: the caller makes
/// durable what its sink still holds. Renames the directory `.salvaged` only if sled could open
/// it and both succeeded: a directory is never marked salvaged before what was read from it is
/// in the queue.
pub fn salvage_generation(
    note: &CorruptNote,
    sink: &mut dyn FnMut(Chunk) -> Result<(), QueueError>,
    progress: &mut dyn FnMut(&Outcome),
    done: &mut dyn FnMut() -> Result<(), QueueError>,
) -> Result<Outcome, QueueError> {
    salvage_dir(note, &mut |db, outcome| {
        let walked = walk_chunks(db, outcome, sink, progress);
        walked.and(done())
    })
}

type Walk<'a> = dyn FnMut(&sled::Db, &mut Outcome) -> Result<(), QueueError> + 'a;

/// Opens a copy of a moved-aside database, walks it, and renames it `.salvaged` if it opened.
fn salvage_dir(note: &CorruptNote, walk: &mut Walk<'_>) -> Result<Outcome, QueueError> {
    let mut outcome = Outcome {
        dir: note.dir.clone(),
        ..Outcome::default()
    };
    let copy = copy_for_reading(&note.dir)?;
    let opened = generation::guard("opening a moved-aside generation", || {
        generation::open_sled(&copy, 64 * 1024 * 1024)
    });
    let result = match opened {
        Ok(db) => {
            outcome.opened = true;
            let walked = walk(&db, &mut outcome);
            let _ = generation::guard("closing a moved-aside generation", || {
                drop(db);
                Ok(())
            });
            walked
        }
        Err(e) => {
            tracing::warn!(dir = %note.dir.display(), error = %e, "sled cannot open this generation: nothing can be read from it through sled");
            Ok(())
        }
    };
    let _ = std::fs::remove_dir_all(&copy);
    result?;
    outcome.lost_events = note.events.map(|n| n.saturating_sub(outcome.events));
    if outcome.opened {
        let name = note.dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let base = name.split('.').next().unwrap_or(name);
        let done = note
            .dir
            .with_file_name(format!("{base}{}", generation::SALVAGED_SUFFIX));
        if !done.exists() {
            std::fs::rename(&note.dir, &done)?;
            if let Some(root) = done.parent() {
                generation::sync_dir(root)?;
            }
            outcome.dir = done;
        }
    }
    Ok(outcome)
}

/// Walks the chunk keys one at a time, skipping what fails, and what the lane records that
/// can still be read mark delivered.
fn walk_chunks(
    db: &sled::Db,
    outcome: &mut Outcome,
    sink: &mut dyn FnMut(Chunk) -> Result<(), QueueError>,
    progress: &mut dyn FnMut(&Outcome),
) -> Result<(), QueueError> {
    // Delivered chunks stay stored until their generation is deleted: a lane whose record is
    // readable has its delivered chunks skipped; one whose record is not has them put back
    // too, and delivered again (a duplicate, never a loss).
    let marks = generation::guard("reading a moved-aside generation's lane records", || {
        delivered::lane_watermarks(db)
    })
    .unwrap_or_default();
    let end = [record::CHUNK_PREFIX + 1];
    let mut cursor = record::chunk_key(0, 0).to_vec();
    let mut failed_in_a_row = 0u64;
    let mut empty_lanes = 0u32;
    loop {
        let step = first_at_or_after(db, &cursor, &end, "reading a moved-aside generation");
        match step {
            Ok(None) => return Ok(()),
            Ok(Some((key, value))) => {
                failed_in_a_row = 0;
                empty_lanes = 0;
                cursor = key.to_vec();
                cursor.push(0); // the next key after this one
                let (lane, seq) = position(&key);
                match marks.get(&lane) {
                    Some(m) if seq < m.acked_below => {
                        cursor = record::chunk_key(lane, m.acked_below).to_vec();
                        continue;
                    }
                    Some(m) if m.is_acked(seq) => continue,
                    _ => {}
                }
                match Chunk::decode(&value) {
                    Ok(chunk) => {
                        outcome.chunks += 1;
                        outcome.events += chunk.events.len() as u64;
                        sink(chunk)?;
                        if outcome.chunks % 256 == 0 {
                            progress(outcome);
                        }
                    }
                    Err(_) => outcome.failed_reads += 1,
                }
            }
            Err(e) if e.is_corrupt() => {
                outcome.failed_reads += 1;
                failed_in_a_row += 1;
                let (lane, seq) = position(&cursor);
                if failed_in_a_row >= LANE_SKIP {
                    failed_in_a_row = 0;
                    empty_lanes += 1;
                    if empty_lanes >= MAX_EMPTY_LANES || lane == u32::MAX {
                        return Ok(());
                    }
                    cursor = record::chunk_key(lane + 1, 0).to_vec();
                } else {
                    cursor = record::chunk_key(lane, seq.saturating_add(1)).to_vec();
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The first entry at or after `from` and before `end`, read under the panic guard: one entry
/// at a time, so that damage costs only the entries it hides.
fn first_at_or_after(
    db: &sled::Db,
    from: &[u8],
    end: &[u8],
    what: &str,
) -> Result<Option<(sled::IVec, sled::IVec)>, QueueError> {
    generation::guard(what, || match db.range(from..end).next() {
        None => Ok(None),
        Some(item) => Ok(Some(item?)),
    })
}

/// Walks the dead letters one at a time, skipping what fails.
fn walk_dead_letters(
    db: &sled::Db,
    outcome: &mut Outcome,
    sink: &mut dyn FnMut(DeadLetter) -> Result<(), QueueError>,
) -> Result<(), QueueError> {
    let end = [record::DEAD_PREFIX + 1];
    let mut seq = 0u64;
    let mut failed_in_a_row = 0u64;
    loop {
        let from = record::dead_key(seq);
        let step = first_at_or_after(db, &from, &end, "reading a moved-aside meta database");
        match step {
            Ok(None) => return Ok(()),
            Ok(Some((key, value))) => {
                failed_in_a_row = 0;
                seq = record::parse_dead_key(&key).map_or(seq, |s| s) + 1;
                match record::decode_value::<DeadLetter>(&value) {
                    Ok(dead) => {
                        outcome.chunks += 1;
                        outcome.events += 1;
                        sink(dead)?;
                    }
                    Err(_) => outcome.failed_reads += 1,
                }
            }
            Err(e) if e.is_corrupt() => {
                outcome.failed_reads += 1;
                failed_in_a_row += 1;
                if failed_in_a_row >= LANE_SKIP || seq == u64::MAX {
                    return Ok(());
                }
                seq += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The lane and sequence number a cursor points at (a chunk key, possibly with a trailing 0).
fn position(cursor: &[u8]) -> (u32, u64) {
    let key = cursor.get(..13).unwrap_or(cursor);
    record::parse_chunk_key(key).unwrap_or((0, 0))
}

/// Copies sled's files of `dir` to `<dir>.salvage-copy`, where sled may change them.
fn copy_for_reading(dir: &Path) -> Result<PathBuf, QueueError> {
    let copy = dir.with_extension("salvage-copy");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(copy.join("blobs"))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str() == Some(generation::NOTE_FILE) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            for blob in std::fs::read_dir(entry.path())? {
                let blob = blob?;
                std::fs::copy(blob.path(), copy.join(&name).join(blob.file_name()))?;
            }
        } else {
            std::fs::copy(entry.path(), copy.join(&name))?;
        }
    }
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Salvages the generation of `note`; the `received_at_ms` of each chunk handed over.
    fn salvage_received_at(note: &CorruptNote) -> (Vec<u64>, Outcome) {
        let mut seen = Vec::new();
        let outcome = salvage_generation(
            note,
            &mut |c| {
                seen.push(c.received_at_ms);
                Ok(())
            },
            &mut |_| {},
            &mut || Ok(()),
        )
        .unwrap();
        (seen, outcome)
    }

    fn chunk(i: u64) -> Chunk {
        Chunk {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: i,
            events: vec![format!("event-{i:06} {}", "y".repeat(4000))],
        }
    }

    /// A database of 3,000 chunks of one event, written, closed, opened once more (sled then
    /// writes a snapshot, so that a later open reads leaves lazily), then damaged: every copy
    /// of chunk 1,500's text in the file is overwritten with a fixed pattern. (A fixed offset
    /// hits a live leaf only sometimes: where sled puts a page varies with its I/O threads.)
    /// sled opens it, but the leaf that holds chunk 1,500 fails its checksum; salvage reads
    /// around it.
    #[test]
    fn salvage_reads_around_a_damaged_leaf() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("gen-00000000000000000001.corrupt");
        {
            let db = generation::open_sled(&dir, 1 << 22).unwrap();
            for i in 0..3000u64 {
                db.insert(record::chunk_key(0, i), chunk(i).encode_plain())
                    .unwrap();
                if i % 100 == 0 {
                    db.flush().unwrap();
                }
            }
            db.flush().unwrap();
        }
        drop(generation::open_sled(&dir, 1 << 22).unwrap());
        let mut bytes = std::fs::read(dir.join("db")).unwrap();
        let marker = b"event-001500 ";
        let mut hits = 0;
        for at in 0..bytes.len() - marker.len() {
            if &bytes[at..at + marker.len()] == marker {
                bytes[at..at + 64].fill(0xA5);
                hits += 1;
            }
        }
        assert!(hits > 0);
        std::fs::write(dir.join("db"), bytes).unwrap();

        let note = CorruptNote {
            generation: Some(1),
            dir: dir.clone(),
            events: Some(3000),
            ..CorruptNote::default()
        };
        let (seen, outcome) = salvage_received_at(&note);
        assert!(outcome.opened);
        assert!(outcome.failed_reads > 0, "{outcome:?}");
        assert!(
            outcome.events > 2000 && outcome.events < 3000,
            "{outcome:?}"
        );
        assert_eq!(outcome.lost_events, Some(3000 - outcome.events));
        // What was read is what was written, each once, in order, around the damaged leaf.
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert!(!seen.contains(&1500));
        assert!(
            seen.contains(&1499) || seen.contains(&1480),
            "read before the damage"
        );
        assert!(seen.iter().any(|&i| i > 1520), "read past the damage");
        assert!(outcome.dir.to_str().unwrap().ends_with(".salvaged"));
        assert!(!dir.exists());
    }

    /// Delivered chunks stay in a generation until it is deleted whole: salvage must not put
    /// them back when the lane record that marks them can be read.
    #[test]
    fn delivered_chunks_are_not_salvaged() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("gen-00000000000000000003.corrupt");
        {
            let db = generation::open_sled(&dir, 1 << 22).unwrap();
            for lane in 0..2 {
                for i in 0..10u64 {
                    db.insert(record::chunk_key(lane, i), chunk(i).encode_plain())
                        .unwrap();
                }
            }
            let rec = record::LaneRecord {
                intake_key: "K".into(),
                events: 4,
                bytes: 0,
                watermark: record::Watermark {
                    acked_below: 5,
                    acked: vec![7, 8],
                },
                end_seq: Some(10),
            };
            db.insert(record::lane_key(0), rec.encode()).unwrap();
            // Lane 1's record cannot be read: its chunks all go back (duplicates, not loss).
            db.insert(record::lane_key(1), &[record::LANE_V2, 0xFF][..])
                .unwrap();
            db.flush().unwrap();
        }
        let note = CorruptNote {
            generation: Some(3),
            dir: dir.clone(),
            events: Some(13),
            ..CorruptNote::default()
        };
        let (seen, outcome) = salvage_received_at(&note);
        let mut want = vec![5, 6, 9];
        want.extend(0..10);
        assert_eq!(seen, want);
        assert_eq!(outcome.lost_events, Some(0));
    }

    /// What was read is put into the queue by `done` (the last batch): if that fails, the
    /// directory is not marked salvaged, so a later `salvage` reads it again.
    #[test]
    fn a_generation_is_marked_salvaged_only_once_its_events_are_queued() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("gen-00000000000000000002.corrupt");
        {
            let db = generation::open_sled(&dir, 1 << 22).unwrap();
            for i in 0..10u64 {
                db.insert(record::chunk_key(0, i), chunk(i).encode_plain())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let note = CorruptNote {
            generation: Some(2),
            dir: dir.clone(),
            events: Some(10),
            ..CorruptNote::default()
        };
        let failed = salvage_generation(&note, &mut |_| Ok(()), &mut |_| {}, &mut || {
            Err(QueueError::Full)
        });
        assert!(matches!(failed, Err(QueueError::Full)), "{failed:?}");
        assert!(dir.exists(), "kept as .corrupt for the next salvage");
        let outcome =
            salvage_generation(&note, &mut |_| Ok(()), &mut |_| {}, &mut || Ok(())).unwrap();
        assert_eq!(outcome.events, 10);
        assert!(!dir.exists());
        assert!(outcome.dir.to_str().unwrap().ends_with(".salvaged"));
    }
}
