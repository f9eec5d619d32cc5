//! Chunks just committed, kept decompressed for the delivery that reads them next.
//!
//! A live forwarder compresses each chunk on the sender's task (flash wear, `compression.rs`)
//! and its delivery reads the same chunk back a moment later, decompressing it: ~8 % of a live
//! forwarder's CPU was zstd decompressing what the process had in memory a few milliseconds
//! earlier (`docs/performance.md`, session 9). So the writer keeps the uncompressed body of
//! each compressed chunk it commits, keyed by where it is stored, and a read takes it from
//! here instead of decompressing the stored value. What is kept is bounded in bytes; a chunk
//! not found here is decoded from the store as before.
//!
//! Delivery reads chunks in the order they were committed, so when a body does not fit, it is
//! the new body that is not kept (it is read from the store): the ones kept are those read
//! next. Pushing out the oldest instead would, whenever more is in flight than the limit (a
//! commit of a thousand syslog connections' batches is larger than the default 4 MiB), throw
//! away each body just before delivery wants it, and serve no read from memory at all.
//!
//! A cache full of bodies that delivery has not taken for [`STALE`] means that delivery is
//! behind (the intake is down, say): what is kept will be read long after, so keeping it
//! only holds memory. Then the cache is emptied, and from then on senders keep the body of
//! only one chunk in [`SAMPLE_EVERY`] ([`FreshBodies::wants_body`]: the others are freed
//! where they were made, at once), until delivery takes one again (it has caught up).
//!
//! A body is put here as its chunk is applied to sled (delivery may read a chunk from sled
//! before its fsync: a body kept only after the fsync was missed by a third of the reads),
//! under a key (generation, lane, sequence number) that the writer never hands out again once
//! a commit has reached sled, so it is the stored chunk's own body; a read checks it against
//! the stored header all the same, and falls back to the store if they disagree.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

/// While delivery is behind, the bodies of one chunk in this many are kept, to see whether
/// it has caught up.
const SAMPLE_EVERY: u32 = 16;

/// A full cache whose oldest body has waited this long for delivery: delivery is behind.
const STALE: Duration = Duration::from_secs(10);

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
    /// In the order they were kept (the least recently used is the oldest: bodies are only
    /// ever put and taken), each with when it was.
    bodies: LruCache<ChunkAt, (Instant, Vec<u8>)>,
    bytes: usize,
}

impl Inner {
    fn clear(&mut self) {
        self.bodies.clear();
        self.bytes = 0;
    }

    /// Whether the oldest body kept has waited for delivery longer than [`STALE`].
    fn stale(&self, now: Instant) -> bool {
        self.bodies
            .peek_lru()
            .is_some_and(|(_, (kept, _))| now.saturating_duration_since(*kept) > STALE)
    }
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

    /// Keeps the bodies of chunks about to be applied to sled, those that fit; a full cache
    /// that delivery has not taken from for [`STALE`] is emptied, and delivery marked behind.
    pub fn insert(&self, bodies: impl IntoIterator<Item = (ChunkAt, Vec<u8>)>) {
        self.insert_at(bodies, Instant::now());
    }

    fn insert_at(&self, bodies: impl IntoIterator<Item = (ChunkAt, Vec<u8>)>, now: Instant) {
        let mut inner = self.lock();
        for (at, body) in bodies {
            if inner.bytes + body.capacity() > self.limit {
                if inner.stale(now) {
                    inner.clear();
                    self.behind.store(true, Ordering::Relaxed);
                    return;
                }
                // Full of bodies that delivery reads before this one: it is read from the store.
                continue;
            }
            inner.bytes += body.capacity();
            if let Some((_, old)) = inner.bodies.put(at, (now, body)) {
                inner.bytes -= old.capacity();
            }
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
        let (_, body) = inner.bodies.pop(&at)?;
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

    /// A commit larger than the limit while delivery keeps up: the bodies that fit are kept
    /// (delivery reads them first), the rest are not, and the keeping goes on.
    #[test]
    fn bodies_over_the_limit_are_not_kept_and_those_kept_stay() {
        let f = FreshBodies::new(100);
        f.insert((0..5).map(|s| ((1, 0, s), body(30))));
        assert_eq!(f.bytes(), 90, "the first three fit");
        assert!(
            f.take((1, 0, 0)).is_some(),
            "the first body is read from memory"
        );
        assert_eq!(f.take((1, 0, 3)), None, "the fourth did not fit");
        f.insert([((1, 0, 5), body(30))]);
        assert!(
            f.take((1, 0, 5)).is_some(),
            "room again once delivery took one"
        );
        assert!(
            (0..100).all(|_| f.wants_body()),
            "delivery keeps up: every body"
        );
    }

    /// A full cache that delivery has not taken from for `STALE`: delivery is behind, so
    /// everything kept goes, and senders keep one body in `SAMPLE_EVERY` until delivery takes
    /// one again.
    #[test]
    fn a_full_cache_left_untaken_stops_the_keeping_until_one_is_taken() {
        let f = FreshBodies::new(100);
        let t0 = Instant::now();
        f.insert_at((0..3).map(|s| ((1, 0, s), body(30))), t0);
        f.insert_at([((1, 0, 3), body(30))], t0 + STALE / 2);
        assert_eq!(f.bytes(), 90, "full, but delivery may still take them");
        assert!((0..100).all(|_| f.wants_body()));
        f.insert_at(
            [((1, 0, 4), body(30))],
            t0 + STALE + Duration::from_millis(1),
        );
        assert_eq!(f.bytes(), 0, "full and untaken for STALE: all of it goes");
        let wanted = (0..SAMPLE_EVERY * 2).filter(|_| f.wants_body()).count();
        assert_eq!(wanted, 2, "one body in {SAMPLE_EVERY}");
        f.insert([((1, 0, 5), body(1))]);
        assert!(f.take((1, 0, 5)).is_some());
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
