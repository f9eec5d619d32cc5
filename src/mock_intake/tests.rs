//! Tests of the mock intake: answers like the intake's, every fault, the control API, the CLI's
//! printing.

use super::cli::event_line;
use super::connections::SHUTDOWN_GRACE;
use super::state::Settings;
use super::*;
use crate::intake_api::{
    check_ack, ErrorResponse, EventIdResponse, EventIdsResponse, EVENT_TIMESTAMP_HEADER,
    INTAKE_KEY_HEADER, MAX_BODY_BYTES,
};
use hyper::header::{ALLOW, CONTENT_ENCODING, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const KEY: &str = "test-intake-key-0001";
const OTHER_KEY: &str = "other-intake-key-0002";
const WAIT: Duration = Duration::from_secs(10);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn mock() -> MockIntake {
    MockIntake::start(localhost()).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post_jsons(
    c: &reqwest::Client,
    mock: &MockIntake,
    events: &[&str],
) -> reqwest::Result<reqwest::Response> {
    c.post(format!("{}/jsons", mock.url()))
        .header(INTAKE_KEY_HEADER, KEY)
        .json(events)
        .send()
        .await
}

async fn status_of(response: reqwest::Result<reqwest::Response>) -> u16 {
    response.unwrap().status().as_u16()
}

fn raws(mock: &MockIntake) -> Vec<String> {
    mock.events().into_iter().map(|e| e.raw).collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn faults(script: Vec<ScriptedFault>) -> FaultConfig {
    FaultConfig {
        script,
        ..Default::default()
    }
}

fn status(status: u16, times: u32) -> ScriptedFault {
    ScriptedFault::Status {
        status,
        retry_after_secs: None,
        times,
    }
}

async fn ids(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    let answer: EventIdsResponse = response.json().await.unwrap();
    for id in &answer.event_ids {
        uuid::Uuid::parse_str(id).unwrap();
    }
    answer.event_ids
}

async fn single_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    let answer: EventIdResponse = response.json().await.unwrap();
    uuid::Uuid::parse_str(&answer.event_id).unwrap();
    answer.event_id
}

#[tokio::test]
async fn answers_every_endpoint_like_the_intake() {
    let mock = mock().await;
    let c = client();
    let url = mock.url();

    let r = c
        .post(format!("{url}/plain"))
        .header(INTAKE_KEY_HEADER, KEY)
        .header(EVENT_TIMESTAMP_HEADER, "2021-04-05T21:33:31+02:00")
        .body("one line")
        .send()
        .await
        .unwrap();
    single_id(r).await;

    let r = c
        .post(format!("{url}/plain/batch"))
        .basic_auth("", Some(KEY))
        .body("a\nb\n")
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);

    let r = c
        .post(format!("{url}/jsons?intake_key={KEY}"))
        .json(&["c", "d"])
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);

    let r = c
        .post(format!("{url}/array"))
        .json(&serde_json::json!([
            {"intake_key": KEY, "json": "e", "timestamp": "2021-04-05T21:33:31+02:00"},
            {"intake_key": OTHER_KEY, "json": "f"},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);

    let r = c
        .post(format!("{url}/"))
        .json(&serde_json::json!({"intake_key": KEY, "json": "g"}))
        .send()
        .await
        .unwrap();
    single_id(r).await;

    let r = c
        .post(format!("{url}/batch"))
        .json(&serde_json::json!({"intake_key": KEY, "jsons": ["h", {"i": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);

    assert_eq!(
        raws(&mock),
        [
            "one line",
            "a",
            "b",
            "c",
            "d",
            "e",
            "f",
            "g",
            "h",
            r#"{"i":1}"#
        ]
    );
    let events = mock.events();
    assert_eq!(
        events[0].timestamp.as_deref(),
        Some("2021-04-05T21:33:31+02:00")
    );
    assert_eq!(events[6].intake_key, OTHER_KEY);
    assert!(events
        .iter()
        .filter(|e| e.raw != "f")
        .all(|e| e.intake_key == KEY));
    let stats = mock.stats();
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.status_count(200), 6);
    assert_eq!(stats.accepted_requests, 6);
    assert_eq!(stats.accepted_events, 10);
    mock.shutdown().await;
}

#[tokio::test]
async fn refuses_like_the_intake_and_records_nothing() {
    let mock = mock().await;
    let c = client();
    let url = mock.url();

    let no_key = c.post(format!("{url}/jsons")).json(&["x"]).send().await;
    assert_eq!(status_of(no_key).await, 401);
    let malformed = c
        .post(format!("{url}/jsons"))
        .header(INTAKE_KEY_HEADER, KEY)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: ErrorResponse = malformed.json().await.unwrap();
    assert!(body.message.contains("malformed"), "{}", body.message);
    let unknown = c.post(format!("{url}/nowhere")).body("x").send().await;
    assert_eq!(status_of(unknown).await, 404);
    let get = c.get(format!("{url}/jsons")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()[ALLOW], "POST");

    assert!(mock.events().is_empty());
    let stats = mock.stats();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.status_count(401), 1);
    assert_eq!(stats.status_count(400), 1);
    assert_eq!(stats.status_count(404), 1);
    assert_eq!(stats.status_count(405), 1);
    assert_eq!(stats.accepted_events, 0);
}

#[tokio::test]
async fn accepts_gzip_bodies() {
    let mock = mock().await;
    let c = client();
    let r = c
        .post(format!("{}/jsons", mock.url()))
        .header(INTAKE_KEY_HEADER, KEY)
        .header(CONTENT_ENCODING, "gzip")
        .header(CONTENT_TYPE, "application/json")
        .body(gzip(br#"["zipped 1", "zipped 2"]"#))
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);
    assert_eq!(raws(&mock), ["zipped 1", "zipped 2"]);
    assert_eq!(mock.stats().gzip_requests, 1);

    let bad = c
        .post(format!("{}/jsons", mock.url()))
        .header(INTAKE_KEY_HEADER, KEY)
        .header(CONTENT_ENCODING, "gzip")
        .body("not gzip")
        .send()
        .await;
    assert_eq!(status_of(bad).await, 400);
    let brotli = c
        .post(format!("{}/jsons", mock.url()))
        .header(INTAKE_KEY_HEADER, KEY)
        .header(CONTENT_ENCODING, "br")
        .body("x")
        .send()
        .await;
    assert_eq!(status_of(brotli).await, 415);
    assert_eq!(mock.events().len(), 2);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let mock = mock().await;
    let c = client();
    let url = format!("{}/plain", mock.url());
    let huge = vec![b'a'; MAX_BODY_BYTES + 1];
    let r = c
        .post(&url)
        .header(INTAKE_KEY_HEADER, KEY)
        .body(huge)
        .send()
        .await;
    assert_eq!(status_of(r).await, 413);

    mock.set_faults(FaultConfig {
        max_body_bytes: Some(100),
        ..Default::default()
    });
    let r = c
        .post(&url)
        .header(INTAKE_KEY_HEADER, KEY)
        .body(vec![b'b'; 101])
        .send()
        .await;
    assert_eq!(status_of(r).await, 413);
    // The limit is on the decoded body too: a small gzip that inflates past it is refused.
    let r = c
        .post(&url)
        .header(INTAKE_KEY_HEADER, KEY)
        .header(CONTENT_ENCODING, "gzip")
        .body(gzip(&[b'c'; 1000]))
        .send()
        .await;
    assert_eq!(status_of(r).await, 413);
    let r = c
        .post(&url)
        .header(INTAKE_KEY_HEADER, KEY)
        .body(vec![b'd'; 100])
        .send()
        .await;
    assert_eq!(status_of(r).await, 200);
    assert_eq!(mock.events().len(), 1);
    assert_eq!(mock.stats().status_count(413), 3);
}

#[tokio::test]
async fn scripted_status_then_normal_answers() {
    let mock = mock().await;
    let c = client();
    mock.set_faults(faults(vec![ScriptedFault::Status {
        status: 503,
        retry_after_secs: Some(7),
        times: 2,
    }]));
    for _ in 0..2 {
        let r = post_jsons(&c, &mock, &["refused"]).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        let body: ErrorResponse = r.json().await.unwrap();
        assert!(body.message.contains("503"), "{}", body.message);
    }
    assert_eq!(mock.stats().script_remaining, 0);
    let r = post_jsons(&c, &mock, &["accepted"]).await.unwrap();
    assert_eq!(ids(r).await.len(), 1);
    assert_eq!(raws(&mock), ["accepted"]);
    let stats = mock.stats();
    assert_eq!(stats.scripted_faults, 2);
    assert_eq!(stats.status_count(503), 2);
    assert_eq!(stats.status_count(200), 1);
}

#[tokio::test]
async fn scripted_redirect_and_retry_at_date() {
    let mock = mock().await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    mock.set_faults(faults(vec![
        ScriptedFault::Redirect {
            status: 307,
            location: "http://elsewhere.example:8080/jsons".into(),
            times: 1,
        },
        ScriptedFault::RetryAtDate {
            status: 429,
            after_secs: 60,
            times: 1,
        },
    ]));
    let r = post_jsons(&c, &mock, &["redirected"]).await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()[LOCATION], "http://elsewhere.example:8080/jsons");
    let r = post_jsons(&c, &mock, &["later"]).await.unwrap();
    assert_eq!(r.status(), 429);
    let date = r.headers()[RETRY_AFTER].to_str().unwrap();
    let at = httpdate::parse_http_date(date).unwrap();
    let ahead = at.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(ahead > Duration::from_secs(50), "{date}");
    assert!(raws(&mock).is_empty(), "nothing is recorded");
    let bad = faults(vec![ScriptedFault::Redirect {
        status: 200,
        location: "/".into(),
        times: 1,
    }]);
    assert_eq!(bad.validate(), Err(InvalidFaults::Redirect(200)));
}

#[tokio::test]
async fn scripted_drop_closes_the_connection_without_an_answer() {
    let mock = mock().await;
    mock.set_faults(faults(vec![ScriptedFault::Drop { times: 2 }]));

    // On the wire: the request is read, then the connection closes with not one byte back.
    let mut stream = TcpStream::connect(mock.addr()).await.unwrap();
    let body = r#"["dropped"]"#;
    let request = format!(
        "POST /jsons HTTP/1.1\r\nHost: mock\r\n{INTAKE_KEY_HEADER}: {KEY}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(read.is_err() || answer.is_empty(), "{answer:?}");

    // Through a client: an error, not an answer.
    let c = client();
    assert!(post_jsons(&c, &mock, &["dropped"]).await.is_err());
    let r = post_jsons(&c, &mock, &["kept"]).await.unwrap();
    assert_eq!(ids(r).await.len(), 1);
    assert_eq!(raws(&mock), ["kept"]);
    let stats = mock.stats();
    assert_eq!(stats.dropped_connections, 2);
    assert_eq!(stats.status_count(200), 1);
}

#[tokio::test]
async fn slow_answers_late_but_keeps_the_events() {
    let mock = mock().await;
    let delay = Duration::from_millis(300);
    mock.set_faults(faults(vec![ScriptedFault::Slow {
        delay_ms: delay.as_millis() as u64,
        times: 2,
    }]));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let err = post_jsons(&impatient, &mock, &["late 1"])
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The client gave up, yet the intake has the event: the sender must resend (a duplicate).
    assert!(mock.wait_for(|e| e.len() == 1, WAIT).await);

    let started = Instant::now();
    let r = post_jsons(&client(), &mock, &["late 2"]).await.unwrap();
    assert!(started.elapsed() >= delay);
    assert_eq!(ids(r).await.len(), 1);
    assert_eq!(raws(&mock), ["late 1", "late 2"]);
}

#[tokio::test]
async fn accept_then_fail_keeps_the_events_and_answers_500() {
    let mock = mock().await;
    let c = client();
    mock.set_faults(faults(vec![ScriptedFault::AcceptThenFail { times: 1 }]));
    let r = post_jsons(&c, &mock, &["kept", "too"]).await;
    assert_eq!(status_of(r).await, 500);
    assert_eq!(raws(&mock), ["kept", "too"]);
    assert_eq!(mock.stats().accepted_events, 2);
}

#[tokio::test]
async fn wrong_ids_answers_the_wrong_count() {
    let mock = mock().await;
    let c = client();
    mock.set_faults(faults(vec![
        ScriptedFault::WrongIds {
            delta: -1,
            times: 1,
        },
        ScriptedFault::WrongIds { delta: 1, times: 1 },
        ScriptedFault::WrongIds {
            delta: -5,
            times: 1,
        },
    ]));
    let r = post_jsons(&c, &mock, &["a", "b", "c"]).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(
        check_ack(&body, 3).unwrap_err(),
        crate::intake_api::AckError::WrongCount { sent: 3, got: 2 }
    );
    // An endpoint answering one id gets a list of two.
    let r = c
        .post(format!("{}/plain", mock.url()))
        .header(INTAKE_KEY_HEADER, KEY)
        .body("d")
        .send()
        .await
        .unwrap();
    assert_eq!(ids(r).await.len(), 2);
    let r = post_jsons(&c, &mock, &["e"]).await.unwrap();
    assert!(ids(r).await.is_empty());
    assert_eq!(raws(&mock), ["a", "b", "c", "d", "e"]);
}

#[tokio::test]
async fn script_steps_apply_in_order() {
    let mock = mock().await;
    let c = client();
    mock.set_faults(faults(vec![
        status(429, 0), // skipped
        status(429, 1),
        ScriptedFault::AcceptThenFail { times: 1 },
        status(502, 2),
    ]));
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(status_of(post_jsons(&c, &mock, &[&i.to_string()]).await).await);
    }
    assert_eq!(statuses, [429, 500, 502, 502, 200]);
    assert_eq!(raws(&mock), ["1", "4"]);
    // Requests to no endpoint do not consume the script.
    mock.set_faults(faults(vec![status(503, 1)]));
    let r = c.post(format!("{}/nowhere", mock.url())).send().await;
    assert_eq!(status_of(r).await, 404);
    assert_eq!(status_of(post_jsons(&c, &mock, &["x"]).await).await, 503);
}

#[tokio::test]
async fn persistent_rules_hold_until_replaced() {
    let mock = mock().await;
    let c = client();
    mock.set_faults(FaultConfig {
        reject_containing: Some("poison".into()),
        key_status: HashMap::from([(OTHER_KEY.to_owned(), 403)]),
        ..Default::default()
    });
    for _ in 0..2 {
        let r = post_jsons(&c, &mock, &["fine", "has poison in it"])
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let body: ErrorResponse = r.json().await.unwrap();
        assert!(body.message.contains("event 1"), "{}", body.message);
    }
    let r = c
        .post(format!("{}/jsons", mock.url()))
        .header(INTAKE_KEY_HEADER, OTHER_KEY)
        .json(&["fine"])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: ErrorResponse = r.json().await.unwrap();
    assert!(!body.message.contains(OTHER_KEY), "{}", body.message);
    let mixed = c
        .post(format!("{}/array", mock.url()))
        .json(&serde_json::json!([
            {"intake_key": KEY, "json": "a"},
            {"intake_key": OTHER_KEY, "json": "b"},
        ]))
        .send()
        .await;
    assert_eq!(status_of(mixed).await, 403);
    assert!(mock.events().is_empty());
    assert_eq!(status_of(post_jsons(&c, &mock, &["fine"]).await).await, 200);

    let delay = Duration::from_millis(200);
    mock.set_faults(FaultConfig {
        delay_ms: delay.as_millis() as u64,
        ..Default::default()
    });
    let started = Instant::now();
    let r = post_jsons(&c, &mock, &["has poison, now accepted"]).await;
    assert_eq!(status_of(r).await, 200);
    assert!(started.elapsed() >= delay);
    assert_eq!(raws(&mock), ["fine", "has poison, now accepted"]);
}

#[tokio::test]
async fn control_api_sets_faults_and_shows_what_happened() {
    let mock = mock().await;
    let c = client();
    let control = |path: &str| format!("{}/_mock/{path}", mock.url());

    let config = r#"{"script": [{"fault": "status", "status": 503, "retry_after_secs": 1},
                                 {"fault": "wrong_ids", "delta": 2}],
                     "key_status": {"revoked-key-000000": 401}}"#;
    let r = c.put(control("faults")).body(config).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let expected = FaultConfig {
        script: vec![
            ScriptedFault::Status {
                status: 503,
                retry_after_secs: Some(1),
                times: 1,
            },
            ScriptedFault::WrongIds { delta: 2, times: 1 },
        ],
        key_status: HashMap::from([("revoked-key-000000".to_owned(), 401)]),
        ..Default::default()
    };
    assert_eq!(r.json::<FaultConfig>().await.unwrap(), expected);
    let r = c.get(control("faults")).send().await.unwrap();
    assert_eq!(r.json::<FaultConfig>().await.unwrap(), expected);
    assert_eq!(mock.faults(), expected);

    assert_eq!(status_of(post_jsons(&c, &mock, &["a"]).await).await, 503);
    let r = post_jsons(&c, &mock, &["b"]).await.unwrap();
    assert_eq!(ids(r).await.len(), 3);

    let stats: MockStats = c
        .get(control("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, mock.stats());
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.status_count(503), 1);
    assert_eq!(stats.scripted_faults, 2);
    let events: Vec<ReceivedEvent> = c
        .get(control("events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        events,
        [ReceivedEvent {
            intake_key: KEY.into(),
            timestamp: None,
            raw: "b".into()
        }]
    );

    let r = c.delete(control("events")).send().await.unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"cleared": 1})
    );
    assert!(mock.events().is_empty());
    assert_eq!(mock.stats().requests, 0);

    let bad = c
        .put(control("faults"))
        .body("{\"scirpt\": []}")
        .send()
        .await;
    assert_eq!(status_of(bad).await, 400);
    let bad_status = r#"{"script": [{"fault": "status", "status": 42}]}"#;
    let r = c
        .put(control("faults"))
        .body(bad_status)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("42"));
    assert_eq!(mock.faults(), expected, "a refused config changes nothing");
    assert_eq!(status_of(c.get(control("nothing")).send().await).await, 404);
    assert_eq!(status_of(c.post(control("stats")).send().await).await, 405);
    let r = c.put(control("faults")).body("{}").send().await;
    assert_eq!(status_of(r).await, 200);
    assert_eq!(mock.faults(), FaultConfig::default());
    assert_eq!(mock.stats().requests, 0, "control requests are not counted");
}

#[test]
fn fault_config_json_form() {
    let config: FaultConfig = serde_json::from_str(
        r#"{
          "script": [
            {"fault": "status", "status": 503, "retry_after_secs": 1, "times": 2},
            {"fault": "drop"},
            {"fault": "slow", "delay_ms": 2000},
            {"fault": "accept_then_fail"},
            {"fault": "wrong_ids", "delta": -1}
          ],
          "reject_containing": "poison",
          "max_body_bytes": 1048576,
          "key_status": {"revoked-key": 401},
          "delay_ms": 5
        }"#,
    )
    .unwrap();
    assert_eq!(
        config.script,
        [
            ScriptedFault::Status {
                status: 503,
                retry_after_secs: Some(1),
                times: 2,
            },
            ScriptedFault::Drop { times: 1 },
            ScriptedFault::Slow {
                delay_ms: 2000,
                times: 1,
            },
            ScriptedFault::AcceptThenFail { times: 1 },
            ScriptedFault::WrongIds {
                delta: -1,
                times: 1
            },
        ]
    );
    assert_eq!(config.max_body_bytes, Some(1048576));
    assert_eq!(config.delay_ms, 5);
    assert!(config.validate().is_ok());
    let again: FaultConfig =
        serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(again, config);
    assert_eq!(
        serde_json::to_value(ScriptedFault::Drop { times: 1 }).unwrap(),
        serde_json::json!({"fault": "drop", "times": 1})
    );
    assert_eq!(
        serde_json::from_str::<FaultConfig>("{}").unwrap(),
        FaultConfig::default()
    );
    assert!(serde_json::from_str::<FaultConfig>(r#"{"delay": 1}"#).is_err());
    let typo = r#"{"script": [{"fault": "drop", "tims": 2}]}"#;
    assert!(serde_json::from_str::<FaultConfig>(typo).is_err());
    assert!(serde_json::from_str::<FaultConfig>(r#"{"script": [{"fault": "nap"}]}"#).is_err());
    let bad = FaultConfig {
        key_status: HashMap::from([("k".to_owned(), 1000)]),
        ..Default::default()
    };
    assert_eq!(bad.validate(), Err(InvalidFaults::Status(1000)));
}

#[tokio::test]
async fn an_invalid_status_set_in_process_answers_500() {
    let mock = mock().await;
    mock.set_faults(faults(vec![status(99, 1)]));
    assert_eq!(
        status_of(post_jsons(&client(), &mock, &["x"]).await).await,
        500
    );
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let mock = mock().await;
    let c = client();
    for i in 0..3 {
        let r = post_jsons(&c, &mock, &[&i.to_string()]).await;
        assert_eq!(status_of(r).await, 200);
    }
    assert_eq!(mock.stats().connections, 1);
}

#[tokio::test]
async fn wait_for_wakes_up_on_events_and_gives_up_at_the_deadline() {
    let mock = mock().await;
    assert!(
        !mock
            .wait_for(|e| !e.is_empty(), Duration::from_millis(50))
            .await
    );
    let url = mock.url();
    let sender = tokio::spawn(async move {
        client()
            .post(format!("{url}/plain"))
            .header(INTAKE_KEY_HEADER, KEY)
            .body("awaited")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(
        mock.wait_for(|e| e.iter().any(|e| e.raw == "awaited"), WAIT)
            .await
    );
    assert_eq!(sender.await.unwrap().unwrap(), 200);
    assert!(
        mock.wait_for_stats(|s| s.status_count(200) == 1, WAIT)
            .await
    );
}

#[tokio::test]
async fn shutdown_closes_connections_and_frees_the_port() {
    let mock = mock().await;
    let addr = mock.addr();
    let c = client();
    // An idle keep-alive connection must not hold the shutdown up.
    assert_eq!(status_of(post_jsons(&c, &mock, &["x"]).await).await, 200);
    let started = Instant::now();
    mock.shutdown().await;
    assert!(started.elapsed() < SHUTDOWN_GRACE);
    assert!(c
        .post(format!("http://{addr}/jsons"))
        .header(INTAKE_KEY_HEADER, KEY)
        .json(&["x"])
        .send()
        .await
        .is_err());

    let again = MockIntake::start(addr).await.unwrap();
    assert_eq!(again.addr(), addr);
    assert_eq!(status_of(post_jsons(&c, &again, &["y"]).await).await, 200);
    assert_eq!(raws(&again), ["y"]);
}

#[tokio::test]
async fn cli_settings_keep_the_latest_events_and_tap_them() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let settings = Settings {
        tap: Some(tx),
        max_kept_events: 2,
    };
    let mock = MockIntake::start_with(localhost(), settings).await.unwrap();
    let r = post_jsons(&client(), &mock, &["1", "2", "3"]).await;
    assert_eq!(status_of(r).await, 200);
    assert_eq!(raws(&mock), ["2", "3"]);
    let stats = mock.stats();
    assert_eq!((stats.accepted_events, stats.forgotten_events), (3, 1));
    for expected in ["1", "2", "3"] {
        assert_eq!(rx.recv().await.unwrap().raw, expected);
    }
}

#[tokio::test]
async fn count_only_counts_events_without_keeping_them() {
    let mock = MockIntake::start_count_only(localhost()).await.unwrap();
    let c = client();
    let r = post_jsons(&c, &mock, &["1", "2", "3"]).await;
    assert_eq!(ids(r.unwrap()).await.len(), 3);
    let r = post_jsons(&c, &mock, &["4"]).await;
    assert_eq!(status_of(r).await, 200);
    assert!(mock.events().is_empty());
    let stats = mock.stats();
    assert_eq!(stats.accepted_requests, 2);
    assert_eq!((stats.accepted_events, stats.forgotten_events), (4, 4));
    assert_eq!(stats.status_count(200), 2);
    assert!(mock.wait_for_stats(|s| s.accepted_events == 4, WAIT).await);
}

#[test]
fn printed_lines_redact_the_key() {
    let line = event_line(&ReceivedEvent {
        intake_key: KEY.into(),
        timestamp: Some("2021-04-05T21:33:31+02:00".into()),
        raw: "line \"quoted\"".into(),
    });
    assert!(line.ends_with('\n'));
    assert!(!line.contains(KEY));
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "intake_key": "…0001",
            "timestamp": "2021-04-05T21:33:31+02:00",
            "event": "line \"quoted\""
        })
    );
}
