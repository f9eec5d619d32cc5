//! Tests of the HTTP source: answers, storage, probes, shutdown and the limits on slow clients.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::config::QueueConfig;
use crate::intake_api::{self, IncomingEvent};

const KEY: &str = "TEST_INTAKE_KEY_0123456789";
const TS: &str = "2021-04-05T21:33:31+02:00";
const RETRY_AFTER: u64 = 7;
const WAIT: Duration = Duration::from_secs(10);

/// A running source on a real queue in a temporary directory.
struct Harness {
    _dir: tempfile::TempDir,
    queue: Queue,
    addr: SocketAddr,
    stats: Arc<HttpSourceStats>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    client: reqwest::Client,
}

/// One stored event: key, event date, raw text.
type Stored = (String, Option<String>, String);

fn source_config() -> HttpSourceConfig {
    HttpSourceConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_body_bytes: 4096,
        max_event_bytes: 1000,
        retry_after_secs: RETRY_AFTER,
        // The time limits and max_connections keep their defaults, far above what a test
        // needs; the tests of the limits lower them.
        ..HttpSourceConfig::default()
    }
}

async fn start() -> Harness {
    start_with(source_config()).await
}

async fn start_with(config: HttpSourceConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(&queue_config(&dir)).unwrap();
    start_on(dir, queue, config).await
}

/// A source on a queue that is full: it already holds more than its `max_bytes`.
async fn start_full() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(&queue_config(&dir)).unwrap();
    let event = IncomingEvent {
        intake_key: KEY.into(),
        timestamp: None,
        raw: "already queued".into(),
    };
    queue.append(vec![event]).await.unwrap();
    queue.close().await.unwrap();
    drop(queue);
    let queue = Queue::open(&QueueConfig {
        max_bytes: 1,
        ..queue_config(&dir)
    })
    .unwrap();
    start_on(dir, queue, source_config()).await
}

fn queue_config(dir: &tempfile::TempDir) -> QueueConfig {
    QueueConfig {
        path: dir.path().join("queue"),
        ..Default::default()
    }
}

async fn start_on(dir: tempfile::TempDir, queue: Queue, config: HttpSourceConfig) -> Harness {
    let source = HttpSource::bind(config, queue.clone()).await.unwrap();
    let addr = source.local_addr();
    let stats = source.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(shutdown.clone()));
    Harness {
        _dir: dir,
        queue,
        addr,
        stats,
        shutdown,
        task,
        client: reqwest::Client::new(),
    }
}

impl Harness {
    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    fn post(&self, path_and_query: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path_and_query))
    }

    /// Every stored event, lane by lane (one read stops where the event date changes).
    fn stored(&self) -> Vec<Stored> {
        let mut all = Vec::new();
        for lane in self.queue.lanes() {
            let mut from = crate::queue::Position::default();
            loop {
                let batch = self.queue.read(lane.id, from, 10_000, 100 << 20).unwrap();
                assert_eq!(batch.span.undecodable, 0);
                if batch.chunks.is_empty() {
                    break;
                }
                from = batch.span.next;
                for stored in batch.chunks {
                    let chunk = stored.chunk;
                    for raw in chunk.events {
                        all.push((chunk.intake_key.clone(), chunk.timestamp.clone(), raw));
                    }
                }
            }
        }
        all
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run returns once shutdown is asked")
            .unwrap()
            .unwrap();
        self.queue.close().await.unwrap();
    }
}

fn stored(key: &str, timestamp: Option<&str>, raw: &str) -> Stored {
    (key.into(), timestamp.map(Into::into), raw.into())
}

async fn json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

fn assert_uuid(id: &serde_json::Value) {
    let id = id.as_str().expect("an id is a string");
    let parsed = uuid::Uuid::parse_str(id).expect("an id is a uuid");
    assert_eq!(parsed.get_version_num(), 4);
}

fn assert_ids(answer: &serde_json::Value, count: usize) {
    let ids = answer["event_ids"].as_array().expect("event_ids");
    assert_eq!(ids.len(), count, "{answer}");
    ids.iter().for_each(assert_uuid);
}

fn assert_message(answer: &serde_json::Value, needle: &str) {
    let message = answer["message"].as_str().expect("a message");
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn plain_with_header_key_keeps_the_event_date() {
    let h = start().await;
    let response = h
        .post("/plain")
        .header(intake_api::INTAKE_KEY_HEADER, KEY)
        .header(intake_api::EVENT_TIMESTAMP_HEADER, TS)
        .body("[764008:0] info: 198.51.100.10 example.org. A IN")
        .send()
        .await
        .unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 200, "{answer}");
    assert_uuid(&answer["event_id"]);
    assert_eq!(
        h.stored(),
        [stored(
            KEY,
            Some(TS),
            "[764008:0] info: 198.51.100.10 example.org. A IN"
        )]
    );
    assert_eq!(h.stats.accepted_events.load(Ordering::Relaxed), 1);
    h.stop().await;
}

#[tokio::test]
async fn plain_batch_with_basic_auth_key() {
    let h = start().await;
    let response = h
        .post("/plain/batch")
        .basic_auth("None", Some(KEY))
        .body("first\r\nsecond\n\n")
        .send()
        .await
        .unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 200, "{answer}");
    assert_ids(&answer, 2);
    assert_eq!(
        h.stored(),
        [stored(KEY, None, "first"), stored(KEY, None, "second")]
    );
    h.stop().await;
}

#[tokio::test]
async fn jsons_with_query_key() {
    let h = start().await;
    let response = h
        .post("/jsons?intake_key=Q%2Bkey")
        .json(&serde_json::json!(["a", {"k": 1}]))
        .send()
        .await
        .unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 200, "{answer}");
    assert_ids(&answer, 2);
    assert_eq!(
        h.stored(),
        [
            stored("Q+key", None, "a"),
            stored("Q+key", None, r#"{"k":1}"#)
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn array_takes_keys_and_dates_from_the_body() {
    let h = start().await;
    let body = serde_json::json!([
        {"timestamp": TS, "intake_key": "KEY_A", "json": "one"},
        {"intake_key": "KEY_B", "json": "two"},
    ]);
    let response = h.post("/array").json(&body).send().await.unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 200, "{answer}");
    assert_ids(&answer, 2);
    let mut events = h.stored();
    events.sort();
    assert_eq!(
        events,
        [
            stored("KEY_A", Some(TS), "one"),
            stored("KEY_B", None, "two")
        ]
    );
    assert_eq!(h.queue.lanes().len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn structured_event_and_batch() {
    let h = start().await;
    let one =
        serde_json::json!({"intake_key": KEY, "json": "{\"key\": \"value\"}", "@timestamp": TS});
    let (status, answer) = json(h.post("/").json(&one).send().await.unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_uuid(&answer["event_id"]);
    let many = serde_json::json!({"intake_key": KEY, "jsons": ["x", "y"]});
    let (status, answer) = json(h.post("/batch").json(&many).send().await.unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_ids(&answer, 2);
    assert_eq!(
        h.stored(),
        [
            stored(KEY, Some(TS), "{\"key\": \"value\"}"),
            stored(KEY, None, "x"),
            stored(KEY, None, "y"),
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn refusals_say_why_and_keep_nothing() {
    let h = start().await;
    let with_key = |path: &str| h.post(path).header(intake_api::INTAKE_KEY_HEADER, KEY);

    let (status, answer) = json(h.post("/plain").body("e").send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert_message(&answer, "intake key");

    let (status, answer) = json(with_key("/jsons").body("[1,").send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert_message(&answer, "malformed");

    let big_body = "x\n".repeat(2100);
    let response = with_key("/plain/batch")
        .body(big_body)
        .send()
        .await
        .unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 413);
    assert_message(&answer, "max_body_bytes");

    let big_event = "x".repeat(1001);
    let (status, answer) = json(with_key("/plain").body(big_event).send().await.unwrap()).await;
    assert_eq!(status, 413);
    assert_message(&answer, "event 0");

    let (status, answer) = json(with_key("/nope").body("e").send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_message(&answer, "/nope");

    let response = h.client.get(h.url("/plain")).send().await.unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    let (status, answer) = json(response).await;
    assert_eq!(status, 405);
    assert_message(&answer, "POST");

    let response = with_key("/plain")
        .header("Content-Encoding", "br")
        .body("e")
        .send()
        .await
        .unwrap();
    let (status, answer) = json(response).await;
    assert_eq!(status, 415);
    assert_message(&answer, "Content-Encoding");

    assert!(h.stored().is_empty());
    let stats = &h.stats;
    assert_eq!(stats.requests.load(Ordering::Relaxed), 7);
    assert_eq!(stats.rejected_400.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rejected_401.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rejected_413.load(Ordering::Relaxed), 2);
    assert_eq!(stats.rejected_other.load(Ordering::Relaxed), 3);
    assert_eq!(stats.accepted_events.load(Ordering::Relaxed), 0);
    h.stop().await;
}

#[tokio::test]
async fn gzip_bodies_are_decompressed_within_the_limit() {
    let h = start().await;
    let with_gzip = |body: Vec<u8>| {
        h.post("/plain/batch")
            .header(intake_api::INTAKE_KEY_HEADER, KEY)
            .header("Content-Encoding", "gzip")
            .body(body)
    };

    let (status, answer) = json(with_gzip(gzip(b"a\nb")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_ids(&answer, 2);

    let (status, answer) = json(with_gzip(b"not gzip".to_vec()).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert_message(&answer, "gzip");

    let bomb = gzip(&"x\n".repeat(100_000).into_bytes());
    assert!(bomb.len() < 4096);
    let (status, answer) = json(with_gzip(bomb).send().await.unwrap()).await;
    assert_eq!(status, 413);
    assert_message(&answer, "decompressed");

    assert_eq!(h.stored(), [stored(KEY, None, "a"), stored(KEY, None, "b")]);
    h.stop().await;
}

#[tokio::test]
async fn health_is_ok() {
    let h = start().await;
    let (status, answer) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(answer, serde_json::json!({"status": "ok"}));
    h.stop().await;
}

#[tokio::test]
async fn full_queue_gets_503_with_retry_after() {
    let h = start_full().await;
    assert!(h.queue.is_full());
    // Alive (a liveness probe must not restart it), but not ready.
    let (status, answer) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(answer, serde_json::json!({"status": "ok"}));
    let response = h.client.get(h.url("/ready")).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "7");
    let (status, answer) = json(response).await;
    assert_eq!(status, 503);
    assert_eq!(answer, serde_json::json!({"status": "queue_full"}));

    let response = h
        .post("/plain")
        .header(intake_api::INTAKE_KEY_HEADER, KEY)
        .body("e")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "7");
    let (status, answer) = json(response).await;
    assert_eq!(status, 503);
    assert_message(&answer, "full");
    assert_eq!(h.stats.rejected_503.load(Ordering::Relaxed), 1);
    h.stop().await;
}

#[tokio::test]
async fn closed_queue_gets_503_with_retry_after() {
    let h = start().await;
    h.queue.close().await.unwrap();
    let response = h
        .post("/plain")
        .header(intake_api::INTAKE_KEY_HEADER, KEY)
        .body("e")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "7");
    let (status, _) = json(response).await;
    assert_eq!(status, 503);
    h.stop().await;
}

/// A response read off a raw connection: status, headers (lower-case names), body.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: serde_json::Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn raw_connect(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

async fn raw_send(conn: &mut BufReader<TcpStream>, request: &str) {
    conn.get_mut().write_all(request.as_bytes()).await.unwrap();
}

async fn raw_read(conn: &mut BufReader<TcpStream>) -> RawResponse {
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.unwrap();
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut response = RawResponse {
        status,
        headers,
        body: serde_json::Value::Null,
    };
    let length: usize = response.header("content-length").unwrap().parse().unwrap();
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await.unwrap();
    response.body = serde_json::from_slice(&body).unwrap();
    response
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let h = start().await;
    let mut conn = raw_connect(h.addr).await;
    let chunk = "x".repeat(5000);
    raw_send(
        &mut conn,
        &format!(
            "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        ),
    )
    .await;
    let response = raw_read(&mut conn).await;
    assert_eq!(response.status, 413);
    assert_message(&response.body, "max_body_bytes");
    assert!(h.stored().is_empty());
    h.stop().await;
}

const HEALTH_REQUEST: &str = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
const READY_REQUEST: &str = "GET /ready HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_refuses_the_rest() {
    let h = start().await;
    // A request in flight: headers and half of the body sent.
    let mut in_flight = raw_connect(h.addr).await;
    raw_send(
        &mut in_flight,
        &format!(
            "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
             Content-Length: 10\r\n\r\nhello"
        ),
    )
    .await;
    // Two idle keep-alive connections, served once already.
    let mut idle = raw_connect(h.addr).await;
    let mut idle_health = raw_connect(h.addr).await;
    for conn in [&mut idle, &mut idle_health] {
        raw_send(conn, HEALTH_REQUEST).await;
        assert_eq!(raw_read(conn).await.status, 200);
    }
    let stats = h.stats.clone();
    wait_until("the request in flight is being handled", || {
        stats.requests.load(Ordering::Relaxed) == 1
    })
    .await;

    h.shutdown.cancel();

    raw_send(
        &mut idle,
        &format!(
            "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
             Content-Length: 4\r\n\r\nlate"
        ),
    )
    .await;
    let refused = raw_read(&mut idle).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("7"));
    assert_eq!(refused.header("connection"), Some("close"));
    assert_message(&refused.body, "stopping");

    raw_send(&mut idle_health, READY_REQUEST).await;
    let ready = raw_read(&mut idle_health).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body, serde_json::json!({"status": "stopping"}));

    let addr = h.addr;
    tokio::time::timeout(WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("new connections are refused");
    assert!(!h.task.is_finished(), "run waits for the request in flight");

    raw_send(&mut in_flight, "world").await;
    let answered = raw_read(&mut in_flight).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_uuid(&answered.body["event_id"]);

    let events = h.stored();
    assert_eq!(events, [stored(KEY, None, "helloworld")]);
    h.stop().await;
}

/// The limit the tests of time limits set.
const LIMIT: Duration = Duration::from_secs(1);

/// `raw_read`, bounded by `WAIT`.
async fn raw_read_within(conn: &mut BufReader<TcpStream>) -> RawResponse {
    tokio::time::timeout(WAIT, raw_read(conn))
        .await
        .expect("an answer")
}

/// Reads until the source closes the connection; returns what it sent before.
async fn read_until_closed(conn: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("reading: {e}"),
            }
        }
    })
    .await
    .expect("the source closes the connection");
    received
}

#[tokio::test]
async fn a_request_head_that_takes_too_long_is_disconnected() {
    let h = start_with(HttpSourceConfig {
        header_read_timeout_secs: 1,
        idle_timeout_secs: 600,
        ..source_config()
    })
    .await;

    // Half a request line, then nothing.
    let started = Instant::now();
    let mut slow = raw_connect(h.addr).await;
    raw_send(&mut slow, "POST /pla").await;
    assert!(read_until_closed(&mut slow).await.is_empty(), "no answer");
    assert!(started.elapsed() >= LIMIT);

    // Nothing at all.
    let started = Instant::now();
    let mut silent = raw_connect(h.addr).await;
    assert!(read_until_closed(&mut silent).await.is_empty(), "no answer");
    assert!(started.elapsed() >= LIMIT);

    // On a kept-alive connection, the next request head is timed from its first byte (the
    // idle limit, far longer, does not apply to it).
    let mut kept_alive = raw_connect(h.addr).await;
    raw_send(&mut kept_alive, HEALTH_REQUEST).await;
    assert_eq!(raw_read_within(&mut kept_alive).await.status, 200);
    let started = Instant::now();
    raw_send(&mut kept_alive, "GET /hea").await;
    assert!(read_until_closed(&mut kept_alive).await.is_empty());
    assert!(started.elapsed() >= LIMIT);

    // The source still serves, and none of that was a request.
    let (status, _) = json(h.client.get(h.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(h.stats.requests.load(Ordering::Relaxed), 0);
    h.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let idle = Duration::from_secs(2);
    let h = start_with(HttpSourceConfig {
        header_read_timeout_secs: 1,
        idle_timeout_secs: idle.as_secs(),
        ..source_config()
    })
    .await;
    let mut conn = raw_connect(h.addr).await;
    raw_send(&mut conn, HEALTH_REQUEST).await;
    assert_eq!(raw_read_within(&mut conn).await.status, 200);
    // Kept alive: served again.
    let last_request = Instant::now();
    raw_send(&mut conn, HEALTH_REQUEST).await;
    assert_eq!(raw_read_within(&mut conn).await.status, 200);

    assert!(read_until_closed(&mut conn).await.is_empty());
    // Closed by the idle limit, counted from the last answer; not by the head's.
    assert!(last_request.elapsed() >= idle);
    h.stop().await;
}

#[tokio::test]
async fn a_body_that_takes_too_long_gets_408_and_nothing_is_kept() {
    let h = start_with(HttpSourceConfig {
        body_read_timeout_secs: 1,
        ..source_config()
    })
    .await;
    let started = Instant::now();
    let mut conn = raw_connect(h.addr).await;
    raw_send(
        &mut conn,
        &format!(
            "POST /plain HTTP/1.1\r\nHost: t\r\nX-SEKOIAIO-INTAKE-KEY: {KEY}\r\n\
             Content-Length: 1000\r\n\r\n0123456789"
        ),
    )
    .await;
    let response = raw_read_within(&mut conn).await;
    assert!(started.elapsed() >= LIMIT);
    assert_eq!(response.status, 408);
    assert_eq!(response.header("connection"), Some("close"));
    assert_message(&response.body, "body_read_timeout_secs");
    assert!(read_until_closed(&mut conn).await.is_empty());

    assert!(h.stored().is_empty());
    assert_eq!(h.stats.requests.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.rejected_other.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.accepted_requests.load(Ordering::Relaxed), 0);
    h.stop().await;
}

#[tokio::test]
async fn connections_over_max_connections_wait_until_one_closes() {
    let h = start_with(HttpSourceConfig {
        max_connections: 2,
        ..source_config()
    })
    .await;
    let mut first = raw_connect(h.addr).await;
    let mut second = raw_connect(h.addr).await;
    for conn in [&mut first, &mut second] {
        raw_send(conn, HEALTH_REQUEST).await;
        assert_eq!(raw_read_within(conn).await.status, 200);
    }

    // The kernel completes the third connection (it waits in the backlog), but the source
    // does not take it. (A negative: it can only be watched for a while.)
    let mut third = raw_connect(h.addr).await;
    raw_send(&mut third, HEALTH_REQUEST).await;
    let mut byte = [0; 1];
    let peeked =
        tokio::time::timeout(Duration::from_millis(300), third.get_mut().peek(&mut byte)).await;
    assert!(peeked.is_err(), "a third connection is served");

    // The two open connections are still served.
    raw_send(&mut second, HEALTH_REQUEST).await;
    assert_eq!(raw_read_within(&mut second).await.status, 200);

    // One closes: the third is taken and served.
    drop(first);
    assert_eq!(raw_read_within(&mut third).await.status, 200);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_slow_client() {
    let h = start_with(HttpSourceConfig {
        header_read_timeout_secs: 1,
        ..source_config()
    })
    .await;
    let mut slow = raw_connect(h.addr).await;
    raw_send(&mut slow, "POST /plain HTTP/1.1\r\nHost: t\r\n").await;
    h.stop().await;
    assert!(read_until_closed(&mut slow).await.is_empty());
}

#[test]
fn the_limits_are_options_of_the_source() {
    use crate::config::{Config, SourceConfig};
    use std::path::Path;

    let default = HttpSourceConfig::default();
    assert_eq!(
        (
            default.header_read_timeout_secs,
            default.body_read_timeout_secs,
            default.idle_timeout_secs,
            default.max_connections
        ),
        (10, 30, 60, 1024)
    );
    let text = "[[source]]\ntype = \"http\"\nheader_read_timeout_secs = 2\n\
                body_read_timeout_secs = 3\nidle_timeout_secs = 4\nmax_connections = 5\n";
    let config = Config::parse(text, Path::new("f.toml")).unwrap();
    let SourceConfig::Http(http) = &config.sources[0] else {
        panic!("not an http source");
    };
    assert_eq!(
        (
            http.header_read_timeout(),
            http.body_read_timeout(),
            http.idle_timeout(),
            http.max_connections
        ),
        (
            Duration::from_secs(2),
            Duration::from_secs(3),
            Duration::from_secs(4),
            5
        )
    );
    for key in [
        "header_read_timeout_secs",
        "body_read_timeout_secs",
        "idle_timeout_secs",
        "max_connections",
    ] {
        let text = format!("[[source]]\ntype = \"http\"\n{key} = 0\n");
        let err = Config::parse(&text, Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains(&format!("`source.{key}`")), "{err}");
    }
}
