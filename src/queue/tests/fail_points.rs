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
    let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel::<()>();
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
    let removed = {
        let db = generation::open_sled(&generation::gen_dir(&cfg.path, 1), 1 << 20).unwrap();
        let mut removed = 0u64;
        for item in db.scan_prefix([record::CHUNK_PREFIX]) {
            let (k, v) = item.unwrap();
            removed += u64::from(record::ChunkHeader::decode(&v).unwrap().events);
            db.remove(k).unwrap();
        }
        set_lane_zero(&db);
        removed
    };
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals().0, 1000);
    // Hold the writer in a commit, so that the next two operations make one group.
    let _injected = inject(&cfg.path);
    let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel::<()>();
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
