//! Syslog over TCP and TLS: one task per connection, on the protected connection server.
//!
//! A connection is read as fast as the queue makes its messages durable and no faster: the
//! messages already in the read buffer (up to a batch) are appended together, and the socket
//! is not read again until they are durable. So a full queue stops the reading, the kernel's
//! receive window closes, and the sender is pushed back instead of its messages being dropped.
//!
//! Limits (`super::super::server`): at most `max_connections` at once (the next wait in the
//! kernel's backlog), a connection silent for `idle_timeout_secs` is closed, and so is one
//! whose message (or TLS handshake) takes longer than `message_timeout_secs` from its first
//! byte. Memory per connection is bounded: a read buffer, at most one batch, and at most
//! `max_event_bytes` of a message that is being cut.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::framing::{Frame, FrameDecoder, Oversize};
use super::store::Store;
use crate::sources::server::{ConnectionTimeouts, Limit, Slot, Watchdog};

/// Most messages appended at once from one connection.
const BATCH_EVENTS: usize = 1000;
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

/// Reads and stores messages until the stream ends; says why it ended.
async fn read_messages<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    store: &Store,
    reading: Reading,
    activity: &crate::sources::server::Activity,
    stop: &CancellationToken,
) -> &'static str {
    let decoder = FrameDecoder::new(reading.max_event_bytes, reading.oversize);
    let mut frames = FramedRead::with_capacity(stream, decoder, READ_BUFFER);
    let mut batch = Vec::new();
    let mut framing_errors = 0;
    loop {
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => return "the source stopped",
            next = frames.next() => next,
        };
        let ended = match next {
            None => Some("the sender closed it"),
            Some(Err(_)) => Some("a read failed"),
            Some(Ok(frame)) => {
                batch.push(frame);
                more_ready(&mut frames, &mut batch)
            }
        };
        let errors = frames.decoder().framing_errors();
        if errors > framing_errors {
            store
                .stats
                .framing_errors
                .fetch_add(errors - framing_errors, Ordering::Relaxed);
            framing_errors = errors;
        }
        {
            // No time limit while the queue makes them durable.
            let _handling = activity.handling();
            if store.store(&batch, stop).await.is_err() {
                return "the source stopped before the messages were stored";
            }
        }
        batch.clear();
        if let Some(ended) = ended {
            // Our side of the close: a TLS sender gets the close_notify it must get back
            // (RFC 5425, 4.4), a TCP sender a FIN.
            let _ = frames.get_mut().shutdown().await;
            return ended;
        }
    }
}

/// Takes the messages that are ready without waiting, up to a batch; `Some` if the stream
/// ended meanwhile.
fn more_ready<S: AsyncRead + Unpin>(
    frames: &mut FramedRead<S, FrameDecoder>,
    batch: &mut Vec<Frame>,
) -> Option<&'static str> {
    let mut bytes: usize = batch.iter().map(|f| f.message.len()).sum();
    while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
        match frames.next().now_or_never() {
            Some(Some(Ok(frame))) => {
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
