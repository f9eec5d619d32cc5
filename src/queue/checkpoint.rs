//! Sources' checkpoints: where a source is in what it reads (a file's offset), stored by the
//! queue in the same atomic commit as the events read up to there.
//!
//! A source that reads something it can read again (a file) must know, after a crash, where
//! to go on: behind the events that reached the queue (or they are lost), not before them (or
//! they are sent twice). Kept apart from the events, the two can never agree after a crash,
//! which is how Fluent Bit and Vector lose or repeat lines. Here a checkpoint rides with the
//! append of the events it follows: [`super::Queue::append_with_checkpoints`] writes both in
//! one sled batch of the active generation, fsynced before the call returns. After any crash
//! the queue holds either the events and the new checkpoint, or neither.
//!
//! Checkpoints outlive the generation they were written to: when a generation is sealed, the
//! next one starts with a copy of every checkpoint and a marker saying so (`CHECKPOINTS_KEY`,
//! one batch, fsynced before anything else is written to it), so a delivered generation is
//! deleted without losing one. At open, the newest generation's checkpoints are read, and older
//! generations are read too only if it lacks the marker (a crash between its creation and the
//! copy). A checkpoint is opaque bytes to the queue, named by its source; `None` lets go of
//! it (a file deleted), so that the set does not grow for ever.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// One source's position, to store with the events read up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Unique over every source of the queue (a source prefixes its own name).
    pub name: Vec<u8>,
    /// The source's bytes; `None` to let go of the checkpoint.
    pub state: Option<Vec<u8>>,
}

impl Checkpoint {
    /// What it costs a commit, roughly.
    pub(super) fn bytes(&self) -> usize {
        self.name.len() + self.state.as_ref().map_or(0, Vec::len)
    }
}

/// The latest checkpoints, as durable: read by sources, changed by the writer after each
/// commit that stored some.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
}

impl Checkpoints {
    pub(super) fn new(map: HashMap<Vec<u8>, Vec<u8>>) -> Checkpoints {
        Checkpoints {
            map: Mutex::new(map),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a commit made durable.
    pub(super) fn publish(&self, stored: Vec<Checkpoint>) {
        let mut map = self.lock();
        for c in stored {
            match c.state {
                Some(state) => map.insert(c.name, state),
                None => map.remove(&c.name),
            };
        }
    }

    /// Every checkpoint whose name starts with `prefix`.
    pub(super) fn with_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut found: Vec<_> = self
            .lock()
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        found.sort();
        found
    }
}
