//! Syslog over TCP and TLS: one task per connection, on the protected connection server.
//!
//! A connection is read as fast as the queue makes its messages durable and no faster: the
//! messages already in the read buffer (up to a batch) are appended together, and while they
//! are made durable the next batch is read and handed to the queue, up to
//! [`crate::sources::durable::DEPTH`] in flight; then the reading waits for the oldest. So a
//! full queue stops the reading, the kernel's receive window closes, and the sender is pushed
//! back instead of its messages being dropped.
//!
//! Limits (`super::super::server`): at most `max_connections` at once (the next wait in the
//! kernel's backlog), a connection silent for `idle_timeout_secs` is closed, and so is one
//! whose message (or TLS handshake) takes longer than `message_timeout_secs` from its first
//! byte. Memory per connection is bounded: a read buffer, at most three batches, and at most
//! `max_event_bytes` of a message that is being cut; and the messages of all connections
//! together, read and not yet durable, by `max_buffered_bytes` ([`super::budget`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, Held};
use super::framing::{Frame, FrameDecoder, Oversize};
use super::store::{Stopped, Store};
use crate::sources::durable::InFlight;
use crate::sources::server::{Activity, ConnectionTimeouts, Handling, Limit, Slot, Watchdog};

/// Most messages appended at once from one connection while many are open.
const BATCH_EVENTS: usize = 1000;
/// Most messages appended at once from a connection that is the only one open (or one of
/// two): a commit costs about the same whatever it holds (~1.3 ms here: sled's apply, its
/// flush through its I/O threads, our fsync), and a lone connection waits for each of its
/// commits, so it puts more in each.
const BATCH_EVENTS_ALONE: usize = 4000;
/// Messages that all connections' batches may hold together before each is cut at
/// [`BATCH_EVENTS`]: larger batches from many connections let the sources outrun delivery,
/// whose reads then come back from disk and cost more CPU (`docs/performance.md`, session 17).
const BATCH_EVENTS_SHARED: usize = 8000;
/// Most message bytes appended at once from one connection.
const BATCH_BYTES: usize = 1 << 20;
/// The read buffer's first size; it grows to hold a message of up to `max_event_bytes`.
const READ_BUFFER: usize = 16 * 1024;

/// How each connection is read.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub max_event_bytes: usize,
    pub oversize: Oversize,
    pub timeouts: ConnectionTimeouts,
}

/// What makes a connection's stream out of the accepted socket: nothing for TCP, the TLS
/// handshake for TLS.
pub trait Handshake: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;
    fn handshake(
        &self,
        tcp: crate::sources::server::WatchedIo<TcpStream>,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

/// Plain TCP.
#[derive(Debug)]
pub struct NoHandshake;

impl Handshake for NoHandshake {
    type Stream = crate::sources::server::WatchedIo<TcpStream>;
    async fn handshake(
        &self,
        tcp: crate::sources::server::WatchedIo<TcpStream>,
    ) -> std::io::Result<Self::Stream> {
        Ok(tcp)
    }
}

/// Serves one connection until it ends, its watchdog closes it or the source stops.
pub async fn serve<H: Handshake>(
    tcp: TcpStream,
    slot: Slot,
    handshake: Arc<H>,
    store: Arc<Store>,
    reading: Reading,
    stop: CancellationToken,
) {
    let _slot = slot;
    let _sender = store.queue.sender();
    let stats = &store.stats;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.open_connections.fetch_add(1, Ordering::Relaxed);
    let peer = tcp.peer_addr().ok();
    let mut watchdog = Watchdog::start(reading.timeouts);
    let activity = watchdog.activity();
    // The source's stop is looked at between messages (`read_messages`), never while some are
    // being stored: what was read from the socket is stored before the connection closes.
    let ended = tokio::select! {
        biased;
        limit = watchdog.expired() => {
            stats.timeouts.fetch_add(1, Ordering::Relaxed);
            limit_reason(limit)
        }
        read = async {
            let handshake = tokio::select! {
                () = stop.cancelled() => return "the source stopped",
                handshake = handshake.handshake(activity.watch(tcp)) => handshake,
            };
            let stream = match handshake {
                Ok(stream) => stream,
                Err(e) => {
                    stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = ?peer, error = %e, "syslog TLS handshake failed");
                    return "the TLS handshake failed";
                }
            };
            read_messages(stream, &store, reading, &activity, &stop).await
        } => read,
    };
    stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(source = %store.name, peer = ?peer, reason = ended, "syslog connection closed");
}

fn limit_reason(limit: Limit) -> &'static str {
    match limit {
        Limit::Request => "a message took longer than message_timeout_secs",
        Limit::Idle => "idle for longer than idle_timeout_secs",
    }
}

/// What a connection keeps with each batch in flight until it is durable: the batch's room
/// in the source's budget, and its [`Handling`] (no time limit while the queue makes it
/// durable).
type Kept<'a> = (Held<'a>, Handling);

/// Reads and stores messages until the stream ends; says why it ended.
///
/// The batches read are handed to the queue while the next is read, up to [`crate::sources::durable::DEPTH`] in
/// flight (`sources/durable/in_flight.rs`: a single connection's rate would otherwise be
/// bounded by the commit latency), and no more: the reading stops at a full batch until the
/// oldest is durable, so that a full queue still stops the reading. They are made durable in
/// the order they were read.
async fn read_messages<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    store: &Store,
    reading: Reading,
    activity: &Activity,
    stop: &CancellationToken,
) -> &'static str {
    let decoder = FrameDecoder::new(reading.max_event_bytes, reading.oversize);
    let mut frames = FramedRead::with_capacity(stream, decoder, READ_BUFFER);
    let budget = &store.budget;
    let mut batch = Vec::new();
    // The room `batch` holds in the source's budget.
    let mut held = budget.none();
    // A message read while the budget had no room for it: nothing more is read until it has.
    let mut waiting: Option<Frame> = None;
    let mut spare = Vec::new();
    let mut in_flight: InFlight<Kept<'_>> = InFlight::new();
    let mut ended: Option<&'static str> = None;
    let mut framing_errors = 0;
    loop {
        let max_events = batch_events(store.stats.open_connections.load(Ordering::Relaxed));
        if ended.is_some() {
            // What was read is stored before the connection closes, room or not (one message
            // over the budget at most).
            batch.extend(waiting.take());
        }
        if !in_flight.is_full() && !batch.is_empty() {
            let next = std::mem::replace(&mut batch, std::mem::take(&mut spare));
            let kept = (
                std::mem::replace(&mut held, budget.none()),
                activity.handling(),
            );
            if store
                .submit(&mut in_flight, next, kept, stop)
                .await
                .is_err()
            {
                return not_stored(store, &batch);
            }
        }
        if ended.is_some() || batch_full(&batch, max_events) {
            match store.durable(&mut in_flight, stop).await {
                Some(Ok(done)) => spare = reuse(done.frames),
                Some(Err(Stopped)) => return not_stored(store, &batch),
                None => break,
            }
            continue;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => ended = Some("the source stopped"),
            () = in_flight.answered() => match store.durable(&mut in_flight, stop).await {
                Some(Ok(done)) => spare = reuse(done.frames),
                Some(Err(Stopped)) => {
                    batch.extend(waiting.take());
                    return not_stored(store, &batch);
                }
                None => {}
            },
            () = room_for(budget, &mut held, waiting.as_ref()) => {
                // The wait took room for more than this message: the ones already read go
                // into the same batch, rather than one batch each.
                batch.extend(waiting.take());
                ended = more_ready(
                    &mut frames,
                    (&mut batch, max_events),
                    budget,
                    &mut held,
                    &mut waiting,
                );
            }
            next = frames.next(), if waiting.is_none() => match next {
                None => ended = Some("the sender closed it"),
                Some(Err(_)) => ended = Some("a read failed"),
                Some(Ok(frame)) => {
                    if budget.try_take(&mut held, frame.message.len()) {
                        batch.push(frame);
                        ended = more_ready(
                            &mut frames,
                            (&mut batch, max_events),
                            budget,
                            &mut held,
                            &mut waiting,
                        );
                    } else {
                        waiting = Some(frame);
                    }
                }
            },
        }
        let errors = frames.decoder().framing_errors();
        if errors > framing_errors {
            store
                .stats
                .framing_errors
                .fetch_add(errors - framing_errors, Ordering::Relaxed);
            framing_errors = errors;
        }
    }
    let ended = ended.unwrap_or("the sender closed it");
    if !stop.is_cancelled() {
        // Our side of the close: a TLS sender gets the close_notify it must get back
        // (RFC 5425, 4.4), a TCP sender a FIN.
        let _ = frames.get_mut().shutdown().await;
    }
    ended
}

/// Ends a connection whose batches in flight could not be stored (the source stopped while
/// the queue was full; the appender has said how many), saying also what was read after
/// them: lost with the connection too, never silently.
fn not_stored(store: &Store, read_ahead: &[Frame]) -> &'static str {
    if !read_ahead.is_empty() {
        tracing::warn!(
            source = %store.name,
            messages = read_ahead.len(),
            "the source stopped while the queue could not take its messages: they were read \
             from the socket but not stored"
        );
    }
    "the source stopped before the messages were stored"
}

/// Waits for room for the message that is waiting, and takes it; never, if none is.
async fn room_for<'a>(budget: &'a Budget, held: &mut Held<'a>, waiting: Option<&Frame>) {
    match waiting {
        Some(frame) => budget.take(held, frame.message.len()).await,
        None => std::future::pending().await,
    }
}

fn reuse(mut frames: Vec<Frame>) -> Vec<Frame> {
    frames.clear();
    frames
}

/// Most messages in one batch of a connection while `open` connections are open.
fn batch_events(open: u64) -> usize {
    let open = usize::try_from(open.max(1)).unwrap_or(usize::MAX);
    (BATCH_EVENTS_SHARED / open).clamp(BATCH_EVENTS, BATCH_EVENTS_ALONE)
}

fn batch_full(batch: &[Frame], max_events: usize) -> bool {
    batch.len() >= max_events || batch_bytes(batch) >= BATCH_BYTES
}

fn batch_bytes(batch: &[Frame]) -> usize {
    batch.iter().map(|f| f.message.len()).sum()
}

/// Takes the messages that are ready without waiting, up to a batch and while the budget has
/// room (the first message without room is left in `waiting`); `Some` if the stream ended
/// meanwhile.
fn more_ready<'a, S: AsyncRead + Unpin>(
    frames: &mut FramedRead<S, FrameDecoder>,
    (batch, max_events): (&mut Vec<Frame>, usize),
    budget: &'a Budget,
    held: &mut Held<'a>,
    waiting: &mut Option<Frame>,
) -> Option<&'static str> {
    let mut bytes = batch_bytes(batch);
    while batch.len() < max_events && bytes < BATCH_BYTES {
        match frames.next().now_or_never() {
            Some(Some(Ok(frame))) => {
                if !budget.try_take(held, frame.message.len()) {
                    *waiting = Some(frame);
                    return None;
                }
                bytes += frame.message.len();
                batch.push(frame);
            }
            Some(None) => return Some("the sender closed it"),
            Some(Some(Err(_))) => return Some("a read failed"),
            None => break,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_connection_takes_larger_batches_and_many_take_the_usual_size() {
        assert_eq!(batch_events(0), BATCH_EVENTS_ALONE);
        assert_eq!(batch_events(1), BATCH_EVENTS_ALONE);
        assert_eq!(batch_events(2), BATCH_EVENTS_ALONE);
        assert_eq!(batch_events(4), 2000);
        assert_eq!(batch_events(8), BATCH_EVENTS);
        assert_eq!(batch_events(1000), BATCH_EVENTS);
        assert_eq!(batch_events(u64::MAX), BATCH_EVENTS);
    }
}
