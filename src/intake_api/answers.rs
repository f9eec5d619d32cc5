//! The intake's answers that do not depend on who serves them: the 200 acknowledgement, and the
//! 404 and 405 of a request to no endpoint.
//!
//! Why here: the HTTP source and the mock intake must answer a sender exactly as the intake
//! does, and each used to build these answers itself, with different messages. They are built
//! once, with the body as bytes; each server maps the body to its own type
//! (`answer.map(Body::from)` for axum, `answer.map(Full::new)` for the mock's hyper) and adds
//! its own headers (the source's `Retry-After`, say).

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, StatusCode};
use serde::Serialize;

use super::{ApiError, Endpoint, ErrorResponse, EventIdResponse, EventIdsResponse};

/// An answer with its JSON body as bytes, ready to be given the body type of a server.
pub type Answer = http::Response<Bytes>;

/// The only method the intake's endpoints take.
pub const INTAKE_METHOD: &str = "POST";

/// `value` as a JSON answer with `status`. None of the API's types can fail to serialise; if
/// one did, the answer is a 500 with a text body rather than a panic.
pub fn json_answer<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    let (status, body, json) = match serde_json::to_vec(value) {
        Ok(body) => (status, Bytes::from(body), true),
        Err(e) => {
            tracing::warn!(error = %e, "cannot serialise an answer");
            let text = Bytes::from_static(b"serialization error");
            (StatusCode::INTERNAL_SERVER_ERROR, text, false)
        }
    };
    let mut answer = http::Response::new(body);
    *answer.status_mut() = status;
    if json {
        answer
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    answer
}

/// The 200 answer to a request whose events are kept, with `ids` fresh ids: `{"event_id"}`
/// where the endpoint answers one id (`/plain`, `/`) and there is one, `{"event_ids": [...]}`
/// otherwise. (Those endpoints carry one event; only a mock told to answer the wrong number of
/// ids gets a list there.)
pub fn acknowledgement(endpoint: Endpoint, ids: usize) -> Answer {
    let new_id = || uuid::Uuid::new_v4().to_string();
    if endpoint.answers_single_id() && ids == 1 {
        return json_answer(StatusCode::OK, &EventIdResponse { event_id: new_id() });
    }
    let event_ids = (0..ids).map(|_| new_id()).collect();
    json_answer(StatusCode::OK, &EventIdsResponse { event_ids })
}

/// The endpoint a request is for, or its refusal: 404 at a path that is no endpoint, 405 for
/// a method other than POST.
pub fn route(method: &Method, path: &str) -> Result<Endpoint, Refusal> {
    let endpoint = Endpoint::from_path(path).ok_or_else(|| Refusal::not_found(path))?;
    if method != Method::POST {
        return Err(Refusal::method_not_allowed(path, INTAKE_METHOD));
    }
    Ok(endpoint)
}

/// A refused request: its status, a message that says what to do, and the `Allow` of a 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            allow: None,
        }
    }

    /// 404: no endpoint at `path`; the message lists the endpoints.
    pub fn not_found(path: &str) -> Refusal {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint at {path}: POST to /plain, /plain/batch, /jsons, /array, / or /batch"
            ),
        )
    }

    /// 405: `path` takes only the methods of `allow` (an `Allow` header value).
    pub fn method_not_allowed(path: &str, allow: &'static str) -> Refusal {
        Refusal {
            allow: Some(allow),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} accepts {allow} only"),
            )
        }
    }

    /// The JSON answer `{"message"}`, with `Allow` on a 405.
    pub fn answer(&self) -> Answer {
        let mut answer = json_answer(
            self.status,
            &ErrorResponse {
                message: self.message.clone(),
            },
        );
        if let Some(allow) = self.allow {
            answer
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        answer
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        Refusal::new(status, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(answer: &Answer) -> serde_json::Value {
        assert_eq!(answer.headers()[CONTENT_TYPE], "application/json");
        serde_json::from_slice(answer.body()).unwrap()
    }

    #[test]
    fn acknowledgements_have_one_id_per_event() {
        let one = json(&acknowledgement(Endpoint::Plain, 1));
        assert!(one["event_id"].is_string(), "{one}");
        let many = json(&acknowledgement(Endpoint::Jsons, 3));
        assert_eq!(
            many["event_ids"].as_array().map(Vec::len),
            Some(3),
            "{many}"
        );
        let wrong = json(&acknowledgement(Endpoint::Plain, 2));
        assert_eq!(wrong["event_ids"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn unrouted_requests_get_404_or_405_with_allow() {
        let missing = route(&Method::POST, "/nope").unwrap_err().answer();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(json(&missing)["message"]
            .as_str()
            .unwrap()
            .contains("/jsons"));
        let get = route(&Method::GET, "/jsons").unwrap_err().answer();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[ALLOW], "POST");
        assert_eq!(route(&Method::POST, "/jsons/"), Ok(Endpoint::Jsons));
    }
}
