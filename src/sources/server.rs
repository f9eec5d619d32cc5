//! The protected connection server that every stream source is built on: how many connections
//! are served at once, and how long a client may take.
//!
//! Why it exists: a source that listens on a socket must not be taken down by its clients,
//! whether they are many, slow or silent. Those defences have nothing to do with what the
//! bytes mean, so they live here, once, and each stream source (the HTTP source today, a
//! syslog TCP/TLS source tomorrow) only says what a request is:
//! - [`Acceptor`]: accepts at most `max_connections` connections at once (the next ones wait in
//!   the kernel's backlog until one closes; a warning at most once a minute says so) and waits
//!   out failed `accept`s (out of file descriptors) instead of spinning;
//! - [`Watchdog`]: one per connection, it says when the connection is to be closed: when a
//!   request (an HTTP head, a syslog frame) takes longer than [`ConnectionTimeouts::request`]
//!   from its first byte (or from the acceptance), or when the connection stays idle between
//!   requests longer than [`ConnectionTimeouts::idle`]. A connection whose request is being
//!   handled ([`Handling`]) is never cut by it;
//! - [`WatchedIo`]: wraps the connection's stream (TCP, TLS, anything `AsyncRead + AsyncWrite`)
//!   so that the first byte after an idle time starts the request's clock.
//!
//! How a source uses it, e.g. a syslog source reading one frame per line (not compiled):
//!
//! ```ignore
//! let mut acceptor = Acceptor::new(listener, config.max_connections, shutdown, "syslog source");
//! while let Some((stream, slot)) = acceptor.accept().await {
//!     tokio::spawn(async move {
//!         let _slot = slot; // the connection's place among max_connections, until it ends
//!         let mut watchdog = Watchdog::start(timeouts);
//!         let activity = watchdog.activity();
//!         let mut frames = BufReader::new(activity.watch(stream)).lines();
//!         loop {
//!             tokio::select! {
//!                 frame = frames.next_line() => {
//!                     let Ok(Some(frame)) = frame else { return };
//!                     let _handling = activity.handling(); // no time limit while appending
//!                     append(frame).await;
//!                 }
//!                 limit = watchdog.expired() => {
//!                     tracing::debug!(?limit, "syslog connection closed: the client is too slow");
//!                     return; // dropping the stream closes the socket
//!                 }
//!             }
//!         }
//!     });
//! }
//! ```
//!
//! A TLS source watches the TCP stream before the handshake (`tls.accept(activity.watch(tcp))`),
//! so that the handshake is timed like the rest of the first request. The HTTP source does the
//! same with hyper driving the stream ([`crate::sources::http`]'s `serve_connection`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The least length of the kernel's queue of connections not yet accepted (`listen(2)`'s
/// backlog); tokio's `TcpListener::bind` gives 1024.
const MIN_BACKLOG: u32 = 1024;

/// Least time between two warnings that `max_connections` is reached.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// Pause after a failed `accept` that is not a connection reset, so as not to spin.
const ACCEPT_FAILURE_PAUSE: Duration = Duration::from_secs(1);

/// Listens on `addr` with a backlog of at least `max_connections` (and 1024): a storm of
/// connects (a fleet of relays reconnecting after an outage) then waits in the kernel's
/// queue while the source accepts, instead of overflowing it. An overflowing queue drops
/// handshakes, and their senders retransmit for seconds to minutes: the syslog bench's 1,000
/// connections at once took over a minute to be all accepted with 1024. The kernel caps the
/// backlog at `net.core.somaxconn`.
pub fn listen(addr: std::net::SocketAddr, max_connections: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted forwarder can listen again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = u32::try_from(max_connections).unwrap_or(u32::MAX);
    socket.listen(backlog.clamp(MIN_BACKLOG, 65_535))
}

/// Accepts connections until `stop` is cancelled, at most `max_connections` at once. Dropping
/// it closes the listening socket.
pub struct Acceptor {
    listener: TcpListener,
    stop: CancellationToken,
    /// One permit per connection served; it is released when the connection closes.
    slots: Arc<Semaphore>,
    max_connections: usize,
    last_full_warning: Option<Instant>,
    /// Who accepts, for the log: "http source".
    source: &'static str,
}

/// A connection's place among the `max_connections` served at once: it is given back when
/// this is dropped, so hold it as long as the connection is served.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Acceptor {
    /// Accepts on `listener`, at most `max_connections` at once, until `stop` is cancelled.
    /// `source` names the source in the log ("http source").
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        stop: CancellationToken,
        source: &'static str,
    ) -> Acceptor {
        Acceptor {
            listener,
            stop,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            last_full_warning: None,
            source,
        }
    }

    /// The next connection with its slot, or `None` once `stop` is cancelled. While every slot
    /// is taken, nothing is accepted: new connections wait in the kernel's backlog.
    pub async fn accept(&mut self) -> Option<(TcpStream, Slot)> {
        let slot = self.slot().await?;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => return Some((stream, Slot { _permit: slot })),
                Err(e) => self.accept_failed(e).await,
            }
        }
    }

    async fn slot(&mut self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        let now = Instant::now();
        if self
            .last_full_warning
            .is_none_or(|last| now.duration_since(last) >= FULL_WARNING_INTERVAL)
        {
            self.last_full_warning = Some(now);
            tracing::warn!(
                max_connections = self.max_connections,
                "{}: max_connections reached; new connections wait until one closes",
                self.source
            );
        }
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            slot = self.slots.clone().acquire_owned() => {
                Some(slot.expect("the connection semaphore is never closed"))
            }
        }
    }

    /// A failed `accept`: a connection reset before it was accepted is nothing; anything else
    /// (out of file descriptors) is logged and waited out, so as not to spin.
    async fn accept_failed(&self, e: std::io::Error) {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
        if matches!(
            e.kind(),
            ConnectionAborted | ConnectionRefused | ConnectionReset
        ) {
            return;
        }
        tracing::error!(
            error = %e,
            "{} cannot accept connections; retrying in 1s",
            self.source
        );
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(ACCEPT_FAILURE_PAUSE) => {}
        }
    }
}

/// The connection-level time limits (a request body's, if any, is the source's business).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// Longest time a request may take to arrive, from the acceptance or from its first byte
    /// on a kept-alive connection, until it is being handled (HTTP: its head).
    pub request: Duration,
    /// Longest time a connection may stay idle between requests.
    pub idle: Duration,
}

/// Which limit a [`Watchdog`] enforced; the source names it after its option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`ConnectionTimeouts::request`].
    Request,
    /// [`ConnectionTimeouts::idle`].
    Idle,
}

/// Where a connection is, as its watchdog sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request since then (the acceptance, or the first byte of the request).
    Receiving(Instant),
    /// That many requests being handled (more than one only over HTTP/2): no time limit here.
    Busy(usize),
    /// Idle since the last request was handled.
    Idle(Instant),
}

impl Phase {
    /// When the connection is to be closed if nothing happens, if ever.
    fn deadline(self, timeouts: ConnectionTimeouts) -> Option<Instant> {
        match self {
            Phase::Receiving(since) => since.checked_add(timeouts.request),
            Phase::Busy(_) => None,
            Phase::Idle(since) => since.checked_add(timeouts.idle),
        }
    }

    /// What its deadline enforces.
    fn limit(self) -> Limit {
        match self {
            Phase::Receiving(_) => Limit::Request,
            Phase::Busy(_) | Phase::Idle(_) => Limit::Idle,
        }
    }
}

/// One connection's watchdog: [`expired`](Watchdog::expired) resolves when the connection is
/// to be closed. Start it when the connection is accepted: the first request is timed from
/// then.
pub struct Watchdog {
    activity: Activity,
    changes: watch::Receiver<Phase>,
    timeouts: ConnectionTimeouts,
}

/// What a connection is doing, told to its [`Watchdog`] by its stream ([`Activity::watch`])
/// and by its request handling ([`Activity::handling`]). Cheap to clone.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<Phase>>);

impl Watchdog {
    /// A watchdog for a connection accepted now.
    pub fn start(timeouts: ConnectionTimeouts) -> Watchdog {
        let (phase, changes) = watch::channel(Phase::Receiving(Instant::now()));
        Watchdog {
            activity: Activity(Arc::new(phase)),
            changes,
            timeouts,
        }
    }

    /// The handle through which the connection tells what it is doing.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// Resolves, with the limit that was passed, once the connection has been too slow: it
    /// is then to be closed (by dropping its stream). Never resolves while a request is being
    /// handled. Cancel-safe.
    pub async fn expired(&mut self) -> Limit {
        loop {
            let deadline = self.changes.borrow_and_update().deadline(self.timeouts);
            tokio::select! {
                biased;
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // Cannot happen: `self.activity` is a sender. Never resolving is safe.
                        std::future::pending::<()>().await;
                    }
                }
                () = sleep_until(deadline) => {
                    let now = *self.changes.borrow_and_update();
                    if now.deadline(self.timeouts).is_some_and(|d| d <= Instant::now()) {
                        return now.limit();
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Activity {
    /// A request is complete and being handled until the returned guard is dropped.
    pub fn handling(&self) -> Handling {
        Handling::start(self.0.clone())
    }

    /// `stream`, telling the watchdog when an idle connection receives bytes.
    pub fn watch<S>(&self, stream: S) -> WatchedIo<S> {
        WatchedIo {
            inner: stream,
            phase: self.0.clone(),
        }
    }
}

/// A request being handled on a connection, from its complete arrival (HTTP: its head) to its
/// answer (or until it is dropped): the watchdog sets no deadline meanwhile.
pub struct Handling(Arc<watch::Sender<Phase>>);

impl Handling {
    fn start(phase: Arc<watch::Sender<Phase>>) -> Handling {
        phase.send_modify(|p| {
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Receiving(_) | Phase::Idle(_) => Phase::Busy(1),
            }
        });
        Handling(phase)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.send_modify(|p| {
            *p = match *p {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Idle(Instant::now()),
            }
        });
    }
}

/// A connection's stream that tells its watchdog when an idle connection receives bytes:
/// from then on, the next request is timed.
pub struct WatchedIo<S> {
    inner: S,
    phase: Arc<watch::Sender<Phase>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.phase.send_if_modified(|p| match p {
                Phase::Idle(_) => {
                    *p = Phase::Receiving(Instant::now());
                    true
                }
                Phase::Receiving(_) | Phase::Busy(_) => false,
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
