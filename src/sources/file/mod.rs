//! The file source: tails the files its `paths` globs match, one event per line (or per
//! multi-line event), with each file's position stored **in the same atomic commit as the
//! events read up to it** (`queue/checkpoint.rs`), so that a crash neither loses a line that
//! was not yet in the queue nor reads again one that was.
//!
//! Files are found by a scan of the globs every `scan_interval_ms`, known by device and inode
//! (and a fingerprint of their first bytes, [`position`]), and read by polling. What rotation
//! does to them:
//! - rename and create: the renamed file keeps its inode, so it is the same file under another
//!   name; if no path of the source names it any more, it is read to its end and let go of once
//!   nothing was written to it for `rotate_wait_ms`; the new file is read from its start;
//! - copytruncate: the file is found shorter than what was read of it (or starting with other
//!   bytes) and is read again from its start. What the writer wrote between the copy and the
//!   truncation is in the copy only: copytruncate itself loses it, as its manual says;
//! - deletion: like rename (read to its end, let go of: no descriptor is kept for ever).
//!
//! A round of reads (up to `ROUND_BYTES` over all files) is handed to the queue while the next
//! is read, at most [`crate::sources::durable::DEPTH`] in flight: a full queue still stops the
//! reading.
//!
//! A file rotated while the forwarder was stopped is found again by its inode in its old
//! directory and read to its end from its checkpoint. A line not ended by a newline is waited
//! for (a writer may be writing it), and handed out as it is when its file is let go of.
//!
//! - [`scan`]: globs to files; [`position`]: checkpoints and fingerprints; [`tail`]: one file;
//!   [`multiline`]: joining lines into events.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{FileSourceConfig, ReadFrom, ReadingSource};
use crate::queue::{Checkpoint, Queue};
use crate::sources::durable::{Appender, InFlight, Lines, Stopped};
use crate::sources::syslog::framing::Frame;
use position::{FileId, Position};
use scan::{Found, Patterns};
use tail::{Cutting, Read, Tail};

pub mod multiline;
pub mod position;
pub mod scan;
pub mod tail;

/// Bytes read over all files before the events are stored: one commit covers them.
const ROUND_BYTES: usize = 1 << 20;

crate::stats::stats_table! {
    /// Counters of one file source (`paths` label in `/metrics`).
    pub struct FileSourceStats => FileSourceSnapshot, metrics "file" {
        /// Lines, multi-line events, or pieces of split lines.
        accepted_events: counter, "Events read from files and made durable in the queue";
        line_bytes: counter, "Bytes of the events read from files made durable";
        truncated_events: counter,
            "Lines over max_event_bytes stored truncated (oversize = truncate)";
        split_pieces: counter, "Events made of lines over max_event_bytes (oversize = split)";
        dead_lettered_events: counter,
            "Lines over max_event_bytes kept as dead letters, not sent (oversize = dead_letter)";
        invalid_utf8_events: counter, "Events read from files that were not valid UTF-8";
        files_opened: counter, "Files the file source began to read";
        files_released: counter,
            "Files read to their end and let go of (rotated away or deleted)";
        open_files: gauge, "Files read now";
        files_waiting: gauge, "Files matched but not read: max_open_files are read already";
        truncations: counter,
            "Files found shorter than what was read (copytruncate), read again from their start";
        read_errors: counter, "Errors reading a file (retried at the next poll)";
        queue_full_waits: counter, "Times the file source stopped reading: the queue was full";
    }
}

crate::sources::durable::line_counters!(FileSourceStats, line_bytes);

/// A file source, ready to [`run`](FileSource::run).
#[derive(Debug)]
pub struct FileSource {
    config: FileSourceConfig,
    queue: Queue,
    patterns: Patterns,
    cutting: Cutting,
    stats: Arc<FileSourceStats>,
    /// The source's name in logs and metrics: its paths.
    label: String,
    /// The checkpoint that says this source ran before ([`ReadFrom`] is for its first start).
    marker: Vec<u8>,
    appender: Appender,
}

impl FileSource {
    pub fn new(config: FileSourceConfig, queue: Queue) -> anyhow::Result<FileSource> {
        let label = config.paths.join(",");
        let intake_key = config
            .resolve_intake_key()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("file source {label}"))?;
        let multiline = match &config.multiline_start {
            Some(re) => Some((
                regex::bytes::Regex::new(re).context("multiline_start")?,
                config.multiline_timeout(),
            )),
            None => None,
        };
        let stats: Arc<FileSourceStats> = Arc::default();
        let mut marker = b"file-source/".to_vec();
        marker.extend_from_slice(config.paths.join("\n").as_bytes());
        Ok(FileSource {
            patterns: Patterns::new(&config.paths, &config.exclude),
            cutting: Cutting {
                max: config.max_event_bytes,
                oversize: config.oversize,
                multiline,
            },
            stats: stats.clone(),
            label: label.clone(),
            marker,
            appender: Appender::new(
                queue.clone(),
                format!("file source {label}"),
                Lines {
                    key: intake_key,
                    oversize: config.oversize,
                    counters: stats,
                },
                "the files wait",
            ),
            queue,
            config,
        })
    }

    pub fn stats(&self) -> Arc<FileSourceStats> {
        self.stats.clone()
    }

    /// The source's paths, as logs and metrics name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Tails the files until `stop`; what was read and not yet stored then is read again at
    /// the next start.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let first_start = self.queue.checkpoint(&self.marker).is_none();
        let mut tails = BTreeMap::new();
        self.scan(&mut tails, first_start);
        self.recover_rotated(&mut tails);
        tracing::info!(
            source = %self.label,
            files = tails.len(),
            first_start,
            "file source started"
        );
        let mut marker_pending = first_start;
        let mut next_scan = Instant::now() + self.config.scan_interval();
        let mut turn = 0usize;
        // The rounds handed to the queue and not yet durable, each with the files it lets go
        // of (`sources/durable/in_flight.rs`): at most `DEPTH`, so a full queue still stops
        // the reading. A tail's checkpoint moves when its round is handed over; the files a
        // round lets go of are closed only once it is durable.
        let mut in_flight: InFlight<Vec<FileId>> = InFlight::new();
        loop {
            if stop.is_cancelled() {
                break;
            }
            if in_flight.is_full() && !self.oldest_durable(&mut tails, &mut in_flight, &stop).await
            {
                break;
            }
            let now = Instant::now();
            if now >= next_scan {
                self.scan(&mut tails, false);
                next_scan = now + self.config.scan_interval();
            }
            // Files a round in flight lets go of are not read again.
            let letting_go: Vec<FileId> = in_flight.extras().flatten().copied().collect();
            let round = self.read_round(&mut tails, turn, &letting_go).await;
            turn = turn.wrapping_add(1);
            let mut frames = round.frames;
            let released = self.release_done(&mut tails, now, &letting_go, &mut frames);
            let mut checkpoints = Vec::new();
            // A file a round in flight lets go of keeps the forgetting that round stores.
            for tail in tails.values_mut().filter(|t| !letting_go.contains(&t.id)) {
                match tail.checkpoint() {
                    Ok(Some(c)) => checkpoints.push(c),
                    Ok(None) => {}
                    Err(e) => self.read_error(tail, &e),
                }
            }
            checkpoints.extend(released.iter().map(|id| Checkpoint {
                name: id.checkpoint_name(),
                state: None,
            }));
            if marker_pending {
                checkpoints.push(Checkpoint {
                    name: self.marker.clone(),
                    state: Some(vec![1]),
                });
            }
            if !frames.is_empty() || !checkpoints.is_empty() {
                marker_pending = false;
                let submitted = self
                    .appender
                    .submit(&mut in_flight, frames, checkpoints, released, &stop)
                    .await;
                if submitted.is_err() {
                    break;
                }
            }
            if !round.read_any {
                // Nothing more to read now: the rounds in flight are waited for before
                // sleeping.
                if !self.all_durable(&mut tails, &mut in_flight, &stop).await {
                    break;
                }
                let due = tails.values().filter_map(Tail::due).min();
                let wake = [
                    Some(now + self.config.poll_interval()),
                    Some(next_scan),
                    due,
                ]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until(wake.into()) => {}
                }
            }
        }
        // The rounds in flight at the stop are stored (unless the queue is full: the appender
        // gives up at the stop), as before the reads were pipelined.
        self.all_durable(&mut tails, &mut in_flight, &stop).await;
        tracing::info!(source = %self.label, files = tails.len(), "file source stopped");
        Ok(())
    }

    /// Waits for the oldest round in flight to be durable, then lets go of the files it
    /// released. `false` if it could not be stored (the source stopped).
    async fn oldest_durable(
        &self,
        tails: &mut BTreeMap<FileId, Tail>,
        in_flight: &mut InFlight<Vec<FileId>>,
        stop: &CancellationToken,
    ) -> bool {
        match self.appender.durable(in_flight, stop).await {
            Some(Ok(round)) => {
                self.let_go(tails, &round.extra);
                true
            }
            Some(Err(Stopped)) => false,
            None => true,
        }
    }

    /// [`FileSource::oldest_durable`] for every round in flight.
    async fn all_durable(
        &self,
        tails: &mut BTreeMap<FileId, Tail>,
        in_flight: &mut InFlight<Vec<FileId>>,
        stop: &CancellationToken,
    ) -> bool {
        while !in_flight.is_empty() {
            if !self.oldest_durable(tails, in_flight, stop).await {
                return false;
            }
        }
        true
    }

    /// Closes the files a durable round let go of.
    fn let_go(&self, tails: &mut BTreeMap<FileId, Tail>, released: &[FileId]) {
        for id in released {
            if let Some(tail) = tails.remove(id) {
                self.stats.files_released.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %self.label, path = %tail.path.display(), "file read to its end and let go of");
            }
        }
        self.stats
            .open_files
            .store(tails.len() as u64, Ordering::Relaxed);
    }

    /// Reads every file but those in `skip` (from a rotating first one; a busy one until its
    /// reads come back short), up to [`ROUND_BYTES`] in all.
    async fn read_round(
        &self,
        tails: &mut BTreeMap<FileId, Tail>,
        turn: usize,
        skip: &[FileId],
    ) -> Round {
        let mut round = Round::default();
        let now = Instant::now();
        let ids: Vec<FileId> = tails
            .keys()
            .filter(|id| !skip.contains(id))
            .copied()
            .collect();
        let n = ids.len().max(1);
        let mut bytes = 0;
        for i in 0..ids.len() {
            let Some(tail) = tails.get_mut(&ids[(turn + i) % n]) else {
                continue;
            };
            // A busy file is read on while its reads come back full, up to the round's
            // budget: with one read a round, a single busy file made commits of ~1,300 lines
            // (a commit, with its fsync, per 256 KiB).
            while bytes < ROUND_BYTES {
                match tail.read().await {
                    Ok(Read::Bytes(got)) => {
                        bytes += got;
                        round.read_any = true;
                        if got < tail::READ_BYTES {
                            break;
                        }
                    }
                    Ok(Read::End) => break,
                    Ok(Read::Truncated) => {
                        self.truncated(tail, now, &mut round.frames);
                        break;
                    }
                    Err(e) => {
                        self.read_error(tail, &e);
                        break;
                    }
                }
            }
            tail.take(now, &mut round.frames);
        }
        round
    }

    fn truncated(&self, tail: &mut Tail, now: Instant, frames: &mut Vec<Frame>) {
        self.stats.truncations.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %self.label, path = %tail.path.display(), "file truncated (copytruncate?): reading it again from its start");
        if let Err(e) = tail.restart(now, frames) {
            self.read_error(tail, &e);
        }
    }

    fn read_error(&self, tail: &Tail, e: &std::io::Error) {
        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %self.label, path = %tail.path.display(), error = %e, "cannot read file; retrying");
    }

    /// The files no path names any more, read to their end and quiet for `rotate_wait_ms`:
    /// their last events go to `frames`, and they are let go of once those are stored.
    /// `letting_go`: those already let go of by a round in flight.
    fn release_done(
        &self,
        tails: &mut BTreeMap<FileId, Tail>,
        now: Instant,
        letting_go: &[FileId],
        frames: &mut Vec<Frame>,
    ) -> Vec<FileId> {
        let wait = self.config.rotate_wait();
        let mut done = Vec::new();
        for tail in tails.values_mut().filter(|t| !letting_go.contains(&t.id)) {
            let quiet = now.saturating_duration_since(tail.last_growth) >= wait;
            if tail
                .gone_since
                .is_some_and(|g| now.saturating_duration_since(g) >= wait)
                && quiet
            {
                tail.finish(now, frames);
                done.push(tail.id);
            }
        }
        done
    }

    /// Looks for files: new ones are opened, known ones get their current path, and those at
    /// no path any more are marked gone.
    fn scan(&self, tails: &mut BTreeMap<FileId, Tail>, first_start: bool) {
        let (found, errors) = self.patterns.scan();
        for e in errors {
            tracing::debug!(source = %self.label, error = %e, "cannot look at a path");
        }
        let now = Instant::now();
        let mut seen = HashSet::new();
        let mut waiting = 0u64;
        for f in found {
            seen.insert(f.id);
            if let Some(tail) = tails.get_mut(&f.id) {
                tail.path = f.path;
                tail.gone_since = None;
                if tail.replaced().unwrap_or(false) {
                    let mut frames = Vec::new();
                    // Its old lines were all handed out at the last round: nothing here.
                    self.truncated(tail, now, &mut frames);
                }
                continue;
            }
            if tails.len() >= self.config.max_open_files {
                waiting += 1;
                continue;
            }
            match self.open(&f, first_start) {
                Ok(tail) => {
                    tails.insert(f.id, tail);
                }
                Err(e) => {
                    tracing::warn!(source = %self.label, path = %f.path.display(), error = %e, "cannot open file; trying again at the next scan");
                }
            }
        }
        for tail in tails.values_mut() {
            if !seen.contains(&tail.id) && tail.gone_since.is_none() {
                tracing::info!(source = %self.label, path = %tail.path.display(), "file rotated away or deleted: reading it to its end");
                tail.gone_since = Some(now);
            }
        }
        self.stats.files_waiting.store(waiting, Ordering::Relaxed);
        self.stats
            .open_files
            .store(tails.len() as u64, Ordering::Relaxed);
    }

    /// Opens a file found by a scan, at its checkpoint if it has one that is still its own.
    fn open(&self, f: &Found, first_start: bool) -> std::io::Result<Tail> {
        let file = std::fs::File::open(&f.path)?;
        let meta = file.metadata()?;
        if FileId::of(&meta) != f.id {
            return Err(std::io::Error::other("replaced while it was opened"));
        }
        let stored = self.stored_position(f.id);
        let (start, committed) = match stored {
            Some(pos) if pos.fingerprint.matches(&file)? => {
                if pos.offset <= meta.len() {
                    (pos.offset, Some((pos.offset, pos.fingerprint)))
                } else {
                    self.stats.truncations.fetch_add(1, Ordering::Relaxed);
                    (0, None)
                }
            }
            // Another file on the inode of one that was deleted.
            Some(_) => (0, None),
            None if first_start && self.config.read_from == ReadFrom::End => (meta.len(), None),
            None => (0, None),
        };
        self.stats.files_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(source = %self.label, path = %f.path.display(), offset = start, "reading file");
        Tail::new(
            f.id,
            f.path.clone(),
            file,
            start,
            committed,
            self.cutting.clone(),
        )
    }

    fn stored_position(&self, id: FileId) -> Option<Position> {
        let bytes = self.queue.checkpoint(&id.checkpoint_name())?;
        match Position::decode(&bytes) {
            Ok(pos) => Some(pos),
            Err(e) => {
                tracing::warn!(source = %self.label, error = %e, "unreadable file checkpoint: the file is read as a new one");
                None
            }
        }
    }

    /// At start: the files this source had checkpoints for that no path names now (rotated
    /// or deleted while the forwarder was stopped). One still in its directory under another
    /// name is read to its end from its checkpoint; the others' checkpoints are let go of.
    fn recover_rotated(&self, tails: &mut BTreeMap<FileId, Tail>) {
        let mut forget = Vec::new();
        for (name, bytes) in self.queue.checkpoints_with_prefix(position::PREFIX) {
            let Some(id) = FileId::from_checkpoint_name(&name) else {
                continue;
            };
            if tails.contains_key(&id) {
                continue;
            }
            let Ok(pos) = Position::decode(&bytes) else {
                continue;
            };
            if !self.patterns.covers(&pos.path) {
                continue; // another source's
            }
            let found = pos.path.parent().and_then(|dir| scan::find_in_dir(dir, id));
            let opened = found.and_then(|path| {
                let file = std::fs::File::open(&path).ok()?;
                let meta = file.metadata().ok()?;
                let ours = FileId::of(&meta) == id
                    && pos.fingerprint.matches(&file).unwrap_or(false)
                    && pos.offset <= meta.len();
                let committed = Some((pos.offset, pos.fingerprint));
                ours.then(|| {
                    Tail::new(id, path, file, pos.offset, committed, self.cutting.clone()).ok()
                })
                .flatten()
            });
            match opened {
                Some(mut tail) => {
                    tracing::info!(source = %self.label, path = %tail.path.display(), was = %pos.path.display(), "file rotated while stopped: reading it to its end");
                    tail.gone_since = Some(Instant::now());
                    self.stats.files_opened.fetch_add(1, Ordering::Relaxed);
                    tails.insert(id, tail);
                }
                None => {
                    tracing::warn!(source = %self.label, path = %pos.path.display(), offset = pos.offset, "a file read before the stop is gone (deleted while stopped?): what was written to it after its checkpoint cannot be read");
                    forget.push(id);
                }
            }
        }
        // Let go of at the first commit.
        if !forget.is_empty() {
            let queue = self.queue.clone();
            let checkpoints = forget
                .into_iter()
                .map(|id| Checkpoint {
                    name: id.checkpoint_name(),
                    state: None,
                })
                .collect();
            tokio::spawn(async move {
                let _ = queue.append_with_checkpoints(Vec::new(), checkpoints).await;
            });
        }
    }
}

/// What one round of reads found.
#[derive(Default)]
struct Round {
    frames: Vec<Frame>,
    read_any: bool,
}
