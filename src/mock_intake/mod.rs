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
//! per event, elsewhere; the 200, 404 and 405 are built by [`intake_api`](crate::intake_api),
//! for the HTTP source too). Like the real intake it accepts gzip request bodies
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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use connections::accept_loop;
use state::{Settings, Shared};

pub use cli::{run_cli, MockCliOptions};
pub use faults::{FaultConfig, InvalidFaults, ScriptedFault};
pub use state::{MockStats, ReceivedEvent};

mod answers;
mod cli;
mod connections;
mod control;
mod faults;
mod intake;
mod state;
#[cfg(test)]
mod tests;

/// The body of every answer of the mock: small, and whole before it is sent.
type Body = Full<Bytes>;

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
