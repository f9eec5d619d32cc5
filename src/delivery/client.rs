//! One request to the intake's `/jsons`, and what its answer means for the events it carried.
//!
//! Redirects are never followed: the intake key would travel to wherever the `Location` points
//! (another host, plain http), and a 301/302/303 would turn the POST into a GET without its
//! events, whose 2xx could then pass for an acknowledgement. A 3xx is a failed try.
//!
//! A request that cannot be built is a local failure, never classified as an answer of the
//! intake: see [`Headers::new`].

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use reqwest::header::{
    HeaderMap, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, LOCATION, RETRY_AFTER,
};

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
    /// 3xx: the intake sends us elsewhere (`to`: the host of the `Location`). Not followed;
    /// nothing was delivered.
    Redirected { status: u16, to: String },
}

/// The longest event date sent as a header. Dates are checked at ingest; this bounds what was
/// queued before that, so that a huge one cannot draw a 431 retried for ever. An RFC 3339
/// date with nanoseconds and an offset is 35 bytes.
pub const MAX_DATE_HEADER_BYTES: usize = 128;

/// Why the events of a batch cannot be sent at all: a local failure, not an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsendable {
    #[error("the intake key has characters not allowed in a header")]
    Key,
}

/// Why the event date of a batch is left out of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DateLeftOut {
    #[error("it has characters not allowed in a header")]
    Characters,
    #[error("it is longer than {MAX_DATE_HEADER_BYTES} bytes")]
    Length,
}

/// The headers of every request of one batch, built once before the first request, so that
/// sending cannot fail to build them: a local failure is dealt with before anything is sent,
/// and never mistaken for the intake's answer.
#[derive(Debug, Clone)]
pub struct Headers {
    map: HeaderMap,
    /// Set when the batch's event date could not be sent: its requests go without it, and the
    /// intake dates the events at reception (what it does for events sent without a date).
    pub date_left_out: Option<DateLeftOut>,
}

impl Headers {
    pub fn new(
        intake_key: &str,
        timestamp: Option<&str>,
        gzip: bool,
    ) -> Result<Headers, Unsendable> {
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if gzip {
            map.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let mut key = HeaderValue::from_str(intake_key).map_err(|_| Unsendable::Key)?;
        key.set_sensitive(true);
        map.insert(INTAKE_KEY_HEADER, key);
        let mut date_left_out = None;
        if let Some(ts) = timestamp {
            if ts.len() > MAX_DATE_HEADER_BYTES {
                date_left_out = Some(DateLeftOut::Length);
            } else {
                match HeaderValue::from_str(ts) {
                    Ok(value) => {
                        map.insert(EVENT_TIMESTAMP_HEADER, value);
                    }
                    Err(_) => date_left_out = Some(DateLeftOut::Characters),
                }
            }
        }
        Ok(Headers { map, date_left_out })
    }
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
            .redirect(reqwest::redirect::Policy::none())
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

    /// The headers of the requests of a batch of `intake_key` with event date `timestamp`.
    pub fn headers(
        &self,
        intake_key: &str,
        timestamp: Option<&str>,
    ) -> Result<Headers, Unsendable> {
        Headers::new(intake_key, timestamp, self.gzip)
    }

    /// POSTs `body` (a JSON list of `events` strings) and classifies the answer.
    pub async fn send(&self, headers: &Headers, body: Bytes, events: usize) -> Outcome {
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
            .headers(headers.map.clone())
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
        if response.status().is_redirection() {
            let to = redirect_host(&self.endpoint, response.headers().get(LOCATION));
            return Outcome::Redirected { status, to };
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
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

/// The host (and port) a redirect points to, for the log: the `Location` resolved against
/// the endpoint (it may be relative). Only the host: a path or query may hold a token.
fn redirect_host(endpoint: &str, location: Option<&HeaderValue>) -> String {
    let Some(location) = location else {
        return "(no Location header)".into();
    };
    let target = location
        .to_str()
        .ok()
        .and_then(|l| reqwest::Url::parse(endpoint).ok()?.join(l).ok());
    match target {
        Some(url) => match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
            (Some(host), None) => format!("{}://{host}", url.scheme()),
            _ => format!("{}: (no host)", url.scheme()),
        },
        None => "(unreadable Location header)".into(),
    }
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

    #[test]
    fn a_redirect_is_logged_by_its_host_only() {
        let endpoint = "https://intake.sekoia.io/jsons";
        let host = |l: &str| redirect_host(endpoint, Some(&HeaderValue::from_str(l).unwrap()));
        assert_eq!(
            host("http://evil.example:8080/steal?token=secret"),
            "http://evil.example:8080"
        );
        assert_eq!(host("/elsewhere"), "https://intake.sekoia.io:443");
        assert_eq!(redirect_host(endpoint, None), "(no Location header)");
    }

    #[test]
    fn headers_that_cannot_be_sent_are_local_failures() {
        assert_eq!(
            Headers::new("bad\nkey", None, false).err(),
            Some(Unsendable::Key)
        );
        let ok = Headers::new("key", Some("2024-01-01T00:00:00Z"), false).unwrap();
        assert_eq!(ok.date_left_out, None);
        assert!(ok.map.contains_key(EVENT_TIMESTAMP_HEADER));
        let bad = Headers::new("key", Some("2024\n"), false).unwrap();
        assert_eq!(bad.date_left_out, Some(DateLeftOut::Characters));
        assert!(!bad.map.contains_key(EVENT_TIMESTAMP_HEADER));
        let long = "9".repeat(MAX_DATE_HEADER_BYTES + 1);
        let bad = Headers::new("key", Some(&long), true).unwrap();
        assert_eq!(bad.date_left_out, Some(DateLeftOut::Length));
        assert!(bad.map.contains_key(CONTENT_ENCODING));
        assert!(bad.map.get(INTAKE_KEY_HEADER).unwrap().is_sensitive());
    }
}
