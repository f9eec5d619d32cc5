//! The benchmark's client: reproducible 200-byte events, request bodies serialised before the
//! clock starts, and a sender that keeps several keep-alive connections busy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{EVENT_BYTES, KEY};

/// Distinct request bodies the client cycles through (serialised once, before the clock starts).
const BODIES: usize = 64;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// One 200-byte syslog line of an nginx-like access log, ASCII, nothing to escape in JSON.
///
/// Client, user, request, status, sizes, trace id and user agent vary pseudo-randomly with
/// `body` and `i`, as in real traffic: the queue compresses its chunks, and a line padded with a
/// repeated filler would compress far better than real logs do.
pub fn event_text(body: usize, i: usize) -> String {
    const USERS: [&str; 8] = [
        "-", "-", "alice", "bob", "backup", "jmartin", "carol", "deploy",
    ];
    const METHODS: [&str; 6] = ["GET", "GET", "GET", "POST", "PUT", "DELETE"];
    const WORDS: [&str; 16] = [
        "items", "orders", "users", "cart", "search", "login", "assets", "reports", "billing",
        "catalog", "health", "sessions", "invoices", "profile", "export", "tokens",
    ];
    const STATUSES: [u16; 8] = [200, 200, 200, 200, 201, 304, 404, 503];
    const AGENTS: [&str; 6] = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7_1) AppleWebKit/605.1.15 (KHTML, like Gecko) \
         Version/18.1 Safari/605.1.15",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "okhttp/4.12.0",
    ];
    let mut next = xorshift(((body as u64) << 32) | i as u64);
    let mut pick = |n: usize| (next() % n as u64) as usize;
    let (a, b, c) = (pick(256), pick(256), pick(256));
    let user = USERS[pick(USERS.len())];
    let method = METHODS[pick(METHODS.len())];
    let (w1, w2) = (WORDS[pick(WORDS.len())], WORDS[pick(WORDS.len())]);
    let id = pick(100_000);
    let status = STATUSES[pick(STATUSES.len())];
    let bytes = pick(60_000);
    let ms = pick(900) + 1;
    let agent = AGENTS[pick(AGENTS.len())];
    let mut line = format!(
        "<134>1 2025-01-15T10:{:02}:{:02}.{:03}Z web-{body:02} nginx 4242 - - {a}.{b}.{c}.{} \
         {user} {method} /api/v1/{w1}/{id}/{w2} {status} {bytes} 0.{ms:03} \
         trace={:016x}{:016x} ua={agent}",
        (i / 60) % 60,
        i % 60,
        i % 1000,
        i % 256,
        next(),
        next(),
    );
    // Short agents leave room for a referer, as real lines have.
    while line.len() < EVENT_BYTES {
        line.push_str(" ref=/");
        line.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
    }
    line.truncate(EVENT_BYTES);
    line
}

/// Request bodies of `per_request` events each, serialised once before the clock starts.
pub struct Bodies {
    pub per_request: usize,
    pub bodies: Vec<Bytes>,
}

impl Bodies {
    pub fn new(per_request: usize) -> Arc<Bodies> {
        let bodies: Vec<Bytes> = (0..BODIES)
            .map(|b| {
                let events: Vec<String> = (0..per_request).map(|i| event_text(b, i)).collect();
                Bytes::from(serde_json::to_vec(&events).expect("serialise"))
            })
            .collect();
        assert_eq!(
            bodies[0].len(),
            2 + per_request * (EVENT_BYTES + 3) - 1,
            "events must need no JSON escaping"
        );
        Arc::new(Bodies {
            per_request,
            bodies,
        })
    }

    /// Payload bytes of `events` events.
    pub fn payload(events: u64) -> u64 {
        events * EVENT_BYTES as u64
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

#[derive(Debug, Default)]
pub struct SendReport {
    /// Events the forwarder acknowledged (200 with one id per event).
    pub acked_events: u64,
    pub requests: u64,
    /// 503 answers (queue full, stopping), retried.
    pub unavailable: u64,
    /// Other answers and transport errors, retried.
    pub errors: u64,
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// Sends `events` events to `url`/jsons over `connections` keep-alive connections (one task
/// each, one request in flight per task), until every request is acknowledged or `deadline`.
pub async fn send_all(
    url: &str,
    events: u64,
    connections: usize,
    bodies: Arc<Bodies>,
    deadline: Instant,
) -> SendReport {
    let client = http_client();
    let per_request = bodies.per_request;
    let requests = events.div_ceil(per_request as u64);
    let next = Arc::new(AtomicU64::new(0));
    let endpoint = format!("{url}/jsons");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, next, bodies, endpoint) = (
            client.clone(),
            next.clone(),
            bodies.clone(),
            endpoint.clone(),
        );
        tasks.spawn(async move {
            let mut report = SendReport::default();
            'requests: loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let body = bodies.bodies[i as usize % bodies.bodies.len()].clone();
                loop {
                    if Instant::now() > deadline {
                        report.timed_out = true;
                        break 'requests;
                    }
                    report.requests += 1;
                    let answer = client
                        .post(&endpoint)
                        .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                        .header("Content-Type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(b) if acknowledged_ids(&b) == per_request => {
                                report.acked_events += per_request as u64;
                                break;
                            }
                            _ => report.errors += 1,
                        },
                        Ok(r) if r.status() == 503 => report.unavailable += 1,
                        _ => report.errors += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            report
        });
    }
    let mut total = SendReport::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("client task");
        total.acked_events += r.acked_events;
        total.requests += r.requests;
        total.unavailable += r.unavailable;
        total.errors += r.errors;
        total.timed_out |= r.timed_out;
    }
    total.elapsed = started.elapsed();
    total
}

/// Number of ids in `{"event_ids":["…",…]}`, without parsing it (the client must stay cheap).
fn acknowledged_ids(body: &[u8]) -> usize {
    if !body.starts_with(b"{\"event_ids\":[") {
        return 0;
    }
    let quotes = body.iter().filter(|&&c| c == b'"').count();
    // Two quotes around the key, two around each id.
    quotes.saturating_sub(2) / 2
}

// ---------------------------------------------------------------------------------------------
// The forwarder process and what it uses
// ---------------------------------------------------------------------------------------------
