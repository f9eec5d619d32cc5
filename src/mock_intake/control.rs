//! The control API under `/_mock/`: set and read the faults, read and forget the events, read the
//! stats.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::answers::{api_error, error_response, json_response};
use super::intake::{read_body, too_large, BodyError};
use super::state::Shared;
use super::{Body, FaultConfig};

/// Prefix of the control API's paths.
pub(super) const CONTROL_PREFIX: &str = "/_mock/";
/// Largest body of a control request.
const MAX_CONTROL_BODY_BYTES: usize = 1024 * 1024;

pub(super) async fn control(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
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
