//! The syslog source: messages over UDP, TCP and TLS, each one an event of the source's
//! intake key, forwarded as sent (the intake parses RFC 3164 and RFC 5424).
//!
//! What "accepted" means here: syslog has no acknowledgement, so the promise is about what
//! reached the queue ([`store`]): a transport reads its next messages only once the last ones
//! are durable, and a full queue stops the reading (TCP and TLS senders are pushed back by the
//! kernel's flow control; UDP datagrams wait in the socket buffer, then are dropped by the
//! kernel and counted). Messages read from a TCP/TLS socket are stored before its connection
//! is closed, also at a stop; what the kernel had received but the forwarder not yet read
//! when it stops is lost with the connection, as with any plain syslog receiver.
//!
//! - [`budget`]: the bytes all connections together hold read and not yet durable;
//! - [`framing`]: cutting a TCP/TLS stream into messages (RFC 6587), and long messages;
//! - [`stream`]: one task per TCP/TLS connection, on the protected connection server;
//! - [`tls`]: the rustls side of `tls://`;
//! - [`udp`]: one message per datagram, and the kernel's drop count;
//! - [`store`]: messages to durable events, waiting out a full queue.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Listen, ReadingSource, SyslogSourceConfig};
use crate::queue::Queue;
use crate::sources::server::{self, Acceptor, ConnectionTimeouts};
use store::Store;
use stream::{Handshake, NoHandshake, Reading};
use tls::Tls;

mod budget;
pub mod framing;
mod store;
mod stream;
mod tls;
mod udp;

/// Who accepts connections, in the log of the generic server.
const SOURCE_NAME: &str = "syslog source";

crate::stats::stats_table! {
    /// Counters of one syslog source (`listen` label in `/metrics`).
    pub struct SyslogSourceStats => SyslogSourceSnapshot, metrics "syslog" {
        /// Messages (or pieces of split ones) made durable in the queue.
        accepted_events: counter, "Syslog messages made durable in the queue";
        /// Their bytes as stored (after stripping and cutting).
        message_bytes: counter, "Bytes of the syslog messages made durable";
        truncated_events: counter,
            "Syslog messages over max_event_bytes stored truncated (oversize = truncate)";
        split_pieces: counter,
            "Events made of syslog messages over max_event_bytes (oversize = split)";
        dead_lettered_events: counter,
            "Syslog messages over max_event_bytes kept as dead letters, not sent (oversize = dead_letter)";
        /// Their invalid bytes were replaced by U+FFFD.
        invalid_utf8_events: counter, "Syslog messages that were not valid UTF-8";
        /// The connection was then read line by line.
        framing_errors: counter, "Octet counts (RFC 6587) that were not numbers";
        queue_full_waits: counter, "Times the syslog source stopped reading: the queue was full";
        /// Of the TCP/TLS connections together ([`budget`]).
        buffered_bytes: gauge,
            "Room of max_buffered_bytes held by TCP/TLS connections: messages read and not yet durable, and room taken for the next ones after a wait";
        buffered_bytes_peak: gauge,
            "Most room of max_buffered_bytes held at once since the start";
        budget_waits: counter,
            "Times a TCP/TLS connection stopped reading: max_buffered_bytes were held by messages not yet durable";
        connections: counter, "TCP/TLS connections accepted";
        open_connections: gauge, "TCP/TLS connections open now";
        timeouts: counter,
            "Connections closed for a message slower than message_timeout_secs or an idle time over idle_timeout_secs";
        tls_handshake_failures: counter, "TLS handshakes that failed";
        datagrams: counter, "UDP datagrams received";
        /// Read every second from `/proc/net/udp` (Linux).
        kernel_dropped_datagrams: counter,
            "UDP datagrams the kernel dropped for this socket (its receive buffer was full)";
    }
}

crate::sources::durable::line_counters!(SyslogSourceStats, message_bytes);

/// What a syslog source listens with.
#[derive(Debug)]
enum Socket {
    Udp(UdpSocket),
    Tcp(TcpListener),
    Tls(TcpListener, Tls),
}

/// A syslog source, bound and ready to [`run`](SyslogSource::run).
#[derive(Debug)]
pub struct SyslogSource {
    socket: Socket,
    addr: SocketAddr,
    config: SyslogSourceConfig,
    store: Arc<Store>,
}

impl SyslogSource {
    /// Binds the socket and reads the key (and the TLS files): every error stops the start.
    pub async fn bind(config: SyslogSourceConfig, queue: Queue) -> anyhow::Result<SyslogSource> {
        let intake_key = config
            .resolve_intake_key()
            .map_err(|e| anyhow::anyhow!("syslog source {}: {e}", config.listen))?;
        let listen = config.listen;
        let socket = match listen {
            Listen::Udp(addr) => Socket::Udp(udp::bind(addr, config.receive_buffer_bytes)?),
            Listen::Tcp(addr) => Socket::Tcp(tcp_listener(addr, config.max_connections)?),
            Listen::Tls(addr) => {
                let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
                    anyhow::bail!("syslog source {listen}: tls_cert and tls_key are needed");
                };
                let tls = Tls::load(cert, key, config.tls_client_ca.as_deref())
                    .with_context(|| format!("syslog source {listen}"))?;
                Socket::Tls(tcp_listener(addr, config.max_connections)?, tls)
            }
        };
        let addr = match &socket {
            Socket::Udp(s) => s.local_addr(),
            Socket::Tcp(l) | Socket::Tls(l, _) => l.local_addr(),
        }
        .context("cannot learn the address the syslog source listens on")?;
        let name = format!("{}://{addr}", listen.scheme());
        tracing::info!(listen = %name, "syslog source listening");
        let stats = Arc::<SyslogSourceStats>::default();
        let budget = budget::Budget::new(config.max_buffered_bytes, stats.clone());
        let store = Store::new(queue, intake_key, config.oversize, stats, budget, name);
        Ok(SyslogSource {
            socket,
            addr,
            config,
            store: Arc::new(store),
        })
    }

    /// The address really listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `udp`, `tcp` or `tls`.
    pub fn scheme(&self) -> &'static str {
        self.config.listen.scheme()
    }

    /// The source's counters; they keep counting while it runs.
    pub fn stats(&self) -> Arc<SyslogSourceStats> {
        self.store.stats.clone()
    }

    /// Serves until `shutdown`; then stops accepting and reading, stores what each connection
    /// had read, and returns (the caller puts a deadline on it).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let reading = Reading {
            max_event_bytes: self.config.max_event_bytes,
            oversize: self.config.oversize,
            timeouts: ConnectionTimeouts {
                request: self.config.message_timeout(),
                idle: self.config.idle_timeout(),
            },
        };
        let name = self.store.name.clone();
        match self.socket {
            Socket::Udp(socket) => {
                let (max, oversize) = (reading.max_event_bytes, reading.oversize);
                udp::run(socket, self.store, max, oversize, shutdown).await;
            }
            Socket::Tcp(listener) => {
                let max = self.config.max_connections;
                serve_stream(listener, NoHandshake, max, self.store, reading, shutdown).await;
            }
            Socket::Tls(listener, tls) => {
                let max = self.config.max_connections;
                serve_stream(listener, tls, max, self.store, reading, shutdown).await;
            }
        }
        tracing::info!(listen = %name, "syslog source stopped");
        Ok(())
    }
}

fn tcp_listener(addr: SocketAddr, max_connections: usize) -> anyhow::Result<TcpListener> {
    server::listen(addr, max_connections).with_context(|| format!("cannot listen on {addr}"))
}

/// Accepts TCP/TLS connections until `shutdown`, then waits for the open ones to store what
/// they read.
async fn serve_stream<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    max_connections: usize,
    store: Arc<Store>,
    reading: Reading,
    shutdown: CancellationToken,
) {
    let handshake = Arc::new(handshake);
    let connections = TaskTracker::new();
    let mut acceptor = Acceptor::new(listener, max_connections, shutdown.clone(), SOURCE_NAME);
    while let Some((tcp, slot)) = acceptor.accept().await {
        connections.spawn(stream::serve(
            tcp,
            slot,
            handshake.clone(),
            store.clone(),
            reading,
            shutdown.clone(),
        ));
    }
    drop(acceptor);
    connections.close();
    connections.wait().await;
}
