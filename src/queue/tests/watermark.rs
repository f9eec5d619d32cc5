//! Queue tests of delivered chunks kept in the store and marked in their lane record's
//! watermark (`record::Watermark`): reads, counts, reopens and deletion skip them.

use super::*;
use crate::queue::generation::GenDb;

fn ack(gen: u64, remove: impl IntoIterator<Item = u64>) -> Ack {
    Ack {
        gen,
        remove: remove.into_iter().collect(),
        ..Ack::default()
    }
}

/// The active generation's database.
fn active_db(q: &Queue) -> Arc<GenDb> {
    let (gens, active) = q.shared.gens_snapshot();
    let gen = gens.iter().find(|g| g.id == active).unwrap();
    gen.db().unwrap().unwrap()
}

fn active_gen(q: &Queue) -> u64 {
    q.shared.gens_snapshot().1
}

/// Lane 0's watermark in the active generation, as stored.
fn stored_watermark(q: &Queue) -> record::Watermark {
    delivered::lane_watermark(&active_db(q).db, 0).unwrap()
}

fn stored_chunks(q: &Queue) -> usize {
    active_db(q).db.scan_prefix([record::CHUNK_PREFIX]).count()
}

/// The sequence numbers a read of lane 0 from its start returns (their event says which).
fn readable(q: &Queue) -> Vec<u64> {
    read_all(q, 0)
        .iter()
        .map(|e| e[6..11].parse().unwrap())
        .collect()
}

#[tokio::test]
async fn delivered_chunks_stay_stored_but_reads_counts_status_and_reopens_skip_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let q = Queue::open(&cfg).unwrap();
    q.append(one_per_chunk("K", 0, 10)).await.unwrap();
    let gen = active_gen(&q);
    q.ack(0, ack(gen, 0..4)).await.unwrap();
    assert_eq!(stored_chunks(&q), 10, "delivered chunks are not removed");
    assert_eq!(readable(&q), (4..10).collect::<Vec<_>>());
    assert_eq!(q.lanes()[0].events(), 6);
    assert_eq!(q.totals(), (6, 6 * 600));
    assert_eq!(q.status().events, 6);
    assert_eq!(
        stored_watermark(&q),
        record::Watermark {
            acked_below: 4,
            acked: vec![]
        }
    );
    // A duplicate ack changes nothing.
    q.ack(0, ack(gen, 0..4)).await.unwrap();
    assert_eq!(q.totals(), (6, 6 * 600));
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (6, 6 * 600));
    assert_eq!(q.status().events, 6);
    assert_eq!(readable(&q), (4..10).collect::<Vec<_>>());
    // Appends after the reopen continue the sequence, after the delivered chunks.
    q.append(one_per_chunk("K", 0, 1)).await.unwrap();
    assert_eq!(readable(&q).len(), 7);
    assert_eq!(stored_chunks(&q), 11);
}

#[tokio::test]
async fn out_of_order_acks_advance_the_watermark_once_the_gap_fills() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let q = Queue::open(&cfg).unwrap();
    q.append(one_per_chunk("K", 0, 10)).await.unwrap();
    let gen = active_gen(&q);
    q.ack(0, ack(gen, [0, 1, 2, 5])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked_below, 3);
    assert_eq!(stored_watermark(&q).acked, [5]);
    q.ack(0, ack(gen, [3])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked_below, 4);
    assert_eq!(stored_watermark(&q).acked, [5]);
    q.ack(0, ack(gen, [7])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked, [5, 7]);
    assert_eq!(readable(&q), [4, 6, 8, 9]);
    assert_eq!(q.totals().0, 4);

    // A reopen redelivers only what was not acknowledged.
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(readable(&q), [4, 6, 8, 9]);
    assert_eq!(q.totals().0, 4);
    q.ack(0, ack(gen, [4])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked_below, 6);
    assert_eq!(stored_watermark(&q).acked, [7]);
    q.ack(0, ack(gen, [6, 8, 9])).await.unwrap();
    assert_eq!(
        stored_watermark(&q),
        record::Watermark {
            acked_below: 10,
            acked: vec![]
        }
    );
    assert_eq!(q.totals(), (0, 0));
    assert!(readable(&q).is_empty());
}

/// A partial delivery still rewrites its chunk with the events left; the chunk is marked
/// delivered once they are.
#[tokio::test]
async fn a_partial_ack_rewrites_and_a_later_ack_marks_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 4, 400)).await.unwrap(); // chunks: [0,1] [2,3]
    let batch = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let mut kept = batch.chunks[0].chunk.clone();
    kept.events.remove(0);
    let partial = Ack {
        gen: batch.span.gen,
        rewrite: vec![(0, kept.clone())],
        ..Ack::default()
    };
    q.ack(0, partial).await.unwrap();
    assert_eq!(q.totals(), (3, 1200));
    assert_eq!(read_all(&q, 0).len(), 3);
    assert_eq!(stored_watermark(&q).acked_below, 0);
    q.ack(0, ack(batch.span.gen, [1])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked, [1]);
    assert_eq!(read_all(&q, 0), kept.events);
    q.ack(0, ack(batch.span.gen, [0])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked_below, 2);
    assert_eq!(q.totals(), (0, 0));
    assert_eq!(stored_chunks(&q), 2);
}

/// A generation's lane records of an older release (v1) have no watermark: delivered chunks
/// were removed. They still load, and the first ack writes a v2 record whose watermark starts
/// past the chunks already gone.
#[tokio::test]
async fn a_v1_lane_record_still_loads_and_is_upgraded_by_the_next_ack() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let gen = {
        let q = Queue::open(&cfg).unwrap();
        q.append(one_per_chunk("K", 0, 6)).await.unwrap();
        let gen = active_gen(&q);
        q.close().await.unwrap();
        gen
    };
    {
        // What an older release leaves after delivering chunks 0, 1 and 3: them removed, a
        // v1 record with the counters of the rest.
        let db = generation::open_sled(&generation::gen_dir(&cfg.path, gen), 1 << 20).unwrap();
        for seq in [0, 1, 3] {
            db.remove(record::chunk_key(0, seq)).unwrap();
        }
        let rec = record::LaneRecord {
            intake_key: "K".into(),
            events: 3,
            bytes: 3 * 600,
            ..Default::default()
        };
        db.insert(record::lane_key(0), rec.encode_v1()).unwrap();
        db.insert(record::META_FORMAT_KEY, &2u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (3, 3 * 600));
    assert_eq!(readable(&q), [2, 4, 5]);
    let format = active_db(&q).db.get(record::META_FORMAT_KEY).unwrap();
    assert_eq!(
        format.as_deref(),
        Some(&record::FORMAT_VERSION.to_be_bytes()[..]),
        "marked with this release's format, for older ones to refuse it"
    );
    q.ack(0, ack(gen, [2])).await.unwrap();
    let rec =
        record::LaneRecord::decode(&active_db(&q).db.get(record::lane_key(0)).unwrap().unwrap())
            .unwrap();
    assert_eq!(rec.events, 2);
    assert_eq!(
        rec.watermark,
        record::Watermark {
            acked_below: 4,
            acked: vec![]
        },
        "past the delivered chunk and the removed ones"
    );
    assert_eq!(readable(&q), [4, 5]);
    q.append(one_per_chunk("K", 0, 1)).await.unwrap();
    assert_eq!(readable(&q).len(), 3);
}

/// A lane's watermark in a generation starts at its first sequence number there, so that it
/// compacts.
#[tokio::test]
async fn a_watermark_starts_at_the_lanes_first_chunk_in_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    let q = Queue::open(&cfg).unwrap();
    q.append(one_per_chunk("K", 0, 200)).await.unwrap();
    // Sealed after the commit that filled it, once its senders are answered.
    wait_for("a generation sealed", || active_gen(&q) > 1).await;
    q.append(one_per_chunk("K", 0, 3)).await.unwrap();
    let first = active_db(&q)
        .db
        .scan_prefix([record::CHUNK_PREFIX])
        .next()
        .unwrap()
        .unwrap()
        .0;
    let (_, first) = record::parse_chunk_key(&first).unwrap();
    assert!(first > 0);
    assert_eq!(stored_watermark(&q).acked_below, first);
    let gen = active_gen(&q);
    q.ack(0, ack(gen, [first])).await.unwrap();
    assert_eq!(stored_watermark(&q).acked_below, first + 1);
    assert!(stored_watermark(&q).acked.is_empty());
}

/// Past `MAX_ACKED` sequence numbers out of order, delivered chunks are removed from the store
/// instead: the lane record stays small, counts stay right, and the next sequence number does
/// not fall below the watermark at a reopen, even with the last chunks removed.
#[tokio::test]
async fn the_set_of_out_of_order_acks_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        generation_bytes: 64 << 20,
        ..config(dir.path())
    };
    let n = record::MAX_ACKED as u64 + 100;
    let q = Queue::open(&cfg).unwrap();
    q.append(one_per_chunk("K", 0, n as usize)).await.unwrap();
    let gen = active_gen(&q);
    q.ack(0, ack(gen, 1..n)).await.unwrap();
    let mark = stored_watermark(&q);
    assert_eq!((mark.acked_below, mark.acked.len()), (0, record::MAX_ACKED));
    assert_eq!(stored_chunks(&q), record::MAX_ACKED + 1);
    assert_eq!(q.totals().0, 1);
    assert_eq!(readable(&q), [0]);
    q.ack(0, ack(gen, [0])).await.unwrap();
    assert_eq!(
        stored_watermark(&q),
        record::Watermark {
            acked_below: n,
            acked: vec![]
        }
    );
    assert_eq!(q.totals(), (0, 0));
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (0, 0));
    assert!(readable(&q).is_empty());
    q.append(one_per_chunk("K", 0, 1)).await.unwrap();
    assert_eq!(readable(&q), [0], "the new chunk (its text says 0) is read");
    let mark = stored_watermark(&q);
    assert_eq!(mark.acked_below, n, "and was stored after the watermark");
}

/// Sealed generations are deleted once every lane in them is delivered, whatever the order of
/// the acknowledgements: their files hold delivered chunks until then.
#[tokio::test]
async fn generations_delivered_out_of_order_in_two_lanes_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    let q = Queue::open(&cfg).unwrap();
    for _ in 0..10 {
        q.append(events("A", 20, 400)).await.unwrap();
        q.append(events("B", 20, 400)).await.unwrap();
    }
    wait_for("sealed generations", || gen_dirs(&cfg.path).len() >= 4).await;
    for lane in [0, 1] {
        // Read everything first (several batches in flight), then acknowledge the batches
        // last first.
        let mut from = Position::default();
        let mut acks = Vec::new();
        loop {
            let batch = q.read(lane, from, 30, usize::MAX).unwrap();
            if batch.chunks.is_empty() {
                break;
            }
            from = batch.span.next;
            acks.push(Ack {
                gen: batch.span.gen,
                remove: batch.chunks.iter().map(|c| c.seq).collect(),
                ..Ack::default()
            });
        }
        for ack in acks.into_iter().rev() {
            q.ack(lane, ack).await.unwrap();
        }
    }
    assert_eq!(q.totals(), (0, 0));
    wait_for("delivered generations deleted", || {
        q.status().generations == 1
    })
    .await;
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (0, 0));
    assert!(read_all(&q, 0).is_empty() && read_all(&q, 1).is_empty());
}
