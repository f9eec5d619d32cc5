//! The local intake-compatible HTTP API.
//!
//! Why it exists: an application written for the Sekoia.io intake should gain disk buffering by
//! changing nothing but its URL. So this source serves the intake's endpoints, takes the key and
//! the event date wherever the intake takes them, and gives the same answers. It parses with the
//! one shared parser ([`intake_api::parse_request`]) so that it cannot drift from the delivery
//! client or the mock intake.
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
//! Slow and abusive clients: every connection has a watchdog ([`serve_connection`]) that closes
//! it when its request head takes longer than `header_read_timeout_secs` (counted from the
//! acceptance, or from the first byte of the next request on a kept-alive connection), or when
//! it stays idle between requests longer than `idle_timeout_secs`; a connection whose request
//! is being handled is never cut by it. A body that takes longer than `body_read_timeout_secs`
//! gets 408 (nothing is kept). At most `max_connections` connections are served at once: the
//! next ones are accepted only when one closes, and wait in the kernel's backlog until then.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpSourceConfig;
use crate::intake_api::{
    self, ApiError, BodyEncoding, Endpoint, ErrorResponse, EventIdResponse, EventIdsResponse,
    IncomingEvent, Limits, RequestMeta,
};
use crate::queue::{Queue, QueueError, SenderGuard};

/// Path of the liveness / readiness probe.
const HEALTH_PATH: &str = "/health";
const READY_PATH: &str = "/ready";

/// Least time between two warnings that `max_connections` is reached.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Counters of the HTTP source, read by metrics. `/health` and `/ready` requests are not
/// counted.
#[derive(Debug, Default)]
pub struct HttpSourceStats {
    /// Requests received (any path, any answer).
    pub requests: AtomicU64,
    /// Requests answered 200 (their events are durable).
    pub accepted_requests: AtomicU64,
    /// Events acknowledged to senders.
    pub accepted_events: AtomicU64,
    /// Requests refused as malformed (bad JSON, bad UTF-8, bad gzip, no event).
    pub rejected_400: AtomicU64,
    /// Requests refused for want of an intake key.
    pub rejected_401: AtomicU64,
    /// Requests refused as too large (body or one event).
    pub rejected_413: AtomicU64,
    /// Requests refused (403) because their new intake keys would bring the queue over
    /// `max_intake_keys`; also counted in `rejected_other`.
    pub rejected_max_intake_keys: AtomicU64,
    /// Requests refused for now: queue full, storage error, forwarder stopping.
    pub rejected_503: AtomicU64,
    /// Other refusals: unknown path (404), wrong method (405), body too slow (408), unknown
    /// encoding (415).
    pub rejected_other: AtomicU64,
    /// Request body bytes read, as sent (before gzip decompression).
    pub bytes: AtomicU64,
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
        let listener = TcpListener::bind(config.listen)
            .await
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
            header_read: self.config.header_read_timeout(),
            idle: self.config.idle_timeout(),
        };
        let mut acceptor = Acceptor {
            listener: self.listener,
            stop: shutdown.clone(),
            slots: Arc::new(Semaphore::new(self.config.max_connections)),
            max_connections: self.config.max_connections,
            last_full_warning: None,
        };
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

/// Accepts connections until `stop` is cancelled, at most `max_connections` at once.
struct Acceptor {
    listener: TcpListener,
    stop: CancellationToken,
    /// One permit per connection served; it is released when the connection closes.
    slots: Arc<Semaphore>,
    max_connections: usize,
    last_full_warning: Option<Instant>,
}

impl Acceptor {
    /// The next connection with its slot, or `None` once `stop` is cancelled. While every slot
    /// is taken, nothing is accepted: new connections wait in the kernel's backlog.
    async fn accept(&mut self) -> Option<(TcpStream, OwnedSemaphorePermit)> {
        let slot = self.slot().await?;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => return Some((stream, slot)),
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
                "http source: max_connections reached; new connections wait until one closes"
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
        tracing::error!(error = %e, "http source cannot accept connections; retrying in 1s");
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The connection-level time limits (the body's is enforced by the handler).
#[derive(Debug, Clone, Copy)]
struct ConnectionTimeouts {
    header_read: Duration,
    idle: Duration,
}

/// Where a connection is, as its watchdog sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head since then (the acceptance, or the first byte of the request).
    Head(Instant),
    /// That many requests being handled (more than one only over HTTP/2): no time limit here.
    Busy(usize),
    /// Idle since the last answer was ready.
    Idle(Instant),
}

impl Phase {
    /// When the connection is to be closed if nothing happens, if ever.
    fn deadline(self, timeouts: ConnectionTimeouts) -> Option<Instant> {
        match self {
            Phase::Head(since) => since.checked_add(timeouts.header_read),
            Phase::Busy(_) => None,
            Phase::Idle(since) => since.checked_add(timeouts.idle),
        }
    }

    /// What its deadline enforces, for the log.
    fn limit(self) -> &'static str {
        match self {
            Phase::Head(_) => "header_read_timeout_secs",
            Phase::Busy(_) | Phase::Idle(_) => "idle_timeout_secs",
        }
    }
}

/// Serves one connection until it ends, or until its watchdog closes it (by dropping it) for
/// a request head that takes too long or an idle time that lasts too long. `_held` (its
/// connection slot, and its place among the queue's senders) is held until then.
async fn serve_connection(
    stream: TcpStream,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
    timeouts: ConnectionTimeouts,
    _held: (OwnedSemaphorePermit, SenderGuard),
) {
    let (phase, mut phase_changes) = watch::channel(Phase::Head(Instant::now()));
    let phase = Arc::new(phase);
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        phase: phase.clone(),
    });
    let service = {
        let phase = phase.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let handling = Handling::start(phase.clone());
            let response = hyper::service::Service::call(&service, request);
            async move {
                let response = response.await;
                drop(handling);
                response
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog below times request heads: hyper's own timer would also cut kept-alive
    // connections idle for that long (it runs while waiting for the next request).
    builder.http1().header_read_timeout(None);
    let connection = watcher.watch(builder.serve_connection_with_upgrades(io, service));
    tokio::pin!(connection);
    loop {
        let deadline = phase_changes.borrow_and_update().deadline(timeouts);
        tokio::select! {
            biased;
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::trace!(error = %e, "http connection ended with an error");
                }
                return;
            }
            changed = phase_changes.changed() => {
                if changed.is_err() {
                    // No sender left: the connection's socket and service are gone.
                    return;
                }
            }
            () = sleep_until(deadline) => {
                let now = *phase_changes.borrow_and_update();
                if now.deadline(timeouts).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(
                        limit = now.limit(),
                        "http connection closed: the client is too slow"
                    );
                    // Dropping the connection closes its socket.
                    return;
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

/// A request being handled on a connection, from its complete head to its answer (or until
/// hyper drops it).
struct Handling(Arc<watch::Sender<Phase>>);

impl Handling {
    fn start(phase: Arc<watch::Sender<Phase>>) -> Handling {
        phase.send_modify(|p| {
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
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

/// A connection's socket that tells its watchdog when an idle connection receives bytes:
/// from then on, the next request head is timed.
struct WatchedIo {
    inner: TcpStream,
    phase: Arc<watch::Sender<Phase>>,
}

impl AsyncRead for WatchedIo {
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
                    *p = Phase::Head(Instant::now());
                    true
                }
                Phase::Head(_) | Phase::Busy(_) => false,
            });
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
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

/// What every request handler shares.
struct Shared {
    config: HttpSourceConfig,
    queue: Queue,
    stats: Arc<HttpSourceStats>,
    /// Cancelled when the source stops.
    stopping: CancellationToken,
    /// One token per request being handled; shutdown waits for them.
    in_flight: TaskTracker,
}

/// The one handler: routes by path, since the intake's paths are defined by
/// [`Endpoint::from_path`] and not by a route table of ours.
async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    // Taken before `stopping` is looked at: either shutdown waits for this request, or the
    // request sees that the source is stopping.
    let _in_flight = shared.in_flight.token();
    let path = request.uri().path().to_owned();
    let mut response = if path == HEALTH_PATH {
        probe(&shared, request.method(), Probe::Liveness)
    } else if path == READY_PATH {
        probe(&shared, request.method(), Probe::Readiness)
    } else {
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        match intake(&shared, &path, request).await {
            Ok(response) => response,
            Err(rejection) => shared.reject(&path, rejection),
        }
    };
    if shared.stopping.is_cancelled() {
        // The connection must not carry another request: this source is going away.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The two probes of the source's port, with the same meaning as the admin listener's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// `GET /health`: 503 only when the process is broken (the queue writer is gone, so that
    /// nothing can ever be stored again): what a liveness probe may restart it for.
    Liveness,
    /// `GET /ready`: 503 also while events would be refused for now (a full queue, a stop):
    /// what a load balancer steers senders away for.
    Readiness,
}

fn probe(shared: &Shared, method: &Method, probe: Probe) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let path = match probe {
            Probe::Liveness => HEALTH_PATH,
            Probe::Readiness => READY_PATH,
        };
        return Rejection::method_not_allowed(path, "GET, HEAD")
            .into_response(shared.config.retry_after_secs);
    }
    let status = if !shared.queue.writer_alive() {
        "queue_writer_stopped"
    } else if probe == Probe::Liveness {
        return Json(serde_json::json!({ "status": "ok" })).into_response();
    } else if shared.stopping.is_cancelled() {
        "stopping"
    } else if shared.queue.is_full() {
        "queue_full"
    } else {
        return Json(serde_json::json!({ "status": "ok" })).into_response();
    };
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "status": status })),
    )
        .into_response();
    set_retry_after(&mut response, shared.config.retry_after_secs);
    response
}

/// An intake request: read, parse, store durably, then acknowledge.
async fn intake(shared: &Shared, path: &str, request: Request) -> Result<Response, Rejection> {
    let endpoint = Endpoint::from_path(path).ok_or_else(|| Rejection::not_found(path))?;
    if request.method() != Method::POST {
        return Err(Rejection::method_not_allowed(path, "POST"));
    }
    shared.check_accepting()?;
    let (parts, body) = request.into_parts();
    let meta = RequestMeta::from_request(&parts.headers, &parts.uri);
    let body = shared.read_body(&parts.headers, body).await?;
    let events = intake_api::parse_request(endpoint, &meta, &body, shared.limits())?;
    let count = events.len();
    shared.store(events).await?;
    Ok(acknowledgement(endpoint, count))
}

impl Shared {
    fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.config.max_event_bytes,
        }
    }

    /// Refuses early (before reading the body) what the queue would refuse anyway.
    fn check_accepting(&self) -> Result<(), Rejection> {
        if self.stopping.is_cancelled() {
            return Err(Rejection::unavailable(
                "the forwarder is stopping; retry later",
            ));
        }
        if self.queue.is_full() {
            return Err(Rejection::unavailable(
                "the forwarder's queue is full; retry later",
            ));
        }
        Ok(())
    }

    /// The request body, bounded by `max_body_bytes` and gunzipped if need be.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, Rejection> {
        let max = self.config.max_body_bytes;
        let encoding = BodyEncoding::from_headers(headers)?;
        if let Some(length) = content_length(headers).filter(|&length| length > max) {
            return Err(body_too_large(length, max));
        }
        let read = axum::body::to_bytes(body, max);
        let raw = tokio::time::timeout(self.config.body_read_timeout(), read)
            .await
            .map_err(|_| {
                Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body did not arrive within body_read_timeout_secs ({} s); \
                         nothing of the request was kept: send it again",
                        self.config.body_read_timeout_secs
                    ),
                )
            })?
            .map_err(|e| {
                if is_length_limit(&e) {
                    Rejection::too_large(format!("the body is over max_body_bytes ({max} bytes)"))
                } else {
                    Rejection::bad_request(format!("cannot read the body: {e}"))
                }
            })?;
        self.stats
            .bytes
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        Ok(encoding.decode(raw, max)?)
    }

    /// Appends `events` and returns once they are durable, or says why the sender must keep them.
    async fn store(&self, events: Vec<IncomingEvent>) -> Result<(), Rejection> {
        let count = events.len() as u64;
        match self.queue.append(events).await {
            Ok(()) => {
                self.stats.accepted_requests.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .accepted_events
                    .fetch_add(count, Ordering::Relaxed);
                Ok(())
            }
            Err(QueueError::Full) => Err(Rejection::unavailable(
                "the forwarder's queue is full; retry later",
            )),
            Err(QueueError::Closed) => Err(Rejection::unavailable(
                "the forwarder is stopping; retry later",
            )),
            Err(e @ QueueError::TooManyKeys { .. }) => {
                self.stats
                    .rejected_max_intake_keys
                    .fetch_add(1, Ordering::Relaxed);
                Err(Rejection::new(StatusCode::FORBIDDEN, e.to_string()))
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    events = count,
                    "cannot store events: answered 503 so that the sender keeps them"
                );
                Err(Rejection::unavailable(
                    "the forwarder cannot store events right now; retry later",
                ))
            }
        }
    }

    /// Counts, logs and answers a refused request. The message never holds an intake key.
    fn reject(&self, path: &str, rejection: Rejection) -> Response {
        self.stats.count_rejection(rejection.status);
        tracing::debug!(
            status = rejection.status.as_u16(),
            path = %path,
            message = %rejection.message,
            "http request rejected"
        );
        rejection.into_response(self.config.retry_after_secs)
    }
}

/// The 200 answer: one id for the single-event endpoints, one id per event otherwise.
fn acknowledgement(endpoint: Endpoint, events: usize) -> Response {
    let new_id = || uuid::Uuid::new_v4().to_string();
    if endpoint.answers_single_id() {
        Json(EventIdResponse { event_id: new_id() }).into_response()
    } else {
        let event_ids = (0..events).map(|_| new_id()).collect();
        Json(EventIdsResponse { event_ids }).into_response()
    }
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn body_too_large(length: usize, max: usize) -> Rejection {
    Rejection::too_large(format!(
        "the body is {length} bytes, over max_body_bytes ({max} bytes)"
    ))
}

/// Whether reading the body failed because it is over the limit given to `to_bytes`.
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn set_retry_after(response: &mut Response, secs: u64) {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
}

/// A refused request: its status and a message that says what to do.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    message: String,
    /// `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl Rejection {
    fn new(status: StatusCode, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            message: message.into(),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::BAD_REQUEST, message)
    }

    fn too_large(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    fn unavailable(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    fn not_found(path: &str) -> Rejection {
        Rejection::new(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint at {path}: POST to /plain, /plain/batch, /jsons, /array, / or /batch"
            ),
        )
    }

    fn method_not_allowed(path: &str, allow: &'static str) -> Rejection {
        Rejection {
            allow: Some(allow),
            ..Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} accepts {allow} only"),
            )
        }
    }

    /// The JSON answer, with `Retry-After` on a 503, `Allow` on a 405 and `Connection: close`
    /// on a 408 (the rest of the body may still be on its way).
    fn into_response(self, retry_after_secs: u64) -> Response {
        let mut response = (
            self.status,
            Json(ErrorResponse {
                message: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            set_retry_after(&mut response, retry_after_secs);
        }
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<ApiError> for Rejection {
    fn from(e: ApiError) -> Rejection {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        Rejection::new(status, e.message)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::QueueConfig;

    const KEY: &str = "TEST_INTAKE_KEY_0123456789";
    const TS: &str = "2021-04-05T21:33:31+02:00";
    const RETRY_AFTER: u64 = 7;
    const WAIT: Duration = Duration::from_secs(10);

    /// A running source on a real queue in a temporary directory.
    struct Harness {
        _dir: tempfile::TempDir,
        queue: Queue,
        addr: SocketAddr,
        stats: Arc<HttpSourceStats>,
        shutdown: CancellationToken,
        task: JoinHandle<anyhow::Result<()>>,
        client: reqwest::Client,
    }

    /// One stored event: key, event date, raw text.
    type Stored = (String, Option<String>, String);

    fn source_config() -> HttpSourceConfig {
        HttpSourceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: 4096,
            max_event_bytes: 1000,
            retry_after_secs: RETRY_AFTER,
            // The time limits and max_connections keep their defaults, far above what a test
            // needs; the tests of the limits lower them.
            ..HttpSourceConfig::default()
        }
    }

    async fn start() -> Harness {
        start_with(source_config()).await
    }

    async fn start_with(config: HttpSourceConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(&queue_config(&dir)).unwrap();
        start_on(dir, queue, config).await
    }

    /// A source on a queue that is full: it already holds more than its `max_bytes`.
    async fn start_full() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(&queue_config(&dir)).unwrap();
        let event = IncomingEvent {
            intake_key: KEY.into(),
            timestamp: None,
            raw: "already queued".into(),
        };
        queue.append(vec![event]).await.unwrap();
        queue.close().await.unwrap();
        drop(queue);
        let queue = Queue::open(&QueueConfig {
            max_bytes: 1,
            ..queue_config(&dir)
        })
        .unwrap();
        start_on(dir, queue, source_config()).await
    }

    fn queue_config(dir: &tempfile::TempDir) -> QueueConfig {
        QueueConfig {
            path: dir.path().join("queue"),
            ..Default::default()
        }
    }

    async fn start_on(dir: tempfile::TempDir, queue: Queue, config: HttpSourceConfig) -> Harness {
        let source = HttpSource::bind(config, queue.clone()).await.unwrap();
        let addr = source.local_addr();
        let stats = source.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        Harness {
            _dir: dir,
            queue,
            addr,
            stats,
            shutdown,
            task,
            client: reqwest::Client::new(),
        }
    }

    impl Harness {
        fn url(&self, path_and_query: &str) -> String {
            format!("http://{}{path_and_query}", self.addr)
        }

        fn post(&self, path_and_query: &str) -> reqwest::RequestBuilder {
            self.client.post(self.url(path_and_query))
        }

        /// Every stored event, lane by lane (one read stops where the event date changes).
        fn stored(&self) -> Vec<Stored> {
            let mut all = Vec::new();
            for lane in self.queue.lanes() {
                let mut from = crate::queue::Position::default();
                loop {
                    let batch = self.queue.read(lane.id, from, 10_000, 100 << 20).unwrap();
                    assert_eq!(batch.span.undecodable, 0);
                    if batch.chunks.is_empty() {
                        break;
                    }
                    from = batch.span.next;
                    for stored in batch.chunks {
                        let chunk = stored.chunk;
                        for raw in chunk.events {
                            all.push((chunk.intake_key.clone(), chunk.timestamp.clone(), raw));
                        }
                    }
                }
            }
            all
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("run returns once shutdown is asked")
                .unwrap()
                .unwrap();
            self.queue.close().await.unwrap();
        }
    }

    fn stored(key: &str, timestamp: Option<&str>, raw: &str) -> Stored {
        (key.into(), timestamp.map(Into::into), raw.into())
    }

    async fn json(response: reqwest::Response) -> (u16, serde_json::Value) {
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap();
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
        (status, value)
    }

    fn assert_uuid(id: &serde_json::Value) {
        let id = id.as_str().expect("an id is a string");
        let parsed = uuid::Uuid::parse_str(id).expect("an id is a uuid");
        assert_eq!(parsed.get_version_num(), 4);
    }

    fn assert_ids(answer: &serde_json::Value, count: usize) {
        let ids = answer["event_ids"].as_array().expect("event_ids");
        assert_eq!(ids.len(), count, "{answer}");
        ids.iter().for_each(assert_uuid);
    }

    fn assert_message(answer: &serde_json::Value, needle: &str) {
        let message = answer["message"].as_str().expect("a message");
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn plain_with_header_key_keeps_the_event_date() {
        let h = start().await;
        let response = h
            .post("/plain")
            .header(intake_api::INTAKE_KEY_HEADER, KEY)
            .header(intake_api::EVENT_TIMESTAMP_HEADER, TS)
            .body("[764008:0] info: 198.51.100.10 example.org. A IN")
            .send()
            .await
            .unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 200, "{answer}");
        assert_uuid(&answer["event_id"]);
        assert_eq!(
            h.stored(),
            [stored(
                KEY,
                Some(TS),
                "[764008:0] info: 198.51.100.10 example.org. A IN"
            )]
        );
        assert_eq!(h.stats.accepted_events.load(Ordering::Relaxed), 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn plain_batch_with_basic_auth_key() {
        let h = start().await;
        let response = h
            .post("/plain/batch")
            .basic_auth("None", Some(KEY))
            .body("first\r\nsecond\n\n")
            .send()
            .await
            .unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 200, "{answer}");
        assert_ids(&answer, 2);
        assert_eq!(
            h.stored(),
            [stored(KEY, None, "first"), stored(KEY, None, "second")]
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn jsons_with_query_key() {
        let h = start().await;
        let response = h
            .post("/jsons?intake_key=Q%2Bkey")
            .json(&serde_json::json!(["a", {"k": 1}]))
            .send()
            .await
            .unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 200, "{answer}");
        assert_ids(&answer, 2);
        assert_eq!(
            h.stored(),
            [
                stored("Q+key", None, "a"),
                stored("Q+key", None, r#"{"k":1}"#)
            ]
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn array_takes_keys_and_dates_from_the_body() {
        let h = start().await;
        let body = serde_json::json!([
            {"timestamp": TS, "intake_key": "KEY_A", "json": "one"},
            {"intake_key": "KEY_B", "json": "two"},
        ]);
        let response = h.post("/array").json(&body).send().await.unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 200, "{answer}");
        assert_ids(&answer, 2);
        let mut events = h.stored();
        events.sort();
        assert_eq!(
            events,
            [
                stored("KEY_A", Some(TS), "one"),
                stored("KEY_B", None, "two")
            ]
        );
        assert_eq!(h.queue.lanes().len(), 2);
        h.stop().await;
    }

    #[tokio::test]
    async fn structured_event_and_batch() {
        let h = start().await;
        let one = serde_json::json!({"intake_key": KEY, "json": "{\"key\": \"value\"}", "@timestamp": TS});
        let (status, answer) = json(h.post("/").json(&one).send().await.unwrap()).await;
        assert_eq!(status, 200, "{answer}");
        assert_uuid(&answer["event_id"]);
        let many = serde_json::json!({"intake_key": KEY, "jsons": ["x", "y"]});
        let (status, answer) = json(h.post("/batch").json(&many).send().await.unwrap()).await;
        assert_eq!(status, 200, "{answer}");
        assert_ids(&answer, 2);
        assert_eq!(
            h.stored(),
            [
                stored(KEY, Some(TS), "{\"key\": \"value\"}"),
                stored(KEY, None, "x"),
                stored(KEY, None, "y"),
            ]
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn refusals_say_why_and_keep_nothing() {
        let h = start().await;
        let with_key = |path: &str| h.post(path).header(intake_api::INTAKE_KEY_HEADER, KEY);

        let (status, answer) = json(h.post("/plain").body("e").send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_message(&answer, "intake key");

        let (status, answer) = json(with_key("/jsons").body("[1,").send().await.unwrap()).await;
        assert_eq!(status, 400);
        assert_message(&answer, "malformed");

        let big_body = "x\n".repeat(2100);
        let response = with_key("/plain/batch")
            .body(big_body)
            .send()
            .await
            .unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 413);
        assert_message(&answer, "max_body_bytes");

        let big_event = "x".repeat(1001);
        let (status, answer) = json(with_key("/plain").body(big_event).send().await.unwrap()).await;
        assert_eq!(status, 413);
        assert_message(&answer, "event 0");

        let (status, answer) = json(with_key("/nope").body("e").send().await.unwrap()).await;
        assert_eq!(status, 404);
        assert_message(&answer, "/nope");

        let response = h.client.get(h.url("/plain")).send().await.unwrap();
        assert_eq!(response.headers()["allow"], "POST");
        let (status, answer) = json(response).await;
        assert_eq!(status, 405);
        assert_message(&answer, "POST");

        let response = with_key("/plain")
            .header("Content-Encoding", "br")
            .body("e")
            .send()
            .await
            .unwrap();
        let (status, answer) = json(response).await;
        assert_eq!(status, 415);
        assert_message(&answer, "Content-Encoding");

        assert!(h.stored().is_empty());
        let stats = &h.stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 7);
        assert_eq!(stats.rejected_400.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected_401.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected_413.load(Ordering::Relaxed), 2);
        assert_eq!(stats.rejected_other.load(Ordering::Relaxed), 3);
        assert_eq!(stats.accepted_events.load(Ordering::Relaxed), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn gzip_bodies_are_decompressed_within_the_limit() {
        let h = start().await;
        let with_gzip = |body: Vec<u8>| {
            h.post("/plain/batch")
                .header(intake_api::INTAKE_KEY_HEADER, KEY)
                .header("Content-Encoding", "gzip")
                .body(body)
        };

        let (status, answer) = json(with_gzip(gzip(b"a\nb")).send().await.unwrap()).await;
        assert_eq!(status, 200, "{answer}");
        assert_ids(&answer, 2);

        let (status, answer) = json(with_gzip(b"not gzip".to_vec()).send().await.unwrap()).await;
        assert_eq!(status, 400);
        assert_message(&answer, "gzip");

        let bomb = gzip(&"x\n".repeat(100_000).into_bytes());
        assert!(bomb.len() < 4096);
        let (status, answer) = json(with_gzip(bomb).send().await.unwrap()).await;
        assert_eq!(status, 413);
        assert_message(&answer, "decompressed");

        assert_eq!(h.stored(), [stored(KEY, None, "a"), stored(KEY, None, "b")]);
        h.stop().await;
    }

    #[tokio::test]
    async fn health_is_ok() {
        let h = start().await;
        let (status, answer) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(answer, serde_json::json!({"status": "ok"}));
        h.stop().await;
    }

    #[tokio::test]
    async fn full_queue_gets_503_with_retry_after() {
        let h = start_full().await;
        assert!(h.queue.is_full());
        // Alive (a liveness probe must not restart it), but not ready.
        let (status, answer) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(answer, serde_json::json!({"status": "ok"}));
        let response = h.client.get(h.url("/ready")).send().await.unwrap();
        assert_eq!(response.headers()["retry-after"], "7");
        let (status, answer) = json(response).await;
        assert_eq!(status, 503);
        assert_eq!(answer, serde_json::json!({"status": "queue_full"}));

        let response = h
            .post("/plain")
            .header(intake_api::INTAKE_KEY_HEADER, KEY)
            .body("e")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["retry-after"], "7");
        let (status, answer) = json(response).await;
        assert_eq!(status, 503);
        assert_message(&answer, "full");
        assert_eq!(h.stats.rejected_503.load(Ordering::Relaxed), 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn closed_queue_gets_503_with_retry_after() {
        let h = start().await;
        h.queue.close().await.unwrap();
        let response = h
            .post("/plain")
            .header(intake_api::INTAKE_KEY_HEADER, KEY)
            .body("e")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["retry-after"], "7");
        let (status, _) = json(response).await;
        assert_eq!(status, 503);
        h.stop().await;
    }

    /// A response read off a raw connection: status, headers (lower-case names), body.
    struct RawResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: serde_json::Value,
    }

    impl RawResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    async fn raw_connect(addr: SocketAddr) -> BufReader<TcpStream> {
        BufReader::new(TcpStream::connect(addr).await.unwrap())
    }

    async fn raw_send(conn: &mut BufReader<TcpStream>, request: &str) {
        conn.get_mut().write_all(request.as_bytes()).await.unwrap();
    }

    async fn raw_read(conn: &mut BufReader<TcpStream>) -> RawResponse {
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            conn.read_line(&mut line).await.unwrap();
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = RawResponse {
            status,
            headers,
            body: serde_json::Value::Null,
        };
        let length: usize = response.header("content-length").unwrap().parse().unwrap();
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await.unwrap();
        response.body = serde_json::from_slice(&body).unwrap();
        response
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    #[tokio::test]
    async fn chunked_body_over_the_limit_is_413() {
        let h = start().await;
        let mut conn = raw_connect(h.addr).await;
        let chunk = "x".repeat(5000);
        raw_send(
            &mut conn,
            &format!(
                "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
                chunk.len()
            ),
        )
        .await;
        let response = raw_read(&mut conn).await;
        assert_eq!(response.status, 413);
        assert_message(&response.body, "max_body_bytes");
        assert!(h.stored().is_empty());
        h.stop().await;
    }

    const HEALTH_REQUEST: &str = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    const READY_REQUEST: &str = "GET /ready HTTP/1.1\r\nHost: t\r\n\r\n";

    #[tokio::test]
    async fn shutdown_finishes_requests_in_flight_and_refuses_the_rest() {
        let h = start().await;
        // A request in flight: headers and half of the body sent.
        let mut in_flight = raw_connect(h.addr).await;
        raw_send(
            &mut in_flight,
            &format!(
                "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
                 Content-Length: 10\r\n\r\nhello"
            ),
        )
        .await;
        // Two idle keep-alive connections, served once already.
        let mut idle = raw_connect(h.addr).await;
        let mut idle_health = raw_connect(h.addr).await;
        for conn in [&mut idle, &mut idle_health] {
            raw_send(conn, HEALTH_REQUEST).await;
            assert_eq!(raw_read(conn).await.status, 200);
        }
        let stats = h.stats.clone();
        wait_until("the request in flight is being handled", || {
            stats.requests.load(Ordering::Relaxed) == 1
        })
        .await;

        h.shutdown.cancel();

        raw_send(
            &mut idle,
            &format!(
                "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
                 Content-Length: 4\r\n\r\nlate"
            ),
        )
        .await;
        let refused = raw_read(&mut idle).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.header("retry-after"), Some("7"));
        assert_eq!(refused.header("connection"), Some("close"));
        assert_message(&refused.body, "stopping");

        raw_send(&mut idle_health, READY_REQUEST).await;
        let ready = raw_read(&mut idle_health).await;
        assert_eq!(ready.status, 503);
        assert_eq!(ready.body, serde_json::json!({"status": "stopping"}));

        let addr = h.addr;
        tokio::time::timeout(WAIT, async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("new connections are refused");
        assert!(!h.task.is_finished(), "run waits for the request in flight");

        raw_send(&mut in_flight, "world").await;
        let answered = raw_read(&mut in_flight).await;
        assert_eq!(answered.status, 200, "{}", answered.body);
        assert_uuid(&answered.body["event_id"]);

        let events = h.stored();
        assert_eq!(events, [stored(KEY, None, "helloworld")]);
        h.stop().await;
    }

    /// The limit the tests of time limits set.
    const LIMIT: Duration = Duration::from_secs(1);

    /// `raw_read`, bounded by `WAIT`.
    async fn raw_read_within(conn: &mut BufReader<TcpStream>) -> RawResponse {
        tokio::time::timeout(WAIT, raw_read(conn))
            .await
            .expect("an answer")
    }

    /// Reads until the source closes the connection; returns what it sent before.
    async fn read_until_closed(conn: &mut BufReader<TcpStream>) -> Vec<u8> {
        let mut received = Vec::new();
        tokio::time::timeout(WAIT, async {
            let mut buf = [0; 1024];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                    Err(e) => panic!("reading: {e}"),
                }
            }
        })
        .await
        .expect("the source closes the connection");
        received
    }

    #[tokio::test]
    async fn a_request_head_that_takes_too_long_is_disconnected() {
        let h = start_with(HttpSourceConfig {
            header_read_timeout_secs: 1,
            idle_timeout_secs: 600,
            ..source_config()
        })
        .await;

        // Half a request line, then nothing.
        let started = Instant::now();
        let mut slow = raw_connect(h.addr).await;
        raw_send(&mut slow, "POST /pla").await;
        assert!(read_until_closed(&mut slow).await.is_empty(), "no answer");
        assert!(started.elapsed() >= LIMIT);

        // Nothing at all.
        let started = Instant::now();
        let mut silent = raw_connect(h.addr).await;
        assert!(read_until_closed(&mut silent).await.is_empty(), "no answer");
        assert!(started.elapsed() >= LIMIT);

        // On a kept-alive connection, the next request head is timed from its first byte (the
        // idle limit, far longer, does not apply to it).
        let mut kept_alive = raw_connect(h.addr).await;
        raw_send(&mut kept_alive, HEALTH_REQUEST).await;
        assert_eq!(raw_read_within(&mut kept_alive).await.status, 200);
        let started = Instant::now();
        raw_send(&mut kept_alive, "GET /hea").await;
        assert!(read_until_closed(&mut kept_alive).await.is_empty());
        assert!(started.elapsed() >= LIMIT);

        // The source still serves, and none of that was a request.
        let (status, _) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(h.stats.requests.load(Ordering::Relaxed), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed() {
        let idle = Duration::from_secs(2);
        let h = start_with(HttpSourceConfig {
            header_read_timeout_secs: 1,
            idle_timeout_secs: idle.as_secs(),
            ..source_config()
        })
        .await;
        let mut conn = raw_connect(h.addr).await;
        raw_send(&mut conn, HEALTH_REQUEST).await;
        assert_eq!(raw_read_within(&mut conn).await.status, 200);
        // Kept alive: served again.
        let last_request = Instant::now();
        raw_send(&mut conn, HEALTH_REQUEST).await;
        assert_eq!(raw_read_within(&mut conn).await.status, 200);

        assert!(read_until_closed(&mut conn).await.is_empty());
        // Closed by the idle limit, counted from the last answer; not by the head's.
        assert!(last_request.elapsed() >= idle);
        h.stop().await;
    }

    #[tokio::test]
    async fn a_body_that_takes_too_long_gets_408_and_nothing_is_kept() {
        let h = start_with(HttpSourceConfig {
            body_read_timeout_secs: 1,
            ..source_config()
        })
        .await;
        let started = Instant::now();
        let mut conn = raw_connect(h.addr).await;
        raw_send(
            &mut conn,
            &format!(
                "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
                 Content-Length: 1000\r\n\r\n0123456789"
            ),
        )
        .await;
        let response = raw_read_within(&mut conn).await;
        assert!(started.elapsed() >= LIMIT);
        assert_eq!(response.status, 408);
        assert_eq!(response.header("connection"), Some("close"));
        assert_message(&response.body, "body_read_timeout_secs");
        assert!(read_until_closed(&mut conn).await.is_empty());

        assert!(h.stored().is_empty());
        assert_eq!(h.stats.requests.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.rejected_other.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.accepted_requests.load(Ordering::Relaxed), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn connections_over_max_connections_wait_until_one_closes() {
        let h = start_with(HttpSourceConfig {
            max_connections: 2,
            ..source_config()
        })
        .await;
        let mut first = raw_connect(h.addr).await;
        let mut second = raw_connect(h.addr).await;
        for conn in [&mut first, &mut second] {
            raw_send(conn, HEALTH_REQUEST).await;
            assert_eq!(raw_read_within(conn).await.status, 200);
        }

        // The kernel completes the third connection (it waits in the backlog), but the source
        // does not take it. (A negative: it can only be watched for a while.)
        let mut third = raw_connect(h.addr).await;
        raw_send(&mut third, HEALTH_REQUEST).await;
        let mut byte = [0; 1];
        let peeked =
            tokio::time::timeout(Duration::from_millis(300), third.get_mut().peek(&mut byte)).await;
        assert!(peeked.is_err(), "a third connection is served");

        // The two open connections are still served.
        raw_send(&mut second, HEALTH_REQUEST).await;
        assert_eq!(raw_read_within(&mut second).await.status, 200);

        // One closes: the third is taken and served.
        drop(first);
        assert_eq!(raw_read_within(&mut third).await.status, 200);
        h.stop().await;
    }

    #[tokio::test]
    async fn shutdown_is_not_held_up_by_a_slow_client() {
        let h = start_with(HttpSourceConfig {
            header_read_timeout_secs: 1,
            ..source_config()
        })
        .await;
        let mut slow = raw_connect(h.addr).await;
        raw_send(&mut slow, "POST /plain HTTP/1.1\r\nHost: t\r\n").await;
        h.stop().await;
        assert!(read_until_closed(&mut slow).await.is_empty());
    }

    #[test]
    fn the_limits_are_options_of_the_source() {
        use crate::config::{Config, SourceConfig};
        use std::path::Path;

        let default = HttpSourceConfig::default();
        assert_eq!(
            (
                default.header_read_timeout_secs,
                default.body_read_timeout_secs,
                default.idle_timeout_secs,
                default.max_connections
            ),
            (10, 30, 60, 1024)
        );
        let text = "[[source]]\ntype = \"http\"\nheader_read_timeout_secs = 2\n\
                    body_read_timeout_secs = 3\nidle_timeout_secs = 4\nmax_connections = 5\n";
        let config = Config::parse(text, Path::new("f.toml")).unwrap();
        let SourceConfig::Http(http) = &config.sources[0];
        assert_eq!(
            (
                http.header_read_timeout(),
                http.body_read_timeout(),
                http.idle_timeout(),
                http.max_connections
            ),
            (
                Duration::from_secs(2),
                Duration::from_secs(3),
                Duration::from_secs(4),
                5
            )
        );
        for key in [
            "header_read_timeout_secs",
            "body_read_timeout_secs",
            "idle_timeout_secs",
            "max_connections",
        ] {
            let text = format!("[[source]]\ntype = \"http\"\n{key} = 0\n");
            let err = Config::parse(&text, Path::new("f.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("line 3"), "{err}");
            assert!(err.contains(&format!("`source.{key}`")), "{err}");
        }
    }
}
