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

fn read_all(q: &Queue, lane: u32) -> Vec<String> {
    q.read(lane, 0, usize::MAX, usize::MAX)
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
    let batch = q.read(a.id, 0, usize::MAX, usize::MAX).unwrap();
    let sizes: Vec<usize> = batch.chunks.iter().map(|c| c.chunk.events.len()).collect();
    assert_eq!(sizes, [2, 1, 1]);
}

#[tokio::test]
async fn read_respects_limits_and_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 10, 500)).await.unwrap(); // 5 chunks of 2
    let mut stamped = events("K", 1, 5);
    stamped[0].timestamp = Some("2024-01-01T00:00:00Z".into());
    q.append(stamped).await.unwrap();
    let first = q.read(0, 0, 4, usize::MAX).unwrap();
    assert_eq!(first.events(), 4);
    let rest = q.read(0, first.next_seq, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        rest.events(),
        6,
        "stops before the chunk with another event date"
    );
    let last = q.read(0, rest.next_seq, usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        last.chunks[0].chunk.timestamp.as_deref(),
        Some("2024-01-01T00:00:00Z")
    );
    // A single chunk larger than the limits is still returned, so nothing can stall.
    let one = q.read(0, 0, 1, 1).unwrap();
    assert_eq!(one.chunks.len(), 1);
}

#[tokio::test]
async fn ack_removes_rewrites_and_never_underflows() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 4, 400)).await.unwrap(); // chunks: [0,1] [2,3]
    let batch = q.read(0, 0, usize::MAX, usize::MAX).unwrap();
    let (c0, c1) = (&batch.chunks[0], &batch.chunks[1]);
    let mut kept = c1.chunk.clone();
    let refused = kept.events.remove(0);
    let ack = Ack {
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
        remove: vec![c0.seq, 999],
        ..Ack::default()
    };
    q.ack(0, again).await.unwrap();
    assert_eq!(q.lanes()[0].events(), 1);
    q.ack(
        0,
        Ack {
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
    let mut cfg = config(dir.path());
    cfg.chunk_bytes = 64 * 1024;
    let q = Queue::open(&cfg).unwrap();
    for _ in 0..40 {
        q.append(events("K", 400, 200)).await.unwrap();
    }
    let count = std::fs::read_dir(cfg.path.join("blobs")).map_or(0, |d| d.count());
    assert_eq!(count, 0, "sled wrote blob files for ordinary chunks");
}

#[tokio::test]
async fn blob_files_of_large_events_are_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.chunk_bytes = 256 * 1024;
    let q = Queue::open(&cfg).unwrap();
    // 20 events of 250,000 bytes, one chunk each: a sled leaf of up to 17 of them is ~4 MB,
    // over the blob threshold, so sled writes blob files.
    for _ in 0..20 {
        q.append(events("K", 1, crate::intake_api::MAX_EVENT_BYTES))
            .await
            .unwrap();
    }
    let blobs = std::fs::read_dir(cfg.path.join("blobs")).map_or(0, |d| d.count());
    let synced = q.stats().blob_fsyncs.load(Ordering::Relaxed);
    assert!(synced > 0, "the test wrote no blob file: it tests nothing");
    assert!(
        synced as usize >= blobs,
        "{blobs} blob files but only {synced} fsynced"
    );
}

#[tokio::test]
async fn corrupt_chunks_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    q.append(events("K", 1, 10)).await.unwrap();
    q.shared
        .tree
        .insert(record::chunk_key(0, 7), &b"\x09zz"[..])
        .unwrap();
    let batch = q.read(0, 0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(batch.corrupt.len(), 1);
    assert_eq!(batch.corrupt[0].0, 7);
    assert_eq!(batch.events(), 2);
    assert_eq!(batch.next_seq, 8);
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

#[test]
fn redaction_never_shows_a_usable_key() {
    assert_eq!(redact_key("short"), "…");
    let shown = redact_key("0123456789abcdef0123");
    assert_eq!(shown, "…0123");
}
