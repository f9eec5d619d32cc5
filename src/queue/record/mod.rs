//! What the queue stores, byte for byte, and how a later release reads it.
//!
//! The queue directory holds a meta database and one database per generation
//! ([`super::generation`]). In a generation everything lives in one sled tree, so that one
//! `apply_batch` can change any part of it atomically (a chunk removed and its lane's counters
//! updated). Keys are prefixed by kind:
//!
//! | key | value |
//! | --- | --- |
//! | `M` `format` | format version of this database (u32 big-endian) |
//! | `L` lane id (u32 BE) | [`LaneRecord`]: the intake key, the lane's counters and [`Watermark`] in this generation |
//! | `E` lane id (u32 BE) seq (u64 BE) | a chunk: [`ChunkHeader`] then [`Chunk`] (see below) |
//! | `C` name | a source's checkpoint (`queue/checkpoint.rs`): [`VALUE_V1`] then the source's bytes, or [`CHECKPOINT_FORGOTTEN`] alone |
//! | `M` `checkpoints` | present once this generation holds every checkpoint of the older ones (carried at its start) |
//!
//! The meta database holds `M format` ([`super::LAYOUT_VERSION`]), `L` lane id -> the intake
//! key (a string), `D` seq (u64 BE) -> a [`DeadLetter`], `G` generation id (u64 BE) -> the
//! generation's summary, and `M` `checkpoints` once any checkpoint was ever written (so that a
//! queue that never had one is never searched for them). (A queue of the first layout kept `D` keys in its one database; they
//! are moved to the meta database at open.)
//!
//! Big-endian ids make sled's byte order the queue order. Every value starts with a version
//! byte; bodies are bincode 2 (standard configuration) of serde types. A release that changes a
//! body adds a new version and keeps decoding the old ones.
//!
//! A chunk value starts with a 9-byte header, the same in every version: the version byte, the
//! event count and the payload bytes (u32 LE each), so that counters are kept without decoding
//! the body. The body depends on the version:
//!
//! | version | body after the header |
//! | --- | --- |
//! | 1 ([`VALUE_V1`]) | bincode of [`Chunk`] |
//! | 2 ([`CHUNK_V2`]) | the v1 body's length (u32 LE), then the v1 body as one lz4 block |
//! | 3 ([`CHUNK_V3`]) | the v1 body's length (u32 LE), then the v1 body as one zstd frame (level 1, content size in its header) |
//!
//! This release reads all three. It writes v3 (or v2 with `chunk_compression = "lz4"`) whenever that makes the value at least an eighth
//! smaller, and v1 otherwise (events that do not compress; while chunks keep not compressing,
//! the queue only tries one in 16: `queue/compression.rs`), and for a body over
//! [`MAX_CHUNK_BODY_BYTES`], which chunks never reach with the default limits. Why v2: disk is
//! what a backlog costs, the target is at most 1.5x the payload while queued, and sled writes
//! each value about three times over its life (its log, leaf consolidations and splits), so every
//! byte saved in a value is saved several times in flash wear. Log lines repeat much from one event of a chunk to the next
//! (host, program, field names, user agents): on 200-byte access-log lines with random ids, v2
//! takes about half the bytes of v1, for about half a microsecond of CPU per event (compress
//! and decompress).
//!
//! The v2 length field and block are `lz4_flex`'s size-prepended block format. Stored bytes
//! can be corrupt, so decoding never trusts a length: a v2 length that its block cannot hold is
//! refused ([`DecodeError::CompressedSize`]) before anything is allocated, a v3 length must be
//! within what the header's events can take and agree with the frame's own content size
//! ([`DecodeError::BodySize`], [`DecodeError::ZstdLength`]), and bincode decodes
//! with a limit (`DECODE_LIMIT`) so that a corrupt string length is an error, not an
//! allocation of that size. A release before v2 (v3) cannot read v2 (v3) chunks (it reports
//! [`DecodeError::UnknownVersion`]): going back to one needs an empty queue. Dead letters stay
//! v1.
//!
//! A lane record is versioned the same way:
//!
//! | version | body |
//! | --- | --- |
//! | 1 ([`VALUE_V1`]) | bincode of the intake key, events, bytes |
//! | 2 ([`LANE_V2`]) | the same, then the [`Watermark`]: `acked_below` (u64), `acked` (a sequence of u64) |
//! | 3 ([`LANE_V3`]) | the same, then `end_seq` (u64): the lane's next sequence number in the generation as the record counts it |
//!
//! Delivered chunks are not removed from the store but marked in the watermark (removing each
//! one cost about a quarter of all the bytes written, `queue/writer/ack.rs`); an absent chunk is
//! delivered too, which is all a v1 record says (it decodes with an empty watermark).
//!
//! Why v3: a commit of appends alone is applied to sled key by key, chunks first and lane
//! records last, not as one batch (a batch costs sled a second write and hand-off to its I/O
//! threads per commit: `queue/writer/durable.rs`). A crash before its fsync can then leave some
//! of its chunks without the lane record that counts them (sled recovers a prefix of its log).
//! None of them was acknowledged, but they are in the store, and delivery would read them: the
//! lane's counters must include them, and its next sequence number must pass them, or the
//! generation could be deleted with events in it, or a new chunk could take the place of one
//! already marked delivered. `end_seq` says where the record's count ends; at open, chunks at
//! or past it are counted in (`queue/writer/load.rs`). v1 and v2 records were written in one
//! batch with their chunks, so they count every chunk stored.
//!
//! This release reads all three and writes v3. A generation is marked format 4
//! ([`FORMAT_VERSION`]) when created, and one of an older format when this release opens it
//! (before any v3 record can be written in it), so that a release before v3 lane records
//! refuses it ("newer format"). Going back needs an empty queue.

use serde::{Deserialize, Serialize};

mod chunk;
pub use chunk::{is_compressed, salvage, Chunk, ChunkHeader, ChunkView};

/// Version of a generation's layout, stored under its `M format`: 2 since chunks may be v2,
/// 3 since lane records may be v2, 4 since they may be v3 (a generation marked 1 holds only v1
/// chunks and lane records; all are read).
pub const FORMAT_VERSION: u32 = 4;
/// Version byte of lane records before v2, dead letters and of the chunks written before v2.
pub const VALUE_V1: u8 = 1;
/// Version byte of chunks whose v1 body is lz4-compressed (`chunk_compression = "lz4"`).
pub const CHUNK_V2: u8 = 2;
/// Version byte of chunks whose v1 body is zstd-compressed (`chunk_compression = "zstd"`, the
/// default).
pub const CHUNK_V3: u8 = 3;
/// zstd's level for chunks: 1 compresses 200-byte log lines to ~0.31 of their size at ~330 MB/s
/// here (3: the same size, 30 % slower; lz4: ~0.50 at ~670 MB/s).
const ZSTD_LEVEL: i32 = 1;
/// Version byte of the lane records of format 3: v1's fields, then a [`Watermark`].
pub const LANE_V2: u8 = 2;
/// Version byte of the lane records written by this release: v2's fields, then `end_seq`.
pub const LANE_V3: u8 = 3;

pub const META_FORMAT_KEY: &[u8] = b"Mformat";
pub const LANE_PREFIX: u8 = b'L';
pub const CHUNK_PREFIX: u8 = b'E';
pub const DEAD_PREFIX: u8 = b'D';
pub const CHECKPOINT_PREFIX: u8 = b'C';
/// In a generation: it holds every checkpoint of the older ones. In the meta database: some
/// checkpoint was written once.
pub const CHECKPOINTS_KEY: &[u8] = b"Mcheckpoints";
/// The value of a checkpoint its source let go of (a file deleted): it hides the checkpoint in
/// older generations.
pub const CHECKPOINT_FORGOTTEN: u8 = 0;

/// Size of the fixed chunk header: version, event count, payload bytes.
pub const CHUNK_HEADER_LEN: usize = 1 + 4 + 4;

/// Largest chunk body (bincode, before compression) stored as v2, and the largest size a v2
/// value may claim. Chunks hold `queue.chunk_bytes` (at most 64 KiB) of payload, or one event
/// (at most 250,000 bytes), so real bodies are far below it.
pub const MAX_CHUNK_BODY_BYTES: usize = 64 << 20;
/// Size of the uncompressed-size field that starts a v2 or v3 body.
const SIZE_FIELD_LEN: usize = 4;
/// An lz4 block cannot expand more than 255:1 (one byte of a match length adds at most 255
/// bytes); the slack covers the small blocks.
const LZ4_MAX_RATIO: usize = 255;
const LZ4_SLACK: usize = 64;
/// What bincode may claim while decoding one value (it counts 8 bytes per integer, plus the
/// bytes of each string): bounds the allocation a corrupt length prefix could ask for.
const DECODE_LIMIT: usize = 1 << 30;

/// Why stored bytes cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("value is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("unknown value version {0} (written by a newer release?)")]
    UnknownVersion(u8),
    #[error("bincode: {0}")]
    Body(#[from] bincode::error::DecodeError),
    #[error("bad key {0:?}")]
    Key(Vec<u8>),
    #[error(
        "compressed chunk claims {claimed} bytes once decompressed, more than its \
         {compressed}-byte lz4 block can hold (at most {limit}): corrupt"
    )]
    CompressedSize {
        claimed: usize,
        compressed: usize,
        limit: usize,
    },
    #[error("compressed chunk: lz4: {0}")]
    Lz4(#[from] lz4_flex::block::DecompressError),
    #[error("compressed chunk decompressed to {actual} bytes, its size field says {claimed}")]
    Lz4Length { claimed: usize, actual: usize },
    #[error(
        "compressed chunk claims {claimed} bytes once decompressed, more than its header's \
         events can take (at most {limit}): corrupt"
    )]
    BodySize { claimed: usize, limit: usize },
    #[error("compressed chunk: zstd: {0}")]
    Zstd(std::io::Error),
    #[error("compressed chunk decompressed to {actual} bytes, its size field says {claimed}")]
    ZstdLength { claimed: usize, actual: usize },
}

/// How a chunk's body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// v2.
    Lz4,
    /// v3.
    Zstd,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The configuration of [`config`] (same bytes) with a bound on what decoding may allocate.
fn decode_config() -> impl bincode::config::Config {
    config().with_limit::<DECODE_LIMIT>()
}

/// A lane's share of one generation: its intake key, its counters there, and which of its
/// chunks there are delivered ([`Watermark`]).
///
/// Stored as v3 ([`LANE_V3`]); a v1 record (the releases before, without a watermark) decodes
/// with an empty watermark, which means what v1 meant: the chunks present are not delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaneRecord {
    pub intake_key: String,
    /// Events queued in this lane.
    pub events: u64,
    /// Payload bytes queued in this lane.
    pub bytes: u64,
    pub watermark: Watermark,
    /// The lane's next sequence number in the generation when the record was written: its
    /// counters cover the chunks below it. Chunks at or past it are of an append commit that a
    /// crash cut short. `None` in v1 and v2 records, written in one batch with their chunks:
    /// they cover every chunk stored.
    pub end_seq: Option<u64>,
}

/// Which chunks of a lane in one generation are delivered, although still stored: removing
/// each delivered chunk from sled cost about half of all the bytes written (sled rewrites
/// whole leaves on consolidation, splits and merges), and a generation is deleted whole once
/// empty anyway.
///
/// A chunk is delivered if its sequence number is below `acked_below`, or in `acked`, or if it
/// is absent (delivered chunks were removed one by one before; and still are, past
/// [`MAX_ACKED`]). Both rules hold together everywhere a chunk is read or counted.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Watermark {
    /// Every chunk of the lane in this generation below it is delivered. Starts at the lane's
    /// first sequence number in the generation, so that `acked` compacts.
    pub acked_below: u64,
    /// Delivered chunks at or above `acked_below`, sorted, without duplicates: delivery has
    /// several batches in flight, which finish out of order.
    pub acked: Vec<u64>,
}

/// Most sequence numbers a [`Watermark`] keeps in `acked`: the lane record is rewritten at
/// every commit that touches the lane, so it must stay small. Past it, delivered chunks are
/// removed from the store instead (absent means delivered). Reached only if one chunk stays
/// undelivered while a thousand after it are (a batch retried while others succeed).
pub const MAX_ACKED: usize = 1024;

impl Watermark {
    /// Starts at `first`: the lane's first sequence number in the generation.
    pub fn starting_at(first: u64) -> Watermark {
        Watermark {
            acked_below: first,
            acked: Vec::new(),
        }
    }

    /// Whether chunk `seq` is marked delivered (an absent chunk is delivered too).
    pub fn is_acked(&self, seq: u64) -> bool {
        seq < self.acked_below || self.acked.binary_search(&seq).is_ok()
    }

    /// Marks `seq` delivered.
    pub fn add(&mut self, seq: u64) {
        if seq < self.acked_below {
            return;
        }
        if let Err(at) = self.acked.binary_search(&seq) {
            self.acked.insert(at, seq);
        }
    }

    /// Moves `acked_below` over the delivered chunks that follow it: those in `acked`, and
    /// those absent. `next_present(seq)` is the first chunk at or after `seq` that the store
    /// holds, if any. It never goes past `end` (the lane's next sequence number in the
    /// generation, as committed): an absent chunk at or past it is one not yet appended.
    pub fn advance(
        &mut self,
        end: u64,
        next_present: &mut dyn FnMut(u64) -> Result<Option<u64>, sled::Error>,
    ) -> Result<(), sled::Error> {
        while self.acked_below < end {
            // The run of marked numbers from `acked_below` on, taken out at once.
            let run = self
                .acked
                .iter()
                .zip(self.acked_below..)
                .take_while(|(seq, want)| **seq == *want && *want < end)
                .count();
            if run > 0 {
                self.acked.drain(..run);
                self.acked_below += run as u64;
                continue;
            }
            let present = next_present(self.acked_below)?.unwrap_or(end).min(end);
            if present <= self.acked_below {
                break;
            }
            self.acked_below = present;
            let below = self.acked_below;
            self.acked.retain(|s| *s >= below);
        }
        Ok(())
    }

    /// Takes out of `acked` what exceeds [`MAX_ACKED`] (the highest): chunks for the caller to
    /// remove from the store.
    pub fn overflow(&mut self) -> Vec<u64> {
        if self.acked.len() <= MAX_ACKED {
            return Vec::new();
        }
        self.acked.split_off(MAX_ACKED)
    }
}

/// The v1 lane record body.
#[derive(Serialize, Deserialize)]
struct LaneRecordV1 {
    intake_key: String,
    events: u64,
    bytes: u64,
}

/// The v2 lane record body: v1's fields, then the watermark.
#[derive(Deserialize)]
struct LaneRecordV2 {
    intake_key: String,
    events: u64,
    bytes: u64,
    watermark: Watermark,
}

/// The v3 lane record body: v2's fields, then where its count ends.
#[derive(Deserialize)]
struct LaneRecordV3 {
    intake_key: String,
    events: u64,
    bytes: u64,
    watermark: Watermark,
    end_seq: u64,
}

impl LaneRecord {
    /// The v3 value; a record without `end_seq` (one read from an older release) is written as
    /// v2, which means the same. The fields are borrowed, in the order of the v2 and v3 bodies
    /// (bincode writes a struct as the tuple of its fields): the writer encodes a lane record
    /// per lane at every commit.
    pub fn encode(&self) -> Vec<u8> {
        match self.end_seq {
            Some(end_seq) => versioned(
                LANE_V3,
                &(
                    &self.intake_key,
                    self.events,
                    self.bytes,
                    &self.watermark,
                    end_seq,
                ),
            ),
            None => self.encode_v2(),
        }
    }

    /// The v2 value, as format 3 wrote it.
    pub fn encode_v2(&self) -> Vec<u8> {
        versioned(
            LANE_V2,
            &(&self.intake_key, self.events, self.bytes, &self.watermark),
        )
    }

    /// The v1 value, as the releases before v2 wrote it (tests, and what a v1 record means).
    pub fn encode_v1(&self) -> Vec<u8> {
        encode_value(&LaneRecordV1 {
            intake_key: self.intake_key.clone(),
            events: self.events,
            bytes: self.bytes,
        })
    }

    /// Decodes a v1, v2 or v3 lane record.
    pub fn decode(bytes: &[u8]) -> Result<LaneRecord, DecodeError> {
        match bytes.first() {
            None => Err(DecodeError::Truncated(0)),
            Some(&VALUE_V1) => {
                let v1: LaneRecordV1 = decode_owned(&bytes[1..])?;
                Ok(LaneRecord {
                    intake_key: v1.intake_key,
                    events: v1.events,
                    bytes: v1.bytes,
                    watermark: Watermark::default(),
                    end_seq: None,
                })
            }
            Some(&LANE_V2) => {
                let v2: LaneRecordV2 = decode_owned(&bytes[1..])?;
                Ok(LaneRecord {
                    intake_key: v2.intake_key,
                    events: v2.events,
                    bytes: v2.bytes,
                    watermark: v2.watermark,
                    end_seq: None,
                })
            }
            Some(&LANE_V3) => {
                let v3: LaneRecordV3 = decode_owned(&bytes[1..])?;
                Ok(LaneRecord {
                    intake_key: v3.intake_key,
                    events: v3.events,
                    bytes: v3.bytes,
                    watermark: v3.watermark,
                    end_seq: Some(v3.end_seq),
                })
            }
            Some(&v) => Err(DecodeError::UnknownVersion(v)),
        }
    }
}

/// An event the intake refused for good (400), kept for a person to look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub intake_key: String,
    pub timestamp: Option<String>,
    pub received_at_ms: u64,
    pub event: String,
    /// HTTP status of the refusal.
    pub status: u16,
    /// What the intake answered (trimmed).
    pub reason: String,
    pub dead_at_ms: u64,
}

/// Encodes a versioned serde value (lane records, dead letters).
pub fn encode_value<T: Serialize>(value: &T) -> Vec<u8> {
    versioned(VALUE_V1, value)
}

/// `version`, then the bincode of `value`.
fn versioned<T: Serialize + ?Sized>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    out.extend_from_slice(&bincode::serde::encode_to_vec(value, config()).unwrap_or_default());
    out
}

/// Decodes a value written by [`encode_value`].
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Truncated(0)),
        Some(&VALUE_V1) => decode_owned(&bytes[1..]),
        Some(&v) => Err(DecodeError::UnknownVersion(v)),
    }
}

/// bincode of an owned value, with a limit in proportion to `body`. bincode allocates a
/// string's claimed length before reading it, so [`DECODE_LIMIT`] alone would let a corrupt
/// 6-byte value allocate a gigabyte. A valid value claims at most 8 bytes per byte it holds (an
/// integer of one varint byte counts 8; a string counts its bytes, all present), so a claim
/// beyond 8 times the body is corruption. (The limit is a type parameter, hence the steps.)
fn decode_owned<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    fn with_limit<T: serde::de::DeserializeOwned, const LIMIT: usize>(
        body: &[u8],
    ) -> Result<T, DecodeError> {
        Ok(bincode::serde::decode_from_slice(body, config().with_limit::<LIMIT>())?.0)
    }
    match body.len() {
        n if n <= 4 << 10 => with_limit::<T, { 32 << 10 }>(body),
        n if n <= 1 << 20 => with_limit::<T, { 8 << 20 }>(body),
        n if n <= 16 << 20 => with_limit::<T, { 128 << 20 }>(body),
        _ => with_limit::<T, DECODE_LIMIT>(body),
    }
}

pub fn lane_key(lane: u32) -> [u8; 5] {
    let mut k = [LANE_PREFIX; 5];
    k[1..].copy_from_slice(&lane.to_be_bytes());
    k
}

pub fn chunk_key(lane: u32, seq: u64) -> [u8; 13] {
    let mut k = [CHUNK_PREFIX; 13];
    k[1..5].copy_from_slice(&lane.to_be_bytes());
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn dead_key(seq: u64) -> [u8; 9] {
    let mut k = [DEAD_PREFIX; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn checkpoint_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(CHECKPOINT_PREFIX);
    k.extend_from_slice(name);
    k
}

/// A checkpoint's stored value: the source's bytes, or `None` for one let go of.
pub fn encode_checkpoint(state: Option<&[u8]>) -> Vec<u8> {
    match state {
        Some(bytes) => {
            let mut v = Vec::with_capacity(1 + bytes.len());
            v.push(VALUE_V1);
            v.extend_from_slice(bytes);
            v
        }
        None => vec![CHECKPOINT_FORGOTTEN],
    }
}

/// The source's bytes of a stored checkpoint (`None`: let go of).
pub fn decode_checkpoint(value: &[u8]) -> Result<Option<&[u8]>, DecodeError> {
    match value.split_first() {
        None => Err(DecodeError::Truncated(0)),
        Some((&VALUE_V1, bytes)) => Ok(Some(bytes)),
        Some((&CHECKPOINT_FORGOTTEN, [])) => Ok(None),
        Some((&v, _)) => Err(DecodeError::UnknownVersion(v)),
    }
}

/// Lane id of an `L` key.
pub fn parse_lane_key(key: &[u8]) -> Result<u32, DecodeError> {
    match key {
        [LANE_PREFIX, a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(DecodeError::Key(key.to_vec())),
    }
}

/// Lane id and sequence number of an `E` key.
pub fn parse_chunk_key(key: &[u8]) -> Result<(u32, u64), DecodeError> {
    if key.len() != 13 || key[0] != CHUNK_PREFIX {
        return Err(DecodeError::Key(key.to_vec()));
    }
    let mut lane = [0; 4];
    lane.copy_from_slice(&key[1..5]);
    let mut seq = [0; 8];
    seq.copy_from_slice(&key[5..]);
    Ok((u32::from_be_bytes(lane), u64::from_be_bytes(seq)))
}

/// Sequence number of a `D` key.
pub fn parse_dead_key(key: &[u8]) -> Result<u64, DecodeError> {
    if key.len() != 9 || key[0] != DEAD_PREFIX {
        return Err(DecodeError::Key(key.to_vec()));
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&key[1..]);
    Ok(u64::from_be_bytes(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> Chunk {
        Chunk {
            intake_key: "K".into(),
            timestamp: Some("2024-01-01T00:00:00Z".into()),
            received_at_ms: 1_700_000_000_000,
            events: vec!["a".into(), "bé".into()],
        }
    }

    /// A chunk that compresses: 100 log-like lines.
    fn big_chunk() -> Chunk {
        Chunk {
            intake_key: "intake-key-0001".into(),
            timestamp: None,
            received_at_ms: 1_700_000_000_000,
            events: (0..100)
                .map(|i| {
                    format!("<134>1 2025-01-15T10:00:{i:02}Z web-01 nginx - - GET /items/{i} 200")
                })
                .collect(),
        }
    }

    /// The v1 value of a chunk, as the release before v2 wrote it.
    fn v1(chunk: &Chunk) -> Vec<u8> {
        chunk.view().encode_v1(&chunk.view().body())
    }

    /// The v2 value of `chunk` with its size field replaced by `size`.
    fn v2_with_size(chunk: &Chunk, size: u32) -> Vec<u8> {
        let mut bytes = chunk.encode_compressed(Codec::Lz4);
        bytes[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4].copy_from_slice(&size.to_le_bytes());
        bytes
    }

    #[test]
    fn chunk_round_trips_with_header() {
        let bytes = chunk().encode_compressed(Codec::Lz4);
        assert_eq!(bytes[0], CHUNK_V2);
        assert_eq!(
            ChunkHeader::decode(&bytes).unwrap(),
            ChunkHeader {
                events: 2,
                payload_bytes: 4
            }
        );
        assert_eq!(Chunk::decode(&bytes).unwrap(), chunk());
    }

    /// A v2 chunk whose body is corrupt but whose lz4 block is intact is salvaged
    /// decompressed, so that its events can be read in its dead letter; other bytes as they are.
    #[test]
    fn salvage_decompresses_what_it_can() {
        let c = big_chunk();
        let mut bytes = c.encode_compressed(Codec::Lz4);
        // A valid lz4 block of a body bincode cannot read.
        let body = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff GET /items/1 200";
        bytes.truncate(CHUNK_HEADER_LEN);
        bytes.extend_from_slice(&lz4_flex::block::compress_prepend_size(body));
        assert!(Chunk::decode(&bytes).is_err());
        assert_eq!(salvage(&bytes), body);
        let garbage = b"\x02 not lz4 at all";
        assert_eq!(salvage(garbage), garbage);
        assert_eq!(salvage(b"\x01 v1"), b"\x01 v1");
    }

    /// A view borrows the events of a v1 value and of a decompressed v2 body, and reads the
    /// same chunk as the owned decoding.
    #[test]
    fn views_borrow_both_versions() {
        let mut scratch = Vec::new();
        for c in [chunk(), big_chunk()] {
            let plain = v1(&c);
            let view = ChunkView::decode(&plain, &mut scratch).unwrap();
            assert_eq!(view.to_chunk(), c);
            assert_eq!(view.payload_bytes(), c.payload_bytes());
            let range = plain.as_ptr_range();
            assert!(view.events.iter().all(|e| range.contains(&e.as_ptr())));
            let compressed = c.encode_compressed(Codec::Lz4);
            let view = ChunkView::decode(&compressed, &mut scratch).unwrap();
            assert_eq!(view.to_chunk(), c);
        }
    }

    #[test]
    fn v1_and_v2_round_trip() {
        let empty = Chunk {
            intake_key: String::new(),
            timestamp: None,
            received_at_ms: 0,
            events: Vec::new(),
        };
        let large = Chunk {
            events: vec!["x".repeat(300_000), String::new(), "é".repeat(1000)],
            ..big_chunk()
        };
        for c in [chunk(), big_chunk(), empty, large] {
            assert_eq!(Chunk::decode(&c.encode_compressed(Codec::Lz4)).unwrap(), c);
            assert_eq!(Chunk::decode(&v1(&c)).unwrap(), c);
        }
    }

    #[test]
    fn v2_compresses_repetitive_events() {
        let c = big_chunk();
        let (v1, v2) = (v1(&c).len(), c.encode_compressed(Codec::Lz4).len());
        assert!(v2 * 2 < v1, "v2 {v2} bytes, v1 {v1} bytes");
    }

    /// The v1 encoding is a contract with every queue on disk: this test pins its bytes, so a
    /// change of serialisation that would make today's queues unreadable fails here first.
    /// This release writes v2, but must still read what the releases before it wrote.
    #[test]
    fn v1_encoding_is_stable() {
        let chunk = Chunk {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: 5,
            events: vec!["ab".into()],
        };
        let pinned = [1, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'K', 0, 5, 1, 2, b'a', b'b'];
        assert_eq!(v1(&chunk), pinned);
        assert_eq!(Chunk::decode(&pinned).unwrap(), chunk);
        assert_eq!(
            ChunkHeader::decode(&pinned).unwrap(),
            ChunkHeader {
                events: 1,
                payload_bytes: 2
            }
        );
    }

    /// The v2 encoding is the contract with the queues this release writes. Its encoder's
    /// output is pinned on a body too short to compress (lz4 stores it as literals, whatever the
    /// version of the compressor); its decoder is pinned on a block with a match.
    #[test]
    fn v2_encoding_is_stable() {
        let chunk = Chunk {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: 5,
            events: vec!["ab".into()],
        };
        let pinned = [
            2, 1, 0, 0, 0, 2, 0, 0, 0, // header
            8, 0, 0, 0, // body size
            0x80, 1, b'K', 0, 5, 1, 2, b'a', b'b', // lz4: token (8 literals), the v1 body
        ];
        assert_eq!(chunk.encode_compressed(Codec::Lz4), pinned);
        assert_eq!(Chunk::decode(&pinned).unwrap(), chunk);

        // Body: key "K", no date, 5 ms, one event of 20 'a's: 1 K 0 5 1 20 a*20 (26 bytes).
        // lz4: 7 literals (1 K 0 5 1 20 a), a match of 14 at offset 1, 5 literals (a*5).
        let pinned = [
            2, 1, 0, 0, 0, 20, 0, 0, 0, // header
            26, 0, 0, 0, // body size
            0x7A, 1, b'K', 0, 5, 1, 20, b'a', 1, 0, // 7 literals, match 10 + 4 at offset 1
            0x50, b'a', b'a', b'a', b'a', b'a', // 5 last literals
        ];
        assert_eq!(
            Chunk::decode(&pinned).unwrap(),
            Chunk {
                events: vec!["a".repeat(20)],
                ..chunk
            }
        );
    }

    #[test]
    fn header_decodes_v1_and_v2() {
        let c = big_chunk();
        let expected = ChunkHeader {
            events: 100,
            payload_bytes: c.payload_bytes() as u32,
        };
        assert_eq!(ChunkHeader::decode(&v1(&c)).unwrap(), expected);
        assert_eq!(
            ChunkHeader::decode(&c.encode_compressed(Codec::Lz4)).unwrap(),
            expected
        );
        // The header alone is enough to keep counters, whatever follows it.
        assert_eq!(
            ChunkHeader::decode(&c.encode_compressed(Codec::Lz4)[..CHUNK_HEADER_LEN]).unwrap(),
            expected
        );
    }

    #[test]
    fn unknown_version_and_truncation_are_errors() {
        let mut bytes = chunk().encode_compressed(Codec::Lz4);
        assert!(matches!(
            Chunk::decode(&bytes[..3]),
            Err(DecodeError::Truncated(3))
        ));
        assert!(matches!(
            ChunkHeader::decode(&bytes[..8]),
            Err(DecodeError::Truncated(8))
        ));
        // A v2 value cut inside its size field.
        assert!(matches!(
            Chunk::decode(&bytes[..CHUNK_HEADER_LEN + 2]),
            Err(DecodeError::Truncated(11))
        ));
        bytes[0] = 9;
        assert!(matches!(
            Chunk::decode(&bytes),
            Err(DecodeError::UnknownVersion(9))
        ));
        assert!(matches!(
            ChunkHeader::decode(&bytes),
            Err(DecodeError::UnknownVersion(9))
        ));
        // Chunk versions are not dead-letter versions.
        assert!(matches!(
            decode_value::<DeadLetter>(&big_chunk().encode_compressed(Codec::Lz4)),
            Err(DecodeError::UnknownVersion(CHUNK_V2))
        ));
    }

    #[test]
    fn truncated_v2_is_an_error() {
        let bytes = big_chunk().encode_compressed(Codec::Lz4);
        for len in CHUNK_HEADER_LEN + 4..bytes.len() {
            assert!(
                Chunk::decode(&bytes[..len]).is_err(),
                "decoded a value cut at {len} of {}",
                bytes.len()
            );
        }
    }

    #[test]
    fn v2_with_a_lying_size_is_an_error() {
        let c = big_chunk();
        let real = c.view().body().len() as u32;
        // Larger than what the block decompresses to.
        assert!(matches!(
            Chunk::decode(&v2_with_size(&c, real + 1)),
            Err(DecodeError::Lz4Length { claimed, actual }) if claimed == real as usize + 1
                && actual == real as usize
        ));
        // Smaller: the block does not fit.
        assert!(matches!(
            Chunk::decode(&v2_with_size(&c, real - 1)),
            Err(DecodeError::Lz4(_))
        ));
        assert!(matches!(
            Chunk::decode(&v2_with_size(&c, 0)),
            Err(DecodeError::Lz4(_))
        ));
        // More than the block could hold: refused before allocating.
        let block = c.encode_compressed(Codec::Lz4).len() - CHUNK_HEADER_LEN - 4;
        let err = Chunk::decode(&v2_with_size(&c, u32::MAX)).unwrap_err();
        assert!(
            matches!(err, DecodeError::CompressedSize { claimed, compressed, .. }
                if claimed == u32::MAX as usize && compressed == block),
            "{err:?}"
        );
        assert!(err.to_string().contains("corrupt"), "{err}");
        let just_over = (block * LZ4_MAX_RATIO + LZ4_SLACK + 1) as u32;
        assert!(matches!(
            Chunk::decode(&v2_with_size(&c, just_over)),
            Err(DecodeError::CompressedSize { .. })
        ));
        // More than any chunk, even with a block that large.
        let mut bytes = v2_with_size(&c, (MAX_CHUNK_BODY_BYTES + 1) as u32);
        bytes.resize(bytes.len() + 1_000_000, 0);
        assert!(matches!(
            Chunk::decode(&bytes),
            Err(DecodeError::CompressedSize { limit, .. }) if limit == MAX_CHUNK_BODY_BYTES
        ));
    }

    #[test]
    fn corrupt_lz4_and_bodies_are_errors_not_panics() {
        let bytes = big_chunk().encode_compressed(Codec::Lz4);
        // Every single-byte corruption after the header: an error or (a changed literal) a
        // chunk, never a panic or an allocation beyond the bounds.
        for at in CHUNK_HEADER_LEN..bytes.len() {
            for value in [0u8, 0x0F, 0xF0, 0xFF] {
                let mut b = bytes.clone();
                b[at] = value;
                let _ = Chunk::decode(&b);
            }
        }
        // A string whose length prefix claims 2^64 - 1 bytes (v1 and v2): bincode would
        // allocate it without the decode limit.
        let mut body = vec![1, b'K', 0, 5, 1];
        body.push(0xFD); // u64 varint follows
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut v1 = vec![VALUE_V1, 1, 0, 0, 0, 2, 0, 0, 0];
        v1.extend_from_slice(&body);
        assert!(matches!(Chunk::decode(&v1), Err(DecodeError::Body(_))));
        let mut v2 = vec![CHUNK_V2, 1, 0, 0, 0, 2, 0, 0, 0];
        v2.extend_from_slice(&lz4_flex::block::compress_prepend_size(&body));
        assert!(matches!(Chunk::decode(&v2), Err(DecodeError::Body(_))));
        // The same with 2^40 - 1 bytes (within usize, beyond memory).
        let mut v1 = vec![VALUE_V1, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'K', 0, 5, 1, 0xFD];
        v1.extend_from_slice(&((1u64 << 40) - 1).to_le_bytes());
        assert!(matches!(Chunk::decode(&v1), Err(DecodeError::Body(_))));
    }

    /// `acked_below` moves over marked numbers and absent chunks, never past `end`.
    #[test]
    fn a_watermark_advances_over_marked_and_absent_chunks_only() {
        let stored = [3u64, 4, 5, 8, 9];
        let mut next_present = |from: u64| -> Result<Option<u64>, sled::Error> {
            Ok(stored.iter().copied().find(|s| *s >= from))
        };
        let mut w = Watermark::starting_at(3);
        w.add(5);
        w.add(5);
        w.add(2); // below: already delivered
        w.advance(10, &mut next_present).unwrap();
        assert_eq!((w.acked_below, w.acked.as_slice()), (3, &[5][..]));
        assert!(w.is_acked(2) && w.is_acked(5) && !w.is_acked(3) && !w.is_acked(4));
        w.add(4);
        w.add(3);
        // 3, 4, 5 marked, 6 and 7 absent: delivered; 8 stored.
        w.advance(10, &mut next_present).unwrap();
        assert_eq!((w.acked_below, w.acked.len()), (8, 0));
        w.add(9);
        w.add(8);
        // Nothing stored past 9: stops at the committed end, not beyond.
        w.advance(10, &mut next_present).unwrap();
        assert_eq!(w.acked_below, 10);
        let mut w = Watermark::starting_at(8);
        w.add(8);
        w.add(9);
        w.advance(9, &mut next_present).unwrap();
        assert_eq!((w.acked_below, w.acked.as_slice()), (9, &[9][..]));
    }

    #[test]
    fn a_watermark_set_overflows_its_highest_numbers() {
        let mut w = Watermark::starting_at(0);
        for seq in (1..=MAX_ACKED as u64 + 3).rev() {
            w.add(seq);
        }
        assert_eq!(
            w.overflow(),
            [
                MAX_ACKED as u64 + 1,
                MAX_ACKED as u64 + 2,
                MAX_ACKED as u64 + 3
            ]
        );
        assert_eq!(w.acked.len(), MAX_ACKED);
        assert!(w.overflow().is_empty());
    }

    /// The lane records' bytes: a contract with the queues this release and the one before
    /// wrote.
    #[test]
    fn lane_v3_and_v2_encodings_are_stable() {
        let lane = LaneRecord {
            intake_key: "K".into(),
            events: 3,
            bytes: 300,
            watermark: Watermark {
                acked_below: 7,
                acked: vec![9],
            },
            end_seq: Some(12),
        };
        let pinned_v3 = [LANE_V3, 1, b'K', 3, 251, 44, 1, 7, 1, 9, 12];
        assert_eq!(lane.encode(), pinned_v3);
        assert_eq!(LaneRecord::decode(&pinned_v3).unwrap(), lane);
        // v2: the same without `end_seq`, decoded without one; a record without one is
        // written as v2.
        let lane = LaneRecord {
            end_seq: None,
            ..lane
        };
        let pinned = [LANE_V2, 1, b'K', 3, 251, 44, 1, 7, 1, 9];
        assert_eq!(lane.encode_v2(), pinned);
        assert_eq!(lane.encode(), pinned);
        assert_eq!(LaneRecord::decode(&pinned).unwrap(), lane);
        // v1: the same without the watermark, decoded with an empty one.
        let v1 = [VALUE_V1, 1, b'K', 3, 251, 44, 1];
        assert_eq!(lane.encode_v1(), v1);
        assert_eq!(
            LaneRecord::decode(&v1).unwrap(),
            LaneRecord {
                watermark: Watermark::default(),
                ..lane
            }
        );
    }

    #[test]
    fn values_round_trip() {
        let lane = LaneRecord {
            intake_key: "K".into(),
            events: 3,
            bytes: 4,
            watermark: Watermark {
                acked_below: 300,
                acked: vec![302, 70_000],
            },
            end_seq: Some(70_001),
        };
        assert_eq!(LaneRecord::decode(&lane.encode()).unwrap(), lane);
    }

    #[test]
    fn keys_sort_in_queue_order() {
        assert!(chunk_key(1, 255) < chunk_key(1, 256));
        assert!(chunk_key(1, u64::MAX) < chunk_key(2, 0));
        assert_eq!(parse_chunk_key(&chunk_key(7, 9)).unwrap(), (7, 9));
        assert_eq!(parse_lane_key(&lane_key(7)).unwrap(), 7);
        assert_eq!(parse_dead_key(&dead_key(3)).unwrap(), 3);
    }

    /// Found while bounding the allocations of the `queue_record` fuzz target (`fuzz/`): a
    /// 6-byte lane record whose key claims 900,000,000 bytes made bincode allocate them before
    /// finding the value short (a corrupt meta value, read at every start, could then abort the
    /// process where memory is tight). A claim beyond what the value's own bytes can hold is
    /// refused before any allocation.
    #[test]
    fn a_length_beyond_the_value_is_refused_before_allocating() {
        // Version byte, then bincode's varint marker for a u32 and the string's length.
        let mut bytes = vec![VALUE_V1, 252];
        bytes.extend_from_slice(&900_000_000u32.to_le_bytes());
        for result in [
            LaneRecord::decode(&bytes).map(drop),
            decode_value::<DeadLetter>(&bytes).map(drop),
            decode_value::<String>(&bytes).map(drop),
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Body(bincode::error::DecodeError::LimitExceeded)
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn v3_round_trips_and_is_smaller_than_v2_on_log_lines() {
        let c = Chunk {
            intake_key: "K".into(),
            timestamp: Some("2026-11-29T01:02:03Z".into()),
            received_at_ms: 7,
            events: (0..80)
                .map(|i| format!("<134>1 2026-11-29T01:02:{i:02}Z web nginx - GET /api/items/{i} 200 ua=curl/8.5.0"))
                .collect(),
        };
        let v3 = c.encode(Codec::Zstd);
        assert_eq!(v3[0], CHUNK_V3);
        assert_eq!(Chunk::decode(&v3).unwrap(), c);
        assert!(v3.len() < c.encode(Codec::Lz4).len());
        assert_eq!(
            ChunkHeader::decode(&v3).unwrap(),
            ChunkHeader {
                events: 80,
                payload_bytes: c.payload_bytes() as u32
            }
        );
        let mut scratch = Vec::new();
        assert_eq!(ChunkView::decode(&v3, &mut scratch).unwrap().to_chunk(), c);
        assert_eq!(
            salvage(&v3),
            c.view().body(),
            "salvage gives the body decompressed"
        );
    }

    #[test]
    fn what_does_not_compress_is_stored_plain() {
        let c = Chunk {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: 7,
            events: vec!["ab".into()],
        };
        assert_eq!(c.encode(Codec::Zstd)[0], VALUE_V1);
        assert_eq!(c.encode(Codec::Lz4)[0], VALUE_V1);
    }

    #[test]
    fn a_corrupt_v3_is_an_error_and_allocates_nothing_it_claims() {
        let c = chunk();
        let good = c.encode_compressed(Codec::Zstd);
        assert_eq!(good[0], CHUNK_V3);
        // A size field claiming more than the header's events can take.
        let mut bytes = good.clone();
        bytes[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Chunk::decode(&bytes),
            Err(DecodeError::BodySize { .. })
        ));
        // A size field one byte short or long of the frame.
        for delta in [-1i64, 1] {
            let mut bytes = good.clone();
            let size = u32::from_le_bytes(
                bytes[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4]
                    .try_into()
                    .unwrap(),
            );
            let size = (i64::from(size) + delta) as u32;
            bytes[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4].copy_from_slice(&size.to_le_bytes());
            assert!(Chunk::decode(&bytes).is_err(), "size {delta:+}");
        }
        // A frame cut short, or a flipped byte in it.
        assert!(Chunk::decode(&good[..good.len() - 3]).is_err());
        assert!(matches!(
            Chunk::decode(&good[..CHUNK_HEADER_LEN + 2]),
            Err(DecodeError::Truncated(_))
        ));
        let mut bytes = good.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let _ = Chunk::decode(&bytes); // an error or garbage events, never a panic
        assert_eq!(
            salvage(&bytes[..good.len() - 3]),
            good[..good.len() - 3].to_vec()
        );
    }
}
