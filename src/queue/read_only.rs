//! A queue opened to be looked at, not run: what the `status` and `dead-letters` commands read
//! on a stopped forwarder, without knowing how the queue directory is laid out.
//!
//! The open is the one a start makes ([`super::load`]): it takes the directory's lock (so it
//! fails with [`QueueError::Locked`] while a forwarder runs on it, which then answers instead),
//! and recovers what a crash or damage left as a start would, since the counts it shows come
//! from that. After that nothing changes the store: no writer thread, no housekeeping, no next
//! generation prepared. A directory that holds no queue is not created.

use std::sync::Arc;

use super::{generation, load, writer, DeadLetter, Loaded, Queue, QueueError, QueueStatus, Shared};
use crate::config::QueueConfig;

/// A queue opened by [`Queue::open_read_only`]. Its lock is held until it is dropped.
#[derive(Debug)]
pub struct ReadOnlyQueue {
    shared: Arc<Shared>,
    _lock: std::fs::File,
}

impl Queue {
    /// Opens the queue of `config` to read its status and dead letters: fails with
    /// [`QueueError::Missing`] if there is none (nothing is created), and with
    /// [`QueueError::Locked`] if a forwarder runs on it.
    pub fn open_read_only(config: &QueueConfig) -> Result<ReadOnlyQueue, QueueError> {
        if !generation::holds_queue(&config.path) {
            return Err(QueueError::Missing(config.path.clone()));
        }
        let Loaded { shared, lock, .. } = load(config)?;
        let (gens, _) = shared.gens_snapshot();
        let open = gens.iter().filter(|g| g.is_open()).count();
        writer::measure_space(&shared, gens.len(), open);
        Ok(ReadOnlyQueue {
            shared,
            _lock: lock,
        })
    }
}

impl ReadOnlyQueue {
    /// What [`Queue::status`] shows.
    pub fn status(&self) -> QueueStatus {
        self.shared.status()
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.shared.dead_letters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake_api::IncomingEvent;
    use crate::queue::Position;

    fn config(dir: &std::path::Path) -> QueueConfig {
        QueueConfig {
            path: dir.join("q"),
            ..QueueConfig::default()
        }
    }

    /// The names under `root`, recursively, sorted; but sled's snapshots (`snap.…`), which
    /// sled itself writes at any open of a database.
    fn tree(root: &std::path::Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut dirs = vec![root.to_owned()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with("snap.") {
                    continue;
                }
                names.push(path.strip_prefix(root).unwrap().display().to_string());
                if path.is_dir() {
                    dirs.push(path);
                }
            }
        }
        names.sort();
        names
    }

    #[test]
    fn no_queue_is_missing_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let err = Queue::open_read_only(&cfg).unwrap_err();
        assert!(matches!(err, QueueError::Missing(_)), "{err}");
        assert!(err.to_string().starts_with("no queue at "), "{err}");
        assert!(!cfg.path.exists());
    }

    /// What a read-only open shows is what the running queue showed, a running forwarder keeps
    /// it out (its lock), and it changes nothing: no generation made ahead, no file added.
    #[tokio::test]
    async fn a_stopped_queue_reads_as_it_ran_and_is_left_as_found() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let q = Queue::open(&cfg).unwrap();
        let event = |raw: &str| IncomingEvent {
            intake_key: "read-only-open-test-key".into(),
            timestamp: None,
            raw: raw.into(),
        };
        q.append(vec![event("one"), event("two")]).await.unwrap();
        // A dead letter: a chunk that rotted, which the read quarantines.
        q.insert_raw_chunk(0, 9, b"\x09rotten");
        let read = q.read(0, Position::default(), 100, 1 << 20);
        assert_eq!(read.unwrap().span.undecodable, 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while q.dead_letter_count() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(matches!(
            Queue::open_read_only(&cfg),
            Err(QueueError::Locked(_))
        ));
        let running = q.status();
        q.close().await.unwrap();
        drop(q);
        let before = tree(&cfg.path);

        let view = Queue::open_read_only(&cfg).unwrap();
        let status = view.status();
        assert_eq!(
            (status.events, status.bytes),
            (running.events, running.bytes)
        );
        assert_eq!(status.dead_letters, 1);
        assert_eq!(
            serde_json::to_value(&status.lanes).unwrap(),
            serde_json::to_value(&running.lanes).unwrap()
        );
        let letters = view.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].event, "\x09rotten");
        drop(view);
        assert_eq!(
            tree(&cfg.path),
            before,
            "the read-only open changed the directory"
        );
    }
}
