//! One intake request to the mock: its route, body, scripted fault, parse and persistent rules,
//! in the order the module doc gives, then the recording of its events.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, LOCATION, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};

use super::answers::{answer_status, api_error, error_response, mock_body};
use super::connections::NoAnswer;
use super::state::Shared;
use super::{Body, FaultConfig, ScriptedFault};
use crate::intake_api::redact_key;
use crate::intake_api::{
    acknowledgement, parse_request, route, ApiError, BodyEncoding, Endpoint, IncomingEvent, Limits,
    RequestMeta, MAX_BODY_BYTES,
};

/// How much of a too-large body is still read (and thrown away) so that the client, which is
/// still sending, gets to read the 413 rather than a reset connection.
const MAX_DRAINED_BYTES: u64 = 64 * 1024 * 1024;

/// What to do with an intake request.
enum Outcome {
    Answer(Response<Body>),
    /// Close the connection without answering (a `drop` fault).
    Drop,
    /// The client went away while sending; nothing to answer.
    Gone(hyper::Error),
}

pub(super) async fn intake(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, NoAnswer> {
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
    let endpoint = match route(req.method(), req.uri().path()) {
        Ok(endpoint) => endpoint,
        Err(refusal) => {
            shared.begin_request_unrouted();
            return (Outcome::Answer(mock_body(refusal.answer())), Duration::ZERO);
        }
    };
    let scripted = shared.begin_request();
    let delay = match scripted {
        Some(ScriptedFault::Slow { delay_ms, .. }) => Duration::from_millis(delay_ms),
        _ => Duration::ZERO,
    };
    (accept(shared, endpoint, req, scripted).await, delay)
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
            mock_body(acknowledgement(endpoint, ids))
        }
        _ => {
            tracing::debug!(
                endpoint = ?endpoint,
                events = count,
                key = %key,
                "mock intake accepted a request"
            );
            mock_body(acknowledgement(endpoint, count))
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
pub(super) enum BodyError {
    /// The body is bigger than the limit; `size` is how much of it was seen.
    TooLarge {
        size: u64,
    },
    Read(hyper::Error),
}

/// Reads a body of at most `limit` bytes. A bigger one is still read (up to
/// [`MAX_DRAINED_BYTES`]) and thrown away, so that the client gets to read the 413.
pub(super) async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
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

pub(super) fn too_large(size: u64, limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "the body is {size} bytes or more, over the limit of {limit} bytes"
    ))
}
