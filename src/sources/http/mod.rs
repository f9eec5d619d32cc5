//! The local intake-compatible HTTP API.
//!
//! Why it exists: an application written for the Sekoia.io intake should gain disk buffering by
//! changing nothing but its URL. So this source serves the intake's endpoints, takes the key and
//! the event date wherever the intake takes them, and gives the same answers. It parses with the
//! one shared parser ([`intake_api::parse_request`](crate::intake_api::parse_request)) so that
//! it cannot drift from the delivery client or the mock intake.
//!
//! The promise: a 200 is sent only once [`Queue::append`] returned `Ok`, i.e. once the events are
//! fsynced. Any other answer means nothing of the request was kept, and tells the sender what
//! to do with its events:
//! - 400 / 401 / 413 / 415: the request itself is wrong; sending it again cannot help;
//! - 403: the request brings intake keys this forwarder does not take (`max_intake_keys`
//!   reached). Not 429: keys are kept as long as the queue, so waiting does not help; the
//!   operator must raise the limit (or the sender use a known key);
//! - 503 + `Retry-After`: keep the events and try again later (queue full, storage error,
//!   forwarder stopping).
//!
//! Shutdown ([`HttpSource::run`]): once the token is cancelled the listening socket is closed,
//! requests arriving on connections already open get 503 + `Retry-After` + `Connection: close`,
//! requests already being handled finish (their events are appended and acknowledged), then the
//! idle connections are closed and `run` returns.
//!
//! Slow and abusive clients (the defences are those of [`super::server`], which other stream
//! sources share): every connection has a watchdog ([`serve_connection`]) that closes it when
//! its request head takes longer than `header_read_timeout_secs` (counted from the acceptance,
//! or from the first byte of the next request on a kept-alive connection), or when it stays
//! idle between requests longer than `idle_timeout_secs`; a connection whose request is being
//! handled is never cut by it. A body that takes longer than `body_read_timeout_secs` gets 408
//! (nothing is kept). At most `max_connections` connections are served at once: the next ones
//! are accepted only when one closes, and wait in the kernel's backlog until then.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpSourceConfig;
use crate::queue::{Queue, SenderGuard};
use crate::sources::server::{self, Acceptor, ConnectionTimeouts, Limit, Slot, Watchdog};

use handler::{handle, Shared};

mod handler;
#[cfg(test)]
mod tests;

/// Who accepts connections, in the log of the generic server.
const SOURCE_NAME: &str = "http source";

crate::stats::stats_table! {
    /// Counters of the HTTP source, one set per source (`listen` label in `/metrics`).
    /// `/health` and `/ready` requests are not counted.
    pub struct HttpSourceStats => HttpSourceSnapshot, metrics "http" {
        /// Any path, any answer.
        requests: counter, "Requests to the HTTP source";
        /// Their events are durable.
        accepted_requests: counter, "Requests the HTTP source answered 200";
        accepted_events: counter, "Events acknowledged by the HTTP source (durable)";
        /// Bad JSON, bad UTF-8, bad gzip, no event.
        rejected_400: counter as "rejected_requests" { "status" = "400" },
            "Requests the HTTP source refused, by status (the sender keeps their events)";
        /// No intake key.
        rejected_401: counter as "rejected_requests" { "status" = "401" }, "Refused: no key";
        /// The body or one event too large.
        rejected_413: counter as "rejected_requests" { "status" = "413" }, "Refused: too large";
        /// Queue full, storage error, forwarder stopping.
        rejected_503: counter as "rejected_requests" { "status" = "503" }, "Refused for now";
        /// Unknown path (404), wrong method (405), body too slow (408), unknown encoding
        /// (415), too many intake keys (403).
        rejected_other: counter as "rejected_requests" { "status" = "other" }, "Other refusals";
        /// Also counted in `rejected_other`.
        rejected_max_intake_keys: counter,
            "Requests refused (403) because their new intake keys would exceed max_intake_keys";
        /// As sent (before gzip decompression).
        body_bytes: counter, "Request body bytes read by the HTTP source";
    }
}

impl HttpSourceStats {
    fn count_rejection(&self, status: StatusCode) {
        let counter = match status.as_u16() {
            400 => &self.rejected_400,
            401 => &self.rejected_401,
            413 => &self.rejected_413,
            503 => &self.rejected_503,
            _ => &self.rejected_other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The HTTP source, bound and ready to [`run`](HttpSource::run).
#[derive(Debug)]
pub struct HttpSource {
    listener: TcpListener,
    addr: SocketAddr,
    config: HttpSourceConfig,
    queue: Queue,
    stats: Arc<HttpSourceStats>,
}

impl HttpSource {
    /// Binds the listener (so the caller can log/learn the real address, port 0 allowed).
    pub async fn bind(config: HttpSourceConfig, queue: Queue) -> anyhow::Result<HttpSource> {
        let listener = server::listen(config.listen, config.max_connections)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener
            .local_addr()
            .context("cannot learn the address the http source listens on")?;
        tracing::info!(addr = %addr, "http source listening");
        Ok(HttpSource {
            listener,
            addr,
            config,
            queue,
            stats: Arc::new(HttpSourceStats::default()),
        })
    }

    /// The address really listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The source's counters; they keep counting while [`run`](HttpSource::run) serves.
    pub fn stats(&self) -> Arc<HttpSourceStats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, answers 503 + Retry-After to
    /// requests arriving on open connections, lets requests in flight finish, and returns (the
    /// caller puts a deadline on it).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = self.addr;
        let in_flight = TaskTracker::new();
        let timeouts = ConnectionTimeouts {
            request: self.config.header_read_timeout(),
            idle: self.config.idle_timeout(),
        };
        let mut acceptor = Acceptor::new(
            self.listener,
            self.config.max_connections,
            shutdown.clone(),
            SOURCE_NAME,
        );
        let queue = self.queue.clone();
        let shared = Arc::new(Shared {
            config: self.config,
            queue: self.queue,
            stats: self.stats,
            stopping: shutdown.clone(),
            in_flight: in_flight.clone(),
        });
        let service = TowerToHyperService::new(Router::new().fallback(handle).with_state(shared));
        let connections = GracefulShutdown::new();
        while let Some((stream, slot)) = acceptor.accept().await {
            // An HTTP client waits for each answer before sending again on its connection: the
            // queue may wait a moment for its next request before committing.
            let sender = queue.sender();
            tokio::spawn(serve_connection(
                stream,
                service.clone(),
                connections.watcher(),
                timeouts,
                (slot, sender),
            ));
        }
        // Closes the listening socket: new connections are refused from now on.
        drop(acceptor);
        drained(shutdown, in_flight).await;
        // Closes the idle connections, lets the others finish their answer.
        connections.shutdown().await;
        tracing::info!(addr = %addr, "http source stopped");
        Ok(())
    }
}

/// Resolves once shutdown was asked for and every request that was being handled is answered:
/// only then may idle connections be closed (until then, they get 503s).
async fn drained(shutdown: CancellationToken, in_flight: TaskTracker) {
    shutdown.cancelled().await;
    tracing::info!(
        requests_in_flight = in_flight.len(),
        "http source stopping: listener closed, finishing requests in flight"
    );
    in_flight.close();
    in_flight.wait().await;
}

/// Serves one connection until it ends, or until its watchdog closes it (by dropping it) for
/// a request head that takes too long or an idle time that lasts too long. `_held` (its
/// connection slot, and its place among the queue's senders) is held until then.
async fn serve_connection(
    stream: TcpStream,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
    timeouts: ConnectionTimeouts,
    _held: (Slot, SenderGuard),
) {
    let mut watchdog = Watchdog::start(timeouts);
    let activity = watchdog.activity();
    let io = TokioIo::new(activity.watch(stream));
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let handling = activity.handling();
        let response = hyper::service::Service::call(&service, request);
        async move {
            let response = response.await;
            drop(handling);
            response
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog below times request heads: hyper's own timer would also cut kept-alive
    // connections idle for that long (it runs while waiting for the next request).
    builder.http1().header_read_timeout(None);
    let connection = watcher.watch(builder.serve_connection_with_upgrades(io, service));
    tokio::pin!(connection);
    tokio::select! {
        biased;
        ended = &mut connection => {
            if let Err(e) = ended {
                tracing::trace!(error = %e, "http connection ended with an error");
            }
        }
        limit = watchdog.expired() => {
            tracing::debug!(
                limit = option_name(limit),
                "http connection closed: the client is too slow"
            );
            // Returning drops the connection, which closes its socket.
        }
    }
}

/// The option of [`HttpSourceConfig`] that sets `limit`, for the log.
fn option_name(limit: Limit) -> &'static str {
    match limit {
        Limit::Request => "header_read_timeout_secs",
        Limit::Idle => "idle_timeout_secs",
    }
}
