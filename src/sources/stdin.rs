//! The stdin source: one event per line of the standard input, read only as fast as the queue
//! makes the lines durable, until its end. The `send` command reads its files with the same
//! [`LineReader`].
//!
//! A pipe has no acknowledgement and cannot be read again: what the promise covers is that the
//! pipe is read at most three reads of [`READ_BYTES`] ahead of what is durable (the batch
//! being stored, one read waiting in the channel, one in the reader thread). A full queue stops the reading, the pipe fills and its
//! writer blocks: back-pressure, never a drop. At the end of the input the source finishes
//! (the gauge `ended` says so) and the forwarder keeps running, delivering what it holds and
//! serving its other sources, until it is stopped: `tail -f x | sekoia-forwarder run` is a
//! forwarder, not a one-shot (that is `send`).
//!
//! The input is read in a thread of its own: a blocking read of a terminal or a pipe cannot
//! be cancelled, and in tokio's blocking pool it would hold the runtime's shutdown until the
//! writer writes again. The thread simply dies with the process.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::config::{IntakeKey, ReadingSource, StdinSourceConfig};
use crate::queue::Queue;
use crate::sources::durable::{Appender, InFlight, Lines, Stopped};
use crate::sources::syslog::framing::{Frame, FrameDecoder, Oversize};

/// The most bytes of one read of the input.
pub const READ_BYTES: usize = 256 << 10;

crate::stats::stats_table! {
    /// Counters of the stdin source (`input="stdin"` in `/metrics`).
    pub struct StdinSourceStats => StdinSourceSnapshot, metrics "stdin" {
        /// Lines, or pieces of split lines; empty lines make no event.
        accepted_events: counter, "Lines read from the standard input and made durable in the queue";
        line_bytes: counter, "Bytes of the lines read from the standard input made durable";
        truncated_events: counter,
            "Lines over max_event_bytes stored truncated (oversize = truncate)";
        split_pieces: counter, "Events made of lines over max_event_bytes (oversize = split)";
        dead_lettered_events: counter,
            "Lines over max_event_bytes kept as dead letters, not sent (oversize = dead_letter)";
        invalid_utf8_events: counter,
            "Lines read from the standard input that were not valid UTF-8 (replaced)";
        read_errors: counter, "Errors reading the standard input (it is then taken as ended)";
        queue_full_waits: counter, "Times the stdin source stopped reading: the queue was full";
        ended: gauge,
            "1 once the standard input is read to its end and every line of it is durable";
    }
}

crate::sources::durable::line_counters!(StdinSourceStats, line_bytes);

/// How a [`LineReader::read_to_end`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The input's end: every line of it is durable.
    Eof,
    /// Stopped first: what was read and not yet durable is lost with the pipe (logged).
    Stopped,
}

/// Cuts an input into lines and stores them, one event each, for one intake key.
#[derive(Debug)]
pub struct LineReader {
    appender: Appender,
    max: usize,
    oversize: Oversize,
    stats: Arc<StdinSourceStats>,
}

impl LineReader {
    /// `name`: the reader's name in logs (`stdin source`, a file of `send`).
    pub fn new(
        queue: Queue,
        intake_key: IntakeKey,
        max: usize,
        oversize: Oversize,
        name: String,
    ) -> LineReader {
        let stats: Arc<StdinSourceStats> = Arc::default();
        let lines = Lines {
            key: intake_key,
            oversize,
            counters: stats.clone(),
        };
        LineReader {
            appender: Appender::new(queue, name, lines, "the writer of the input blocks"),
            max,
            oversize,
            stats,
        }
    }

    pub fn stats(&self) -> Arc<StdinSourceStats> {
        self.stats.clone()
    }

    /// Reads `input` to its end, storing its lines as they come: each read's lines are handed
    /// to the queue while the next is read, at most [`crate::sources::durable::DEPTH`] in flight, so that a full queue
    /// stops the reading (`sources/durable/in_flight.rs`). A read error ends the input like its
    /// end (what was read before it is stored) and is returned once that is durable.
    pub async fn read_to_end(
        &self,
        input: impl Read + Send + 'static,
        stop: &CancellationToken,
    ) -> std::io::Result<End> {
        let mut reads = spawn_reader(input, &self.appender.name)?;
        let mut decoder = FrameDecoder::lines(self.max, self.oversize);
        let mut buf = BytesMut::new();
        let mut in_flight = InFlight::new();
        loop {
            if in_flight.is_full() && self.oldest_durable(&mut in_flight, stop).await.is_err() {
                return Ok(End::Stopped);
            }
            let read = tokio::select! {
                () = stop.cancelled() => return Ok(End::Stopped),
                read = reads.recv() => read,
            };
            let mut frames = Vec::new();
            let error = match read {
                Some(Ok(bytes)) => {
                    buf.extend_from_slice(&bytes);
                    while let Some(frame) = decoder.decode(&mut buf).ok().flatten() {
                        frames.push(frame);
                    }
                    if self.submit(&mut in_flight, frames, stop).await.is_err() {
                        return Ok(End::Stopped);
                    }
                    continue;
                }
                Some(Err(e)) => Some(e),
                None => None,
            };
            if let Some(e) = &error {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.appender.name, error = %e,
                    "cannot read the input: taken as its end");
            }
            // The last line may have no newline: it is an event all the same.
            while let Some(frame) = decoder.decode_eof(&mut buf).ok().flatten() {
                frames.push(frame);
            }
            if self.submit(&mut in_flight, frames, stop).await.is_err() {
                return Ok(End::Stopped);
            }
            while !in_flight.is_empty() {
                if self.oldest_durable(&mut in_flight, stop).await.is_err() {
                    return Ok(End::Stopped);
                }
            }
            return match error {
                Some(e) => Err(e),
                None => Ok(End::Eof),
            };
        }
    }

    /// Hands `frames` to the queue behind those in flight (none if there are none).
    async fn submit(
        &self,
        in_flight: &mut InFlight<()>,
        frames: Vec<Frame>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        if frames.is_empty() {
            return Ok(());
        }
        self.appender
            .submit(in_flight, frames, Vec::new(), (), stop)
            .await
    }

    /// Waits for the oldest lines in flight to be durable; `Err` if `stop` came first (the
    /// appender said how many lines were read and not stored).
    async fn oldest_durable(
        &self,
        in_flight: &mut InFlight<()>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        match self.appender.durable(in_flight, stop).await {
            Some(Err(Stopped)) => Err(Stopped),
            Some(Ok(_)) | None => Ok(()),
        }
    }
}

/// Reads `input` in a thread of its own, one read at a time: the next read starts only once
/// the last one was taken (the channel holds one), so that a full queue stops the reading.
/// The channel ends at the input's end, after an error if one ended it.
fn spawn_reader(
    mut input: impl Read + Send + 'static,
    name: &str,
) -> std::io::Result<mpsc::Receiver<std::io::Result<Vec<u8>>>> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name(format!("reader {name}"))
        .spawn(move || loop {
            let mut bytes = vec![0; READ_BYTES];
            match input.read(&mut bytes) {
                Ok(0) => return,
                Ok(n) => {
                    bytes.truncate(n);
                    if tx.blocking_send(Ok(bytes)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// `[[source]] type = "stdin"`, ready to [`run`](StdinSource::run).
#[derive(Debug)]
pub struct StdinSource {
    reader: LineReader,
}

impl StdinSource {
    pub fn new(config: &StdinSourceConfig, queue: Queue) -> anyhow::Result<StdinSource> {
        let intake_key = config
            .resolve_intake_key()
            .map_err(|e| anyhow::anyhow!("stdin source: {e}"))?;
        Ok(StdinSource {
            reader: LineReader::new(
                queue,
                intake_key,
                config.max_event_bytes,
                config.oversize,
                "stdin source".into(),
            ),
        })
    }

    pub fn stats(&self) -> Arc<StdinSourceStats> {
        self.reader.stats()
    }

    /// Reads the standard input to its end (or until `stop`), then finishes; the forwarder
    /// goes on.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        tracing::info!("stdin source started");
        let end = self.reader.read_to_end(std::io::stdin(), &stop).await;
        let s = self.reader.stats.snapshot();
        match end {
            Ok(End::Stopped) => {
                tracing::info!(events = s.accepted_events, "stdin source stopped");
            }
            Ok(End::Eof) | Err(_) => {
                self.reader.stats.ended.store(1, Ordering::Relaxed);
                tracing::info!(
                    events = s.accepted_events,
                    "the standard input is read to its end and every line of it is durable; \
                     the forwarder keeps running (delivering) until it is stopped"
                );
            }
        }
        Ok(())
    }
}
