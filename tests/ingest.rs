//! What the HTTP source refuses at ingest, through the real binary: event dates and header
//! values that could never be delivered, and intake keys beyond `max_intake_keys`. Each
//! refusal is a 4xx that says what is wrong, and nothing of a refused request is stored or
//! ever reaches the intake.

mod common;

use common::*;
use serde_json::json;

const KEY: &str = "test-intake-key-0000000001";
const TS_HEADER: &str = "X-SEKOIAIO-EVENT-TIMESTAMP";

/// The status and JSON body of an answer.
async fn answer(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = request.send().await.expect("the source answers");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("a body");
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        )
    });
    (status, value)
}

fn message(body: &serde_json::Value) -> String {
    body["message"].as_str().unwrap_or_default().to_owned()
}

/// Sends one good event and waits for the intake to hold it: whatever a refused request
/// left in the queue would have been delivered before it (same key, one lane, in order) or
/// alongside it, so the intake holding only that event proves nothing else was kept.
async fn assert_only_marker_delivered(
    fwd: &Forwarder,
    mock: &MockIntake,
    client: &reqwest::Client,
) {
    let marker = "marker event".to_owned();
    assert!(post_jsons(client, &fwd.url(), KEY, std::slice::from_ref(&marker)).await);
    wait_delivered_from(fwd, mock, std::slice::from_ref(&marker)).await;
    fwd.wait_drained().await;
    let got: Vec<String> = mock.events().into_iter().map(|e| e.raw).collect();
    assert_eq!(
        got,
        [marker],
        "the intake received events of refused requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_event_dates_and_header_values_are_refused_at_ingest() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let url = fwd.url();
    let huge = "2".repeat(1_000_000);
    let long_key = "k".repeat(1000);
    let non_ascii = reqwest::header::HeaderValue::from_bytes(b"2021-04-05T21:33:31+02:\xe900")
        .expect("obs-text is a valid header value");
    // (what, request, what the message must name)
    let cases: Vec<(&str, reqwest::RequestBuilder, Vec<&str>)> = vec![
        (
            "/array, an unparseable timestamp in the second element",
            client.post(format!("{url}/array")).json(&json!([
                {"intake_key": KEY, "json": "a", "timestamp": "2021-04-05T21:33:31+02:00"},
                {"intake_key": KEY, "json": "b", "timestamp": "yesterday at noon"},
            ])),
            vec!["element 1", "timestamp", "yesterday"],
        ),
        (
            "/array, a timestamp of a megabyte",
            client
                .post(format!("{url}/array"))
                .json(&json!([{"intake_key": KEY, "json": "a", "timestamp": huge}])),
            vec!["element 0", "timestamp", "1000000 bytes"],
        ),
        (
            "/array, a date that does not exist",
            client.post(format!("{url}/array")).json(&json!([
                {"intake_key": KEY, "json": "a", "timestamp": "2021-02-30T10:00:00Z"},
            ])),
            vec!["element 0", "timestamp"],
        ),
        (
            "/batch, an unparseable @timestamp",
            client.post(format!("{url}/batch")).json(&json!({
                "intake_key": KEY, "jsons": ["a", "b"], "@timestamp": "not a date"
            })),
            vec!["@timestamp", "not a date"],
        ),
        (
            "/, an unparseable @timestamp",
            client.post(format!("{url}/")).json(&json!({
                "intake_key": KEY, "json": "a", "@timestamp": "2021-13-01T00:00:00Z"
            })),
            vec!["@timestamp"],
        ),
        (
            "/jsons, an unparseable timestamp header",
            client
                .post(format!("{url}/jsons"))
                .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                .header(TS_HEADER, "garbage")
                .json(&json!(["a"])),
            vec![TS_HEADER, "garbage"],
        ),
        (
            "/plain, a timestamp header of 8 KB",
            client
                .post(format!("{url}/plain"))
                .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                .header(TS_HEADER, "1".repeat(8192))
                .body("a"),
            vec![TS_HEADER, "8192 bytes"],
        ),
        (
            "/plain/batch, a timestamp header that is not ASCII",
            client
                .post(format!("{url}/plain/batch"))
                .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                .header(TS_HEADER, non_ascii)
                .body("a\nb"),
            vec![TS_HEADER],
        ),
    ];
    for (what, request, needles) in cases {
        let (status, body) = answer(request).await;
        assert_eq!(status, 400, "{what}: {body}");
        let message = message(&body);
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: {message:?} should name {needle:?}"
            );
        }
        assert!(
            message.len() < 1000,
            "{what}: the message echoes too much: {} bytes",
            message.len()
        );
    }
    // An intake key travels in a header too: one that could never be sent is refused.
    let (status, body) = answer(
        client
            .post(format!("{url}/array"))
            .json(&json!([{"intake_key": long_key, "json": "a"}])),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("intake key"), "{body}");
    let status = fwd.status().await;
    assert_eq!(
        status["queue"]["events"], 0,
        "refused events were stored: {status}"
    );
    assert_only_marker_delivered(&fwd, &mock, &client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_date_form_reaches_the_intake_normalised() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let url = fwd.url();
    // (event, date as sent, date the intake must receive)
    let array_dates = [
        // The intake's own example.
        (
            "array-1",
            "2021-04-05T21:33:31+02:00",
            "2021-04-05T21:33:31+02:00",
        ),
        // Logstash's @timestamp, as in Sekoia's Logstash guide.
        (
            "array-2",
            "2021-04-05T19:33:31.123Z",
            "2021-04-05T19:33:31.123Z",
        ),
        (
            "array-3",
            "2021-04-05 19:33:31+00:00",
            "2021-04-05T19:33:31Z",
        ),
        (
            "array-4",
            "2021-04-05t19:33:31.5z",
            "2021-04-05T19:33:31.500Z",
        ),
        // No offset: kept without one (the forwarder does not guess a time zone).
        ("array-5", "2021-04-05T19:33:31", "2021-04-05T19:33:31"),
        (
            "array-6",
            "2021-04-05 19:33:31.123456",
            "2021-04-05T19:33:31.123456",
        ),
    ];
    let items: Vec<serde_json::Value> = array_dates
        .iter()
        .map(|(raw, sent, _)| json!({"intake_key": KEY, "json": raw, "timestamp": sent}))
        .collect();
    let (status, body) = answer(client.post(format!("{url}/array")).json(&items)).await;
    assert_eq!(status, 200, "{body}");
    let mut expected: Vec<(String, String)> = array_dates
        .iter()
        .map(|(raw, _, want)| (raw.to_string(), want.to_string()))
        .collect();
    // An HTTP date in the header.
    let (status, body) = answer(
        client
            .post(format!("{url}/jsons"))
            .header("X-SEKOIAIO-INTAKE-KEY", KEY)
            .header(TS_HEADER, "Mon, 05 Apr 2021 19:33:31 GMT")
            .json(&json!(["jsons-1"])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    expected.push(("jsons-1".into(), "2021-04-05T19:33:31Z".into()));
    let (status, body) = answer(
        client
            .post(format!("{url}/plain"))
            .header("X-SEKOIAIO-INTAKE-KEY", KEY)
            .header(TS_HEADER, "2021-04-05T21:33:31.000+02:00")
            .body("plain-1"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    expected.push(("plain-1".into(), "2021-04-05T21:33:31+02:00".into()));
    let (status, body) = answer(client.post(format!("{url}/batch")).json(&json!({
        "intake_key": KEY, "jsons": ["batch-1", "batch-2"], "@timestamp": "2021-04-05T21:33:31-05:30"
    })))
    .await;
    assert_eq!(status, 200, "{body}");
    expected.push(("batch-1".into(), "2021-04-05T21:33:31-05:30".into()));
    expected.push(("batch-2".into(), "2021-04-05T21:33:31-05:30".into()));

    let raws: Vec<String> = expected.iter().map(|(raw, _)| raw.clone()).collect();
    wait_delivered_from(&fwd, &mock, &raws).await;
    let mut got: Vec<(String, String)> = mock
        .events()
        .into_iter()
        .map(|e| (e.raw, e.timestamp.unwrap_or_default()))
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

/// The `/array` body of one event per key `keys`, the event naming its key.
fn one_event_per_key(keys: std::ops::Range<usize>) -> Vec<serde_json::Value> {
    keys.map(|i| json!({"intake_key": key(i), "json": format!("event of {}", key(i))}))
        .collect()
}

fn key(i: usize) -> String {
    format!("intake-key-{i:08}")
}

#[tokio::test(flavor = "multi_thread")]
async fn intake_keys_beyond_max_intake_keys_are_refused_before_anything_is_stored() {
    const MAX: usize = 5000;
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.url(), "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen(
        "[queue]\n",
        &format!("[queue]\nmax_intake_keys = {MAX}\n"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    let array = format!("{}/array", fwd.url());

    // One key too many on an empty queue: refused whole, no lane made.
    let (status, body) = answer(client.post(&array).json(&one_event_per_key(0..MAX + 1))).await;
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("max_intake_keys"), "{body}");
    let report = fwd.status().await;
    assert_eq!(report["queue"]["events"], 0, "{report}");
    assert_eq!(report["queue"]["lanes"].as_array().map(Vec::len), Some(0));

    // Exactly the limit: taken, and every key's event delivered with its key.
    let (status, body) = answer(client.post(&array).json(&one_event_per_key(0..MAX))).await;
    assert_eq!(status, 200, "{}", message(&body));
    let raws: Vec<String> = (0..MAX).map(|i| format!("event of {}", key(i))).collect();
    wait_delivered_from(&fwd, &mock, &raws).await;
    let got = mock.events();
    assert_eq!(got.len(), MAX, "the intake received more than was sent");
    assert!(got
        .iter()
        .all(|e| e.raw == format!("event of {}", e.intake_key)));

    // A known key with a new one: refused whole, the known key's event is not stored either.
    let mixed = json!([
        {"intake_key": key(0), "json": "refused, known key"},
        {"intake_key": key(MAX), "json": "refused, new key"},
    ]);
    let (status, body) = answer(client.post(&array).json(&mixed)).await;
    assert_eq!(status, 403, "{body}");
    // Known keys are still taken.
    let marker = json!([{"intake_key": key(0), "json": "marker"}]);
    let (status, body) = answer(client.post(&array).json(&marker)).await;
    assert_eq!(status, 200, "{body}");
    wait_delivered_from(&fwd, &mock, &["marker".to_owned()]).await;
    fwd.wait_drained().await;
    assert_eq!(
        mock.events().len(),
        MAX + 1,
        "events of a refused request reached the intake"
    );
    let report = fwd.status().await;
    assert_eq!(report["queue"]["lanes"].as_array().map(Vec::len), Some(MAX));

    let text = fwd.metrics().await;
    let line = format!(
        "sekoia_forwarder_http_rejected_max_intake_keys_total{{listen=\"{}\"}} 2",
        fwd.source
    );
    assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
}
