//! Queue tests of sources' checkpoints (`queue/checkpoint.rs`): stored with their events,
//! kept across reopens, rotations and the deletion of the generations they were written to,
//! and found again after a crash between a generation's creation and the copy into it.

use super::*;

fn at(name: &str, offset: u64) -> Checkpoint {
    Checkpoint {
        name: name.as_bytes().to_vec(),
        state: Some(offset.to_be_bytes().to_vec()),
    }
}

fn offset(q: &Queue, name: &str) -> Option<u64> {
    let state = q.checkpoint(name.as_bytes())?;
    Some(u64::from_be_bytes(state.try_into().unwrap()))
}

#[tokio::test]
async fn a_checkpoint_is_stored_with_its_events_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    {
        let q = Queue::open(&cfg).unwrap();
        assert_eq!(q.checkpoint(b"file/a"), None);
        q.append_with_checkpoints(events("K", 3, 10), vec![at("file/a", 30)])
            .await
            .unwrap();
        q.append_with_checkpoints(events("K", 2, 10), vec![at("file/a", 50), at("file/b", 7)])
            .await
            .unwrap();
        // A checkpoint alone, and one let go of.
        q.append_with_checkpoints(Vec::new(), vec![at("other/x", 1)])
            .await
            .unwrap();
        q.append_with_checkpoints(
            Vec::new(),
            vec![Checkpoint {
                name: b"file/b".to_vec(),
                state: None,
            }],
        )
        .await
        .unwrap();
        assert_eq!(offset(&q, "file/a"), Some(50));
        q.close().await.unwrap();
    }
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(q.totals().0, 5);
    assert_eq!(offset(&q, "file/a"), Some(50));
    assert_eq!(q.checkpoint(b"file/b"), None, "let go of");
    let mine: Vec<Vec<u8>> = q
        .checkpoints_with_prefix(b"file/")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(mine, [b"file/a".to_vec()]);
}

#[tokio::test]
async fn checkpoints_outlive_the_generations_they_were_written_to() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    let q = Queue::open(&cfg).unwrap();
    // Written once, in the first generation, then never again: only the copies carry it.
    q.append_with_checkpoints(events("K", 50, 100), vec![at("still", 1)])
        .await
        .unwrap();
    for round in 0..40u64 {
        q.append_with_checkpoints(events("K", 50, 100), vec![at("moving", round)])
            .await
            .unwrap();
    }
    assert!(gen_dirs(&cfg.path).len() >= 4, "{:?}", gen_dirs(&cfg.path));
    assert_eq!(drain(&q, 0, true).await.len(), 41 * 50);
    wait_for("delivered generations deleted", || {
        q.status().generations == 1
    })
    .await;
    q.close().await.unwrap();
    drop(q);
    let q = Queue::open(&cfg).unwrap();
    assert_eq!(offset(&q, "still"), Some(1));
    assert_eq!(offset(&q, "moving"), Some(39));
}

/// A crash after a generation was created, before the checkpoints were copied into it: the
/// open reads the older generations' too, then copies them in.
#[tokio::test]
async fn checkpoints_are_found_in_older_generations_when_the_copy_was_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_generations(dir.path());
    {
        let q = Queue::open(&cfg).unwrap();
        q.append_with_checkpoints(events("K", 50, 100), vec![at("f", 1)])
            .await
            .unwrap();
        for _ in 0..30 {
            q.append(events("K", 50, 100)).await.unwrap();
        }
        q.close().await.unwrap();
    }
    let gens = gen_dirs(&cfg.path);
    assert!(gens.len() >= 2, "{gens:?}");
    // What the crash leaves: the newest generation without the copy.
    let newest = cfg.path.join(gens.last().unwrap());
    {
        let db = generation::open_sled(&newest, 1 << 20).unwrap();
        assert!(db.get(record::CHECKPOINTS_KEY).unwrap().is_some());
        db.remove(record::CHECKPOINTS_KEY).unwrap();
        db.remove(record::checkpoint_key(b"f")).unwrap();
        db.flush().unwrap();
    }
    {
        let q = Queue::open(&cfg).unwrap();
        assert_eq!(offset(&q, "f"), Some(1));
        q.close().await.unwrap();
    }
    let db = generation::open_sled(&newest, 1 << 20).unwrap();
    assert!(
        db.get(record::CHECKPOINTS_KEY).unwrap().is_some(),
        "copied in at open"
    );
}
