//! What "delivered" means in a generation's database, for everything that reads or counts its
//! chunks: a chunk is delivered if its lane record's [`Watermark`] marks it, or if it is absent
//! (generations of older releases, and chunks past [`record::MAX_ACKED`], are removed one by
//! one). Delivered chunks stay stored until their generation is deleted whole.

use std::collections::HashMap;

use super::record::{self, LaneRecord, Watermark};
use super::QueueError;

/// The watermark of every lane record of a generation that can be read. A lane whose record
/// cannot be decoded is left out: its chunks all count as undelivered, so that at worst a
/// delivered chunk is sent again (a duplicate), never one skipped (a loss).
pub fn lane_watermarks(db: &sled::Db) -> Result<HashMap<u32, Watermark>, QueueError> {
    let mut marks = HashMap::new();
    for item in db.scan_prefix([record::LANE_PREFIX]) {
        let (key, value) = item?;
        if let (Ok(lane), Ok(rec)) = (record::parse_lane_key(&key), LaneRecord::decode(&value)) {
            marks.insert(lane, rec.watermark);
        }
    }
    Ok(marks)
}

/// The watermark of one lane's record (empty if it has none or it cannot be decoded: see
/// [`lane_watermarks`]).
pub fn lane_watermark(db: &sled::Db, lane: u32) -> Result<Watermark, QueueError> {
    Ok(db
        .get(record::lane_key(lane))?
        .and_then(|v| LaneRecord::decode(&v).ok())
        .map(|rec| rec.watermark)
        .unwrap_or_default())
}

/// The first chunk stored at or after `lane`/`seq` (by key) and not delivered, with its key's
/// lane and sequence number. Skips a lane's chunks below its `acked_below` with one seek.
pub fn next_undelivered(
    db: &sled::Db,
    marks: &HashMap<u32, Watermark>,
    lane: u32,
    seq: u64,
) -> Result<Option<(u32, u64, sled::IVec)>, QueueError> {
    let end = [record::CHUNK_PREFIX + 1];
    let mut from = record::chunk_key(lane, seq).to_vec();
    loop {
        let Some(item) = db.range(from.as_slice()..&end[..]).next() else {
            return Ok(None);
        };
        let (key, value) = item?;
        let (lane, seq) =
            record::parse_chunk_key(&key).map_err(|e| QueueError::Storage(e.to_string()))?;
        match marks.get(&lane) {
            Some(m) if seq < m.acked_below => {
                from = record::chunk_key(lane, m.acked_below).to_vec()
            }
            Some(m) if m.is_acked(seq) => {
                from = key.to_vec();
                from.push(0); // the next key after this one
            }
            _ => return Ok(Some((lane, seq, value))),
        }
    }
}

/// Whether the generation holds a chunk not delivered.
pub fn holds_undelivered(db: &sled::Db) -> Result<bool, QueueError> {
    let marks = lane_watermarks(db)?;
    Ok(next_undelivered(db, &marks, 0, 0)?.is_some())
}

/// Calls `each` with every undelivered chunk of the generation, in key order.
pub fn for_each_undelivered(
    db: &sled::Db,
    each: &mut dyn FnMut(u32, u64, &[u8]),
) -> Result<(), QueueError> {
    let marks = lane_watermarks(db)?;
    let (mut lane, mut seq) = (0, 0);
    while let Some((l, s, value)) = next_undelivered(db, &marks, lane, seq)? {
        each(l, s, &value);
        (lane, seq) = match s.checked_add(1) {
            Some(next) => (l, next),
            None => match l.checked_add(1) {
                Some(next) => (next, 0),
                None => return Ok(()),
            },
        };
    }
    Ok(())
}
