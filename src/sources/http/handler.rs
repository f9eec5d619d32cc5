//! The intake handler of the HTTP source: routing, the probes, reading and parsing a request,
//! storing its events durably, and the answers (the promise is in [`super`]'s doc).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::HttpSourceStats;
use crate::config::HttpSourceConfig;
use crate::intake_api::{self, BodyEncoding, IncomingEvent, Limits, Refusal, RequestMeta};
use crate::queue::{Queue, QueueError};

/// Path of the liveness / readiness probe.
const HEALTH_PATH: &str = "/health";
const READY_PATH: &str = "/ready";

/// What every request handler shares.
pub(super) struct Shared {
    pub(super) config: HttpSourceConfig,
    pub(super) queue: Queue,
    pub(super) stats: Arc<HttpSourceStats>,
    /// Cancelled when the source stops.
    pub(super) stopping: CancellationToken,
    /// One token per request being handled; shutdown waits for them.
    pub(super) in_flight: TaskTracker,
}

/// The one handler: routes by path, since the intake's paths are defined by
/// [`intake_api::route`] and not by a route table of ours.
pub(super) async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
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
        let refusal = Refusal::method_not_allowed(path, "GET, HEAD");
        return respond(refusal, shared.config.retry_after_secs);
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
async fn intake(shared: &Shared, path: &str, request: Request) -> Result<Response, Refusal> {
    let endpoint = intake_api::route(request.method(), path)?;
    shared.check_accepting()?;
    let (parts, body) = request.into_parts();
    let meta = RequestMeta::from_request(&parts.headers, &parts.uri);
    let body = shared.read_body(&parts.headers, body).await?;
    let events = intake_api::parse_request(endpoint, &meta, &body, shared.limits())?;
    let count = events.len();
    shared.store(events).await?;
    Ok(intake_api::acknowledgement(endpoint, count).map(Body::from))
}

impl Shared {
    fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.config.max_event_bytes,
        }
    }

    /// Refuses early (before reading the body) what the queue would refuse anyway.
    fn check_accepting(&self) -> Result<(), Refusal> {
        if self.stopping.is_cancelled() {
            return Err(unavailable("the forwarder is stopping; retry later"));
        }
        if self.queue.is_full() {
            return Err(unavailable("the forwarder's queue is full; retry later"));
        }
        Ok(())
    }

    /// The request body, bounded by `max_body_bytes` and gunzipped if need be.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
        let max = self.config.max_body_bytes;
        let encoding = BodyEncoding::from_headers(headers)?;
        if let Some(length) = content_length(headers).filter(|&length| length > max) {
            return Err(body_too_large(length, max));
        }
        let read = axum::body::to_bytes(body, max);
        let raw = tokio::time::timeout(self.config.body_read_timeout(), read)
            .await
            .map_err(|_| {
                Refusal::new(
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
                    too_large(format!("the body is over max_body_bytes ({max} bytes)"))
                } else {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}"),
                    )
                }
            })?;
        self.stats
            .body_bytes
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        Ok(encoding.decode(raw, max)?)
    }

    /// Appends `events` and returns once they are durable, or says why the sender must keep them.
    async fn store(&self, events: Vec<IncomingEvent>) -> Result<(), Refusal> {
        let count = events.len() as u64;
        match self.queue.append(events).await {
            Ok(()) => {
                self.stats.accepted_requests.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .accepted_events
                    .fetch_add(count, Ordering::Relaxed);
                Ok(())
            }
            Err(QueueError::Full) => Err(unavailable("the forwarder's queue is full; retry later")),
            Err(QueueError::Closed) => Err(unavailable("the forwarder is stopping; retry later")),
            Err(e @ QueueError::TooManyKeys { .. }) => {
                self.stats
                    .rejected_max_intake_keys
                    .fetch_add(1, Ordering::Relaxed);
                Err(Refusal::new(StatusCode::FORBIDDEN, e.to_string()))
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    events = count,
                    "cannot store events: answered 503 so that the sender keeps them"
                );
                Err(unavailable(
                    "the forwarder cannot store events right now; retry later",
                ))
            }
        }
    }

    /// Counts, logs and answers a refused request. The message never holds an intake key.
    fn reject(&self, path: &str, rejection: Refusal) -> Response {
        self.stats.count_rejection(rejection.status);
        tracing::debug!(
            status = rejection.status.as_u16(),
            path = %path,
            message = %rejection.message,
            "http request rejected"
        );
        respond(rejection, self.config.retry_after_secs)
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

fn body_too_large(length: usize, max: usize) -> Refusal {
    too_large(format!(
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

fn unavailable(message: &str) -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message)
}

fn too_large(message: String) -> Refusal {
    Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, message)
}

/// The answer to a refused request, with `Retry-After` on a 503 and `Connection: close` on a
/// 408 (the rest of the body may still be on its way).
fn respond(refusal: Refusal, retry_after_secs: u64) -> Response {
    let mut response = refusal.answer().map(Body::from);
    if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
        set_retry_after(&mut response, retry_after_secs);
    }
    if refusal.status == StatusCode::REQUEST_TIMEOUT {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
