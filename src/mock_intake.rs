//! A look-alike of the Sekoia.io intake that can misbehave on demand.
//!
//! Why it exists: the forwarder's whole promise is what it does when the intake is *not* well —
//! it answers 503 for a while, drops a connection mid-request, keeps events but loses the answer,
//! acknowledges the wrong number of events, refuses a key. Those cases cannot be produced on
//! purpose against the real intake, so this mock produces them, in-process for the integration
//! tests (real sockets on 127.0.0.1) and as `sekoia-forwarder mock-intake` for offline trials.
//!
//! It answers like the real intake because it *is* the same parser: every request goes through
//! [`intake_api::parse_request`](crate::intake_api::parse_request), with the same endpoints, key
//! lookup, limits and answers (`{"event_id"}` for `/plain` and `/`, `{"event_ids": [...]}`, one
//! per event, elsewhere). Like the real intake it accepts gzip request bodies
//! (`Content-Encoding: gzip`) and refuses bodies over 10 MiB with 413.
//!
//! It is written on hyper directly, not a framework, because one fault is "close the connection
//! without answering": a hyper service that returns an error makes hyper close the connection
//! without writing a response. Connections are HTTP/1.1 with keep-alive, like a real client
//! would get.
//!
//! # Faults
//!
//! A [`FaultConfig`] holds a *script*, applied to successive intake requests in arrival order
//! (each step `times` times, then normal answers again), and *persistent rules* that hold until
//! replaced. Order of the checks for one request:
//!
//! 1. a scripted `status` or `drop` applies to any request, valid or not (an outage does not
//!    look at what is sent; the body is still read first, so the sender has sent it all);
//! 2. body over `max_body_bytes` (or over 10 MiB) → 413; bad gzip → 400; other encodings → 415;
//! 3. the shared parser (400, 401, 413 for an event over 250,000 bytes);
//! 4. `key_status`: a request carrying a listed key gets that status;
//! 5. `reject_containing`: a request with an event containing that text gets 400;
//! 6. the events are recorded, then answered: 200 with the ids, or 500 for a scripted
//!    `accept_then_fail`, or the wrong number of ids for a scripted `wrong_ids`.
//!
//! Nothing is recorded when a request is refused (steps 1–5). A scripted `slow` and the
//! persistent `delay_ms` delay the *answer*: the events are recorded first, so a client that
//! gives up waiting has had its events accepted anyway — as can happen with the real intake,
//! and why the forwarder promises at-least-once delivery.
//!
//! The JSON form of a [`FaultConfig`] (every field optional):
//!
//! ```json
//! {
//!   "script": [
//!     {"fault": "status", "status": 503, "retry_after_secs": 1, "times": 2},
//!     {"fault": "drop"},
//!     {"fault": "slow", "delay_ms": 2000},
//!     {"fault": "accept_then_fail"},
//!     {"fault": "wrong_ids", "delta": -1},
//!     {"fault": "retry_at_date", "status": 503, "after_secs": 3},
//!     {"fault": "redirect", "status": 307, "location": "http://elsewhere:8080/jsons"}
//!   ],
//!   "reject_containing": "poison",
//!   "max_body_bytes": 1048576,
//!   "key_status": {"revoked-key": 401, "other-entity-key": 403},
//!   "delay_ms": 0
//! }
//! ```
//!
//! `times` defaults to 1. A `status` fault may be any status from 200 to 599: a 200 with an
//! error body models an intake that "succeeds" without acknowledging anything. A
//! `retry_at_date` fault answers `status` with `Retry-After` as an HTTP date `after_secs` from
//! now. A `redirect` fault answers a 3xx `status` with a `Location` (a proxy or a moved service
//! sending the client elsewhere); like `status`, it applies to any request and records nothing.
//!
//! # Control API
//!
//! On the same listener, under `/_mock/` (these requests are not counted in the stats and never
//! consume the script):
//!
//! | request | effect |
//! | --- | --- |
//! | `PUT /_mock/faults` | replace the faults with the JSON [`FaultConfig`] of the body (the script restarts); answers the config |
//! | `GET /_mock/faults` | the current faults, with the script as given |
//! | `GET /_mock/events` | JSON list of the accepted [`ReceivedEvent`]s, in arrival order |
//! | `GET /_mock/stats` | the [`MockStats`] |
//! | `DELETE /_mock/events` | forget the events and reset the stats (faults are kept); answers `{"cleared": N}` |
//!
//! For example: `curl -X PUT localhost:18080/_mock/faults -d '{"script": [{"fault": "drop", "times": 3}]}'`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::intake_api::redact_key;
use crate::intake_api::{
    parse_request, ApiError, BodyEncoding, Endpoint, ErrorResponse, EventIdResponse,
    EventIdsResponse, IncomingEvent, Limits, RequestMeta, MAX_BODY_BYTES,
};

/// Prefix of the control API's paths.
const CONTROL_PREFIX: &str = "/_mock/";
/// Largest body of a control request.
const MAX_CONTROL_BODY_BYTES: usize = 1024 * 1024;
/// How much of a too-large body is still read (and thrown away) so that the client, which is
/// still sending, gets to read the 413 rather than a reset connection.
const MAX_DRAINED_BYTES: u64 = 64 * 1024 * 1024;
/// How long in-flight answers get to finish at shutdown before their connections are closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors), so as not to spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

type Body = Full<Bytes>;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// One event the mock accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedEvent {
    pub intake_key: String,
    /// The event date the sender gave, verbatim.
    pub timestamp: Option<String>,
    /// The event as the intake received it.
    pub raw: String,
}

impl From<IncomingEvent> for ReceivedEvent {
    fn from(e: IncomingEvent) -> Self {
        ReceivedEvent {
            intake_key: e.intake_key,
            timestamp: e.timestamp,
            raw: e.raw,
        }
    }
}

/// The faults the mock injects. `FaultConfig::default()` (or `{}` in JSON) is a healthy intake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Applied to successive intake requests, in order; normal answers once exhausted.
    pub script: Vec<ScriptedFault>,
    /// Refuse (400) any request with an event containing this text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_containing: Option<String>,
    /// Refuse (413) bodies bigger than this (the 10 MiB limit of the intake always applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Answer requests carrying one of these intake keys with the given status (401, 403...).
    pub key_status: HashMap<String, u16>,
    /// Added to the time of every answer, in milliseconds.
    pub delay_ms: u64,
}

/// One step of the script: a fault, applied to `times` successive requests (1 if not given).
///
/// In JSON: `{"fault": "<snake_case name>", ..., "times": N}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScriptedFault {
    /// Answer `status` with a JSON error body (and `Retry-After` if given); record nothing.
    Status {
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
        #[serde(default = "one")]
        times: u32,
    },
    /// Close the connection without answering; record nothing.
    Drop {
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer normally after `delay_ms`.
    Slow {
        delay_ms: u64,
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer 500: the intake kept events whose answer is lost.
    AcceptThenFail {
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer 200 with `len + delta` ids (at least 0).
    WrongIds {
        delta: i32,
        #[serde(default = "one")]
        times: u32,
    },
    /// Answer `status` with `Retry-After` as an HTTP date `after_secs` from now; record nothing.
    RetryAtDate {
        status: u16,
        after_secs: u64,
        #[serde(default = "one")]
        times: u32,
    },
    /// Answer a redirect (`status` 300..=399) to `location`; record nothing.
    Redirect {
        status: u16,
        location: String,
        #[serde(default = "one")]
        times: u32,
    },
}

fn one() -> u32 {
    1
}

impl ScriptedFault {
    /// How many successive requests this step applies to.
    pub fn times(&self) -> u32 {
        match *self {
            ScriptedFault::Status { times, .. }
            | ScriptedFault::Drop { times }
            | ScriptedFault::Slow { times, .. }
            | ScriptedFault::AcceptThenFail { times }
            | ScriptedFault::WrongIds { times, .. }
            | ScriptedFault::RetryAtDate { times, .. }
            | ScriptedFault::Redirect { times, .. } => times,
        }
    }
}

/// Why a [`FaultConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFaults {
    #[error("{0} is not a status the mock can answer (200..=599)")]
    Status(u16),
    #[error("{0} is not a redirect status (300..=399)")]
    Redirect(u16),
    #[error("{0:?} cannot be sent as a Location header")]
    Location(String),
}

impl FaultConfig {
    /// Checks that every status of the config can be answered.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        for step in &self.script {
            if let ScriptedFault::Redirect {
                status, location, ..
            } = step
            {
                if !(300..=399).contains(status) {
                    return Err(InvalidFaults::Redirect(*status));
                }
                if HeaderValue::from_str(location).is_err() {
                    return Err(InvalidFaults::Location(location.clone()));
                }
            }
        }
        let scripted = self.script.iter().filter_map(|s| match s {
            ScriptedFault::Status { status, .. } | ScriptedFault::RetryAtDate { status, .. } => {
                Some(*status)
            }
            _ => None,
        });
        match scripted
            .chain(self.key_status.values().copied())
            .find(|s| answerable(*s).is_none())
        {
            Some(bad) => Err(InvalidFaults::Status(bad)),
            None => Ok(()),
        }
    }
}

/// What the mock saw since it started (or since the last [`MockIntake::clear`]).
///
/// Requests to the control API are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockStats {
    /// TCP connections accepted (a keep-alive client opens few).
    pub connections: u64,
    /// Requests to anything but the control API.
    pub requests: u64,
    /// Answers sent, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests whose events were recorded.
    pub accepted_requests: u64,
    /// Events recorded (including those of `accept_then_fail` and `wrong_ids`).
    pub accepted_events: u64,
    /// Connections closed without an answer by a `drop` fault.
    pub dropped_connections: u64,
    /// Requests a scripted fault was applied to.
    pub scripted_faults: u64,
    /// Scripted applications still to come.
    pub script_remaining: u64,
    /// Requests with a gzip body.
    pub gzip_requests: u64,
    /// Request body bytes received, as sent (compressed or not).
    pub body_bytes: u64,
    /// Events no longer kept in memory (the CLI keeps only the latest ones).
    pub forgotten_events: u64,
}

impl MockStats {
    /// How many answers had this status.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

/// How a mock is run: the CLI prints events as they come and keeps only the latest ones.
struct Settings {
    tap: Option<mpsc::UnboundedSender<ReceivedEvent>>,
    max_kept_events: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tap: None,
            max_kept_events: usize::MAX,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of events or stats, so that waiters wake up instead of polling.
    changes: watch::Sender<u64>,
    settings: Settings,
}

#[derive(Default)]
struct State {
    faults: FaultConfig,
    /// What is left of `faults.script`: each step with the number of requests it still applies to.
    script: VecDeque<(ScriptedFault, u32)>,
    events: VecDeque<ReceivedEvent>,
    stats: MockStats,
}

impl State {
    /// The stats, with what is left of the script.
    fn stats(&self) -> MockStats {
        let mut stats = self.stats.clone();
        stats.script_remaining = self.script.iter().map(|(_, left)| u64::from(*left)).sum();
        stats
    }

    /// Takes the fault scripted for the next request, if any.
    fn next_scripted(&mut self) -> Option<ScriptedFault> {
        while let Some((step, left)) = self.script.front_mut() {
            if *left == 0 {
                self.script.pop_front();
                continue;
            }
            *left -= 1;
            let fault = step.clone();
            if *left == 0 {
                self.script.pop_front();
            }
            return Some(fault);
        }
        None
    }
}

impl Shared {
    fn new(settings: Settings) -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
            settings,
        }
    }

    /// The state; a panic elsewhere (a test's predicate) must not take the mock down with it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    fn set_faults(&self, faults: FaultConfig) {
        self.update(|st| {
            st.script = faults
                .script
                .iter()
                .map(|s| (s.clone(), s.times()))
                .collect();
            st.faults = faults;
        });
    }

    fn faults(&self) -> FaultConfig {
        self.lock().faults.clone()
    }

    fn events(&self) -> Vec<ReceivedEvent> {
        self.lock().events.iter().cloned().collect()
    }

    fn stats(&self) -> MockStats {
        self.lock().stats()
    }

    /// Forgets the events and resets the stats; returns how many events were forgotten.
    fn clear(&self) -> usize {
        self.update(|st| {
            let n = st.events.len();
            st.events.clear();
            st.stats = MockStats::default();
            n
        })
    }

    fn count_connection(&self) {
        self.update(|st| st.stats.connections += 1);
    }

    /// Counts a new intake request and takes its scripted fault.
    fn begin_request(&self) -> Option<ScriptedFault> {
        self.update(|st| {
            st.stats.requests += 1;
            let fault = st.next_scripted();
            if fault.is_some() {
                st.stats.scripted_faults += 1;
            }
            fault
        })
    }

    /// Counts a request to no endpoint: it does not consume the script.
    fn begin_request_unrouted(&self) {
        self.update(|st| st.stats.requests += 1);
    }

    fn count_body(&self, bytes: u64, gzip: bool) {
        self.update(|st| {
            st.stats.body_bytes += bytes;
            st.stats.gzip_requests += u64::from(gzip);
        });
    }

    fn count_answer(&self, status: StatusCode) {
        self.update(|st| *st.stats.by_status.entry(status.as_u16()).or_default() += 1);
    }

    fn count_drop(&self) {
        self.update(|st| st.stats.dropped_connections += 1);
    }

    /// Records the events of one accepted request and hands them to the CLI printer.
    fn record(&self, events: Vec<IncomingEvent>) {
        let max = self.settings.max_kept_events;
        if max == 0 && self.settings.tap.is_none() {
            // Count only (benchmarks): nothing is kept, so nothing is copied.
            let n = events.len() as u64;
            self.update(|st| {
                st.stats.accepted_requests += 1;
                st.stats.accepted_events += n;
                st.stats.forgotten_events += n;
            });
            return;
        }
        let events: Vec<ReceivedEvent> = events.into_iter().map(ReceivedEvent::from).collect();
        self.update(|st| {
            st.stats.accepted_requests += 1;
            st.stats.accepted_events += events.len() as u64;
            st.events.extend(events.iter().cloned());
            while st.events.len() > max {
                st.events.pop_front();
                st.stats.forgotten_events += 1;
            }
        });
        if let Some(tap) = &self.settings.tap {
            for event in events {
                // The printer only goes away when stdout is gone; events are still recorded.
                let _ = tap.send(event);
            }
        }
    }

    /// Waits until `check` holds on the state, or the deadline passes; says whether it holds.
    async fn wait_until(&self, check: impl Fn(&mut State) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribing before checking means no change between the check and the wait is missed.
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if check(&mut self.lock()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return check(&mut self.lock()),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process mock
// ---------------------------------------------------------------------------------------------

/// A running mock intake. Dropping it stops it too, but [`MockIntake::shutdown`] waits for that.
pub struct MockIntake {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl MockIntake {
    /// Listens on `addr` (port 0 picks a free port) and serves until shut down.
    pub async fn start(addr: SocketAddr) -> std::io::Result<MockIntake> {
        Self::start_with(addr, Settings::default()).await
    }

    /// Like [`MockIntake::start`], but keeps no event in memory: it only counts them
    /// ([`MockStats::accepted_events`]; [`MockIntake::events`] stays empty). For benchmarks
    /// that push millions of events through it.
    pub async fn start_count_only(addr: SocketAddr) -> std::io::Result<MockIntake> {
        let settings = Settings {
            tap: None,
            max_kept_events: 0,
        };
        Self::start_with(addr, settings).await
    }

    /// Serves on a listener the caller bound: a test can hold a port that answers nothing
    /// (bound, never accepted: an intake that is down) and make the intake come up on it later,
    /// with no window in which another process could take the port.
    pub async fn start_on(listener: TcpListener) -> std::io::Result<MockIntake> {
        Self::serve(listener, Settings::default())
    }

    async fn start_with(addr: SocketAddr, settings: Settings) -> std::io::Result<MockIntake> {
        Self::serve(TcpListener::bind(addr).await?, settings)
    }

    fn serve(listener: TcpListener, settings: Settings) -> std::io::Result<MockIntake> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(settings));
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        Ok(MockIntake {
            addr,
            shared,
            stop,
            server,
        })
    }

    /// The address the mock listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of the mock, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the faults; the script starts again from its first step.
    ///
    /// A status outside 200..=599 is answered as 500 (see [`FaultConfig::validate`]).
    pub fn set_faults(&self, faults: FaultConfig) {
        self.shared.set_faults(faults);
    }

    /// The current faults (the script as given, not what is left of it).
    pub fn faults(&self) -> FaultConfig {
        self.shared.faults()
    }

    /// The events the mock accepted, in arrival order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.shared.events()
    }

    /// What the mock saw.
    pub fn stats(&self) -> MockStats {
        self.shared.stats()
    }

    /// Forgets the events and resets the stats; the faults are kept.
    pub fn clear(&self) {
        self.shared.clear();
    }

    /// Waits until `pred` holds on the accepted events, at most `timeout`; says whether it holds.
    ///
    /// Wakes up on every change rather than sleeping, so callers need no fixed sleeps.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[ReceivedEvent]) -> bool,
        timeout: Duration,
    ) -> bool {
        self.shared
            .wait_until(|st| pred(st.events.make_contiguous()), timeout)
            .await
    }

    /// Waits until `pred` holds on the stats, at most `timeout`; says whether it holds.
    ///
    /// Stats are counted when an answer is decided, just before it is written.
    pub async fn wait_for_stats(
        &self,
        pred: impl Fn(&MockStats) -> bool,
        timeout: Duration,
    ) -> bool {
        self.shared
            .wait_until(|st| pred(&st.stats()), timeout)
            .await
    }

    /// Stops listening and closes every connection (in-flight answers get a short grace).
    ///
    /// The port is free again when this returns, so a test can restart a mock on it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.server.await {
            tracing::warn!(error = %e, "mock intake server task failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// Service error that makes hyper close the connection without answering.
#[derive(Debug, thiserror::Error)]
enum NoAnswer {
    #[error("connection dropped on purpose (fault injection)")]
    Dropped,
    #[error("the request body could not be read: {0}")]
    BodyRead(hyper::Error),
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.count_connection();
                    let conn = serve_connection(stream, peer, Arc::clone(&shared), &graceful);
                    connections.spawn(conn);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mock intake cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // A stop request, or the MockIntake was dropped.
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("mock intake: closing connections still busy at shutdown");
    }
    connections.shutdown().await;
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    graceful: &GracefulShutdown,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // Answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let conn = graceful.watch(conn);
    async move {
        if let Err(e) = conn.await {
            tracing::debug!(peer = %peer, error = %e, "mock intake connection closed");
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, NoAnswer> {
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control(&shared, req).await);
    }
    intake(&shared, req).await
}

// ---------------------------------------------------------------------------------------------
// Intake requests
// ---------------------------------------------------------------------------------------------

/// What to do with an intake request.
enum Outcome {
    Answer(Response<Body>),
    /// Close the connection without answering (a `drop` fault).
    Drop,
    /// The client went away while sending; nothing to answer.
    Gone(hyper::Error),
}

async fn intake(shared: &Shared, req: Request<Incoming>) -> Result<Response<Body>, NoAnswer> {
    let (outcome, extra_delay) = decide(shared, req).await;
    let delay = Duration::from_millis(shared.lock().faults.delay_ms) + extra_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match outcome {
        Outcome::Answer(response) => {
            shared.count_answer(response.status());
            Ok(response)
        }
        Outcome::Drop => {
            shared.count_drop();
            Err(NoAnswer::Dropped)
        }
        Outcome::Gone(e) => Err(NoAnswer::BodyRead(e)),
    }
}

/// Decides the answer to an intake request and records its events if it is accepted; also
/// returns the delay a `slow` fault adds.
async fn decide(shared: &Shared, req: Request<Incoming>) -> (Outcome, Duration) {
    let endpoint = match route(&req) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            shared.begin_request_unrouted();
            return (Outcome::Answer(unrouted(&e)), Duration::ZERO);
        }
    };
    let scripted = shared.begin_request();
    let delay = match scripted {
        Some(ScriptedFault::Slow { delay_ms, .. }) => Duration::from_millis(delay_ms),
        _ => Duration::ZERO,
    };
    (accept(shared, endpoint, req, scripted).await, delay)
}

/// The endpoint a request is for, or why there is none (404, 405).
fn route(req: &Request<Incoming>) -> Result<Endpoint, ApiError> {
    let path = req.uri().path();
    let Some(endpoint) = Endpoint::from_path(path) else {
        return Err(ApiError {
            status: 404,
            message: format!("no intake endpoint at {path}"),
        });
    };
    if req.method() != Method::POST {
        return Err(ApiError {
            status: 405,
            message: format!("{path} takes POST"),
        });
    }
    Ok(endpoint)
}

/// The answer to a request that [`route`] refused.
fn unrouted(e: &ApiError) -> Response<Body> {
    let mut response = api_error(e);
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

async fn accept(
    shared: &Shared,
    endpoint: Endpoint,
    req: Request<Incoming>,
    scripted: Option<ScriptedFault>,
) -> Outcome {
    let meta = RequestMeta::from_request(req.headers(), req.uri());
    let encoding = BodyEncoding::from_headers(req.headers());
    let gzip = encoding == Ok(BodyEncoding::Gzip);
    let rules = shared.faults();
    let limit = rules
        .max_body_bytes
        .map_or(MAX_BODY_BYTES, |m| m.min(MAX_BODY_BYTES));
    let (body, size) = match read_body(req.into_body(), limit).await {
        Ok(body) => {
            let size = body.len() as u64;
            (Ok(body), size)
        }
        Err(BodyError::TooLarge { size }) => (Err(too_large(size, limit)), size),
        Err(BodyError::Read(e)) => return Outcome::Gone(e),
    };
    shared.count_body(size, gzip);
    if let Some(outcome) = outage(scripted.as_ref()) {
        return outcome;
    }
    let events = match body
        .and_then(|body| encoding.and_then(|e| e.decode(body, limit)))
        .and_then(|body| parse_request(endpoint, &meta, &body, Limits::default()))
        .and_then(|events| apply_rules(&rules, events))
    {
        Ok(events) => events,
        Err(e) => {
            tracing::debug!(
                endpoint = ?endpoint,
                status = e.status,
                error = %e.message,
                "mock intake refused a request"
            );
            return Outcome::Answer(api_error(&e));
        }
    };
    Outcome::Answer(answer_accepted(shared, endpoint, events, scripted))
}

/// The answer of a scripted fault that does not look at the request, if that is the fault.
fn outage(scripted: Option<&ScriptedFault>) -> Option<Outcome> {
    match scripted? {
        ScriptedFault::Status {
            status,
            retry_after_secs,
            ..
        } => {
            tracing::info!(status, "mock intake: scripted status");
            let mut response = error_response(
                answer_status(*status),
                format!("scripted fault: status {status}"),
            );
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(*secs));
            }
            Some(Outcome::Answer(response))
        }
        ScriptedFault::RetryAtDate {
            status, after_secs, ..
        } => {
            tracing::info!(
                status,
                after_secs,
                "mock intake: scripted status, retry at a date"
            );
            let mut response = error_response(
                answer_status(*status),
                format!("scripted fault: status {status}"),
            );
            let at = std::time::SystemTime::now() + Duration::from_secs(*after_secs);
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
                response.headers_mut().insert(RETRY_AFTER, date);
            }
            Some(Outcome::Answer(response))
        }
        ScriptedFault::Redirect {
            status, location, ..
        } => {
            tracing::info!(status, %location, "mock intake: scripted redirect");
            let status = StatusCode::from_u16(*status)
                .ok()
                .filter(StatusCode::is_redirection)
                .unwrap_or(StatusCode::TEMPORARY_REDIRECT);
            let mut response = error_response(status, "scripted fault: redirect");
            match HeaderValue::from_str(location) {
                Ok(location) => {
                    response.headers_mut().insert(LOCATION, location);
                }
                Err(_) => {
                    tracing::warn!("mock intake: the redirect's location is not a header value");
                }
            }
            Some(Outcome::Answer(response))
        }
        ScriptedFault::Drop { .. } => {
            tracing::info!("mock intake: scripted drop of the connection");
            Some(Outcome::Drop)
        }
        _ => None,
    }
}

/// Records the events of an accepted request and builds its answer.
fn answer_accepted(
    shared: &Shared,
    endpoint: Endpoint,
    events: Vec<IncomingEvent>,
    scripted: Option<ScriptedFault>,
) -> Response<Body> {
    let count = events.len();
    let key = events
        .first()
        .map(|e| redact_key(&e.intake_key))
        .unwrap_or_default();
    shared.record(events);
    match scripted {
        Some(ScriptedFault::AcceptThenFail { .. }) => {
            tracing::info!(events = count, key = %key, "mock intake: scripted accept_then_fail");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "scripted fault: the events were kept but the answer failed",
            )
        }
        Some(ScriptedFault::WrongIds { delta, .. }) => {
            let ids = usize::try_from(count as i64 + i64::from(delta)).unwrap_or(0);
            tracing::info!(events = count, ids, key = %key, "mock intake: scripted wrong_ids");
            ids_response(endpoint, ids)
        }
        _ => {
            tracing::debug!(
                endpoint = ?endpoint,
                events = count,
                key = %key,
                "mock intake accepted a request"
            );
            ids_response(endpoint, count)
        }
    }
}

/// The persistent rules that look at the parsed events: `key_status`, then `reject_containing`.
fn apply_rules(
    rules: &FaultConfig,
    events: Vec<IncomingEvent>,
) -> Result<Vec<IncomingEvent>, ApiError> {
    if let Some((key, status)) = events
        .iter()
        .find_map(|e| Some((&e.intake_key, *rules.key_status.get(&e.intake_key)?)))
    {
        return Err(ApiError {
            status: answer_status(status).as_u16(),
            message: format!(
                "intake key {} is refused (mock key_status rule)",
                redact_key(key)
            ),
        });
    }
    if let Some(needle) = rules.reject_containing.as_deref() {
        if let Some(i) = events.iter().position(|e| e.raw.contains(needle)) {
            return Err(ApiError::bad_request(format!(
                "event {i} contains rejected text (mock reject_containing rule)"
            )));
        }
    }
    Ok(events)
}

#[derive(Debug)]
enum BodyError {
    /// The body is bigger than the limit; `size` is how much of it was seen.
    TooLarge {
        size: u64,
    },
    Read(hyper::Error),
}

/// Reads a body of at most `limit` bytes. A bigger one is still read (up to
/// [`MAX_DRAINED_BYTES`]) and thrown away, so that the client gets to read the 413.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let limit = limit as u64;
    let mut kept = BytesMut::new();
    let mut size: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers
        };
        size += data.len() as u64;
        if size <= limit {
            kept.extend_from_slice(&data);
        } else if size > MAX_DRAINED_BYTES {
            break;
        }
    }
    if size > limit {
        return Err(BodyError::TooLarge { size });
    }
    Ok(kept.freeze())
}

fn too_large(size: u64, limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "the body is {size} bytes or more, over the limit of {limit} bytes"
    ))
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

/// `status` if the mock can answer it.
fn answerable(status: u16) -> Option<StatusCode> {
    if !(200..=599).contains(&status) {
        return None;
    }
    StatusCode::from_u16(status).ok()
}

/// `status`, or 500 if it cannot be answered (a config set in-process without validation).
fn answer_status(status: u16) -> StatusCode {
    answerable(status).unwrap_or_else(|| {
        tracing::warn!(
            status,
            "mock intake: cannot answer this status, answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    })
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "mock intake cannot serialize an answer");
            let mut response = Response::new(Full::new(Bytes::from_static(b"serialization error")));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

fn error_response(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(
        status,
        &ErrorResponse {
            message: message.into(),
        },
    )
}

fn api_error(e: &ApiError) -> Response<Body> {
    json_response(answer_status(e.status), &e.body())
}

/// 200 with `count` fresh ids: `{"event_id"}` where the endpoint answers one id and there is
/// one, `{"event_ids"}` otherwise.
fn ids_response(endpoint: Endpoint, count: usize) -> Response<Body> {
    let new_id = || uuid::Uuid::new_v4().to_string();
    if endpoint.answers_single_id() && count == 1 {
        return json_response(StatusCode::OK, &EventIdResponse { event_id: new_id() });
    }
    let event_ids = (0..count).map(|_| new_id()).collect();
    json_response(StatusCode::OK, &EventIdsResponse { event_ids })
}

// ---------------------------------------------------------------------------------------------
// Control API
// ---------------------------------------------------------------------------------------------

async fn control(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::PUT, "/_mock/faults") => put_faults(shared, req.into_body()).await,
        (Method::GET, "/_mock/faults") => json_response(StatusCode::OK, &shared.faults()),
        (Method::GET, "/_mock/events") => json_response(StatusCode::OK, &shared.events()),
        (Method::DELETE, "/_mock/events") => {
            let cleared = shared.clear();
            json_response(StatusCode::OK, &serde_json::json!({ "cleared": cleared }))
        }
        (Method::GET, "/_mock/stats") => json_response(StatusCode::OK, &shared.stats()),
        (_, "/_mock/faults" | "/_mock/events" | "/_mock/stats") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {path} is not part of the mock's control API",
                req.method()
            ),
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not part of the mock's control API: \
                 /_mock/faults (GET, PUT), /_mock/events (GET, DELETE), /_mock/stats (GET)"
            ),
        ),
    }
}

async fn put_faults(shared: &Shared, body: Incoming) -> Response<Body> {
    let body = match read_body(body, MAX_CONTROL_BODY_BYTES).await {
        Ok(body) => body,
        Err(BodyError::TooLarge { size }) => {
            return api_error(&too_large(size, MAX_CONTROL_BODY_BYTES))
        }
        Err(BodyError::Read(e)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    let faults: FaultConfig = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("the body is not a fault configuration: {e}"),
            )
        }
    };
    if let Err(e) = faults.validate() {
        return error_response(StatusCode::BAD_REQUEST, e.to_string());
    }
    tracing::info!(
        script_steps = faults.script.len(),
        reject_containing = faults.reject_containing.is_some(),
        max_body_bytes = ?faults.max_body_bytes,
        key_rules = faults.key_status.len(),
        delay_ms = faults.delay_ms,
        "mock intake: faults set"
    );
    shared.set_faults(faults.clone());
    json_response(StatusCode::OK, &faults)
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Options of `sekoia-forwarder mock-intake`.
#[derive(Debug, Clone, clap::Args)]
pub struct MockCliOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Do not print the accepted events on stdout.
    #[arg(long)]
    pub quiet: bool,
    /// Keep at most this many events in memory for GET /_mock/events (oldest forgotten first).
    #[arg(long, default_value_t = 100_000)]
    pub keep_events: usize,
}

/// Runs the mock until Ctrl-C or SIGTERM, printing one JSON line per accepted event on stdout.
pub async fn run_cli(opts: MockCliOptions) -> anyhow::Result<()> {
    use anyhow::Context;

    let (tap, printed) = if opts.quiet {
        (None, None)
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    };
    let settings = Settings {
        tap,
        max_kept_events: opts.keep_events,
    };
    let mock = MockIntake::start_with(opts.listen, settings)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = mock.addr();
    tracing::info!(addr = %addr, "mock intake listening");
    eprintln!("mock intake listening on http://{addr}");
    let printer = printed.map(|rx| tokio::spawn(print_events(rx)));

    let stopped = stop_signal().await;
    tracing::info!("mock intake stopping");
    // Dropping the mock's state closes the printer's channel, so the printer ends.
    mock.shutdown().await;
    if let Some(printer) = printer {
        if let Err(e) = printer.await {
            tracing::warn!(error = %e, "mock intake printer failed");
        }
    }
    stopped.context("cannot wait for Ctrl-C/SIGTERM")
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

/// One printed line: the key redacted, the event verbatim.
#[derive(Serialize)]
struct PrintedEvent<'a> {
    intake_key: String,
    timestamp: Option<&'a str>,
    event: &'a str,
}

fn event_line(e: &ReceivedEvent) -> String {
    let printed = PrintedEvent {
        intake_key: redact_key(&e.intake_key),
        timestamp: e.timestamp.as_deref(),
        event: &e.raw,
    };
    match serde_json::to_string(&printed) {
        Ok(mut line) => {
            line.push('\n');
            line
        }
        Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
    }
}

/// Prints events as they come, flushing after each burst.
async fn print_events(mut events: mpsc::UnboundedReceiver<ReceivedEvent>) {
    let mut out = tokio::io::stdout();
    while let Some(first) = events.recv().await {
        let mut text = event_line(&first);
        while let Ok(next) = events.try_recv() {
            text.push_str(&event_line(&next));
        }
        let written = async {
            out.write_all(text.as_bytes()).await?;
            out.flush().await
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "cannot print events on stdout; no longer printing them");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake_api::{check_ack, EVENT_TIMESTAMP_HEADER, INTAKE_KEY_HEADER};
    use hyper::header::CONTENT_ENCODING;
    use std::io::Write;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    const KEY: &str = "test-intake-key-0001";
    const OTHER_KEY: &str = "other-intake-key-0002";
    const WAIT: Duration = Duration::from_secs(10);

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn mock() -> MockIntake {
        MockIntake::start(localhost()).await.unwrap()
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    async fn post_jsons(
        c: &reqwest::Client,
        mock: &MockIntake,
        events: &[&str],
    ) -> reqwest::Result<reqwest::Response> {
        c.post(format!("{}/jsons", mock.url()))
            .header(INTAKE_KEY_HEADER, KEY)
            .json(events)
            .send()
            .await
    }

    async fn status_of(response: reqwest::Result<reqwest::Response>) -> u16 {
        response.unwrap().status().as_u16()
    }

    fn raws(mock: &MockIntake) -> Vec<String> {
        mock.events().into_iter().map(|e| e.raw).collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn faults(script: Vec<ScriptedFault>) -> FaultConfig {
        FaultConfig {
            script,
            ..Default::default()
        }
    }

    fn status(status: u16, times: u32) -> ScriptedFault {
        ScriptedFault::Status {
            status,
            retry_after_secs: None,
            times,
        }
    }

    async fn ids(response: reqwest::Response) -> Vec<String> {
        assert_eq!(response.status(), 200);
        let answer: EventIdsResponse = response.json().await.unwrap();
        for id in &answer.event_ids {
            uuid::Uuid::parse_str(id).unwrap();
        }
        answer.event_ids
    }

    async fn single_id(response: reqwest::Response) -> String {
        assert_eq!(response.status(), 200);
        let answer: EventIdResponse = response.json().await.unwrap();
        uuid::Uuid::parse_str(&answer.event_id).unwrap();
        answer.event_id
    }

    #[tokio::test]
    async fn answers_every_endpoint_like_the_intake() {
        let mock = mock().await;
        let c = client();
        let url = mock.url();

        let r = c
            .post(format!("{url}/plain"))
            .header(INTAKE_KEY_HEADER, KEY)
            .header(EVENT_TIMESTAMP_HEADER, "2021-04-05T21:33:31+02:00")
            .body("one line")
            .send()
            .await
            .unwrap();
        single_id(r).await;

        let r = c
            .post(format!("{url}/plain/batch"))
            .basic_auth("", Some(KEY))
            .body("a\nb\n")
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);

        let r = c
            .post(format!("{url}/jsons?intake_key={KEY}"))
            .json(&["c", "d"])
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);

        let r = c
            .post(format!("{url}/array"))
            .json(&serde_json::json!([
                {"intake_key": KEY, "json": "e", "timestamp": "2021-04-05T21:33:31+02:00"},
                {"intake_key": OTHER_KEY, "json": "f"},
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);

        let r = c
            .post(format!("{url}/"))
            .json(&serde_json::json!({"intake_key": KEY, "json": "g"}))
            .send()
            .await
            .unwrap();
        single_id(r).await;

        let r = c
            .post(format!("{url}/batch"))
            .json(&serde_json::json!({"intake_key": KEY, "jsons": ["h", {"i": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);

        assert_eq!(
            raws(&mock),
            [
                "one line",
                "a",
                "b",
                "c",
                "d",
                "e",
                "f",
                "g",
                "h",
                r#"{"i":1}"#
            ]
        );
        let events = mock.events();
        assert_eq!(
            events[0].timestamp.as_deref(),
            Some("2021-04-05T21:33:31+02:00")
        );
        assert_eq!(events[6].intake_key, OTHER_KEY);
        assert!(events
            .iter()
            .filter(|e| e.raw != "f")
            .all(|e| e.intake_key == KEY));
        let stats = mock.stats();
        assert_eq!(stats.requests, 6);
        assert_eq!(stats.status_count(200), 6);
        assert_eq!(stats.accepted_requests, 6);
        assert_eq!(stats.accepted_events, 10);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_like_the_intake_and_records_nothing() {
        let mock = mock().await;
        let c = client();
        let url = mock.url();

        let no_key = c.post(format!("{url}/jsons")).json(&["x"]).send().await;
        assert_eq!(status_of(no_key).await, 401);
        let malformed = c
            .post(format!("{url}/jsons"))
            .header(INTAKE_KEY_HEADER, KEY)
            .body("{")
            .send()
            .await
            .unwrap();
        assert_eq!(malformed.status(), 400);
        let body: ErrorResponse = malformed.json().await.unwrap();
        assert!(body.message.contains("malformed"), "{}", body.message);
        let unknown = c.post(format!("{url}/nowhere")).body("x").send().await;
        assert_eq!(status_of(unknown).await, 404);
        let get = c.get(format!("{url}/jsons")).send().await.unwrap();
        assert_eq!(get.status(), 405);
        assert_eq!(get.headers()[ALLOW], "POST");

        assert!(mock.events().is_empty());
        let stats = mock.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.status_count(401), 1);
        assert_eq!(stats.status_count(400), 1);
        assert_eq!(stats.status_count(404), 1);
        assert_eq!(stats.status_count(405), 1);
        assert_eq!(stats.accepted_events, 0);
    }

    #[tokio::test]
    async fn accepts_gzip_bodies() {
        let mock = mock().await;
        let c = client();
        let r = c
            .post(format!("{}/jsons", mock.url()))
            .header(INTAKE_KEY_HEADER, KEY)
            .header(CONTENT_ENCODING, "gzip")
            .header(CONTENT_TYPE, "application/json")
            .body(gzip(br#"["zipped 1", "zipped 2"]"#))
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);
        assert_eq!(raws(&mock), ["zipped 1", "zipped 2"]);
        assert_eq!(mock.stats().gzip_requests, 1);

        let bad = c
            .post(format!("{}/jsons", mock.url()))
            .header(INTAKE_KEY_HEADER, KEY)
            .header(CONTENT_ENCODING, "gzip")
            .body("not gzip")
            .send()
            .await;
        assert_eq!(status_of(bad).await, 400);
        let brotli = c
            .post(format!("{}/jsons", mock.url()))
            .header(INTAKE_KEY_HEADER, KEY)
            .header(CONTENT_ENCODING, "br")
            .body("x")
            .send()
            .await;
        assert_eq!(status_of(brotli).await, 415);
        assert_eq!(mock.events().len(), 2);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413() {
        let mock = mock().await;
        let c = client();
        let url = format!("{}/plain", mock.url());
        let huge = vec![b'a'; MAX_BODY_BYTES + 1];
        let r = c
            .post(&url)
            .header(INTAKE_KEY_HEADER, KEY)
            .body(huge)
            .send()
            .await;
        assert_eq!(status_of(r).await, 413);

        mock.set_faults(FaultConfig {
            max_body_bytes: Some(100),
            ..Default::default()
        });
        let r = c
            .post(&url)
            .header(INTAKE_KEY_HEADER, KEY)
            .body(vec![b'b'; 101])
            .send()
            .await;
        assert_eq!(status_of(r).await, 413);
        // The limit is on the decoded body too: a small gzip that inflates past it is refused.
        let r = c
            .post(&url)
            .header(INTAKE_KEY_HEADER, KEY)
            .header(CONTENT_ENCODING, "gzip")
            .body(gzip(&[b'c'; 1000]))
            .send()
            .await;
        assert_eq!(status_of(r).await, 413);
        let r = c
            .post(&url)
            .header(INTAKE_KEY_HEADER, KEY)
            .body(vec![b'd'; 100])
            .send()
            .await;
        assert_eq!(status_of(r).await, 200);
        assert_eq!(mock.events().len(), 1);
        assert_eq!(mock.stats().status_count(413), 3);
    }

    #[tokio::test]
    async fn scripted_status_then_normal_answers() {
        let mock = mock().await;
        let c = client();
        mock.set_faults(faults(vec![ScriptedFault::Status {
            status: 503,
            retry_after_secs: Some(7),
            times: 2,
        }]));
        for _ in 0..2 {
            let r = post_jsons(&c, &mock, &["refused"]).await.unwrap();
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()[RETRY_AFTER], "7");
            let body: ErrorResponse = r.json().await.unwrap();
            assert!(body.message.contains("503"), "{}", body.message);
        }
        assert_eq!(mock.stats().script_remaining, 0);
        let r = post_jsons(&c, &mock, &["accepted"]).await.unwrap();
        assert_eq!(ids(r).await.len(), 1);
        assert_eq!(raws(&mock), ["accepted"]);
        let stats = mock.stats();
        assert_eq!(stats.scripted_faults, 2);
        assert_eq!(stats.status_count(503), 2);
        assert_eq!(stats.status_count(200), 1);
    }

    #[tokio::test]
    async fn scripted_redirect_and_retry_at_date() {
        let mock = mock().await;
        let c = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        mock.set_faults(faults(vec![
            ScriptedFault::Redirect {
                status: 307,
                location: "http://elsewhere.example:8080/jsons".into(),
                times: 1,
            },
            ScriptedFault::RetryAtDate {
                status: 429,
                after_secs: 60,
                times: 1,
            },
        ]));
        let r = post_jsons(&c, &mock, &["redirected"]).await.unwrap();
        assert_eq!(r.status(), 307);
        assert_eq!(r.headers()[LOCATION], "http://elsewhere.example:8080/jsons");
        let r = post_jsons(&c, &mock, &["later"]).await.unwrap();
        assert_eq!(r.status(), 429);
        let date = r.headers()[RETRY_AFTER].to_str().unwrap();
        let at = httpdate::parse_http_date(date).unwrap();
        let ahead = at.duration_since(std::time::SystemTime::now()).unwrap();
        assert!(ahead > Duration::from_secs(50), "{date}");
        assert!(raws(&mock).is_empty(), "nothing is recorded");
        let bad = faults(vec![ScriptedFault::Redirect {
            status: 200,
            location: "/".into(),
            times: 1,
        }]);
        assert_eq!(bad.validate(), Err(InvalidFaults::Redirect(200)));
    }

    #[tokio::test]
    async fn scripted_drop_closes_the_connection_without_an_answer() {
        let mock = mock().await;
        mock.set_faults(faults(vec![ScriptedFault::Drop { times: 2 }]));

        // On the wire: the request is read, then the connection closes with not one byte back.
        let mut stream = TcpStream::connect(mock.addr()).await.unwrap();
        let body = r#"["dropped"]"#;
        let request = format!(
            "POST /jsons HTTP/1.1\r\nHost: mock\r\n{INTAKE_KEY_HEADER}: {KEY}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
            .await
            .unwrap();
        assert!(read.is_err() || answer.is_empty(), "{answer:?}");

        // Through a client: an error, not an answer.
        let c = client();
        assert!(post_jsons(&c, &mock, &["dropped"]).await.is_err());
        let r = post_jsons(&c, &mock, &["kept"]).await.unwrap();
        assert_eq!(ids(r).await.len(), 1);
        assert_eq!(raws(&mock), ["kept"]);
        let stats = mock.stats();
        assert_eq!(stats.dropped_connections, 2);
        assert_eq!(stats.status_count(200), 1);
    }

    #[tokio::test]
    async fn slow_answers_late_but_keeps_the_events() {
        let mock = mock().await;
        let delay = Duration::from_millis(300);
        mock.set_faults(faults(vec![ScriptedFault::Slow {
            delay_ms: delay.as_millis() as u64,
            times: 2,
        }]));
        let impatient = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let err = post_jsons(&impatient, &mock, &["late 1"])
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        // The client gave up, yet the intake has the event: the sender must resend (a duplicate).
        assert!(mock.wait_for(|e| e.len() == 1, WAIT).await);

        let started = Instant::now();
        let r = post_jsons(&client(), &mock, &["late 2"]).await.unwrap();
        assert!(started.elapsed() >= delay);
        assert_eq!(ids(r).await.len(), 1);
        assert_eq!(raws(&mock), ["late 1", "late 2"]);
    }

    #[tokio::test]
    async fn accept_then_fail_keeps_the_events_and_answers_500() {
        let mock = mock().await;
        let c = client();
        mock.set_faults(faults(vec![ScriptedFault::AcceptThenFail { times: 1 }]));
        let r = post_jsons(&c, &mock, &["kept", "too"]).await;
        assert_eq!(status_of(r).await, 500);
        assert_eq!(raws(&mock), ["kept", "too"]);
        assert_eq!(mock.stats().accepted_events, 2);
    }

    #[tokio::test]
    async fn wrong_ids_answers_the_wrong_count() {
        let mock = mock().await;
        let c = client();
        mock.set_faults(faults(vec![
            ScriptedFault::WrongIds {
                delta: -1,
                times: 1,
            },
            ScriptedFault::WrongIds { delta: 1, times: 1 },
            ScriptedFault::WrongIds {
                delta: -5,
                times: 1,
            },
        ]));
        let r = post_jsons(&c, &mock, &["a", "b", "c"]).await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert_eq!(
            check_ack(&body, 3).unwrap_err(),
            crate::intake_api::AckError::WrongCount { sent: 3, got: 2 }
        );
        // An endpoint answering one id gets a list of two.
        let r = c
            .post(format!("{}/plain", mock.url()))
            .header(INTAKE_KEY_HEADER, KEY)
            .body("d")
            .send()
            .await
            .unwrap();
        assert_eq!(ids(r).await.len(), 2);
        let r = post_jsons(&c, &mock, &["e"]).await.unwrap();
        assert!(ids(r).await.is_empty());
        assert_eq!(raws(&mock), ["a", "b", "c", "d", "e"]);
    }

    #[tokio::test]
    async fn script_steps_apply_in_order() {
        let mock = mock().await;
        let c = client();
        mock.set_faults(faults(vec![
            status(429, 0), // skipped
            status(429, 1),
            ScriptedFault::AcceptThenFail { times: 1 },
            status(502, 2),
        ]));
        let mut statuses = Vec::new();
        for i in 0..5 {
            statuses.push(status_of(post_jsons(&c, &mock, &[&i.to_string()]).await).await);
        }
        assert_eq!(statuses, [429, 500, 502, 502, 200]);
        assert_eq!(raws(&mock), ["1", "4"]);
        // Requests to no endpoint do not consume the script.
        mock.set_faults(faults(vec![status(503, 1)]));
        let r = c.post(format!("{}/nowhere", mock.url())).send().await;
        assert_eq!(status_of(r).await, 404);
        assert_eq!(status_of(post_jsons(&c, &mock, &["x"]).await).await, 503);
    }

    #[tokio::test]
    async fn persistent_rules_hold_until_replaced() {
        let mock = mock().await;
        let c = client();
        mock.set_faults(FaultConfig {
            reject_containing: Some("poison".into()),
            key_status: HashMap::from([(OTHER_KEY.to_owned(), 403)]),
            ..Default::default()
        });
        for _ in 0..2 {
            let r = post_jsons(&c, &mock, &["fine", "has poison in it"])
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
            let body: ErrorResponse = r.json().await.unwrap();
            assert!(body.message.contains("event 1"), "{}", body.message);
        }
        let r = c
            .post(format!("{}/jsons", mock.url()))
            .header(INTAKE_KEY_HEADER, OTHER_KEY)
            .json(&["fine"])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let body: ErrorResponse = r.json().await.unwrap();
        assert!(!body.message.contains(OTHER_KEY), "{}", body.message);
        let mixed = c
            .post(format!("{}/array", mock.url()))
            .json(&serde_json::json!([
                {"intake_key": KEY, "json": "a"},
                {"intake_key": OTHER_KEY, "json": "b"},
            ]))
            .send()
            .await;
        assert_eq!(status_of(mixed).await, 403);
        assert!(mock.events().is_empty());
        assert_eq!(status_of(post_jsons(&c, &mock, &["fine"]).await).await, 200);

        let delay = Duration::from_millis(200);
        mock.set_faults(FaultConfig {
            delay_ms: delay.as_millis() as u64,
            ..Default::default()
        });
        let started = Instant::now();
        let r = post_jsons(&c, &mock, &["has poison, now accepted"]).await;
        assert_eq!(status_of(r).await, 200);
        assert!(started.elapsed() >= delay);
        assert_eq!(raws(&mock), ["fine", "has poison, now accepted"]);
    }

    #[tokio::test]
    async fn control_api_sets_faults_and_shows_what_happened() {
        let mock = mock().await;
        let c = client();
        let control = |path: &str| format!("{}/_mock/{path}", mock.url());

        let config = r#"{"script": [{"fault": "status", "status": 503, "retry_after_secs": 1},
                                     {"fault": "wrong_ids", "delta": 2}],
                         "key_status": {"revoked-key-000000": 401}}"#;
        let r = c.put(control("faults")).body(config).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let expected = FaultConfig {
            script: vec![
                ScriptedFault::Status {
                    status: 503,
                    retry_after_secs: Some(1),
                    times: 1,
                },
                ScriptedFault::WrongIds { delta: 2, times: 1 },
            ],
            key_status: HashMap::from([("revoked-key-000000".to_owned(), 401)]),
            ..Default::default()
        };
        assert_eq!(r.json::<FaultConfig>().await.unwrap(), expected);
        let r = c.get(control("faults")).send().await.unwrap();
        assert_eq!(r.json::<FaultConfig>().await.unwrap(), expected);
        assert_eq!(mock.faults(), expected);

        assert_eq!(status_of(post_jsons(&c, &mock, &["a"]).await).await, 503);
        let r = post_jsons(&c, &mock, &["b"]).await.unwrap();
        assert_eq!(ids(r).await.len(), 3);

        let stats: MockStats = c
            .get(control("stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats, mock.stats());
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.status_count(503), 1);
        assert_eq!(stats.scripted_faults, 2);
        let events: Vec<ReceivedEvent> = c
            .get(control("events"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            events,
            [ReceivedEvent {
                intake_key: KEY.into(),
                timestamp: None,
                raw: "b".into()
            }]
        );

        let r = c.delete(control("events")).send().await.unwrap();
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap(),
            serde_json::json!({"cleared": 1})
        );
        assert!(mock.events().is_empty());
        assert_eq!(mock.stats().requests, 0);

        let bad = c
            .put(control("faults"))
            .body("{\"scirpt\": []}")
            .send()
            .await;
        assert_eq!(status_of(bad).await, 400);
        let bad_status = r#"{"script": [{"fault": "status", "status": 42}]}"#;
        let r = c
            .put(control("faults"))
            .body(bad_status)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains("42"));
        assert_eq!(mock.faults(), expected, "a refused config changes nothing");
        assert_eq!(status_of(c.get(control("nothing")).send().await).await, 404);
        assert_eq!(status_of(c.post(control("stats")).send().await).await, 405);
        let r = c.put(control("faults")).body("{}").send().await;
        assert_eq!(status_of(r).await, 200);
        assert_eq!(mock.faults(), FaultConfig::default());
        assert_eq!(mock.stats().requests, 0, "control requests are not counted");
    }

    #[test]
    fn fault_config_json_form() {
        let config: FaultConfig = serde_json::from_str(
            r#"{
              "script": [
                {"fault": "status", "status": 503, "retry_after_secs": 1, "times": 2},
                {"fault": "drop"},
                {"fault": "slow", "delay_ms": 2000},
                {"fault": "accept_then_fail"},
                {"fault": "wrong_ids", "delta": -1}
              ],
              "reject_containing": "poison",
              "max_body_bytes": 1048576,
              "key_status": {"revoked-key": 401},
              "delay_ms": 5
            }"#,
        )
        .unwrap();
        assert_eq!(
            config.script,
            [
                ScriptedFault::Status {
                    status: 503,
                    retry_after_secs: Some(1),
                    times: 2,
                },
                ScriptedFault::Drop { times: 1 },
                ScriptedFault::Slow {
                    delay_ms: 2000,
                    times: 1,
                },
                ScriptedFault::AcceptThenFail { times: 1 },
                ScriptedFault::WrongIds {
                    delta: -1,
                    times: 1
                },
            ]
        );
        assert_eq!(config.max_body_bytes, Some(1048576));
        assert_eq!(config.delay_ms, 5);
        assert!(config.validate().is_ok());
        let again: FaultConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        assert_eq!(
            serde_json::to_value(ScriptedFault::Drop { times: 1 }).unwrap(),
            serde_json::json!({"fault": "drop", "times": 1})
        );
        assert_eq!(
            serde_json::from_str::<FaultConfig>("{}").unwrap(),
            FaultConfig::default()
        );
        assert!(serde_json::from_str::<FaultConfig>(r#"{"delay": 1}"#).is_err());
        let typo = r#"{"script": [{"fault": "drop", "tims": 2}]}"#;
        assert!(serde_json::from_str::<FaultConfig>(typo).is_err());
        assert!(serde_json::from_str::<FaultConfig>(r#"{"script": [{"fault": "nap"}]}"#).is_err());
        let bad = FaultConfig {
            key_status: HashMap::from([("k".to_owned(), 1000)]),
            ..Default::default()
        };
        assert_eq!(bad.validate(), Err(InvalidFaults::Status(1000)));
    }

    #[tokio::test]
    async fn an_invalid_status_set_in_process_answers_500() {
        let mock = mock().await;
        mock.set_faults(faults(vec![status(99, 1)]));
        assert_eq!(
            status_of(post_jsons(&client(), &mock, &["x"]).await).await,
            500
        );
    }

    #[tokio::test]
    async fn keep_alive_reuses_one_connection() {
        let mock = mock().await;
        let c = client();
        for i in 0..3 {
            let r = post_jsons(&c, &mock, &[&i.to_string()]).await;
            assert_eq!(status_of(r).await, 200);
        }
        assert_eq!(mock.stats().connections, 1);
    }

    #[tokio::test]
    async fn wait_for_wakes_up_on_events_and_gives_up_at_the_deadline() {
        let mock = mock().await;
        assert!(
            !mock
                .wait_for(|e| !e.is_empty(), Duration::from_millis(50))
                .await
        );
        let url = mock.url();
        let sender = tokio::spawn(async move {
            client()
                .post(format!("{url}/plain"))
                .header(INTAKE_KEY_HEADER, KEY)
                .body("awaited")
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        assert!(
            mock.wait_for(|e| e.iter().any(|e| e.raw == "awaited"), WAIT)
                .await
        );
        assert_eq!(sender.await.unwrap().unwrap(), 200);
        assert!(
            mock.wait_for_stats(|s| s.status_count(200) == 1, WAIT)
                .await
        );
    }

    #[tokio::test]
    async fn shutdown_closes_connections_and_frees_the_port() {
        let mock = mock().await;
        let addr = mock.addr();
        let c = client();
        // An idle keep-alive connection must not hold the shutdown up.
        assert_eq!(status_of(post_jsons(&c, &mock, &["x"]).await).await, 200);
        let started = Instant::now();
        mock.shutdown().await;
        assert!(started.elapsed() < SHUTDOWN_GRACE);
        assert!(c
            .post(format!("http://{addr}/jsons"))
            .header(INTAKE_KEY_HEADER, KEY)
            .json(&["x"])
            .send()
            .await
            .is_err());

        let again = MockIntake::start(addr).await.unwrap();
        assert_eq!(again.addr(), addr);
        assert_eq!(status_of(post_jsons(&c, &again, &["y"]).await).await, 200);
        assert_eq!(raws(&again), ["y"]);
    }

    #[tokio::test]
    async fn cli_settings_keep_the_latest_events_and_tap_them() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let settings = Settings {
            tap: Some(tx),
            max_kept_events: 2,
        };
        let mock = MockIntake::start_with(localhost(), settings).await.unwrap();
        let r = post_jsons(&client(), &mock, &["1", "2", "3"]).await;
        assert_eq!(status_of(r).await, 200);
        assert_eq!(raws(&mock), ["2", "3"]);
        let stats = mock.stats();
        assert_eq!((stats.accepted_events, stats.forgotten_events), (3, 1));
        for expected in ["1", "2", "3"] {
            assert_eq!(rx.recv().await.unwrap().raw, expected);
        }
    }

    #[tokio::test]
    async fn count_only_counts_events_without_keeping_them() {
        let mock = MockIntake::start_count_only(localhost()).await.unwrap();
        let c = client();
        let r = post_jsons(&c, &mock, &["1", "2", "3"]).await;
        assert_eq!(ids(r.unwrap()).await.len(), 3);
        let r = post_jsons(&c, &mock, &["4"]).await;
        assert_eq!(status_of(r).await, 200);
        assert!(mock.events().is_empty());
        let stats = mock.stats();
        assert_eq!(stats.accepted_requests, 2);
        assert_eq!((stats.accepted_events, stats.forgotten_events), (4, 4));
        assert_eq!(stats.status_count(200), 2);
        assert!(mock.wait_for_stats(|s| s.accepted_events == 4, WAIT).await);
    }

    #[test]
    fn printed_lines_redact_the_key() {
        let line = event_line(&ReceivedEvent {
            intake_key: KEY.into(),
            timestamp: Some("2021-04-05T21:33:31+02:00".into()),
            raw: "line \"quoted\"".into(),
        });
        assert!(line.ends_with('\n'));
        assert!(!line.contains(KEY));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "intake_key": "…0001",
                "timestamp": "2021-04-05T21:33:31+02:00",
                "event": "line \"quoted\""
            })
        );
    }
}
