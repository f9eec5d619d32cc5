//! Chunks just committed, kept decompressed for the delivery that reads them next.
//!
//! A live forwarder compresses each chunk on the sender's task (flash wear, `compression.rs`)
//! and its delivery reads the same chunk back a moment later, decompressing it: ~8 % of a live
//! forwarder's CPU was zstd decompressing what the process had in memory a few milliseconds
//! earlier (`docs/performance.md`, session 9). So the writer keeps the uncompressed body of
//! each compressed chunk it commits, keyed by where it is stored, and a read takes it from
//! here instead of decompressing the stored value. What is kept is bounded in bytes, the
//! oldest dropped first; a chunk not found here is decoded from the store as before.
//!
//! A body pushed out before delivery took it means that delivery is further behind than the
//! limit (the intake is down, say): whatever is kept then will be read long after newer
//! bodies push it out, so keeping it only holds memory and costs the writer. So the first body
//! pushed out empties the whole cache, and from then on the bodies of only one commit in
//! [`SAMPLE_EVERY`] are kept, until delivery takes one again (it has caught up).
//!
//! A body is put here as its chunk is applied to sled (delivery may read a chunk from sled
//! before its fsync: a body kept only after the fsync was missed by a third of the reads),
//! under a key (generation, lane, sequence number) that the writer never hands out again once
//! a commit has reached sled, so it is the stored chunk's own body; a read checks it against
//! the stored header all the same, and falls back to the store if they disagree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;

/// While delivery is behind, the bodies of one commit in this many are kept, to see whether
/// it has caught up.
const SAMPLE_EVERY: u32 = 16;

/// Where a chunk is stored: generation, lane, sequence number.
pub type ChunkAt = (u64, u32, u64);

pub struct FreshBodies {
    limit: usize,
    inner: Mutex<Inner>,
    /// Compressed chunks read from here, and decompressed from the store instead.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

struct Inner {
    bodies: LruCache<ChunkAt, Vec<u8>>,
    bytes: usize,
    /// Delivery is behind: only one commit's bodies in [`SAMPLE_EVERY`] are kept.
    behind: bool,
    skipped: u32,
}

impl FreshBodies {
    /// Keeps at most `limit` bytes of bodies (0: none).
    pub fn new(limit: usize) -> FreshBodies {
        FreshBodies {
            limit,
            inner: Mutex::new(Inner {
                bodies: LruCache::unbounded(),
                bytes: 0,
                behind: false,
                skipped: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the bodies of chunks just made durable, dropping the oldest over the limit.
    pub fn insert(&self, bodies: impl IntoIterator<Item = (ChunkAt, Vec<u8>)>) {
        let mut inner = self.lock();
        if inner.behind {
            inner.skipped = inner.skipped.wrapping_add(1);
            if inner.skipped % SAMPLE_EVERY != 0 {
                return;
            }
        }
        for (at, body) in bodies {
            if body.capacity() > self.limit {
                continue;
            }
            inner.bytes += body.capacity();
            if let Some(old) = inner.bodies.put(at, body) {
                inner.bytes -= old.capacity();
            }
        }
        if inner.bytes > self.limit {
            // A body delivery never took must go: it is behind by more than the limit.
            inner.bodies.clear();
            inner.bytes = 0;
            inner.behind = true;
        }
    }

    /// Takes the body of the chunk at `at`, if it is still kept.
    pub fn take(&self, at: ChunkAt) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let body = inner.bodies.pop(&at)?;
        inner.bytes -= body.capacity();
        inner.behind = false;
        Some(body)
    }

    /// Counts a compressed chunk read: from here (`kept`), or decompressed from the store.
    pub fn count_read(&self, kept: bool) {
        let counter = if kept { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl std::fmt::Debug for FreshBodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshBodies")
            .field("limit", &self.limit)
            .field("bytes", &self.bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        v.resize(n, 7);
        v
    }

    #[test]
    fn a_body_is_taken_once() {
        let f = FreshBodies::new(1000);
        f.insert([((1, 2, 3), body(10))]);
        assert_eq!(f.take((1, 2, 3)).map(|b| b.len()), Some(10));
        assert_eq!(f.take((1, 2, 3)), None);
        assert_eq!(f.bytes(), 0);
    }

    /// Over the limit, delivery is behind: everything kept goes, and only one commit in
    /// `SAMPLE_EVERY` is kept until delivery takes a body again.
    #[test]
    fn a_body_pushed_out_untaken_stops_the_keeping_until_one_is_taken() {
        let f = FreshBodies::new(100);
        f.insert((0..3).map(|s| ((1, 0, s), body(30))));
        assert_eq!(f.bytes(), 90);
        f.insert([((1, 0, 3), body(30))]);
        assert_eq!(f.bytes(), 0, "over the limit: all of it goes");
        let commits = SAMPLE_EVERY as u64 * 2;
        for s in 4..4 + commits {
            f.insert([((1, 0, s), body(1))]);
        }
        let kept: Vec<u64> = (4..4 + commits)
            .filter(|s| f.take((1, 0, *s)).is_some())
            .collect();
        assert_eq!(kept.len(), 2, "one commit in {SAMPLE_EVERY}: {kept:?}");
        // Delivery took one: every commit is kept again.
        for s in 100..110 {
            f.insert([((1, 0, s), body(1))]);
        }
        assert!((100..110).all(|s| f.take((1, 0, s)).is_some()));
    }

    #[test]
    fn nothing_is_kept_with_no_room() {
        let f = FreshBodies::new(0);
        f.insert([((1, 0, 0), body(1))]);
        assert_eq!(f.take((1, 0, 0)), None);
    }
}
