use super::*;
use crate::intake_api::IncomingEvent;

fn config(dir: &Path) -> QueueConfig {
    QueueConfig {
        path: dir.join("q"),
        chunk_bytes: 1024,
        ..QueueConfig::default()
    }
}

fn events(key: &str, n: usize, size: usize) -> Vec<IncomingEvent> {
    (0..n)
        .map(|i| IncomingEvent {
            intake_key: key.into(),
            timestamp: None,
            raw: format!(
                "{i:>0w$}{}",
                "x".repeat(size.saturating_sub(8)),
                w = size.min(8)
            ),
        })
        .collect()
}

/// Events of `size` bytes that compress little (pseudo-random hex: zstd takes them to about
/// half, lz4 not at all). The tests about value sizes also store chunks plain
/// ([`plain_config`]), to have values as large as their payload.
/// The test configuration with chunks stored uncompressed.
fn plain_config(dir: &Path) -> QueueConfig {
    QueueConfig {
        chunk_compression: crate::config::ChunkCompression::None,
        ..config(dir)
    }
}

fn incompressible_events(key: &str, n: usize, size: usize) -> Vec<IncomingEvent> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| IncomingEvent {
            intake_key: key.into(),
            timestamp: None,
            raw: (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b"0123456789abcdef"[(x >> 60) as usize])
                })
                .collect(),
        })
        .collect()
}

/// Events of 600 bytes, one to a chunk (`config`'s 1 KiB chunks), numbered from `from`: the
/// number is in the text ([`one_per_chunk_text`]).
fn one_per_chunk(key: &str, from: usize, n: usize) -> Vec<IncomingEvent> {
    (from..from + n)
        .map(|i| IncomingEvent {
            intake_key: key.into(),
            timestamp: None,
            raw: one_per_chunk_text(i),
        })
        .collect()
}

/// The text of event `i` of [`one_per_chunk`]: its number at bytes 6..11.
fn one_per_chunk_text(i: usize) -> String {
    format!("event-{i:05}-{}", "x".repeat(588))
}

fn read_all(q: &Queue, lane: u32) -> Vec<String> {
    q.read(lane, Position::default(), usize::MAX, usize::MAX)
        .unwrap()
        .chunks
        .into_iter()
        .flat_map(|c| c.chunk.events)
        .collect()
}

#[tokio::test]
async fn appended_events_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(&config(dir.path())).unwrap();
        q.append(events("K", 100, 50)).await.unwrap();
        q.append(events("K", 10, 50)).await.unwrap();
        q.close().await.unwrap();
    }
    let q = Queue::open(&config(dir.path())).unwrap();
    let lanes = q.lanes();
    assert_eq!(lanes.len(), 1);
    assert_eq!(lanes[0].events(), 110);
    assert_eq!(lanes[0].bytes(), 110 * 50);
    let got = read_all(&q, 0);
    let mut want: Vec<String> = events("K", 100, 50).into_iter().map(|e| e.raw).collect();
    want.extend(events("K", 10, 50).into_iter().map(|e| e.raw));
    assert_eq!(got, want);
    // Appending after reopen continues the sequence instead of overwriting.
    q.append(events("K", 1, 5)).await.unwrap();
    assert_eq!(read_all(&q, 0).len(), 111);
}

#[tokio::test]
async fn every_append_is_covered_by_an_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    let before = q.stats().fsyncs.load(Ordering::Relaxed);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.append(events(&format!("key-{}", i % 3), 20, 100)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let fsyncs = q.stats().fsyncs.load(Ordering::Relaxed) - before;
    let commits = q.stats().commits.load(Ordering::Relaxed);
    assert!(fsyncs >= 1, "appends were acknowledged without any fsync");
    assert_eq!(
        fsyncs, commits,
        "a commit answered its senders without an fsync"
    );
    assert!(
        commits <= 50,
        "group commit must not cost more than one fsync per append"
    );
    assert_eq!(q.totals().0, 50 * 20);
}

#[tokio::test]
async fn lanes_keep_order_per_key_and_chunk_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    let mut mixed = events("A", 3, 400);
    mixed.extend(events("B", 2, 10));
    mixed.extend(events("A", 1, 10));
    q.append(mixed).await.unwrap();
    let lanes = q.lanes();
    assert_eq!(lanes.len(), 2);
    let a = lanes.iter().find(|l| l.intake_key == "A").unwrap();
    let b = lanes.iter().find(|l| l.intake_key == "B").unwrap();
    assert_eq!(a.events(), 4);
    assert_eq!(b.events(), 2);
    // chunk_bytes is 1024: three 400-byte events make two chunks, the trailing event a third.
    let batch = q
        .read(a.id, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let sizes: Vec<usize> = batch.chunks.iter().map(|c| c.chunk.events.len()).collect();
    assert_eq!(sizes, [2, 1, 1]);
}

/// Empty events weigh nothing by bytes: the event cap still cuts their chunks, so that reads
/// (and delivery batches) keep to their event limit.
#[tokio::test]
async fn chunks_are_capped_by_events_too() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    let n = 2 * MAX_CHUNK_EVENTS + 10;
    let empty = events("K", n, 0)
        .into_iter()
        .map(|e| IncomingEvent {
            raw: String::new(),
            ..e
        })
        .collect();
    q.append(empty).await.unwrap();
    let all = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let sizes: Vec<usize> = all.chunks.iter().map(|c| c.chunk.events.len()).collect();
    assert_eq!(sizes, [MAX_CHUNK_EVENTS, MAX_CHUNK_EVENTS, 10]);
    let limited = q
        .read(0, Position::default(), MAX_CHUNK_EVENTS + 1, usize::MAX)
        .unwrap();
    assert_eq!(limited.events(), MAX_CHUNK_EVENTS);
}

#[tokio::test]
async fn read_respects_limits_and_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 10, 500)).await.unwrap(); // 5 chunks of 2
    let mut stamped = events("K", 1, 5);
    stamped[0].timestamp = Some("2024-01-01T00:00:00Z".into());
    q.append(stamped).await.unwrap();
    let first = q.read(0, Position::default(), 4, usize::MAX).unwrap();
    assert_eq!(first.events(), 4);
    let rest = q.read(0, first.span.next, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        rest.events(),
        6,
        "stops before the chunk with another event date"
    );
    let last = q.read(0, rest.span.next, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        last.chunks[0].chunk.timestamp.as_deref(),
        Some("2024-01-01T00:00:00Z")
    );
    // A single chunk larger than the limits is still returned, so nothing can stall.
    let one = q.read(0, Position::default(), 1, 1).unwrap();
    assert_eq!(one.chunks.len(), 1);
}

#[tokio::test]
async fn ack_removes_rewrites_and_never_underflows() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 4, 400)).await.unwrap(); // chunks: [0,1] [2,3]
    let batch = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let (c0, c1) = (&batch.chunks[0], &batch.chunks[1]);
    let mut kept = c1.chunk.clone();
    let refused = kept.events.remove(0);
    let ack = Ack {
        gen: batch.span.gen,
        remove: vec![c0.seq],
        rewrite: vec![(c1.seq, kept.clone())],
        dead: vec![DeadLetter {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: c1.chunk.received_at_ms,
            event: refused.clone(),
            status: 400,
            reason: "bad".into(),
            dead_at_ms: 0,
        }],
    };
    q.ack(0, ack).await.unwrap();
    assert_eq!(q.lanes()[0].events(), 1);
    assert_eq!(q.lanes()[0].bytes(), 400);
    assert_eq!(read_all(&q, 0), kept.events);
    assert_eq!(q.dead_letters().unwrap()[0].event, refused);
    // Removing the same chunks again (a duplicate ack) must not move the counters.
    let again = Ack {
        gen: batch.span.gen,
        remove: vec![c0.seq, 999],
        ..Ack::default()
    };
    q.ack(0, again).await.unwrap();
    assert_eq!(q.lanes()[0].events(), 1);
    q.ack(
        0,
        Ack {
            gen: batch.span.gen,
            remove: vec![c1.seq],
            ..Ack::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((q.lanes()[0].events(), q.lanes()[0].bytes()), (0, 0));
    q.ack(
        0,
        Ack {
            gen: batch.span.gen,
            remove: vec![c1.seq],
            ..Ack::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((q.lanes()[0].events(), q.lanes()[0].bytes()), (0, 0));
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&config(dir.path())).unwrap();
    assert_eq!((q.lanes()[0].events(), q.lanes()[0].bytes()), (0, 0));
    assert_eq!(q.dead_letter_count(), 1);
}

#[tokio::test]
async fn second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _q = Queue::open(&config(dir.path())).unwrap();
    let err = Queue::open(&config(dir.path())).unwrap_err();
    assert!(matches!(err, QueueError::Locked(_)), "{err}");
}

#[tokio::test]
async fn ordinary_chunks_stay_out_of_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = plain_config(dir.path());
    cfg.chunk_bytes = 16 * 1024;
    let q = Queue::open(&cfg).unwrap();
    for _ in 0..40 {
        q.append(incompressible_events("K", 400, 200))
            .await
            .unwrap();
    }
    let count =
        std::fs::read_dir(generation::gen_dir(&cfg.path, 1).join("blobs")).map_or(0, |d| d.count());
    assert_eq!(count, 0, "sled wrote blob files for ordinary chunks");
}

#[tokio::test]
async fn blob_files_of_large_events_are_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = plain_config(dir.path());
    cfg.chunk_bytes = 256 * 1024;
    let q = Queue::open(&cfg).unwrap();
    // 20 events of 250,000 bytes that do not compress, one chunk each: a sled leaf of up to
    // 17 of them is ~4 MB, over the blob threshold, so sled writes blob files.
    for _ in 0..20 {
        let event = incompressible_events("K", 1, crate::intake_api::MAX_EVENT_BYTES);
        q.append(event).await.unwrap();
    }
    let blobs =
        std::fs::read_dir(generation::gen_dir(&cfg.path, 1).join("blobs")).map_or(0, |d| d.count());
    let synced = q.stats().blob_fsyncs.load(Ordering::Relaxed);
    assert!(synced > 0, "the test wrote no blob file: it tests nothing");
    assert!(
        synced as usize >= blobs,
        "{blobs} blob files but only {synced} fsynced"
    );
}

/// Dead letters of large events make nodes over sled's blob threshold in the meta database:
/// its `blobs/` files must be fsynced like a generation's, or a power cut loses dead letters
/// (or leaves `meta/` unopenable).
#[tokio::test]
async fn blob_files_of_large_dead_letters_are_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    // 24 events of 200 KB refused for good, one at a time, as bisection dead-letters them.
    for event in incompressible_events("K", 24, 200_000) {
        let dead = DeadLetter {
            intake_key: "K".into(),
            timestamp: None,
            received_at_ms: 1,
            event: event.raw,
            status: 400,
            reason: "refused".into(),
            dead_at_ms: 2,
        };
        let ack = Ack {
            gen: 1,
            dead: vec![dead],
            ..Ack::default()
        };
        q.ack(0, ack).await.unwrap();
    }
    assert_eq!(q.dead_letter_count(), 24);
    let blobs = std::fs::read_dir(dir.path().join("q/meta/blobs")).map_or(0, |d| d.count());
    let synced = q.stats().meta_blob_fsyncs.load(Ordering::Relaxed);
    assert!(
        blobs > 0,
        "the test made no blob file in meta/: it tests nothing"
    );
    assert!(
        synced as usize >= blobs,
        "{blobs} blob files in meta/ but {synced} fsynced"
    );
}

/// A chunk that does not decode is skipped by the read, which goes on after it, and moved to
/// the dead letters by the queue itself, with its bytes: once, however many reads met it.
#[tokio::test]
async fn undecodable_chunks_are_skipped_and_quarantined_by_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    q.insert_raw_chunk(0, 7, b"\x09zz");
    let read = || {
        q.read(0, Position::default(), usize::MAX, usize::MAX)
            .unwrap()
    };
    let batch = read();
    assert_eq!(batch.span.undecodable, 1);
    assert_eq!(batch.events(), 2);
    assert_eq!(batch.span.next.seq, 8);
    // Met again before the writer got to it: still one dead letter.
    let _ = read();
    wait_for("the chunk quarantined", || q.dead_letter_count() == 1).await;
    let dead = q.dead_letters().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.as_bytes(), b"\x09zz");
    assert_eq!(
        (
            dead[0].intake_key.as_str(),
            dead[0].status,
            dead[0].reason.as_str()
        ),
        ("K", 0, "undecodable chunk")
    );
    assert_eq!(
        read().span.undecodable,
        0,
        "a quarantined chunk is delivered"
    );
    q.close().await.unwrap();
    drop(q);
    // And it stays so after a restart: the dead letter and the chunk's mark were committed.
    let q = Queue::open(&config(dir.path())).unwrap();
    assert_eq!(read_span_undecodable(&q), 0);
    assert_eq!(q.dead_letter_count(), 1);
}

fn read_span_undecodable(q: &Queue) -> usize {
    q.read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap()
        .span
        .undecodable
}

#[tokio::test]
async fn closed_queue_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    q.close().await.unwrap();
    assert!(matches!(
        q.append(events("K", 1, 10)).await,
        Err(QueueError::Closed)
    ));
}

fn small_generations(dir: &Path) -> QueueConfig {
    QueueConfig {
        generation_bytes: 64 * 1024,
        ..config(dir)
    }
}

/// 1,000 events of lane 0 ("K") in several generations, then a clean stop.
async fn fill_and_close(cfg: &QueueConfig) {
    let q = Queue::open(cfg).unwrap();
    for _ in 0..20 {
        q.append(events("K", 50, 100)).await.unwrap();
    }
    q.close().await.unwrap();
}

/// Removes every chunk of the (stopped) generation at `dir` and sets lane 0's counters to
/// zero, behind the queue's back, as acknowledgements before a crash would leave it; returns
/// the events removed.
fn empty_generation(dir: &Path) -> u64 {
    let db = generation::open_sled(dir, 1 << 20).unwrap();
    let mut removed = 0u64;
    for item in db.scan_prefix([record::CHUNK_PREFIX]) {
        let (k, v) = item.unwrap();
        removed += u64::from(record::ChunkHeader::decode(&v).unwrap().events);
        db.remove(k).unwrap();
    }
    set_lane_zero(&db);
    removed
}

/// Sets lane 0's counters in a generation's database to zero, behind the queue's back.
fn set_lane_zero(db: &sled::Db) {
    let rec = record::LaneRecord {
        intake_key: "K".into(),
        ..Default::default()
    };
    db.insert(record::lane_key(0), rec.encode()).unwrap();
    db.flush().unwrap();
}

fn gen_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    names.sort();
    names
}

/// Reads a lane from the start to the end, over every generation, acknowledging each batch
/// when `ack` is set.
async fn drain(q: &Queue, lane: u32, ack: bool) -> Vec<String> {
    let mut from = Position::default();
    let mut got = Vec::new();
    loop {
        let batch = q.read(lane, from, 500, usize::MAX).unwrap();
        assert_eq!(batch.span.undecodable, 0);
        if batch.chunks.is_empty() {
            return got;
        }
        assert!(batch.span.next > from, "reads must move forward");
        from = batch.span.next;
        if ack {
            let remove = batch.chunks.iter().map(|c| c.seq).collect();
            q.ack(
                lane,
                Ack {
                    gen: batch.span.gen,
                    remove,
                    ..Ack::default()
                },
            )
            .await
            .unwrap();
        }
        got.extend(batch.chunks.into_iter().flat_map(|c| c.chunk.events));
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn generations_rotate_keep_order_and_are_deleted_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    let q = Queue::open(&cfg).unwrap();
    let mut want = Vec::new();
    for round in 0..40 {
        let batch = events("K", 50, 100);
        want.extend(batch.iter().map(|e| format!("{round}:{}", e.raw)));
        let batch = batch
            .into_iter()
            .map(|mut e| {
                e.raw = format!("{round}:{}", e.raw);
                e
            })
            .collect();
        q.append(batch).await.unwrap();
    }
    let gens = gen_dirs(&cfg.path);
    assert!(gens.len() >= 4, "200 KB in 64 KiB generations: {gens:?}");
    // A read stops at the end of a generation; one from a sealed generation says so (delivery
    // must not linger for more events there), one from the active generation does not.
    let first = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    assert!(
        first.span.gen == 1 && first.span.sealed,
        "{:?}",
        (first.span.gen, first.span.sealed)
    );
    let (_, active) = q.shared.gens_snapshot();
    let last = q
        .read(
            0,
            Position {
                gen: active,
                seq: 0,
            },
            usize::MAX,
            usize::MAX,
        )
        .unwrap();
    assert!(last.span.gen == active && !last.span.sealed && !last.chunks.is_empty());
    // Order holds across generations, and reading alone removes nothing.
    assert_eq!(drain(&q, 0, false).await, want);
    assert_eq!(q.totals().0, 2000);
    let disk_full = generation::disk_usage(&cfg.path);

    assert_eq!(drain(&q, 0, true).await, want);
    assert_eq!(q.totals(), (0, 0));
    // Sealed generations go as soon as they are empty (readers may hold one for a moment).
    wait_for("delivered generations deleted", || {
        gen_dirs(&cfg.path).len() == 2 && q.status().generations == 1
    })
    .await;
    let disk_empty = generation::disk_usage(&cfg.path);
    assert!(
        disk_empty < disk_full,
        "space is given back: {disk_empty} bytes after the drain, {disk_full} before"
    );
    // The queue goes on after the deletions, and after a reopen.
    q.append(events("K", 3, 10)).await.unwrap();
    q.close().await.unwrap();
    drop(q);
    assert_eq!(
        gen_dirs(&cfg.path).len(),
        1,
        "a clean stop leaves no unused generation"
    );
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals(), (3, 30));
    assert_eq!(drain(&q, 0, false).await.len(), 3);
}

#[tokio::test]
async fn a_backlog_in_many_generations_reopens_without_opening_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    {
        let q = Queue::open(&cfg).unwrap();
        for _ in 0..30 {
            q.append(events("A", 40, 100)).await.unwrap();
            q.append(events("B", 10, 100)).await.unwrap();
        }
        q.close().await.unwrap();
    }
    let q = Queue::open(&cfg).unwrap();
    let status = q.status();
    assert!(status.generations >= 3, "{status:?}");
    assert_eq!(
        status.open_generations, 1,
        "only the active generation is open after a reopen"
    );
    assert_eq!(q.totals(), (1500, 150_000));
    let a = q.lanes().iter().find(|l| l.intake_key == "A").unwrap().id;
    let b = q.lanes().iter().find(|l| l.intake_key == "B").unwrap().id;
    assert_eq!(drain(&q, a, false).await.len(), 1200);
    assert_eq!(drain(&q, b, true).await.len(), 300);
    assert_eq!(q.totals(), (1200, 120_000));
    // New appends go after the old ones, in the newest generation.
    q.append(events("A", 1, 7)).await.unwrap();
    let all = drain(&q, a, true).await;
    assert_eq!(all.len(), 1201);
    assert_eq!(all.last().unwrap().len(), 7);
    wait_for("all generations but the active one deleted", || {
        gen_dirs(&cfg.path).len() == 2 && q.status().generations == 1
    })
    .await;
}

/// A crash after the last acknowledgement of a sealed generation but before its deletion
/// leaves a generation whose summary (written when it was sealed) still counts events. It must
/// be found empty and deleted even though delivery will never read it again.
#[tokio::test]
async fn a_generation_emptied_before_a_crash_is_found_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    fill_and_close(&cfg).await;
    // Empty the oldest generation behind the queue's back, as the acks before a crash would.
    let oldest = generation::gen_dir(&cfg.path, 1);
    let removed = empty_generation(&oldest);
    assert!(removed > 0);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals().0, 1000, "the summary still counts them");
    wait_for("the empty generation deleted", || !oldest.exists()).await;
    assert_eq!(q.totals().0, 1000 - removed);
    assert_eq!(drain(&q, 0, false).await.len() as u64, 1000 - removed);
}

/// The first release kept one sled database at the root of the queue directory, with dead
/// letters in it. This release moves it into generation 0 and reads it.
#[tokio::test]
async fn a_queue_of_the_first_layout_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    {
        std::fs::create_dir_all(&cfg.path).unwrap();
        let db = generation::open_sled(&cfg.path, 1 << 20).unwrap();
        db.insert(record::META_FORMAT_KEY, &1u32.to_be_bytes())
            .unwrap();
        let rec = record::LaneRecord {
            intake_key: "OLD".into(),
            events: 3,
            bytes: 6,
            ..Default::default()
        };
        db.insert(record::lane_key(0), rec.encode_v1()).unwrap();
        let chunk = Chunk {
            intake_key: "OLD".into(),
            timestamp: None,
            received_at_ms: 1,
            events: vec!["a1".into(), "a2".into(), "a3".into()],
        };
        db.insert(
            record::chunk_key(0, 4),
            chunk.encode_compressed(record::Codec::Lz4),
        )
        .unwrap();
        let dead = DeadLetter {
            intake_key: "OLD".into(),
            timestamp: None,
            received_at_ms: 1,
            event: "refused".into(),
            status: 400,
            reason: "bad".into(),
            dead_at_ms: 2,
        };
        db.insert(record::dead_key(0), record::encode_value(&dead))
            .unwrap();
        db.flush().unwrap();
    }
    let q = Queue::open(&cfg).unwrap();
    assert!(!cfg.path.join("db").exists());
    assert!(generation::gen_dir(&cfg.path, 0).join("db").exists());
    assert_eq!(q.lanes()[0].intake_key, "OLD");
    assert_eq!(q.totals(), (3, 6));
    assert_eq!(read_all(&q, 0), ["a1", "a2", "a3"]);
    assert_eq!(q.dead_letters().unwrap()[0].event, "refused");
    // New events go to the same lane, after the old ones.
    q.append(events("OLD", 1, 4)).await.unwrap();
    assert_eq!(drain(&q, 0, false).await.len(), 4);
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals().0, 4);
    assert_eq!(q.dead_letter_count(), 1, "dead letters are moved once");
}

/// The version byte of every chunk stored in the active generation, in key order.
fn stored_versions(q: &Queue) -> Vec<u8> {
    let (gens, active) = q.shared.gens_snapshot();
    let gen = gens.iter().find(|g| g.id == active).unwrap();
    let db = gen.db().unwrap().unwrap();
    db.db
        .scan_prefix([record::CHUNK_PREFIX])
        .map(|item| item.unwrap().1[0])
        .collect()
}

#[tokio::test]
async fn chunks_are_compressed_from_the_first_byte_when_it_pays() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        chunk_bytes: 16 * 1024,
        ..config(dir.path())
    };
    let q = Queue::open(&cfg).unwrap();
    q.append(events("K", 10, 100)).await.unwrap();
    assert_eq!(
        stored_versions(&q),
        [record::CHUNK_V3],
        "log lines compress: stored compressed from the first chunk"
    );
    // One short event: the compressed value would be larger.
    q.append(incompressible_events("K", 1, 12)).await.unwrap();
    assert_eq!(
        stored_versions(&q),
        [record::CHUNK_V3, record::VALUE_V1],
        "what does not compress is stored plain"
    );
    // Both kinds read back the same.
    let all = drain(&q, 0, true).await;
    assert_eq!(all.len(), 11);
    assert_eq!(
        all[..10],
        events("K", 10, 100)
            .into_iter()
            .map(|e| e.raw)
            .collect::<Vec<_>>()[..]
    );
}

/// Counters that say a sealed generation is empty while it still holds chunks (rot, a bug)
/// must not get it deleted: the writer checks the store before deleting, and recounts.
#[tokio::test]
async fn a_generation_whose_counters_lie_is_recounted_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    fill_and_close(&cfg).await;
    let oldest = generation::gen_dir(&cfg.path, 1);
    let held = {
        let db = generation::open_sled(&oldest, 1 << 20).unwrap();
        let held = db.scan_prefix([record::CHUNK_PREFIX]).count();
        set_lane_zero(&db);
        held
    };
    assert!(held > 0);
    let q = Queue::open(&cfg).unwrap();
    // An acknowledgement in the generation makes the writer read its (lying) counters at once;
    // they say empty, so the same pass tries to delete it, finds chunks, and recounts. A second
    // operation is answered only after that pass.
    let nothing = Ack {
        gen: 1,
        remove: vec![u64::MAX],
        ..Ack::default()
    };
    q.ack(0, nothing.clone()).await.unwrap();
    q.ack(0, nothing).await.unwrap();
    assert!(oldest.exists(), "a generation holding chunks was deleted");
    assert_eq!(q.totals().0, 1000);
    assert_eq!(drain(&q, 0, true).await.len(), 1000);
}

/// Reads a lane to its end and acknowledges everything, as delivery does (the queue moves
/// undecodable chunks to the dead letters itself).
async fn deliver_all(q: &Queue, lane: u32) -> usize {
    let mut from = Position::default();
    let mut delivered = 0;
    loop {
        let batch = q.read(lane, from, 500, usize::MAX).unwrap();
        if batch.chunks.is_empty() && batch.span.undecodable == 0 {
            return delivered;
        }
        from = batch.span.next;
        delivered += batch.events();
        let ack = Ack {
            gen: batch.span.gen,
            remove: batch.chunks.iter().map(|c| c.seq).collect(),
            ..Ack::default()
        };
        q.ack(lane, ack).await.unwrap();
    }
}

/// A chunk whose header no longer decodes (one byte left: a tampered generation) was counted
/// when it was appended, and its quarantine cannot say how many events it held. Once delivery
/// has passed the end of its sealed generation, the generation is recounted from what it holds
/// and deleted, whatever its counters said.
#[tokio::test]
async fn a_generation_with_an_undecodable_chunk_is_deleted_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    fill_and_close(&cfg).await;
    let oldest = generation::gen_dir(&cfg.path, 1);
    {
        let db = generation::open_sled(&oldest, 1 << 20).unwrap();
        let (key, _) = db
            .scan_prefix([record::CHUNK_PREFIX])
            .next()
            .unwrap()
            .unwrap();
        db.insert(key, &[record::CHUNK_V2][..]).unwrap();
        db.flush().unwrap();
    }
    let q = Queue::open(&cfg).unwrap();
    let delivered = deliver_all(&q, 0).await;
    assert!(delivered > 0);
    wait_for("the undecodable chunk quarantined", || {
        q.dead_letter_count() == 1
    })
    .await;
    wait_for("the delivered generation deleted", || !oldest.exists()).await;
    wait_for("the counters recounted", || q.totals() == (0, 0)).await;
}

mod checkpoints;
#[cfg(feature = "failpoints")]
mod cut_short;
mod delivery_reads;
#[cfg(feature = "failpoints")]
mod fail_points;
mod watermark;
