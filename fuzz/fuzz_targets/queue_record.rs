//! The decoders of what the queue stores (`queue/record.rs`, and the generation summaries of
//! the meta database): stored bytes may be corrupt (bit rot, a torn write), and a corrupt
//! value must come back as an error for the caller to quarantine, never as a panic, a hang or
//! a huge allocation. libFuzzer's `-timeout` and `-malloc_limit_mb` (see docs/reliability.md)
//! turn a slow decode or an oversized allocation into a finding.
//!
//! Input: one byte choosing the decoder, then the stored value (or key).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::queue::generation::GenSummary;
use sekoia_forwarder::queue::record::{
    self, Chunk, ChunkHeader, ChunkView, DeadLetter, LaneRecord,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => chunk(bytes),
        1 => lane(bytes),
        2 => value::<DeadLetter>(bytes),
        3 => value::<GenSummary>(bytes),
        // The meta database's lane names: an intake key per lane id.
        4 => value::<String>(bytes),
        _ => keys(bytes),
    }
});

/// A chunk value (`E` key of a generation), through every reader the queue has.
fn chunk(bytes: &[u8]) {
    let header = ChunkHeader::decode(bytes);
    let mut scratch = Vec::new();
    let view = ChunkView::decode(bytes, &mut scratch).map(|v| v.to_chunk());
    let owned = Chunk::decode(bytes);
    // What the delivery keeps of an undecodable chunk, in its dead letter.
    let _ = record::salvage(bytes);
    match (view, owned) {
        (Ok(view), Ok(owned)) => {
            assert_eq!(view, owned);
            assert!(header.is_ok(), "a chunk decoded without a header");
            // What decodes re-encodes to the same chunk, in every version.
            for codec in [record::Codec::Lz4, record::Codec::Zstd] {
                let again = Chunk::decode(&owned.encode_compressed(codec));
                assert_eq!(again.ok().as_ref(), Some(&owned));
            }
            assert_eq!(
                Chunk::decode(&owned.encode_plain()).ok().as_ref(),
                Some(&owned)
            );
        }
        (Err(_), Err(_)) => {}
        (view, owned) => panic!("the two decoders disagree: {view:?} / {owned:?}"),
    }
}

/// A lane record (v1 or v2), re-encoded (as v2) when it decodes; what a watermark says of a
/// sequence number never panics.
fn lane(bytes: &[u8]) {
    if let Ok(decoded) = LaneRecord::decode(bytes) {
        let again = LaneRecord::decode(&decoded.encode());
        assert_eq!(again.ok().as_ref(), Some(&decoded));
        let w = &decoded.watermark;
        for seq in [0, w.acked_below, u64::MAX] {
            let _ = w.is_acked(seq);
        }
    }
}

/// A versioned serde value (`decode_value`), re-encoded when it decodes.
fn value<T>(bytes: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(decoded) = record::decode_value::<T>(bytes) {
        let again = record::decode_value::<T>(&record::encode_value(&decoded));
        assert_eq!(again.ok().as_ref(), Some(&decoded));
    }
}

/// The key parsers: a key read back from sled is what its builder wrote.
fn keys(bytes: &[u8]) {
    if let Ok(lane) = record::parse_lane_key(bytes) {
        assert_eq!(record::lane_key(lane).as_slice(), bytes);
    }
    if let Ok((lane, seq)) = record::parse_chunk_key(bytes) {
        assert_eq!(record::chunk_key(lane, seq).as_slice(), bytes);
    }
    if let Ok(seq) = record::parse_dead_key(bytes) {
        assert_eq!(record::dead_key(seq).as_slice(), bytes);
    }
}
