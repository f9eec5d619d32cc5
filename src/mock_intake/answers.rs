//! The answers the mock builds: statuses it can send, and JSON bodies.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::Body;
use crate::intake_api::{ApiError, Endpoint, ErrorResponse, EventIdResponse, EventIdsResponse};

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

pub(super) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
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

pub(super) fn error_response(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(
        status,
        &ErrorResponse {
            message: message.into(),
        },
    )
}

pub(super) fn api_error(e: &ApiError) -> Response<Body> {
    json_response(answer_status(e.status), &e.body())
}

/// 200 with `count` fresh ids: `{"event_id"}` where the endpoint answers one id and there is
/// one, `{"event_ids"}` otherwise.
pub(super) fn ids_response(endpoint: Endpoint, count: usize) -> Response<Body> {
    let new_id = || uuid::Uuid::new_v4().to_string();
    if endpoint.answers_single_id() && count == 1 {
        return json_response(StatusCode::OK, &EventIdResponse { event_id: new_id() });
    }
    let event_ids = (0..count).map(|_| new_id()).collect();
    json_response(StatusCode::OK, &EventIdsResponse { event_ids })
}
