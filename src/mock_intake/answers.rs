//! The answers the mock builds: the statuses it can send, and its JSON bodies (the intake's own
//! answers, 200, 404 and 405, are [`intake_api`](crate::intake_api)'s).

use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::Body;
use crate::intake_api::{json_answer, Answer, ApiError, Refusal};

/// `status` if the mock can answer it.
pub(super) fn answerable(status: u16) -> Option<StatusCode> {
    if !(200..=599).contains(&status) {
        return None;
    }
    StatusCode::from_u16(status).ok()
}

/// `status`, or 500 if it cannot be answered (a config set in-process without validation).
pub(super) fn answer_status(status: u16) -> StatusCode {
    answerable(status).unwrap_or_else(|| {
        tracing::warn!(
            status,
            "mock intake: cannot answer this status, answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    })
}

/// `value` as a JSON answer (the control API's).
pub(super) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    mock_body(json_answer(status, value))
}

pub(super) fn error_response(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    mock_body(Refusal::new(status, message).answer())
}

pub(super) fn api_error(e: &ApiError) -> Response<Body> {
    json_response(answer_status(e.status), &e.body())
}

/// An answer of [`intake_api`](crate::intake_api), with the mock's body type.
pub(super) fn mock_body(answer: Answer) -> Response<Body> {
    answer.map(Full::new)
}
