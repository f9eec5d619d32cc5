//! Queue tests of append commits cut short by a crash: a commit of appends alone is applied to
//! sled key by key (`writer/durable.rs`), so a crash before its fsync can leave some of its
//! chunks stored without the lane record that counts them. The next open counts them in.

use super::*;

/// A stored chunk of one event, as an append of `one_per_chunk` writes it.
fn chunk_value(key: &str, i: usize) -> Vec<u8> {
    Chunk {
        intake_key: key.into(),
        timestamp: None,
        received_at_ms: 1,
        events: vec![one_per_chunk_text(i)],
    }
    .encode(record::Codec::Zstd)
}

fn active_dir(cfg: &QueueConfig, q: &Queue) -> std::path::PathBuf {
    generation::gen_dir(&cfg.path, q.shared.gens_snapshot().1)
}

/// What a crash leaves behind the queue's back, written to its stopped directory: chunks 3 and
/// 4 of lane 0 past its record's count, and lane 1 (known to the meta database, as new lanes
/// are made durable there first) with chunks 0 and 1 and no record at all.
fn leave_cut_short_commit(cfg: &QueueConfig, gen_dir: &Path) {
    let meta = generation::open_sled(&cfg.path.join(generation::META_DIR), 1 << 20).unwrap();
    meta.insert(record::lane_key(1), record::encode_value(&"K2".to_owned()))
        .unwrap();
    meta.flush().unwrap();
    drop(meta);
    let db = generation::open_sled(gen_dir, 1 << 20).unwrap();
    let rec = record::LaneRecord::decode(&db.get(record::lane_key(0)).unwrap().unwrap()).unwrap();
    assert_eq!(
        rec.end_seq,
        Some(3),
        "an append writes where its count ends"
    );
    for seq in [3, 4] {
        db.insert(record::chunk_key(0, seq), chunk_value("K", seq as usize))
            .unwrap();
    }
    for seq in [0, 1] {
        db.insert(
            record::chunk_key(1, seq),
            chunk_value("K2", 100 + seq as usize),
        )
        .unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test]
async fn chunks_of_an_append_cut_short_are_counted_delivered_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let gen_dir = {
        let q = Queue::open(&cfg).unwrap();
        q.append(one_per_chunk("K", 0, 3)).await.unwrap();
        let gen_dir = active_dir(&cfg, &q);
        q.close().await.unwrap();
        gen_dir
    };
    leave_cut_short_commit(&cfg, &gen_dir);

    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (7, 7 * 600), "every stored chunk is counted");
    assert_eq!(q.status().events, 7);
    // New appends take the next sequence numbers: a chunk already stored is never replaced.
    q.append(one_per_chunk("K", 5, 1)).await.unwrap();
    q.append(one_per_chunk("K2", 102, 1)).await.unwrap();
    let k: Vec<String> = drain(&q, 0, true).await;
    let k2: Vec<String> = drain(&q, 1, true).await;
    let ids = |events: &[String]| -> Vec<usize> {
        events.iter().map(|e| e[6..11].parse().unwrap()).collect()
    };
    assert_eq!(ids(&k), [0, 1, 2, 3, 4, 5]);
    assert_eq!(ids(&k2), [100, 101, 102]);
    assert_eq!(
        q.totals(),
        (0, 0),
        "counters follow the chunks down to zero"
    );
    q.close().await.unwrap();
    drop(q);

    // Once the lanes' records are rewritten, the next open finds nothing uncounted.
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (0, 0));
    assert!(drain(&q, 0, false).await.is_empty());
}

/// Appends alone are applied key by key, acknowledgements as one batch; both leave lane
/// records that say where their count ends.
#[tokio::test]
async fn lane_records_say_where_their_count_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let q = Queue::open(&cfg).unwrap();
    q.append(one_per_chunk("K", 0, 4)).await.unwrap();
    let (gens, active) = q.shared.gens_snapshot();
    let db = gens
        .iter()
        .find(|g| g.id == active)
        .unwrap()
        .db()
        .unwrap()
        .unwrap();
    let stored =
        || record::LaneRecord::decode(&db.db.get(record::lane_key(0)).unwrap().unwrap()).unwrap();
    assert_eq!(stored().end_seq, Some(4));
    assert_eq!(stored().events, 4);
    q.ack(
        0,
        Ack {
            gen: active,
            remove: vec![0, 1],
            ..Ack::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stored().end_seq, Some(4));
    assert_eq!(stored().events, 2);
}
