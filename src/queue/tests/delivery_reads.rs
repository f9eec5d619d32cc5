//! Queue tests of what delivery reads: chunks kept uncompressed since their commit
//! (`fresh.rs`) read exactly as the stored ones, and a batch that waits for more events reads
//! on after its chunks (`Queue::read_on`) within its generation, its event date and its limits.

use super::*;

fn with_delivery_cache(dir: &Path, bytes: usize) -> QueueConfig {
    QueueConfig {
        delivery_cache_bytes: bytes,
        ..config(dir)
    }
}

/// Five appends of compressible events; what they are, in order.
async fn append_five(q: &Queue) -> Vec<String> {
    let mut want = Vec::new();
    for _ in 0..5 {
        let batch = events("K", 20, 100);
        want.extend(batch.iter().map(|e| e.raw.clone()));
        q.append(batch).await.unwrap();
    }
    want
}

/// Every chunk is read right whether its body was kept (read from memory), dropped because
/// delivery fell further behind than the cache holds, or never kept (the cache off): and a
/// second read of the same chunks, whose bodies were taken by the first, decompresses them
/// from the store.
#[tokio::test]
async fn kept_bodies_read_as_the_stored_chunks() {
    for (limit, kept) in [(8 << 20, "all"), (0, "none"), (3000, "dropped")] {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&with_delivery_cache(dir.path(), limit)).unwrap();
        let want = append_five(&q).await;
        assert_eq!(read_all(&q, 0), want, "cache of {limit} bytes");
        let (hits, misses) = q.fresh_reads();
        let chunks = hits + misses;
        assert!(chunks >= 5, "compressed chunks read: {chunks}");
        match kept {
            "all" => assert_eq!(misses, 0, "all from memory with room for all"),
            "none" => assert_eq!(hits, 0, "nothing from memory with the cache off"),
            _ => assert!(misses > 0, "{hits} from memory, {misses} not"),
        }
        assert_eq!(read_all(&q, 0), want, "read again, cache of {limit} bytes");
        assert_eq!(
            q.fresh_reads(),
            (hits, misses + chunks),
            "the second read decompressed all"
        );
    }
}

/// A body that does not hold what the stored header says (it cannot happen: keys are never
/// handed out twice) is not trusted: the read falls back to the stored value.
#[tokio::test]
async fn a_kept_body_that_disagrees_with_the_store_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    q.append(events("K", 5, 100)).await.unwrap();
    let gen = q.shared.gens_snapshot().1;
    let stored = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let seq = stored.chunks[0].seq;
    let mut other = stored.chunks[0].chunk.clone();
    other.events.pop();
    let (_, body) = other.encode_keeping_body(record::Codec::Zstd);
    q.shared
        .fresh
        .insert([((gen, 0, seq), body.expect("compressible"))]);
    let again = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    assert_eq!(again.chunks[0].chunk, stored.chunks[0].chunk);
}

/// `read_on` takes only what came after the batch's chunks, of the batch's event date, within
/// what the batch has left of its limits (the first chunk included); past its generation it
/// takes nothing and says the generation is sealed, so that the batch goes as it is.
#[tokio::test]
async fn read_on_continues_a_batch_within_its_generation_date_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&small_generations(dir.path())).unwrap();
    let all = ReadLimits {
        max_events: usize::MAX,
        max_bytes: usize::MAX,
        reception_tolerance_ms: None,
    };
    let read_on = |from: Position, limits: ReadLimits, timestamp: Option<&str>| {
        let mut got = Vec::new();
        let date = BatchDate {
            timestamp,
            received_at_ms: 0,
        };
        let span = q
            .read_on(0, from, limits, date, &mut |_, c| {
                got.extend(c.events.iter().map(|e| e.to_string()))
            })
            .unwrap();
        (span, got)
    };
    q.append(events("K", 10, 100)).await.unwrap();
    let first = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    assert_eq!(first.events(), 10);

    let (span, got) = read_on(first.span.next, all, None);
    assert!(got.is_empty() && !span.sealed, "nothing new yet: {got:?}");

    let more = events("K", 4, 100);
    q.append(more.clone()).await.unwrap();
    let one_event = ReadLimits {
        max_events: 1,
        ..all
    };
    let (_, got) = read_on(first.span.next, one_event, None);
    assert!(got.is_empty(), "the first chunk must fit too: {got:?}");
    let (span, got) = read_on(first.span.next, all, None);
    assert_eq!(got, more.iter().map(|e| e.raw.clone()).collect::<Vec<_>>());

    let mut dated = events("K", 1, 100);
    dated[0].timestamp = Some("2024-01-01T00:00:00Z".into());
    q.append(dated).await.unwrap();
    let (_, got) = read_on(span.next, all, None);
    assert!(got.is_empty(), "another event date ends the batch: {got:?}");
    let (span, got) = read_on(span.next, all, Some("2024-01-01T00:00:00Z"));
    assert_eq!(got.len(), 1, "the same date goes on");

    // Fill past the 64 KiB generation: what follows is in the next one.
    let before = q.shared.gens_snapshot().1;
    while q.shared.gens_snapshot().1 == before {
        q.append(events("K", 50, 100)).await.unwrap();
    }
    let end = q.read(0, span.next, usize::MAX, usize::MAX).unwrap();
    assert_eq!(end.span.gen, before, "the rest of the first generation");
    assert!(end.span.sealed);
    let (span, got) = read_on(end.span.next, all, None);
    assert!(
        got.is_empty(),
        "read_on never crosses into the next generation"
    );
    assert!(span.sealed, "so the batch goes as it is");
}

/// One request carries one date: with reception times sent (a tolerance), a read of undated
/// events stops at the first chunk received more than the tolerance after the batch's first,
/// or before it (a clock stepped back), and says it was cut there (so that the batch does not
/// linger for what can never join it). The tolerance is inclusive. Without one
/// (`event_time = "intake"`), reception times do not cut; chunks with a date of their own keep
/// theirs, whenever they were received.
#[tokio::test]
async fn reception_times_cut_a_read_beyond_the_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&config(dir.path())).unwrap();
    let appends: [(u64, Option<&str>); 9] = [
        (10_000, None),
        (10_600, None),
        (11_000, None), // exactly the tolerance after the first: admitted
        (11_001, None), // cut: a new batch
        (12_000, None),
        (9_000, None), // the clock stepped back by 3 s: cut
        (9_500, None),
        (30_000, Some("2024-01-01T00:00:00Z")), // a date of its own: cut
        (90_000, Some("2024-01-01T00:00:00Z")), // same date, a minute later: joins
    ];
    for (i, (at, timestamp)) in appends.iter().enumerate() {
        let mut batch = events("K", 2, 50);
        for e in &mut batch {
            e.timestamp = timestamp.map(str::to_owned);
            e.raw = format!("append {i} {}", e.raw);
        }
        q.append_received_at(batch, *at).await.unwrap();
    }
    let reads = |tolerance: Option<u64>| {
        let limits = ReadLimits {
            max_events: usize::MAX,
            max_bytes: usize::MAX,
            reception_tolerance_ms: tolerance,
        };
        let mut from = Position::default();
        let mut batches: Vec<(Vec<u64>, bool)> = Vec::new();
        loop {
            let mut received = Vec::new();
            let span = q
                .read_with(0, from, limits, &mut |_, c| received.push(c.received_at_ms))
                .unwrap();
            if span.chunks == 0 {
                return batches;
            }
            batches.push((received, span.cut));
            from = span.next;
        }
    };
    assert_eq!(
        reads(Some(1000)),
        [
            (vec![10_000, 10_600, 11_000], true),
            (vec![11_001, 12_000], true),
            (vec![9_000, 9_500], true),
            (vec![30_000, 90_000], false),
        ]
    );
    assert_eq!(
        reads(None),
        [
            (
                vec![10_000, 10_600, 11_000, 11_001, 12_000, 9_000, 9_500],
                true
            ),
            (vec![30_000, 90_000], false),
        ],
        "event_time = \"intake\": only the sender's dates cut"
    );
    // read_on continues a batch by the same rule, from its first chunk's reception time.
    let first = q.read(0, Position::default(), 1, usize::MAX).unwrap();
    assert_eq!(first.chunks.len(), 1);
    let limits = ReadLimits {
        max_events: usize::MAX,
        max_bytes: usize::MAX,
        reception_tolerance_ms: Some(1000),
    };
    let date = BatchDate {
        timestamp: None,
        received_at_ms: 10_000,
    };
    let mut received = Vec::new();
    let span = q
        .read_on(0, first.span.next, limits, date, &mut |_, c| {
            received.push(c.received_at_ms)
        })
        .unwrap();
    assert_eq!(received, [10_600, 11_000]);
    assert!(span.cut);
}

/// The rule itself, chunk by chunk.
#[test]
fn a_batch_date_admits_what_one_request_can_carry() {
    let undated = BatchDate {
        timestamp: None,
        received_at_ms: 5_000,
    };
    assert!(undated.admits(None, 5_000, Some(0)));
    assert!(!undated.admits(None, 5_001, Some(0)));
    assert!(undated.admits(None, 6_000, Some(1000)));
    assert!(undated.admits(None, 4_000, Some(1000)));
    assert!(!undated.admits(None, 3_999, Some(1000)));
    assert!(!undated.admits(None, 6_001, Some(1000)));
    assert!(undated.admits(None, u64::MAX, None));
    assert!(!undated.admits(Some("2024-01-01T00:00:00Z"), 5_000, None));
    let dated = BatchDate {
        timestamp: Some("2024-01-01T00:00:00Z"),
        received_at_ms: 5_000,
    };
    assert!(dated.admits(Some("2024-01-01T00:00:00Z"), 999_999, Some(1000)));
    assert!(!dated.admits(None, 5_000, Some(1000)));
    assert!(!dated.admits(Some("2024-01-01T00:00:01Z"), 5_000, Some(1000)));
}

/// A chunk that a read stops at (it cannot join the batch) begins the next one: if its body
/// was kept in memory (`fresh.rs`), the read that stopped at it gives it back, so that the next
/// read takes it from memory too instead of decompressing it.
#[tokio::test]
async fn a_chunk_a_read_stops_at_keeps_its_body_for_the_next_read() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&with_delivery_cache(dir.path(), 8 << 20)).unwrap();
    for at in [10_000, 20_000] {
        q.append_received_at(events("K", 5, 100), at).await.unwrap();
    }
    let limits = ReadLimits {
        max_events: usize::MAX,
        max_bytes: usize::MAX,
        reception_tolerance_ms: Some(1000),
    };
    let mut from = Position::default();
    for want in [10_000, 20_000] {
        let mut received = Vec::new();
        let span = q
            .read_with(0, from, limits, &mut |_, c| received.push(c.received_at_ms))
            .unwrap();
        assert_eq!(received, [want]);
        from = span.next;
    }
    let (from_memory, decompressed) = q.fresh_reads();
    assert_eq!(decompressed, 0, "{from_memory} from memory");
}
