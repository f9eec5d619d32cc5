//! One request to the intake's `/jsons`, and what its answer means for the events it carried.

use std::time::Duration;

use bytes::Bytes;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};

use super::retry::parse_retry_after;
use crate::config::{Compression, IntakeConfig};
use crate::intake_api::{self, check_ack, EVENT_TIMESTAMP_HEADER, INTAKE_KEY_HEADER};

/// What an answer means for the events of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx with one event id per event: the events may leave the queue.
    Acked,
    /// Try the same events again later (connection error, timeout, 429, 5xx, an answer that
    /// does not acknowledge every event, an unexpected status).
    Retry {
        retry_after: Option<Duration>,
        reason: String,
    },
    /// 413: the request is too large; smaller requests may pass.
    TooLarge { reason: String },
    /// 400: something in the request is refused; sending it again will not help.
    Rejected { status: u16, reason: String },
    /// 401/403: the intake key is wrong or revoked.
    AuthFailed { status: u16, reason: String },
}

/// The HTTP client of the intake.
#[derive(Debug, Clone)]
pub struct IntakeClient {
    http: reqwest::Client,
    endpoint: String,
    gzip: bool,
}

/// The longest part of an error answer kept in logs and dead letters.
const REASON_MAX: usize = 512;

impl IntakeClient {
    pub fn new(config: &IntakeConfig) -> Result<IntakeClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout())
            .connect_timeout(config.request_timeout().min(Duration::from_secs(10)))
            .user_agent(concat!("sekoia-forwarder/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(50))
            .build()?;
        Ok(IntakeClient {
            http,
            endpoint: format!("{}/jsons", config.url.as_str().trim_end_matches('/')),
            gzip: config.compression == Compression::Gzip,
        })
    }

    /// The URL batches are POSTed to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// POSTs `body` (a JSON list of `events` strings) and classifies the answer.
    pub async fn send(
        &self,
        intake_key: &str,
        timestamp: Option<&str>,
        body: Bytes,
        events: usize,
    ) -> Outcome {
        let headers = match headers(intake_key, timestamp, self.gzip) {
            Ok(h) => h,
            Err(reason) => {
                return Outcome::Rejected {
                    status: 400,
                    reason,
                }
            }
        };
        let body = if self.gzip {
            match tokio::task::spawn_blocking(move || gzip(&body)).await {
                Ok(Ok(compressed)) => Bytes::from(compressed),
                _ => {
                    return Outcome::Retry {
                        retry_after: None,
                        reason: "cannot compress the request body".into(),
                    }
                }
            }
        } else {
            body
        };
        let answer = self
            .http
            .post(&self.endpoint)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    retry_after: None,
                    reason: describe_error(&e),
                }
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Retry {
                    retry_after,
                    reason: format!("answer {status} cut short: {}", describe_error(&e)),
                }
            }
        };
        classify(status, &body, events, retry_after)
    }
}

fn headers(intake_key: &str, timestamp: Option<&str>, gzip: bool) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let mut key = HeaderValue::from_str(intake_key)
        .map_err(|_| "the intake key has characters not allowed in a header".to_owned())?;
    key.set_sensitive(true);
    headers.insert(INTAKE_KEY_HEADER, key);
    if let Some(ts) = timestamp {
        let ts = HeaderValue::from_str(ts)
            .map_err(|_| "the event timestamp has characters not allowed in a header".to_owned())?;
        headers.insert(EVENT_TIMESTAMP_HEADER, ts);
    }
    Ok(headers)
}

/// What an answer means; pure, so that every case is unit-tested.
pub fn classify(status: u16, body: &[u8], events: usize, retry_after: Option<Duration>) -> Outcome {
    let reason = || format!("{status}: {}", trimmed(body));
    match status {
        200..=299 => match check_ack(body, events) {
            Ok(_) => Outcome::Acked,
            Err(e) => Outcome::Retry {
                retry_after,
                reason: format!("{status} does not acknowledge the batch: {e}"),
            },
        },
        400 => Outcome::Rejected {
            status,
            reason: reason(),
        },
        401 | 403 => Outcome::AuthFailed {
            status,
            reason: reason(),
        },
        413 => Outcome::TooLarge { reason: reason() },
        _ => Outcome::Retry {
            retry_after,
            reason: reason(),
        },
    }
}

fn trimmed(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_MAX)]);
    text.trim().replace('\n', " ")
}

fn describe_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "answer unreadable"
    } else {
        "request failed"
    };
    // reqwest's Display names the URL, never the headers, so the key cannot leak here.
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// gzip at the fastest level: the point is bandwidth on slow links, not the best ratio.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// The largest body sent in one request: the intake's limit.
pub const MAX_REQUEST_BODY: usize = intake_api::MAX_BODY_BYTES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_needs_one_id_per_event() {
        assert_eq!(
            classify(200, br#"{"event_ids":["a","b"]}"#, 2, None),
            Outcome::Acked
        );
        assert!(matches!(
            classify(200, br#"{"event_ids":["a"]}"#, 2, None),
            Outcome::Retry { .. }
        ));
        assert!(matches!(classify(202, b"", 2, None), Outcome::Retry { .. }));
    }

    #[test]
    fn statuses_map_to_their_handling() {
        assert!(matches!(
            classify(400, b"bad", 1, None),
            Outcome::Rejected { status: 400, .. }
        ));
        assert!(matches!(
            classify(401, b"", 1, None),
            Outcome::AuthFailed { status: 401, .. }
        ));
        assert!(matches!(
            classify(403, b"", 1, None),
            Outcome::AuthFailed { status: 403, .. }
        ));
        assert!(matches!(
            classify(413, b"", 1, None),
            Outcome::TooLarge { .. }
        ));
        let ra = Some(Duration::from_secs(3));
        assert_eq!(
            classify(429, b"slow down", 1, ra),
            Outcome::Retry {
                retry_after: ra,
                reason: "429: slow down".into()
            }
        );
        assert!(matches!(classify(503, b"", 1, None), Outcome::Retry { .. }));
        assert!(matches!(classify(404, b"", 1, None), Outcome::Retry { .. }));
    }
}
