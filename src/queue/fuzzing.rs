//! The queue's stored formats, for the fuzz target `queue_record` (`fuzz/`) and the seeds of
//! its corpus (`tests/fuzz_seeds.rs`): the one door to them from outside the queue, so that
//! `record` and `generation` stay private. Not an API for anything else (hidden from the
//! docs): it changes with the target.
//!
//! An input is one byte choosing the decoder, then the stored value (or key):
//! 0 a chunk, 1 a lane record, 2 a dead letter, 3 a generation summary, 4 a lane name (the
//! meta database's intake key of a lane id), 5 the key parsers, 6 a source's checkpoint.

use super::generation::{GenLane, GenSummary};
use super::record::{
    self, Chunk, ChunkHeader, ChunkView, Codec, DeadLetter, LaneRecord, Watermark,
};

/// Runs one input through every decoder the queue has for what it chose, and checks what the
/// fuzz target asserts besides "no panic": both chunk decoders agree, whatever decodes
/// re-encodes to the same value, a key parses back to its bytes. Panics when a check fails.
pub fn queue_record(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => chunk(bytes),
        1 => lane(bytes),
        2 => value::<DeadLetter>(bytes),
        3 => value::<GenSummary>(bytes),
        4 => value::<String>(bytes),
        5 => keys(bytes),
        _ => checkpoint(bytes),
    }
}

/// A source's checkpoint (`C` key of a generation): what decodes re-encodes to its bytes.
fn checkpoint(bytes: &[u8]) {
    if let Ok(state) = record::decode_checkpoint(bytes) {
        assert_eq!(record::encode_checkpoint(state), bytes);
    }
}

/// A chunk value (`E` key of a generation), through every reader the queue has.
fn chunk(bytes: &[u8]) {
    let header = ChunkHeader::decode(bytes);
    let mut scratch = Vec::new();
    let view = ChunkView::decode(bytes, &mut scratch).map(|v| v.to_chunk());
    let owned = Chunk::decode(bytes);
    // What the quarantine keeps of an undecodable chunk, in its dead letter.
    let _ = record::salvage(bytes);
    match (view, owned) {
        (Ok(view), Ok(owned)) => {
            assert_eq!(view, owned);
            assert!(header.is_ok(), "a chunk decoded without a header");
            // What decodes re-encodes to the same chunk, in every version.
            for codec in [Codec::Lz4, Codec::Zstd] {
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

/// A lane record (v1, v2 or v3), re-encoded (as v3) when it decodes; what a watermark says of
/// a sequence number never panics.
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

/// The seeds of the `queue_record` corpus, made by the queue's own encoders from two example
/// events: (name, input in the format of [`queue_record`]). Every version of each encoding the
/// queue reads, and every key.
pub fn queue_record_seeds(events: [&str; 2]) -> Vec<(&'static str, Vec<u8>)> {
    let [first, second] = events;
    let chunk = Chunk {
        intake_key: "YOUR_INTAKE_KEY".into(),
        timestamp: Some("2021-04-05T21:33:31+02:00".into()),
        received_at_ms: 1_700_000_000_000,
        events: vec![first.into(), second.into(), first.into()],
    };
    let untimed = Chunk {
        timestamp: None,
        events: vec![second.into()],
        ..chunk.clone()
    };
    let lane = LaneRecord {
        intake_key: "YOUR_INTAKE_KEY".into(),
        events: 3,
        bytes: 140,
        watermark: Watermark {
            acked_below: 70_000,
            acked: vec![70_002, 70_003, 70_400],
        },
        end_seq: Some(70_500),
    };
    let dead = DeadLetter {
        intake_key: "YOUR_INTAKE_KEY".into(),
        timestamp: None,
        received_at_ms: 1_700_000_000_000,
        event: first.into(),
        status: 400,
        reason: "{\"message\": \"invalid event\"}".into(),
        dead_at_ms: 1_700_000_000_500,
    };
    let summary = GenSummary {
        lanes: vec![
            GenLane {
                lane: 1,
                events: 3,
                bytes: 140,
                end_seq: 12,
            },
            GenLane {
                lane: 7,
                events: 0,
                bytes: 0,
                end_seq: 3,
            },
        ],
    };
    let tagged = |which: u8, bytes: Vec<u8>| [vec![which], bytes].concat();
    vec![
        ("chunk-v2", tagged(0, chunk.encode_compressed(Codec::Lz4))),
        ("chunk-v3", tagged(0, chunk.encode_compressed(Codec::Zstd))),
        ("chunk-v1", tagged(0, chunk.encode_plain())),
        (
            "chunk-v2-untimed",
            tagged(0, untimed.encode_compressed(Codec::Lz4)),
        ),
        ("lane-v3", tagged(1, lane.encode())),
        ("lane-v2", tagged(1, lane.encode_v2())),
        ("lane", tagged(1, lane.encode_v1())),
        ("dead-letter", tagged(2, record::encode_value(&dead))),
        ("gen-summary", tagged(3, record::encode_value(&summary))),
        (
            "lane-name",
            tagged(4, record::encode_value(&"YOUR_INTAKE_KEY".to_owned())),
        ),
        ("key-lane", tagged(5, record::lane_key(7).to_vec())),
        ("key-chunk", tagged(5, record::chunk_key(7, 12).to_vec())),
        ("key-dead", tagged(5, record::dead_key(3).to_vec())),
        (
            "checkpoint",
            tagged(6, record::encode_checkpoint(Some(first.as_bytes()))),
        ),
        (
            "checkpoint-forgotten",
            tagged(6, record::encode_checkpoint(None)),
        ),
    ]
}
