//! What the queue stores, byte for byte, and how a later release reads it.
//!
//! Everything lives in one sled tree so that one `apply_batch` can change any part of it
//! atomically (a chunk removed and its lane's counters updated, an event moved to the dead
//! letters and its chunk rewritten). Keys are prefixed by kind:
//!
//! | key | value |
//! | --- | --- |
//! | `M` `format` | on-disk format version (u32 big-endian) |
//! | `L` lane id (u32 BE) | [`LaneRecord`]: the intake key and the lane's counters |
//! | `E` lane id (u32 BE) seq (u64 BE) | a chunk: [`ChunkHeader`] then [`Chunk`] |
//! | `D` seq (u64 BE) | a [`DeadLetter`] |
//!
//! Big-endian ids make sled's byte order the queue order. Every value starts with a version
//! byte; bodies are bincode 2 (standard configuration) of serde types. A release that changes a
//! body adds a new version and keeps decoding the old ones.

use serde::{Deserialize, Serialize};

/// Version of the layout above, stored under `M format`.
pub const FORMAT_VERSION: u32 = 1;
/// Version byte of the value bodies written by this release.
pub const VALUE_V1: u8 = 1;

pub const META_FORMAT_KEY: &[u8] = b"Mformat";
pub const LANE_PREFIX: u8 = b'L';
pub const CHUNK_PREFIX: u8 = b'E';
pub const DEAD_PREFIX: u8 = b'D';

/// Size of the fixed chunk header: version, event count, payload bytes.
pub const CHUNK_HEADER_LEN: usize = 1 + 4 + 4;

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
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Events of one intake key, received together, stored as one sled value.
///
/// Storing many events per key is what makes sled fast enough (one key per event is ~10x
/// slower, `shared/notes/measurements.md`). All events of a chunk share the key, the sender's
/// event date (if any) and the reception time, so a chunk maps onto one `/jsons` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub intake_key: String,
    /// `X-SEKOIAIO-EVENT-TIMESTAMP` to send with these events, as the sender gave it.
    pub timestamp: Option<String>,
    /// When the forwarder received these events, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    pub events: Vec<String>,
}

/// The fixed-size start of a stored chunk: enough to keep counters without decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    pub events: u32,
    pub payload_bytes: u32,
}

impl Chunk {
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(String::len).sum()
    }

    /// Encodes the chunk with its header.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.payload_bytes();
        let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload + self.events.len() * 3 + 64);
        out.push(VALUE_V1);
        out.extend_from_slice(&(self.events.len() as u32).to_le_bytes());
        out.extend_from_slice(&(payload as u32).to_le_bytes());
        // Encoding into a Vec cannot fail for these types.
        let body = bincode::serde::encode_to_vec(self, config()).unwrap_or_default();
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Chunk, DecodeError> {
        ChunkHeader::decode(bytes)?;
        let (chunk, _) = bincode::serde::decode_from_slice(&bytes[CHUNK_HEADER_LEN..], config())?;
        Ok(chunk)
    }
}

impl ChunkHeader {
    pub fn decode(bytes: &[u8]) -> Result<ChunkHeader, DecodeError> {
        if bytes.len() < CHUNK_HEADER_LEN {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        if bytes[0] != VALUE_V1 {
            return Err(DecodeError::UnknownVersion(bytes[0]));
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        Ok(ChunkHeader {
            events: word(1),
            payload_bytes: word(5),
        })
    }
}

/// A lane: the events of one intake key, in queue order, with their counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneRecord {
    pub intake_key: String,
    /// Events queued in this lane.
    pub events: u64,
    /// Payload bytes queued in this lane.
    pub bytes: u64,
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
    let mut out = vec![VALUE_V1];
    out.extend_from_slice(&bincode::serde::encode_to_vec(value, config()).unwrap_or_default());
    out
}

/// Decodes a value written by [`encode_value`].
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Truncated(0)),
        Some(&VALUE_V1) => Ok(bincode::serde::decode_from_slice(&bytes[1..], config())?.0),
        Some(&v) => Err(DecodeError::UnknownVersion(v)),
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

    #[test]
    fn chunk_round_trips_with_header() {
        let bytes = chunk().encode();
        assert_eq!(
            ChunkHeader::decode(&bytes).unwrap(),
            ChunkHeader {
                events: 2,
                payload_bytes: 4
            }
        );
        assert_eq!(Chunk::decode(&bytes).unwrap(), chunk());
    }

    /// The v1 encoding is a contract with every queue on disk: this test pins its bytes, so a
    /// change of serialisation that would make today's queues unreadable fails here first.
    #[test]
    fn v1_encoding_is_stable() {
        let bytes = Chunk {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: 5,
            events: vec!["ab".into()],
        }
        .encode();
        assert_eq!(
            bytes,
            [1, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'K', 0, 5, 1, 2, b'a', b'b']
        );
    }

    #[test]
    fn unknown_version_and_truncation_are_errors() {
        let mut bytes = chunk().encode();
        assert!(matches!(
            Chunk::decode(&bytes[..3]),
            Err(DecodeError::Truncated(3))
        ));
        bytes[0] = 9;
        assert!(matches!(
            Chunk::decode(&bytes),
            Err(DecodeError::UnknownVersion(9))
        ));
    }

    #[test]
    fn keys_sort_in_queue_order() {
        assert!(chunk_key(1, 255) < chunk_key(1, 256));
        assert!(chunk_key(1, u64::MAX) < chunk_key(2, 0));
        assert_eq!(parse_chunk_key(&chunk_key(7, 9)).unwrap(), (7, 9));
        assert_eq!(parse_lane_key(&lane_key(7)).unwrap(), 7);
        assert_eq!(parse_dead_key(&dead_key(3)).unwrap(), 3);
    }
}
