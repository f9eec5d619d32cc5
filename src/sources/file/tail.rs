//! One file being read: where the next read starts, the line in progress, the multi-line event
//! being joined, and where a restart must resume (what its checkpoint says).
//!
//! The resume offset is the first byte not yet in an event handed out: the start of the line
//! in progress (or of what is left of a line being split), or the start of the first line of
//! a pending multi-line event. A checkpoint stored with the events handed out up to there
//! means that after a crash the file is read again from exactly the first byte not stored.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::multiline::{Joiner, Line};
use super::position::{read_fully_at, FileId, Fingerprint, Position};
use crate::queue::Checkpoint;
use crate::sources::syslog::framing::{Frame, FrameDecoder, Oversize};

/// The most bytes read from one file at a time.
pub const READ_BYTES: usize = 256 << 10;

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// That many new bytes.
    Bytes(usize),
    /// Nothing new.
    End,
    /// The file is shorter than what was read of it, or starts with other bytes now
    /// (copytruncate, or truncated and written again): it is read again from its start.
    Truncated,
}

/// How a tail cuts its file into events.
#[derive(Debug, Clone)]
pub struct Cutting {
    pub max: usize,
    pub oversize: Oversize,
    pub multiline: Option<(regex::bytes::Regex, std::time::Duration)>,
}

#[derive(Debug)]
pub struct Tail {
    pub id: FileId,
    /// Where it was last seen.
    pub path: PathBuf,
    file: Arc<File>,
    /// Offset of the next byte to read.
    read_at: u64,
    /// Bytes read and not yet decoded (the line in progress).
    buf: BytesMut,
    decoder: FrameDecoder,
    joiner: Option<Joiner>,
    cutting: Cutting,
    fingerprint: Fingerprint,
    /// Where the end of the last frame decoded is: the start of the next line.
    line_start: u64,
    /// The resume offset and fingerprint of the last checkpoint handed to the queue, or that
    /// the queue held at the start (`None`: no checkpoint yet).
    offered: Option<(u64, Fingerprint)>,
    /// When it was first found at no path of its source: it is read to its end, then let go of.
    pub gone_since: Option<Instant>,
    /// When a read last found new bytes.
    pub last_growth: Instant,
}

impl Tail {
    /// A tail of `file` (found at `path`) that reads from `start`; `stored` is the checkpoint
    /// the queue holds for it, if any.
    pub fn new(
        id: FileId,
        path: PathBuf,
        file: File,
        start: u64,
        stored: Option<(u64, Fingerprint)>,
        cutting: Cutting,
    ) -> std::io::Result<Tail> {
        let fingerprint = Fingerprint::of(&file)?;
        Ok(Tail {
            id,
            path,
            file: Arc::new(file),
            read_at: start,
            buf: BytesMut::new(),
            decoder: FrameDecoder::lines(cutting.max, cutting.oversize),
            joiner: cutting
                .multiline
                .clone()
                .map(|(re, timeout)| Joiner::new(re, timeout, cutting.max)),
            cutting,
            fingerprint,
            line_start: start,
            offered: stored,
            gone_since: None,
            last_growth: Instant::now(),
        })
    }

    /// Reads what is new, up to [`READ_BYTES`].
    pub async fn read(&mut self) -> std::io::Result<Read> {
        let file = self.file.clone();
        let at = self.read_at;
        let (bytes, len) = tokio::task::spawn_blocking(move || {
            let mut bytes = vec![0; READ_BYTES];
            let n = read_fully_at(&file, &mut bytes, at)?;
            bytes.truncate(n);
            let len = if n == 0 { file.metadata()?.len() } else { at };
            Ok::<_, std::io::Error>((bytes, len))
        })
        .await
        .map_err(std::io::Error::other)??;
        if bytes.is_empty() {
            return Ok(if len < self.read_at {
                Read::Truncated
            } else {
                Read::End
            });
        }
        self.read_at += bytes.len() as u64;
        self.buf.extend_from_slice(&bytes);
        self.last_growth = Instant::now();
        Ok(Read::Bytes(bytes.len()))
    }

    /// Whether the file still starts with the bytes it had (checked at each scan: a file
    /// truncated and written past the old offset again shows no shrinking).
    pub fn replaced(&self) -> std::io::Result<bool> {
        Ok(self.fingerprint.len > 0 && !self.fingerprint.matches(&self.file)?)
    }

    /// Hands out, to `out`, the events of the lines read; those of the old content first when
    /// the file was truncated, after which it is read again from its start.
    pub fn take(&mut self, now: Instant, out: &mut Vec<Frame>) {
        while let Some(frame) = self.decoder.decode(&mut self.buf).ok().flatten() {
            self.hand_out(frame, now, out);
        }
        if let Some(joiner) = &mut self.joiner {
            joiner.flush_if_idle(now, out);
        }
    }

    /// Hands out everything left, the line in progress too: the file is let go of, or was
    /// truncated under it.
    pub fn finish(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.take(now, out);
        while let Some(frame) = self.decoder.decode_eof(&mut self.buf).ok().flatten() {
            self.hand_out(frame, now, out);
        }
        if let Some(joiner) = &mut self.joiner {
            joiner.flush(out);
        }
    }

    /// The file was truncated: what was read of it is handed out, and it is read again from
    /// its start.
    pub fn restart(&mut self, now: Instant, out: &mut Vec<Frame>) -> std::io::Result<()> {
        self.finish(now, out);
        self.read_at = 0;
        self.line_start = 0;
        self.buf.clear();
        self.decoder = FrameDecoder::lines(self.cutting.max, self.cutting.oversize);
        self.fingerprint = Fingerprint::of(&self.file)?;
        Ok(())
    }

    fn hand_out(&mut self, frame: Frame, now: Instant, out: &mut Vec<Frame>) {
        let start = self.line_start;
        self.line_start = self.decoded_to();
        match &mut self.joiner {
            Some(joiner) => joiner.push(Line { frame, start }, now, out),
            None => out.push(frame),
        }
    }

    /// The offset up to which bytes were decoded into frames.
    fn decoded_to(&self) -> u64 {
        self.read_at - self.buf.len() as u64 - self.decoder.pending_bytes()
    }

    /// Where a restart must read from: the first byte not in an event handed out.
    pub fn resume_offset(&self) -> u64 {
        let decoded = self.decoded_to();
        match self.joiner.as_ref().and_then(Joiner::pending_start) {
            Some(start) => start.min(decoded),
            None => decoded,
        }
    }

    /// When a pending multi-line event is due.
    pub fn due(&self) -> Option<Instant> {
        self.joiner.as_ref().and_then(Joiner::due)
    }

    /// Whether everything in the file was read and handed out.
    pub fn at_end(&self) -> bool {
        self.buf.is_empty() && self.decoder.pending_bytes() == 0 && self.due().is_none()
    }

    /// The checkpoint to store with the events handed out so far, if it moved since the last
    /// one handed to the queue. The caller hands it over with those events: from then on the
    /// source makes it durable in order, or stops (`sources/durable/in_flight.rs`).
    pub fn checkpoint(&mut self) -> std::io::Result<Option<Checkpoint>> {
        let offset = self.resume_offset();
        if !self.fingerprint.is_full() && self.read_at > self.fingerprint.len {
            self.fingerprint = Fingerprint::of(&self.file)?;
        }
        if self.offered == Some((offset, self.fingerprint)) {
            return Ok(None);
        }
        self.offered = Some((offset, self.fingerprint));
        let position = Position {
            path: self.path.clone(),
            offset,
            fingerprint: self.fingerprint,
        };
        let checkpoint = Checkpoint {
            name: self.id.checkpoint_name(),
            state: Some(position.encode()),
        };
        Ok(Some(checkpoint))
    }
}
