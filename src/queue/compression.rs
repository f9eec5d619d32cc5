//! When the queue compresses a chunk: from the first byte, as long as it pays.
//!
//! Every byte a chunk takes is written to the disk about three times by sled (its log, then
//! the leaf rewrites of consolidations and splits), so bytes saved in a value are saved several
//! times over in flash wear (issue 7, section 5: the live forwarder wrote 6.2x its payload
//! with chunks stored plain, 3.5x with every chunk compressed). A chunk is stored compressed
//! (v3 zstd by default, v2 lz4) only when that makes it at least an eighth smaller ([`record::Chunk::encode`]); events
//! that do not compress (already compressed or encrypted payloads) are stored plain, so that
//! delivery does not pay to decompress them. After [`MISSES_BEFORE_SAMPLING`] chunks in a row
//! that did not compress, the queue stops trying and samples one chunk in
//! [`SAMPLE_EVERY`] until one compresses again: lz4 is the largest single cost per event of a
//! live forwarder, and trying costs it whether it pays or not. `[queue] chunk_compression`
//! picks zstd (the default: log lines to ~0.31 of their size), lz4 (~0.50, half the CPU) or
//! none (hosts short of CPU whose disks do not wear).
//!
//! [`record::Chunk::encode`]: super::record::Chunk::encode

use std::sync::atomic::{AtomicU32, Ordering};

use super::record::Codec;
use crate::config::ChunkCompression;

/// Chunks in a row that did not compress before the queue only samples.
const MISSES_BEFORE_SAMPLING: u32 = 8;
/// While sampling, one chunk in this many is tried.
const SAMPLE_EVERY: u32 = 16;

/// Whether compressing chunks has paid lately; shared by every sender's task.
#[derive(Debug, Default)]
pub struct Compression {
    /// `None`: `[queue] chunk_compression = "none"`, never try.
    codec: Option<Codec>,
    misses: AtomicU32,
    skipped: AtomicU32,
}

impl Compression {
    pub fn new(setting: ChunkCompression) -> Compression {
        Compression {
            codec: match setting {
                ChunkCompression::Zstd => Some(Codec::Zstd),
                ChunkCompression::Lz4 => Some(Codec::Lz4),
                ChunkCompression::None => None,
            },
            ..Compression::default()
        }
    }

    /// Whether to try compressing the next chunk, and with what.
    pub fn should_try(&self) -> Option<Codec> {
        let codec = self.codec?;
        let sampled = self.misses.load(Ordering::Relaxed) >= MISSES_BEFORE_SAMPLING;
        if sampled && self.skipped.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY != 0 {
            return None;
        }
        Some(codec)
    }

    /// Records whether a chunk that was tried came out compressed.
    pub fn record(&self, paid: bool) {
        if paid {
            self.misses.store(0, Ordering::Relaxed);
        } else {
            let _ = self
                .misses
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                    Some(m.saturating_add(1))
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_tries_when_turned_off() {
        let c = Compression::new(ChunkCompression::None);
        assert!((0..100).all(|_| c.should_try().is_none()));
    }

    #[test]
    fn tries_every_chunk_while_it_pays() {
        let c = Compression::new(ChunkCompression::Lz4);
        for _ in 0..100 {
            assert_eq!(c.should_try(), Some(Codec::Lz4));
            c.record(true);
        }
    }

    #[test]
    fn samples_after_chunks_that_do_not_compress_and_resumes_when_one_does() {
        let c = Compression::new(ChunkCompression::Zstd);
        for _ in 0..MISSES_BEFORE_SAMPLING {
            assert_eq!(c.should_try(), Some(Codec::Zstd));
            c.record(false);
        }
        let tried = (0..SAMPLE_EVERY * 4)
            .filter(|_| c.should_try().is_some())
            .count();
        assert_eq!(tried, 4, "one chunk in {SAMPLE_EVERY} while sampling");
        c.record(true);
        assert!(
            (0..10).all(|_| c.should_try().is_some()),
            "every chunk again"
        );
    }
}
