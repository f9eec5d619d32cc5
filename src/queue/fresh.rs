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
//! pushed out empties the whole cache, and from then on senders keep the body of only one
//! chunk in [`SAMPLE_EVERY`] ([`FreshBodies::wants_body`]: the others are freed where they
//! were made, at once), until delivery takes one again (it has caught up).
//!
//! A body is put here as its chunk is applied to sled (delivery may read a chunk from sled
//! before its fsync: a body kept only after the fsync was missed by a third of the reads),
//! under a key (generation, lane, sequence number) that the writer never hands out again once
//! a commit has reached sled, so it is the stored chunk's own body; a read checks it against
//! the stored header all the same, and falls back to the store if they disagree.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;

/// While delivery is behind, the bodies of one chunk in this many are kept, to see whether
/// it has caught up.
const SAMPLE_EVERY: u32 = 16;

/// Where a chunk is stored: generation, lane, sequence number.
pub type ChunkAt = (u64, u32, u64);

pub struct FreshBodies {
    limit: usize,
    inner: Mutex<Inner>,
    /// Delivery is behind: only one body in [`SAMPLE_EVERY`] is kept.
    behind: AtomicBool,
    sampled: AtomicU32,
    /// Compressed chunks read from here, and decompressed from the store instead.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

struct Inner {
    bodies: LruCache<ChunkAt, Vec<u8>>,
    bytes: usize,
}

impl FreshBodies {
    /// Keeps at most `limit` bytes of bodies (0: none).
    pub fn new(limit: usize) -> FreshBodies {
        FreshBodies {
            limit,
            inner: Mutex::new(Inner {
                bodies: LruCache::unbounded(),
                bytes: 0,
            }),
            behind: AtomicBool::new(false),
            sampled: AtomicU32::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the bodies of chunks about to be applied to sled; over the limit, drops them all
    /// and marks delivery as behind.
    pub fn insert(&self, bodies: impl IntoIterator<Item = (ChunkAt, Vec<u8>)>) {
        let mut inner = self.lock();
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
            self.behind.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the sender encoding a chunk should hand its body over to be kept.
    pub fn wants_body(&self) -> bool {
        if self.limit == 0 {
            return false;
        }
        !self.behind.load(Ordering::Relaxed)
            || self.sampled.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY == 0
    }

    /// Takes the body of the chunk at `at`, if it is still kept.
    pub fn take(&self, at: ChunkAt) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let body = inner.bodies.pop(&at)?;
        inner.bytes -= body.capacity();
        self.behind.store(false, Ordering::Relaxed);
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

    /// Over the limit, delivery is behind: everything kept goes, and senders keep one body
    /// in `SAMPLE_EVERY` until delivery takes one again.
    #[test]
    fn a_body_pushed_out_untaken_stops_the_keeping_until_one_is_taken() {
        let f = FreshBodies::new(100);
        assert!(
            (0..100).all(|_| f.wants_body()),
            "every body while it keeps up"
        );
        f.insert((0..3).map(|s| ((1, 0, s), body(30))));
        assert_eq!(f.bytes(), 90);
        f.insert([((1, 0, 3), body(30))]);
        assert_eq!(f.bytes(), 0, "over the limit: all of it goes");
        let wanted = (0..SAMPLE_EVERY * 2).filter(|_| f.wants_body()).count();
        assert_eq!(wanted, 2, "one body in {SAMPLE_EVERY}");
        f.insert([((1, 0, 4), body(1))]);
        assert!(f.take((1, 0, 4)).is_some());
        assert!(
            (0..100).all(|_| f.wants_body()),
            "delivery took one: every body again"
        );
    }

    #[test]
    fn nothing_is_kept_with_no_room() {
        let f = FreshBodies::new(0);
        assert!(!f.wants_body());
        f.insert([((1, 0, 0), body(1))]);
        assert_eq!(f.take((1, 0, 0)), None);
    }
}
