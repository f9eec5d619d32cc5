//! The Sekoia.io intake HTTP API: one implementation, shared by everyone who speaks it.
//!
//! Three parts of the crate talk this protocol: the local HTTP source (which mimics the intake so
//! that applications written for Sekoia only change a URL), the delivery client (which sends to the
//! real intake) and the mock intake used by tests and `sekoia-forwarder mock-intake`. They all use
//! the types and the request parser below, and the two servers the answers of [`answers`]
//! (acknowledgement, 404, 405), so that they cannot drift apart.
//!
//! The API is described in `shared/intake-api.md`; the limits come from Sekoia's own SDK
//! (`shared/notes/sekoia-intake.md`).

use base64::Engine;
use serde::{Deserialize, Serialize};

mod answers;

pub use answers::{acknowledgement, json_answer, route, Answer, Refusal, INTAKE_METHOD};

/// Header that carries the intake key.
pub const INTAKE_KEY_HEADER: &str = "X-SEKOIAIO-INTAKE-KEY";
/// Header that carries the event date of every event of the request.
pub const EVENT_TIMESTAMP_HEADER: &str = "X-SEKOIAIO-EVENT-TIMESTAMP";
/// Query string parameter that may carry the intake key.
pub const INTAKE_KEY_QUERY: &str = "intake_key";
/// Largest request body the real intake accepts.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Largest single event the real intake accepts (Sekoia's SDK drops longer ones).
pub const MAX_EVENT_BYTES: usize = 250_000;
/// Longest intake key taken. A key goes back out in a header of every request to the intake;
/// Sekoia's keys are a few dozen characters, and a longer one could only draw a 431 there.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest event date taken, as sent. The longest RFC 3339 date is 35 bytes; the bound leaves
/// room for the other forms and keeps a bad value from costing more than a glance.
pub const MAX_DATE_BYTES: usize = 64;

/// Answer to a request that carried one event (`/plain`, `/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventIdResponse {
    pub event_id: String,
}

/// Answer to a request that carried a list of events (`/plain/batch`, `/jsons`, `/array`, `/batch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventIdsResponse {
    pub event_ids: Vec<String>,
}

/// Body of an error answer. The real intake's error bodies are not documented; this one says
/// what is wrong in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub message: String,
}

/// One element of the `/array` endpoint's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArrayItem {
    pub intake_key: String,
    pub json: EventText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// Body of the structured endpoint `/` (one event).
///
/// Sekoia's documentation spells the key field `intakey_key` in one table and `intake_key` in
/// its examples: both are accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StructuredEvent {
    #[serde(alias = "intakey_key")]
    pub intake_key: String,
    pub json: EventText,
    #[serde(
        default,
        rename = "@timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<String>,
}

/// Body of the structured endpoint `/batch` (many events, one key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StructuredBatch {
    #[serde(alias = "intakey_key")]
    pub intake_key: String,
    pub jsons: Vec<EventText>,
    #[serde(
        default,
        rename = "@timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<String>,
}

/// The intake's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /plain`: the body is one event.
    Plain,
    /// `POST /plain/batch`: one event per line.
    PlainBatch,
    /// `POST /jsons`: a JSON list of events, the key in a header, the query or Basic auth.
    Jsons,
    /// `POST /array`: a JSON list of `{intake_key, json, timestamp}`.
    Array,
    /// `POST /`: `{intake_key, json, @timestamp}`.
    Structured,
    /// `POST /batch`: `{intake_key, jsons, @timestamp}`.
    StructuredBatch,
}

impl Endpoint {
    /// The endpoint served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let path = path.trim_end_matches('/');
        match path {
            "" => Some(Endpoint::Structured),
            "/plain" => Some(Endpoint::Plain),
            "/plain/batch" => Some(Endpoint::PlainBatch),
            "/jsons" => Some(Endpoint::Jsons),
            "/array" => Some(Endpoint::Array),
            "/batch" => Some(Endpoint::StructuredBatch),
            _ => None,
        }
    }

    /// Whether the answer carries one id (`event_id`) rather than a list (`event_ids`).
    pub fn answers_single_id(self) -> bool {
        matches!(self, Endpoint::Plain | Endpoint::Structured)
    }
}

/// What a request says besides its body: where the key and the event date may come from.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// Value of the `X-SEKOIAIO-INTAKE-KEY` header.
    pub header_key: Option<String>,
    /// Value of the `Authorization` header (HTTP Basic: the key is the password).
    pub authorization: Option<String>,
    /// Query string of the request URI, without the `?`.
    pub query: Option<String>,
    /// Value of the `X-SEKOIAIO-EVENT-TIMESTAMP` header.
    pub event_timestamp: Option<String>,
}

impl RequestMeta {
    /// The intake key given outside the body: header first, then Basic password, then query.
    pub fn intake_key(&self) -> Option<String> {
        if let Some(key) = self.header_key.as_deref().filter(|k| !k.is_empty()) {
            return Some(key.to_owned());
        }
        if let Some(key) = self.authorization.as_deref().and_then(basic_password) {
            return Some(key);
        }
        self.query.as_deref().and_then(query_key)
    }
}

impl RequestMeta {
    /// What a request says besides its body, from its headers and URI.
    ///
    /// A value that is not visible ASCII is kept (made UTF-8), not dropped: dropping it would
    /// turn a bad key into "no key" and a bad date into "no date", where the sender needs to
    /// hear what is wrong with the value it sent. The parser refuses it and says why.
    pub fn from_request(headers: &http::HeaderMap, uri: &http::Uri) -> RequestMeta {
        let header = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        RequestMeta {
            header_key: header(INTAKE_KEY_HEADER),
            authorization: header(http::header::AUTHORIZATION.as_str()),
            query: uri.query().map(str::to_owned),
            event_timestamp: header(EVENT_TIMESTAMP_HEADER),
        }
    }
}

/// How a request body is encoded (`Content-Encoding`); the intake takes gzip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Identity,
    Gzip,
}

impl BodyEncoding {
    /// The encoding a `Content-Encoding` header names; 415 for one the intake does not take.
    pub fn from_headers(headers: &http::HeaderMap) -> Result<BodyEncoding, ApiError> {
        let Some(value) = headers.get(http::header::CONTENT_ENCODING) else {
            return Ok(BodyEncoding::Identity);
        };
        let value = String::from_utf8_lossy(value.as_bytes())
            .trim()
            .to_ascii_lowercase();
        match value.as_str() {
            "" | "identity" => Ok(BodyEncoding::Identity),
            "gzip" | "x-gzip" => Ok(BodyEncoding::Gzip),
            other => Err(ApiError {
                status: 415,
                message: format!(
                    "unsupported Content-Encoding `{other}`: send the body as is or gzip-compressed"
                ),
            }),
        }
    }

    /// The body as the parser needs it, refusing to inflate a gzip body beyond `max` bytes (a
    /// small body may decompress to gigabytes): 400 for bad gzip, 413 beyond the limit.
    pub fn decode(self, body: bytes::Bytes, max: usize) -> Result<bytes::Bytes, ApiError> {
        use std::io::Read;
        match self {
            BodyEncoding::Identity => Ok(body),
            BodyEncoding::Gzip => {
                let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
                let mut out = Vec::new();
                flate2::read::MultiGzDecoder::new(&body[..])
                    .take(limit)
                    .read_to_end(&mut out)
                    .map_err(|e| {
                        ApiError::bad_request(format!("the body is not valid gzip: {e}"))
                    })?;
                if out.len() > max {
                    return Err(ApiError::too_large(format!(
                        "the body is over {max} bytes once decompressed"
                    )));
                }
                Ok(out.into())
            }
        }
    }
}

/// The password of an HTTP Basic `Authorization` header value.
fn basic_password(value: &str) -> Option<String> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// The `intake_key` parameter of a query string.
fn query_key(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == INTAKE_KEY_QUERY)
        .map(|(_, value)| value.into_owned())
        .filter(|v| !v.is_empty())
}

/// One event taken from a request, with the key and date it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingEvent {
    pub intake_key: String,
    /// The event date given by the sender, if any, checked and normalised ([`normalize_date`]).
    pub timestamp: Option<String>,
    /// The event itself, as the intake will receive it.
    pub raw: String,
}

/// Shows enough of an intake key to tell keys apart, never enough to use it: what logs,
/// `status`, metrics and dead-letter listings show of a key.
pub fn redact_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() >= 16 {
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("…{tail}")
    } else {
        "…".to_owned()
    }
}

/// A request the intake refuses, with the status it answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 401,
            message: message.into(),
        }
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 413,
            message: message.into(),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            message: self.message.clone(),
        }
    }
}

/// Limits applied while parsing a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: MAX_EVENT_BYTES,
        }
    }
}

/// Parses a request to `endpoint` into its events, or says why the intake refuses it.
///
/// Decisions, made on purpose:
/// - a body that is not UTF-8 (`/plain`, `/plain/batch`) or not the expected JSON is a 400 that
///   names the problem; nothing of the request is kept, so the sender still has it all;
/// - a missing key is a 401, and so is a key that could never travel in the header of a
///   request to the intake (not visible ASCII, or over [`MAX_KEY_BYTES`]); an event over
///   `max_event_bytes` is a 413 for the whole request, since the intake could never accept it;
/// - an event date (the `X-SEKOIAIO-EVENT-TIMESTAMP` header, `@timestamp`, an `/array`
///   element's `timestamp`) that is not a date is a 400 that names where it was: here the
///   sender still has its events, while at delivery the date could only fail a request that
///   carries other events too. A good date is normalised ([`normalize_date`]);
/// - an event in a JSON list that is not a string (an object, a number) is kept as its compact
///   JSON text, which is what the intake would have received had the sender quoted it;
/// - `/plain/batch` ignores empty lines and a `\r` before each `\n`;
/// - a request with no event at all is a 400.
pub fn parse_request(
    endpoint: Endpoint,
    meta: &RequestMeta,
    body: &[u8],
    limits: Limits,
) -> Result<Vec<IncomingEvent>, ApiError> {
    let events = match endpoint {
        Endpoint::Plain => {
            let key = require_key(meta)?;
            let text = utf8(body)?;
            if text.is_empty() {
                return Err(ApiError::bad_request(
                    "the body is empty: /plain takes one event",
                ));
            }
            vec![IncomingEvent {
                intake_key: key,
                timestamp: header_date(meta)?,
                raw: text.to_owned(),
            }]
        }
        Endpoint::PlainBatch => {
            let key = require_key(meta)?;
            let timestamp = header_date(meta)?;
            let text = utf8(body)?;
            text.split('\n')
                .map(|line| line.strip_suffix('\r').unwrap_or(line))
                .filter(|line| !line.is_empty())
                .map(|line| IncomingEvent {
                    intake_key: key.clone(),
                    timestamp: timestamp.clone(),
                    raw: line.to_owned(),
                })
                .collect()
        }
        Endpoint::Jsons => {
            let key = require_key(meta)?;
            let timestamp = header_date(meta)?;
            let values: Vec<EventText> = json(body, "a JSON list of events")?;
            values
                .into_iter()
                .map(|v| IncomingEvent {
                    intake_key: key.clone(),
                    timestamp: timestamp.clone(),
                    raw: value_text(v),
                })
                .collect()
        }
        Endpoint::Array => {
            let items: Vec<ArrayItem> = json(
                body,
                "a JSON list of objects {\"intake_key\", \"json\", \"timestamp\"}",
            )?;
            let mut events = Vec::with_capacity(items.len());
            // Senders often give many elements the same date: it is parsed once.
            let mut last_date: Option<(String, String)> = None;
            for (i, item) in items.into_iter().enumerate() {
                if item.intake_key.is_empty() {
                    return Err(ApiError::unauthorized(format!(
                        "element {i} has an empty intake_key"
                    )));
                }
                let timestamp = match item.timestamp {
                    None => None,
                    Some(sent) => match &last_date {
                        Some((prev, normal)) if *prev == sent => Some(normal.clone()),
                        _ => {
                            let normal = checked_date(&sent, DateSource::Element(i))?;
                            last_date = Some((sent, normal.clone()));
                            Some(normal)
                        }
                    },
                };
                events.push(IncomingEvent {
                    intake_key: item.intake_key,
                    timestamp,
                    raw: value_text(item.json),
                });
            }
            events
        }
        Endpoint::Structured => {
            let event: StructuredEvent = json(
                body,
                "a JSON object {\"intake_key\", \"json\", \"@timestamp\"}",
            )?;
            let key = body_key(event.intake_key, meta)?;
            vec![IncomingEvent {
                intake_key: key,
                timestamp: body_or_header_date(event.timestamp, meta)?,
                raw: value_text(event.json),
            }]
        }
        Endpoint::StructuredBatch => {
            let batch: StructuredBatch = json(
                body,
                "a JSON object {\"intake_key\", \"jsons\": [...], \"@timestamp\"}",
            )?;
            let key = body_key(batch.intake_key, meta)?;
            let timestamp = body_or_header_date(batch.timestamp, meta)?;
            batch
                .jsons
                .into_iter()
                .map(|v| IncomingEvent {
                    intake_key: key.clone(),
                    timestamp: timestamp.clone(),
                    raw: value_text(v),
                })
                .collect()
        }
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("the request carries no event"));
    }
    check_keys(&events)?;
    if let Some((i, e)) = events
        .iter()
        .enumerate()
        .find(|(_, e)| e.raw.len() > limits.max_event_bytes)
    {
        return Err(ApiError::too_large(format!(
            "event {i} is {} bytes, over the intake's limit of {} bytes per event",
            e.raw.len(),
            limits.max_event_bytes
        )));
    }
    Ok(events)
}

/// Refuses a key that could never be delivered: it travels in an HTTP header, so it must be
/// visible ASCII, and short enough for any server to take the header. (A key from a JSON body
/// could hold anything.)
fn check_keys(events: &[IncomingEvent]) -> Result<(), ApiError> {
    let mut last: Option<&str> = None;
    for e in events {
        if last == Some(e.intake_key.as_str()) {
            continue;
        }
        let key = e.intake_key.as_str();
        if key.len() > MAX_KEY_BYTES {
            return Err(ApiError::unauthorized(format!(
                "the intake key is {} bytes; an intake key is at most {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::unauthorized(
                "the intake key has characters an intake key cannot have (only visible ASCII)",
            ));
        }
        last = Some(key);
    }
    Ok(())
}

/// Why a sender's event date is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DateError {
    #[error("is {0} bytes; a date is at most {MAX_DATE_BYTES}")]
    TooLong(usize),
    #[error(
        "is not a date: give RFC 3339 / ISO 8601 (2021-04-05T21:33:31+02:00, \
         2021-04-05T19:33:31.123Z) or an HTTP date (Mon, 05 Apr 2021 19:33:31 GMT)"
    )]
    NotADate,
}

/// Checks an event date and gives it in the one form the forwarder sends on.
///
/// The intake documents its dates as "Datetime" with RFC 3339 examples, and Sekoia's Logstash
/// guide sends Logstash's `@timestamp` (`2021-04-05T19:33:31.123Z`). Taken:
/// - RFC 3339, also with a space or `t` between date and time, a lowercase `z`, or an offset
///   without a colon (`+0200`): sent as RFC 3339 with the same offset (`Z` for UTC),
///   fractional seconds in 0, 3, 6 or 9 digits;
/// - RFC 2822 / HTTP dates (`Mon, 05 Apr 2021 19:33:31 GMT`): sent as RFC 3339, same instant
///   and offset;
/// - ISO 8601 without an offset (`2021-04-05T19:33:31`, as Python's `isoformat()` gives):
///   sent as ISO 8601 without an offset, `T` between date and time. The forwarder does not
///   guess a time zone; the intake reads it as it would have read it from the sender.
///
/// Whatever is sent on is visible ASCII and at most 35 bytes, so it always makes a header.
pub fn normalize_date(sent: &str) -> Result<String, DateError> {
    use chrono::{DateTime, NaiveDateTime, SecondsFormat};
    if sent.len() > MAX_DATE_BYTES {
        return Err(DateError::TooLong(sent.len()));
    }
    let text = sent.trim();
    if let Ok(date) = DateTime::parse_from_rfc2822(text) {
        return Ok(date.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    }
    // ISO 8601 from here on; chrono would also take years of more than 4 digits or signed
    // ones, which ISO 8601 allows only by agreement and RFC 3339 not at all.
    let bytes = text.as_bytes();
    if bytes.len() < 11 || !bytes[..4].iter().all(u8::is_ascii_digit) || bytes[4] != b'-' {
        return Err(DateError::NotADate);
    }
    let iso = match bytes[10] {
        b' ' | b't' => format!("{}T{}", &text[..10], &text[11..]),
        _ => text.to_owned(),
    };
    let with_offset = DateTime::parse_from_rfc3339(&iso)
        // ISO 8601's offset without a colon (`+0200`, as strftime's %z gives).
        .or_else(|_| DateTime::parse_from_str(&iso, "%Y-%m-%dT%H:%M:%S%.f%z"));
    if let Ok(date) = with_offset {
        return Ok(date.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    }
    match NaiveDateTime::parse_from_str(&iso, "%Y-%m-%dT%H:%M:%S%.f") {
        Ok(date) => Ok(date.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
        Err(_) => Err(DateError::NotADate),
    }
}

/// The event date of events received at `received_at_ms` (ms since the Unix epoch, UTC):
/// RFC 3339 in UTC with milliseconds (`2026-12-02T14:39:16.123Z`, the form of Logstash's
/// `@timestamp`, which Sekoia's own guides send), what the forwarder sends in
/// `X-SEKOIAIO-EVENT-TIMESTAMP` for events without a date of their own. `None` for 0 (a
/// reception time not known) or a time chrono cannot represent.
pub fn reception_date(received_at_ms: u64) -> Option<String> {
    use chrono::{DateTime, SecondsFormat};
    if received_at_ms == 0 {
        return None;
    }
    let ms = i64::try_from(received_at_ms).ok()?;
    let date = DateTime::from_timestamp_millis(ms)?;
    Some(date.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// Where an event date was given, for the message that refuses it.
#[derive(Debug, Clone, Copy)]
enum DateSource {
    Header,
    Field,
    Element(usize),
}

/// [`normalize_date`], as a 400 that says where the date was and shows (the start of) it.
fn checked_date(sent: &str, source: DateSource) -> Result<String, ApiError> {
    normalize_date(sent).map_err(|e| {
        let place = match source {
            DateSource::Header => format!("the {EVENT_TIMESTAMP_HEADER} header"),
            DateSource::Field => "the @timestamp field".to_owned(),
            DateSource::Element(i) => format!("element {i}: its timestamp"),
        };
        let message = match e {
            DateError::TooLong(_) => format!("{place} {e}"),
            DateError::NotADate => {
                let shown: String = sent.chars().take(MAX_DATE_BYTES).collect();
                format!("{place} {shown:?} {e}")
            }
        };
        ApiError::bad_request(message)
    })
}

/// The request's `X-SEKOIAIO-EVENT-TIMESTAMP`, checked and normalised.
fn header_date(meta: &RequestMeta) -> Result<Option<String>, ApiError> {
    meta.event_timestamp
        .as_deref()
        .map(|t| checked_date(t, DateSource::Header))
        .transpose()
}

/// A body's `@timestamp` if it has one, else the header's, checked and normalised.
fn body_or_header_date(
    from_body: Option<String>,
    meta: &RequestMeta,
) -> Result<Option<String>, ApiError> {
    match from_body {
        Some(t) => checked_date(&t, DateSource::Field).map(Some),
        None => header_date(meta),
    }
}

fn require_key(meta: &RequestMeta) -> Result<String, ApiError> {
    meta.intake_key().ok_or_else(|| {
        ApiError::unauthorized(format!(
            "no intake key: give it in the {INTAKE_KEY_HEADER} header, as the HTTP Basic password, \
             or as ?{INTAKE_KEY_QUERY}="
        ))
    })
}

fn body_key(from_body: String, meta: &RequestMeta) -> Result<String, ApiError> {
    if !from_body.is_empty() {
        return Ok(from_body);
    }
    require_key(meta)
}

fn utf8(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid UTF-8 (first invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed body: expected {expected}: {e}")))
}

fn value_text(value: EventText) -> String {
    value.0
}

/// One event of a JSON body: a string as it is, anything else (an object, a number) as its
/// compact JSON text, which is what the intake would have received had the sender quoted it.
///
/// Deserialised directly, without building a `serde_json::Value` for the common case of a
/// string: this is the hot path of the HTTP source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EventText(pub String);

impl<'de> Deserialize<'de> for EventText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = EventText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event (a string, or any JSON value)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EventText, E> {
                Ok(EventText(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<EventText, E> {
                Ok(EventText(v))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<EventText, E> {
                Ok(EventText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<EventText, E> {
                Ok(EventText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<EventText, E> {
                Ok(EventText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<EventText, E> {
                Ok(EventText(serde_json::Value::from(v).to_string()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<EventText, E> {
                Ok(EventText("null".to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<EventText, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(EventText(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<EventText, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(EventText(v.to_string()))
            }
        }
        d.deserialize_any(Text)
    }
}

/// Why an answer of the intake does not acknowledge a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("the answer is not {{\"event_ids\": [...]}}: {0}")]
    Malformed(String),
    #[error("the answer has {got} event ids for {sent} events")]
    WrongCount { sent: usize, got: usize },
}

/// Checks that a 2xx answer to a batch of `sent` events acknowledges every one of them: a JSON
/// object whose `event_ids` is a list of exactly `sent` strings.
///
/// The ids are counted, not collected: nothing downstream needs them, and a batch of 10,000
/// events would otherwise cost 10,000 allocations.
pub fn check_ack(body: &[u8], sent: usize) -> Result<(), AckError> {
    let answer: IdCount =
        serde_json::from_slice(body).map_err(|e| AckError::Malformed(e.to_string()))?;
    if answer.event_ids.0 != sent {
        return Err(AckError::WrongCount {
            sent,
            got: answer.event_ids.0,
        });
    }
    Ok(())
}

/// `{"event_ids": [...]}`, keeping only how many ids there are.
#[derive(Deserialize)]
struct IdCount {
    event_ids: Counted,
}

/// The length of a JSON list of strings.
struct Counted(usize);

/// One event id: any string, looked at and dropped.
struct AnId;

impl<'de> Deserialize<'de> for AnId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Id;
        impl serde::de::Visitor<'_> for Id {
            type Value = AnId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event id (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<AnId, E> {
                Ok(AnId)
            }
        }
        d.deserialize_str(Id)
    }
}

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = Counted;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of event ids")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Counted, A::Error> {
                let mut n = 0;
                while seq.next_element::<AnId>()?.is_some() {
                    n += 1;
                }
                Ok(Counted(n))
            }
        }
        d.deserialize_seq(Count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_never_shows_a_usable_key() {
        assert_eq!(redact_key("short"), "…");
        let shown = redact_key("0123456789abcdef0123");
        assert_eq!(shown, "…0123");
    }

    fn meta_with_key() -> RequestMeta {
        RequestMeta {
            header_key: Some("KEY".into()),
            ..Default::default()
        }
    }

    #[test]
    fn key_from_header_basic_and_query() {
        assert_eq!(meta_with_key().intake_key().as_deref(), Some("KEY"));
        let basic = base64::engine::general_purpose::STANDARD.encode(":SECRET");
        let meta = RequestMeta {
            authorization: Some(format!("Basic {basic}")),
            ..Default::default()
        };
        assert_eq!(meta.intake_key().as_deref(), Some("SECRET"));
        let meta = RequestMeta {
            query: Some("a=b&intake_key=Q%2Bk".into()),
            ..Default::default()
        };
        assert_eq!(meta.intake_key().as_deref(), Some("Q+k"));
        assert_eq!(RequestMeta::default().intake_key(), None);
    }

    #[test]
    fn meta_and_encoding_from_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(INTAKE_KEY_HEADER, http::HeaderValue::from_static("K"));
        headers.insert(EVENT_TIMESTAMP_HEADER, http::HeaderValue::from_static("T"));
        let uri: http::Uri = "/jsons?intake_key=Q".parse().unwrap();
        let meta = RequestMeta::from_request(&headers, &uri);
        assert_eq!(meta.intake_key().as_deref(), Some("K"));
        assert_eq!(meta.event_timestamp.as_deref(), Some("T"));
        assert_eq!(meta.query.as_deref(), Some("intake_key=Q"));
        assert_eq!(
            BodyEncoding::from_headers(&headers).unwrap(),
            BodyEncoding::Identity
        );
        headers.insert("content-encoding", http::HeaderValue::from_static("br"));
        assert_eq!(
            BodyEncoding::from_headers(&headers).unwrap_err().status,
            415
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &[b'a'; 100]).unwrap();
        let gz = bytes::Bytes::from(gz.finish().unwrap());
        assert_eq!(
            BodyEncoding::Gzip.decode(gz.clone(), 100).unwrap().len(),
            100
        );
        assert_eq!(BodyEncoding::Gzip.decode(gz, 99).unwrap_err().status, 413);
        let bad = BodyEncoding::Gzip.decode(bytes::Bytes::from_static(b"nope"), 99);
        assert_eq!(bad.unwrap_err().status, 400);
    }

    #[test]
    fn keys_that_cannot_travel_in_a_header_are_refused() {
        let err = parse_request(
            Endpoint::Array,
            &RequestMeta::default(),
            "[{\"intake_key\": \"ok\", \"json\": \"a\"}, {\"intake_key\": \"bad\\nkey\", \"json\": \"b\"}]".as_bytes(),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.status, 401);
        let err = parse_request(
            Endpoint::Structured,
            &RequestMeta::default(),
            "{\"intake_key\": \"clé\", \"json\": \"a\"}".as_bytes(),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.status, 401);
    }

    #[test]
    fn plain_batch_splits_lines() {
        let events = parse_request(
            Endpoint::PlainBatch,
            &meta_with_key(),
            b"a\r\nb\n\nc\n",
            Limits::default(),
        )
        .unwrap();
        let raws: Vec<_> = events.iter().map(|e| e.raw.as_str()).collect();
        assert_eq!(raws, ["a", "b", "c"]);
    }

    #[test]
    fn jsons_keeps_non_strings_as_json_text() {
        let events = parse_request(
            Endpoint::Jsons,
            &meta_with_key(),
            br#"["x", {"k": 1}]"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(events[0].raw, "x");
        assert_eq!(events[1].raw, r#"{"k":1}"#);
        let events = parse_request(
            Endpoint::Jsons,
            &meta_with_key(),
            br#"[1, 2.5, true, null, [1, "a"], "\u00e9\n"]"#,
            Limits::default(),
        )
        .unwrap();
        let raws: Vec<&str> = events.iter().map(|e| e.raw.as_str()).collect();
        assert_eq!(raws, ["1", "2.5", "true", "null", r#"[1,"a"]"#, "é\n"]);
    }

    #[test]
    fn structured_accepts_documented_typo() {
        let events = parse_request(
            Endpoint::Structured,
            &RequestMeta::default(),
            br#"{"intakey_key": "K", "json": "e", "@timestamp": "2021-04-05T21:33:31+02:00"}"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(events[0].intake_key, "K");
        assert_eq!(
            events[0].timestamp.as_deref(),
            Some("2021-04-05T21:33:31+02:00")
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse_request(
            Endpoint::Jsons,
            &RequestMeta::default(),
            b"[]",
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.status, 401);
        let err =
            parse_request(Endpoint::Jsons, &meta_with_key(), b"{", Limits::default()).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains("malformed"), "{}", err.message);
        let err = parse_request(
            Endpoint::Plain,
            &meta_with_key(),
            b"\xff\xfe",
            Limits::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("UTF-8"));
        let big = vec![b'a'; 11];
        let err = parse_request(
            Endpoint::Plain,
            &meta_with_key(),
            &big,
            Limits {
                max_event_bytes: 10,
            },
        )
        .unwrap_err();
        assert_eq!(err.status, 413);
    }

    #[test]
    fn dates_are_checked_and_normalised() {
        let ok = [
            ("2021-04-05T21:33:31+02:00", "2021-04-05T21:33:31+02:00"),
            ("2021-04-05T19:33:31.123Z", "2021-04-05T19:33:31.123Z"),
            ("2021-04-05 19:33:31+00:00", "2021-04-05T19:33:31Z"),
            ("2021-04-05t19:33:31.5z", "2021-04-05T19:33:31.500Z"),
            (
                "2021-04-05T19:33:31.123456789-05:30",
                "2021-04-05T19:33:31.123456789-05:30",
            ),
            ("2021-04-05T21:33:31+0200", "2021-04-05T21:33:31+02:00"),
            (" 2021-04-05T21:33:31Z ", "2021-04-05T21:33:31Z"),
            ("2021-04-05T19:33:31\n", "2021-04-05T19:33:31"),
            ("Mon, 05 Apr 2021 19:33:31 GMT", "2021-04-05T19:33:31Z"),
            (
                "Mon, 5 Apr 2021 21:33:31 +0200",
                "2021-04-05T21:33:31+02:00",
            ),
            ("2021-04-05T19:33:31", "2021-04-05T19:33:31"),
            ("2021-04-05 19:33:31.120", "2021-04-05T19:33:31.120"),
        ];
        for (sent, want) in ok {
            assert_eq!(normalize_date(sent).as_deref(), Ok(want), "{sent:?}");
            // Normalised is a fixed point: the mock intake parses what the forwarder sends.
            assert_eq!(normalize_date(want).as_deref(), Ok(want), "{want:?}");
        }
        let bad = [
            "",
            "yesterday",
            "2021-04-05",
            "2021-02-30T10:00:00Z",
            "2021-04-05T25:00:00Z",
            "1617651211",
            "+12021-04-05T19:33:31Z",
            "2021-04-05T19:33:31+02:00 trailing",
            "2021-04-05T19:33:31+02:\u{e9}0",
            "\u{e9}\u{e9}\u{e9}\u{e9}-\u{e9}\u{e9}\u{e9}",
        ];
        for sent in bad {
            assert_eq!(normalize_date(sent), Err(DateError::NotADate), "{sent:?}");
        }
        let long = "2".repeat(MAX_DATE_BYTES + 1);
        assert_eq!(
            normalize_date(&long),
            Err(DateError::TooLong(MAX_DATE_BYTES + 1))
        );
    }

    #[test]
    fn reception_dates_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(
            reception_date(1_617_651_211_123).as_deref(),
            Some("2021-04-05T19:33:31.123Z")
        );
        assert_eq!(
            reception_date(1_617_651_211_000).as_deref(),
            Some("2021-04-05T19:33:31.000Z")
        );
        assert_eq!(reception_date(0), None, "unknown");
        assert_eq!(reception_date(u64::MAX), None);
        // What the intake (and the mock, and the HTTP source) take as a date, the same instant.
        let sent = reception_date(1_617_651_211_123).unwrap();
        assert_eq!(normalize_date(&sent).as_deref(), Ok(sent.as_str()));
    }

    #[test]
    fn bad_dates_are_refused_naming_where_they_were() {
        let array = br#"[{"intake_key": "K", "json": "a", "timestamp": "2021-04-05T21:33:31Z"},
                         {"intake_key": "K", "json": "b", "timestamp": "2021-04-05T21:33:31Z"},
                         {"intake_key": "K", "json": "c", "timestamp": "noon"}]"#;
        let err = parse_request(
            Endpoint::Array,
            &RequestMeta::default(),
            array,
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.status, 400);
        assert!(
            err.message
                .starts_with("element 2: its timestamp \"noon\" is not a date"),
            "{}",
            err.message
        );
        let meta = RequestMeta {
            event_timestamp: Some("noon".into()),
            ..meta_with_key()
        };
        for endpoint in [Endpoint::Plain, Endpoint::PlainBatch] {
            let err = parse_request(endpoint, &meta, b"a", Limits::default()).unwrap_err();
            assert!(
                err.message.contains(EVENT_TIMESTAMP_HEADER),
                "{}",
                err.message
            );
        }
        // The body's @timestamp wins over the header, and is the one checked.
        let body = br#"{"intake_key": "K", "jsons": ["a"], "@timestamp": "2021-04-05T21:33:31Z"}"#;
        let events =
            parse_request(Endpoint::StructuredBatch, &meta, body, Limits::default()).unwrap();
        assert_eq!(events[0].timestamp.as_deref(), Some("2021-04-05T21:33:31Z"));
        let body = br#"{"intake_key": "K", "json": "a", "@timestamp": "noon"}"#;
        let err = parse_request(
            Endpoint::Structured,
            &RequestMeta::default(),
            body,
            Limits::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("@timestamp"), "{}", err.message);
    }

    #[test]
    fn header_values_that_are_not_ascii_are_refused_not_dropped() {
        let mut headers = http::HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"KEY\xe9").unwrap();
        headers.insert(INTAKE_KEY_HEADER, value);
        let uri: http::Uri = "/plain".parse().unwrap();
        let meta = RequestMeta::from_request(&headers, &uri);
        let err = parse_request(Endpoint::Plain, &meta, b"a", Limits::default()).unwrap_err();
        assert_eq!(err.status, 401);
        assert!(err.message.contains("visible ASCII"), "{}", err.message);
        let key = "k".repeat(MAX_KEY_BYTES + 1);
        let meta = RequestMeta {
            header_key: Some(key),
            ..Default::default()
        };
        let err = parse_request(Endpoint::Plain, &meta, b"a", Limits::default()).unwrap_err();
        assert_eq!(err.status, 401);
    }

    #[test]
    fn ack_requires_one_id_per_event() {
        assert!(check_ack(br#"{"event_ids": ["a", "b\n"]}"#, 2).is_ok());
        assert_eq!(
            check_ack(br#"{"event_ids": ["a"]}"#, 2).unwrap_err(),
            AckError::WrongCount { sent: 2, got: 1 }
        );
        assert!(matches!(
            check_ack(b"ok", 1).unwrap_err(),
            AckError::Malformed(_)
        ));
        assert!(matches!(
            check_ack(br#"{"event_ids": [1, 2]}"#, 2).unwrap_err(),
            AckError::Malformed(_)
        ));
        assert!(matches!(
            check_ack(br#"{"event_id": "a"}"#, 1).unwrap_err(),
            AckError::Malformed(_)
        ));
    }
}
