//! Queue tests that inject faults (`failpoints` feature): failed flushes and fsyncs, and the
//! writer held before its fsync.

use super::*;
use std::collections::HashMap;

/// Events of 400 bytes (two to a chunk) whose text says which group they belong to.
fn tagged(key: &str, tag: &str, n: usize) -> Vec<IncomingEvent> {
    (0..n)
        .map(|i| IncomingEvent {
            intake_key: key.into(),
            timestamp: None,
            raw: format!("{tag}-{i:03}-{}", "x".repeat(390)),
        })
        .collect()
}

/// The events' texts as a source's lines ([`Queue::submit_lines`]).
fn lines(events: &[IncomingEvent]) -> Vec<std::borrow::Cow<'_, str>> {
    events.iter().map(|e| e.raw.as_str().into()).collect()
}

fn texts(events: &[IncomingEvent]) -> Vec<String> {
    events.iter().map(|e| e.raw.clone()).collect()
}

/// Every event of every lane after a reopen, by intake key; asserts that each chunk is in the
/// lane of its own intake key.
fn contents_by_key(q: &Queue) -> HashMap<String, Vec<String>> {
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for lane in q.lanes() {
        let batch = q
            .read(lane.id, Position::default(), usize::MAX, usize::MAX)
            .unwrap();
        for c in batch.chunks {
            assert_eq!(
                c.chunk.intake_key, lane.intake_key,
                "lane {} holds a chunk of another intake key",
                lane.id
            );
            by_key
                .entry(lane.intake_key.clone())
                .or_default()
                .extend(c.chunk.events);
        }
    }
    by_key
}

fn contains_run(haystack: &[String], run: &[String]) -> bool {
    haystack.windows(run.len()).any(|w| w == run)
}

/// The store's failure injected at `point` while `b` is committed, in one test's queue.
struct Injected {
    _aim: crate::failpoint::Aimed,
    _scenario: fail::FailScenario<'static>,
}

/// Serialises the tests that configure fail points, and aims the I/O points at `path`.
fn inject(path: &Path) -> Injected {
    // Aimed first and released last: the points never fire for other tests' queues.
    let aim = crate::failpoint::aim(path);
    Injected {
        _scenario: fail::FailScenario::setup(),
        _aim: aim,
    }
}

/// Holds the writer at fail point `queue-fsync` (aim it with [`inject`] first): each time the
/// writer gets there it says so on the receiver, then waits for a message on the sender (60 s
/// at most, so that a failed test cannot hang the suite).
fn hold_at_fsync() -> (
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (reached_tx, reached) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    fail::cfg_callback("queue-fsync", move || {
        let _ = reached_tx.send(());
        let _ = released
            .lock()
            .unwrap()
            .recv_timeout(std::time::Duration::from_secs(60));
    })
    .unwrap();
    (reached, release)
}

/// A commit that fails at `point` after its batch reached sled: its chunks may be visible
/// to readers, and a later group must never be stored under their keys, so that a
/// delivery of the failed group (which the intake acknowledges) removes nothing else.
async fn a_failed_commit_hands_out_no_key_twice(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let injected = inject(&cfg.path);
    let q = Queue::open(&cfg).unwrap();
    let (a, b, c) = (
        tagged("K", "a", 4),
        tagged("K", "b", 6),
        tagged("K", "c", 2),
    );
    q.append(a.clone()).await.unwrap();
    let a_chunks = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap()
        .chunks
        .len();
    fail::cfg(point, "return").unwrap();
    assert!(
        q.append(b).await.is_err(),
        "{point}: the failure was not injected"
    );
    fail::remove(point);
    // Delivery reads what sled shows: the failed group's chunks among them.
    let seen = q
        .read(0, Position::default(), usize::MAX, usize::MAX)
        .unwrap();
    let c_acked = q.append(c.clone()).await;
    if let Err(e) = &c_acked {
        assert!(matches!(e, QueueError::RestartNeeded(_)), "{point}: {e}");
    }
    // The intake acknowledges the failed group's chunks: they are removed.
    let failed_seqs: Vec<u64> = seen.chunks[a_chunks..].iter().map(|c| c.seq).collect();
    let removal = q
        .ack(
            0,
            Ack {
                gen: seen.span.gen,
                remove: failed_seqs,
                ..Ack::default()
            },
        )
        .await;
    if c_acked.is_ok() {
        let now = read_all(&q, 0);
        assert!(
            contains_run(&now, &texts(&c)),
            "{point}: the removal of the failed group's chunks removed an acknowledged \
             group's (removal: {removal:?})"
        );
    }
    let closed = q.close().await;
    assert!(
        matches!(closed, Err(QueueError::RestartNeeded(_))),
        "{point}: a queue whose store failed must close with an error: {closed:?}"
    );
    drop(q);
    drop(injected);
    // Recovery reads what is on disk; everything acknowledged is there, whole, in order.
    let q = Queue::open(&cfg).unwrap();
    let d = tagged("K", "d", 3);
    q.append(d.clone()).await.unwrap();
    let stored = contents_by_key(&q).remove("K").unwrap_or_default();
    assert!(contains_run(&stored, &texts(&a)), "{point}: {stored:?}");
    assert!(contains_run(&stored, &texts(&d)), "{point}");
    if c_acked.is_ok() {
        assert!(contains_run(&stored, &texts(&c)), "{point}");
    }
}

#[tokio::test]
async fn a_failed_flush_hands_out_no_key_twice() {
    a_failed_commit_hands_out_no_key_twice("queue-flush").await;
}

#[tokio::test]
async fn a_failed_blob_sync_hands_out_no_key_twice() {
    a_failed_commit_hands_out_no_key_twice("queue-blob-sync").await;
}

#[tokio::test]
async fn a_failed_fsync_hands_out_no_key_twice() {
    a_failed_commit_hands_out_no_key_twice("queue-fsync").await;
}

/// A failed commit that created a lane: its id is never given to another intake key, or
/// chunks of two keys would share a lane (and a delivery batch).
#[tokio::test]
async fn a_failed_commit_hands_out_no_lane_id_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let injected = inject(&cfg.path);
    let q = Queue::open(&cfg).unwrap();
    q.append(tagged("K", "a", 2)).await.unwrap();
    // The meta database's fsync (the new lane) passes, the generation's fails.
    fail::cfg("queue-fsync", "1*off->return").unwrap();
    assert!(q.append(tagged("L", "b", 6)).await.is_err());
    fail::remove("queue-fsync");
    let c = tagged("M", "c", 2);
    let c_acked = q.append(c.clone()).await;
    let _ = q.close().await;
    drop(q);
    drop(injected);
    let q = Queue::open(&cfg).unwrap();
    let stored = contents_by_key(&q);
    if c_acked.is_ok() {
        assert_eq!(stored.get("M"), Some(&texts(&c)));
    }
}

/// An append is answered only after the fsyncs that cover it: the writer is held after
/// its flush, before each fsync (the meta database's for the new lane, then the
/// generation's), and the append must still be pending each time. (Counting fsyncs after
/// the fact, or killing the process, cannot see an answer sent too early: the page cache
/// survives a kill.)
#[tokio::test]
async fn an_append_is_pending_until_its_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let q = Queue::open(&cfg).unwrap();
    let _injected = inject(&cfg.path);
    let (mut reached, release) = hold_at_fsync();
    let mut append = tokio::spawn({
        let q = q.clone();
        async move { q.append(tagged("K", "a", 3)).await }
    });
    let mut held = 0;
    loop {
        tokio::select! {
            done = &mut append => {
                done.unwrap().unwrap();
                break;
            }
            Some(()) = reached.recv() => {
                held += 1;
                let fsyncs = q.stats().fsyncs.load(Ordering::Relaxed);
                // Flushed, not fsynced: the sender must not have its answer yet. An answer
                // sent early would reach it within moments.
                let early =
                    tokio::time::timeout(std::time::Duration::from_millis(500), &mut append)
                        .await;
                assert!(early.is_err(), "answered before its fsync: {early:?}");
                assert_eq!(q.stats().fsyncs.load(Ordering::Relaxed), fsyncs);
                release.send(()).unwrap();
            }
        }
    }
    assert!(held >= 2, "the writer was held at {held} fsyncs, not 2");
    fail::remove("queue-fsync");
}

/// An append and an acknowledgement of the same lane in one group commit, the
/// acknowledgement in a sealed generation still counted from its summary: reading that
/// generation's real counts corrects the lane's total, and the append staged before must
/// not write the stale total back.
#[tokio::test]
async fn an_append_and_an_ack_in_one_group_keep_the_recount() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    fill_and_close(&cfg).await;
    // Empty generation 1 behind the queue's back: its summary still counts its events.
    let removed = empty_generation(&generation::gen_dir(&cfg.path, 1));
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals().0, 1000);
    // Hold the writer in a commit, so that the next two operations make one group.
    let _injected = inject(&cfg.path);
    let (mut reached, release) = hold_at_fsync();
    let spawn_append = |n| {
        let q = q.clone();
        tokio::spawn(async move { q.append(events("K", n, 10)).await })
    };
    let first = spawn_append(1);
    reached.recv().await.unwrap();
    let queued = |q: &Queue| q.ops.max_capacity() - q.ops.capacity();
    let append = spawn_append(1);
    wait_for("the append queued", || queued(&q) >= 1).await;
    let ack = tokio::spawn({
        let q = q.clone();
        async move {
            let nothing = Ack {
                gen: 1,
                remove: vec![u64::MAX],
                ..Ack::default()
            };
            q.ack(0, nothing).await
        }
    });
    wait_for("the ack queued", || queued(&q) >= 2).await;
    fail::remove("queue-fsync");
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    append.await.unwrap().unwrap();
    ack.await.unwrap().unwrap();
    assert_eq!(q.totals().0, 1000 - removed + 2);
}

/// The values of chunks `seqs` of lane 0 as sled stores them, read from a closed generation.
/// Opening it also makes sled write a snapshot that covers its whole log: from then on, sled
/// opens it without reading the older segments again.
fn stored_values(gen_dir: &Path, seqs: &[u64]) -> Vec<(u64, Vec<u8>)> {
    let db = generation::open_sled(gen_dir, 1 << 20).unwrap();
    seqs.iter()
        .map(|&seq| {
            let value = db.get(record::chunk_key(0, seq)).unwrap().unwrap();
            (seq, value.to_vec())
        })
        .collect()
}

/// Overwrites every copy of 32 bytes from the middle of a chunk's stored value (its
/// compressed events, past the header and the metadata that chunks share) in a generation's
/// log with a fixed pattern. The events must not compress, or the same bytes could stand in
/// other chunks (and other leaves).
fn overwrite_value(gen_dir: &Path, value: &[u8]) {
    assert!(value.len() > 1024, "the chunk is too small to find");
    let needle = &value[value.len() / 2..value.len() / 2 + 32];
    let path = gen_dir.join("db");
    let mut bytes = std::fs::read(&path).unwrap();
    let mut hits = 0;
    for at in 0..bytes.len() - needle.len() {
        if &bytes[at..at + needle.len()] == needle {
            bytes[at..at + needle.len()].fill(0xA5);
            hits += 1;
        }
    }
    assert!(hits > 0, "the chunk is not in the generation's log");
    std::fs::write(&path, bytes).unwrap();
}

/// Copies a directory (a generation's files), to try a damage on the copy.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Whether a damaged generation is damaged the way the test needs: sled opens it, the
/// writer's count of it reads (the format marker, the lane record, the dead-letter scan at
/// the start of the keys, the lane's last chunk), and only the read of chunk `damaged` fails.
fn damaged_only_at(gen_dir: &Path, damaged: u64, last: u64) -> bool {
    let Ok(db) = generation::open_sled(gen_dir, 1 << 20) else {
        return false; // the damage lies where sled reads at open: its last segment
    };
    let reads = |key: &[u8]| matches!(db.get(key), Ok(Some(_)));
    reads(record::META_FORMAT_KEY)
        && reads(&record::lane_key(0))
        && reads(&record::chunk_key(0, last))
        && db.scan_prefix([record::DEAD_PREFIX]).all(|r| r.is_ok())
        && matches!(
            db.get(record::chunk_key(0, damaged)).map_err(QueueError::from),
            Err(e) if e.is_corrupt()
        )
}

/// Damages one leaf in the middle of a closed generation so that sled opens it and the
/// writer counts it, but a read of the leaf's chunks fails its checksum; returns the chunk.
/// sled reads the segment its snapshot points into at open: the damage must lie in an
/// earlier one. Where a leaf's last copy lies varies from run to run (sled's segment cleaner
/// moves live pages to the log's end), so candidates are tried on a copy first.
fn damage_a_middle_leaf(gen_dir: &Path, seqs: &[u64], scratch: &Path) -> u64 {
    let last = *seqs.last().unwrap();
    let candidates: Vec<u64> = (1..12).map(|i| seqs[seqs.len() * i / 24]).collect();
    for (i, (seq, value)) in stored_values(gen_dir, &candidates).into_iter().enumerate() {
        let probe = scratch.join(format!("probe-{i}"));
        copy_dir(gen_dir, &probe);
        overwrite_value(&probe, &value);
        if damaged_only_at(&probe, seq, last) {
            overwrite_value(gen_dir, &value);
            return seq;
        }
    }
    panic!("no damage of the kind needed found among chunks {candidates:?}");
}

/// An acknowledgement whose generation turns out damaged when the writer reads the chunks it
/// removes (sled opens the generation, the leaf of those chunks fails its checksum) fails
/// alone: an append committed in the same group is stored and answered, and the generation
/// is moved aside. (It used to fail the whole group, and delivery retries the ack every
/// second: every append that met it was refused, again and again.)
#[tokio::test]
async fn an_ack_in_a_damaged_generation_fails_alone_in_its_group() {
    let dir = tempfile::tempdir().unwrap();
    // A first generation that spans several of sled's segments (2 MiB), in chunks of 4 KiB.
    let cfg = QueueConfig {
        generation_bytes: 4 * 1024 * 1024,
        chunk_bytes: 4096,
        ..config(dir.path())
    };
    // Read (as delivery does) but not acknowledged: the whole first generation.
    let (gen, seqs) = {
        let q = Queue::open(&cfg).unwrap();
        let all = incompressible_events("K", 10_000, 500);
        for part in all.chunks(500) {
            q.append(part.to_vec()).await.unwrap();
        }
        let batch = q
            .read(0, Position::default(), usize::MAX, usize::MAX)
            .unwrap();
        let seqs: Vec<u64> = batch.chunks.iter().map(|c| c.seq).collect();
        q.close().await.unwrap();
        (batch.span.gen, seqs)
    };
    assert!(
        gen_dirs(&cfg.path).len() >= 2,
        "the first generation is sealed"
    );
    let gen_path = generation::gen_dir(&cfg.path, gen);
    // Damaged while the queue is stopped: a sealed generation is opened when first needed,
    // here by the writer, for the ack (or its count, which reads around the damage).
    damage_a_middle_leaf(&gen_path, &seqs, &dir.path().join("scratch"));

    let q = Queue::open(&cfg).unwrap();
    // Hold the writer in a commit, so that the next two operations make one group.
    let injected = inject(&cfg.path);
    let (mut reached, release) = hold_at_fsync();
    let first = tokio::spawn({
        let q = q.clone();
        async move { q.append(tagged("K", "first", 1)).await }
    });
    reached.recv().await.unwrap();
    let queued = |q: &Queue| q.ops.max_capacity() - q.ops.capacity();
    let after = tagged("K", "after", 3);
    let append = tokio::spawn({
        let (q, after) = (q.clone(), after.clone());
        async move { q.append(after).await }
    });
    wait_for("the append queued", || queued(&q) >= 1).await;
    let ack = tokio::spawn({
        let q = q.clone();
        async move {
            let ack = Ack {
                gen,
                remove: seqs,
                ..Ack::default()
            };
            q.ack(0, ack).await
        }
    });
    wait_for("the ack queued", || queued(&q) >= 2).await;
    fail::remove("queue-fsync");
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    let appended = append.await.unwrap();
    let acked = ack.await.unwrap();
    drop(injected);
    assert!(
        appended.is_ok(),
        "the append failed with the damaged ack of its group: {appended:?}"
    );
    assert!(
        matches!(&acked, Err(e) if e.is_corrupt()),
        "the ack of a damaged generation must fail as such: {acked:?}"
    );

    let moved = format!(
        "{}.corrupt",
        gen_path.file_name().unwrap().to_string_lossy()
    );
    wait_for("the damaged generation moved aside", || {
        cfg.path.join(&moved).exists()
    })
    .await;
    assert!(!gen_path.exists());
    assert!(q
        .corrupt_generations()
        .iter()
        .any(|note| note.generation == Some(gen)));
    assert!(contains_run(&drain(&q, 0, false).await, &texts(&after)));
    q.close().await.unwrap();
    drop(q);
    // Durable: the append is there after a reopen.
    let q = Queue::open(&cfg).unwrap();
    assert!(contains_run(&drain(&q, 0, false).await, &texts(&after)));
}

/// Two appends of one stream in flight, each in a group of its own: the first is refused
/// (the disk looked full when its group was checked), then the disk has room again when the
/// second's group is. The second must be refused too, so that it is not stored ahead of the
/// first; once the order is mended, both are stored, in order. (Without the order, the second
/// was stored alone: a file's checkpoint past lines that were never stored.)
#[tokio::test]
async fn an_append_after_a_refused_one_of_its_stream_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let q = Queue::open(&cfg).unwrap();
    q.append(tagged("K", "zero", 2)).await.unwrap();
    let injected = inject(&cfg.path);
    // The writer is held at its first disk check, with the first append's group gathered.
    let (mut reached, release) = crate::failpoint::hold_once("queue-disk-check");
    let order = AppendOrder::new();
    let (one, two) = (tagged("K", "one", 4), tagged("K", "two", 4));
    let first = q
        .submit_lines("K", &lines(&one), Vec::new(), &order)
        .await
        .unwrap();
    reached.recv().await.unwrap();
    let second = q
        .submit_lines("K", &lines(&two), Vec::new(), &order)
        .await
        .unwrap();
    // The held check sees a full disk, once; the second's group will see room.
    fail::cfg("queue-disk-low", "1*return").unwrap();
    release.send(()).unwrap();
    assert!(matches!(first.await, Err(QueueError::Full)));
    let second = second.await;
    fail::remove("queue-disk-check");
    fail::remove("queue-disk-low");
    drop(injected);
    assert!(
        matches!(second, Err(QueueError::EarlierAppendFailed)),
        "stored ahead of the append refused before it: {second:?}"
    );
    assert!(order.is_broken());
    assert!(matches!(
        q.submit_lines("K", &lines(&two), Vec::new(), &order).await,
        Err(QueueError::EarlierAppendFailed)
    ));
    let zero = texts(&tagged("K", "zero", 2));
    assert_eq!(
        drain(&q, 0, false).await,
        zero,
        "only what was acknowledged"
    );
    // The source heard both answers: it mends the order, waits for room as every source
    // does (the refusal marked the queue full until the next disk check) and appends both
    // again, in order.
    order.mend();
    wait_for("room in the queue again", || !q.is_full()).await;
    let first = q
        .submit_lines("K", &lines(&one), Vec::new(), &order)
        .await
        .unwrap();
    let second = q
        .submit_lines("K", &lines(&two), Vec::new(), &order)
        .await
        .unwrap();
    first.await.unwrap();
    second.await.unwrap();
    let all: Vec<String> = [zero, texts(&one), texts(&two)].concat();
    assert_eq!(drain(&q, 0, false).await, all);
}
