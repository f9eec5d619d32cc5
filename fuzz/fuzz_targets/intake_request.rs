//! A request to the local intake API, as the HTTP source takes it apart: the path picks the
//! endpoint, headers and query give the key and the event date, `Content-Encoding` says how to
//! read the body (gzip or not, bounded once inflated), then `intake_api::parse_request`.
//!
//! Input (simple, so that seeds can be written from the intake's examples):
//! - byte 0: the endpoint (`/plain`, `/plain/batch`, `/jsons`, `/array`, `/`, `/batch`);
//! - byte 1: flags. Bits 0-1: the body's encoding (0: none; 1: gzip, the body below is
//!   compressed here, so the fuzzer explores what the parser sees; 2: gzip, the body below is
//!   the compressed stream itself; 3: `Content-Encoding` given as a field below). Bits 2-5: which
//!   of the key header, `Authorization`, query and event date header follow. Bit 6: a small body
//!   limit (4 KiB, to reach the 413 of a gzip bomb); bit 7: a small event limit (64 bytes);
//! - each field present: its length (one byte), then its bytes;
//! - the rest: the body.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::intake_api::{
    self, BodyEncoding, Endpoint, Limits, RequestMeta, MAX_BODY_BYTES,
};

const PATHS: [&str; 6] = ["/plain", "/plain/batch", "/jsons", "/array", "/", "/batch"];

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::read(data) else {
        return;
    };
    let Some(endpoint) = Endpoint::from_path(input.path) else {
        panic!("{} is an endpoint", input.path);
    };
    let Ok(uri) = input.uri().parse::<http::Uri>() else {
        return;
    };
    let headers = input.headers();
    let meta = RequestMeta::from_request(&headers, &uri);
    let Ok(encoding) = BodyEncoding::from_headers(&headers) else {
        return;
    };
    let Ok(body) = encoding.decode(input.body.clone().into(), input.max_body) else {
        return;
    };
    assert!(body.len() <= input.max_body, "decoded past the body limit");
    if let Some(plain) = input.compressed_here {
        // What was compressed here comes back whole.
        assert_eq!(&body[..], plain);
    }
    let limits = Limits {
        max_event_bytes: input.max_event,
    };
    let Ok(events) = intake_api::parse_request(endpoint, &meta, &body, limits) else {
        return;
    };
    // What is accepted is what the delivery can send: at least one event, none over the limit,
    // each with a key that fits in an HTTP header.
    assert!(!events.is_empty());
    for e in &events {
        assert!(e.raw.len() <= input.max_event);
        assert!(!e.intake_key.is_empty());
        assert!(http::HeaderValue::from_str(&e.intake_key).is_ok());
    }
    if endpoint == Endpoint::Plain {
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].raw.as_bytes(), &body[..]);
    }
});

struct Input<'a> {
    path: &'static str,
    encoding: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    timestamp: Option<&'a [u8]>,
    max_body: usize,
    max_event: usize,
    /// The body before compression, when it was compressed here.
    compressed_here: Option<&'a [u8]>,
    body: Vec<u8>,
}

impl<'a> Input<'a> {
    fn read(data: &'a [u8]) -> Option<Input<'a>> {
        let [endpoint, flags, rest @ ..] = data else {
            return None;
        };
        let mut rest = rest;
        let mut field = |present: bool| -> Option<Option<&'a [u8]>> {
            if !present {
                return Some(None);
            }
            let (&len, tail) = rest.split_first()?;
            let (value, tail) = tail.split_at_checked(usize::from(len))?;
            rest = tail;
            Some(Some(value))
        };
        let bit = |n: u8| flags & (1 << n) != 0;
        let encoding_field = field(flags & 3 == 3)?;
        let key = field(bit(2))?;
        let authorization = field(bit(3))?;
        let query = field(bit(4))?;
        let timestamp = field(bit(5))?;
        let (encoding, compressed_here, body) = match flags & 3 {
            0 => (None, None, rest.to_vec()),
            1 => (Some(&b"gzip"[..]), Some(rest), gzip(rest)),
            2 => (Some(&b"gzip"[..]), None, rest.to_vec()),
            _ => (encoding_field, None, rest.to_vec()),
        };
        Some(Input {
            path: PATHS[usize::from(*endpoint) % PATHS.len()],
            encoding,
            key,
            authorization,
            query,
            timestamp,
            max_body: if bit(6) { 4096 } else { MAX_BODY_BYTES },
            max_event: if bit(7) {
                64
            } else {
                intake_api::MAX_EVENT_BYTES
            },
            compressed_here,
            body,
        })
    }

    fn uri(&self) -> String {
        match self.query {
            Some(q) => format!("{}?{}", self.path, String::from_utf8_lossy(q)),
            None => self.path.to_owned(),
        }
    }

    /// The headers that the fields give; a value that HTTP cannot carry is left out, as the
    /// server would never have parsed it.
    fn headers(&self) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        let fields = [
            (http::header::CONTENT_ENCODING.as_str(), self.encoding),
            (intake_api::INTAKE_KEY_HEADER, self.key),
            (http::header::AUTHORIZATION.as_str(), self.authorization),
            (intake_api::EVENT_TIMESTAMP_HEADER, self.timestamp),
        ];
        for (name, value) in fields {
            let Some(value) = value.and_then(|v| http::HeaderValue::from_bytes(v).ok()) else {
                continue;
            };
            if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                headers.insert(name, value);
            }
        }
        headers
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}
