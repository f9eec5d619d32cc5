//! The real binary between a client and the mock intake: every fault the intake can throw,
//! and proof that every acknowledged event arrives (and how many duplicates each fault costs).

mod common;

use common::*;
use std::time::Duration;

const KEY: &str = "test-intake-key-0000000001";

fn faults(script: Vec<ScriptedFault>) -> FaultConfig {
    FaultConfig {
        script,
        ..FaultConfig::default()
    }
}

/// Runs `n` events through a forwarder whose intake misbehaves as `faults` says; returns the
/// number of duplicates the mock received.
async fn deliver_through(faults: FaultConfig, intake_extra: &str, n: usize) -> usize {
    let mock = start_mock().await;
    mock.set_faults(faults);
    let (fwd, _dir) = forwarder_for(&mock, intake_extra, "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, n, 50).await;
    assert_eq!(
        acked.len(),
        n,
        "the forwarder refused events:\n{}",
        fwd.log()
    );
    wait_delivered(&mock, &acked).await;
    fwd.wait_drained().await;
    let dups = assert_all_delivered(&mock, &acked);
    assert!(mock.events().iter().all(|e| e.intake_key == KEY));
    dups
}

#[tokio::test(flavor = "multi_thread")]
async fn events_reach_the_intake_and_leave_the_queue() {
    let dups = deliver_through(FaultConfig::default(), "", 500).await;
    assert_eq!(dups, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_requests_are_delivered() {
    // 5,000 events of ~200 bytes in one 1 MB request.
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let acked = send_events(&reqwest::Client::new(), &fwd.url(), KEY, 0, 5000, 5000).await;
    assert_eq!(acked.len(), 5000);
    wait_delivered(&mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_compressed_delivery() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "compression = \"gzip\"", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 300, 100).await;
    wait_delivered(&mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
    let stats = mock.stats();
    assert!(stats.gzip_requests > 0, "{stats:?}");
    assert_eq!(stats.gzip_requests, stats.requests, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_went_through() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 300, 100).await;
    let refused = client
        .post(format!("{}/jsons", fwd.url()))
        .body("not json")
        .header("X-SEKOIAIO-INTAKE-KEY", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    wait_delivered(&mock, &acked).await;
    fwd.wait_drained().await;
    let text = fwd.metrics().await;
    let source = format!("listen=\"{}\"", fwd.source);
    for line in [
        format!("sekoia_forwarder_http_accepted_events_total{{{source}}} 300"),
        format!("sekoia_forwarder_http_rejected_requests_total{{{source},status=\"400\"}} 1"),
        "sekoia_forwarder_delivery_acked_events_total 300".to_owned(),
        "sekoia_forwarder_queue_events 0".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(!text.contains(KEY));
}

/// The metrics table of docs/operations.md is the list of what `/metrics` serves, no more and
/// no less; and `/status` shows the same counters (both are drawn from one stats table).
#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_the_documented_ones_and_status_shows_them_too() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 40, 10).await;
    wait_delivered(&mock, &acked).await;
    fwd.wait_drained().await;
    let text = fwd.metrics().await;
    let served: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    // Rows of the table: "| `sekoia_forwarder_name_total{labels}` | type | ...".
    let documented: std::collections::BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `sekoia_forwarder_"))
        .map(|l| {
            let name = l.split(['`', '{']).next().unwrap();
            let name = name.strip_suffix("_total").unwrap_or(name);
            format!("sekoia_forwarder_{name}")
        })
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not in docs/operations.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/operations.md, not served: {missing:?}"
    );
    let status = fwd.status().await;
    assert_eq!(status["delivery"]["acked_events"], 40, "{status}");
    assert_eq!(status["queue_counters"]["appended_events"], 40, "{status}");
    let source = &status["http_sources"][0];
    assert_eq!(source["listen"], fwd.source.to_string(), "{status}");
    assert_eq!(source["accepted_events"], 40, "{status}");
    assert!(
        text.lines()
            .any(|l| l == "sekoia_forwarder_queue_appended_events_total 40"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried() {
    let dups = deliver_through(
        faults(vec![ScriptedFault::Status {
            status: 503,
            retry_after_secs: None,
            times: 4,
        }]),
        "",
        200,
    )
    .await;
    assert_eq!(dups, 0, "a 5xx answer means nothing was kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_requests_honours_retry_after() {
    let mock = start_mock().await;
    mock.set_faults(faults(vec![ScriptedFault::Status {
        status: 429,
        retry_after_secs: Some(2),
        times: 1,
    }]));
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let start = std::time::Instant::now();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 10, 10).await;
    wait_delivered(&mock, &acked).await;
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "retried before Retry-After (backoff alone would have retried after ~50 ms)"
    );
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
}

/// `Retry-After` as an HTTP date in the future is obeyed like delay-seconds.
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_as_a_date_is_honoured() {
    let mock = start_mock().await;
    mock.set_faults(faults(vec![ScriptedFault::RetryAtDate {
        status: 503,
        after_secs: 3,
        times: 1,
    }]));
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 10, 10).await;
    let refused = mock
        .wait_for_stats(|s| s.status_count(503) == 1, DEADLINE)
        .await;
    assert!(refused, "{:?}", mock.stats());
    let start = std::time::Instant::now();
    wait_delivered_from(&fwd, &mock, &acked).await;
    // The date has a resolution of a second: 3 s ahead is at least 2 s of wait.
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "retried after {:?}, before the date of Retry-After (backoff alone retries after ~50 ms)",
        start.elapsed()
    );
    assert_eq!(mock.stats().status_count(503), 1);
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_connections_are_retried() {
    let dups = deliver_through(faults(vec![ScriptedFault::Drop { times: 3 }]), "", 200).await;
    assert_eq!(dups, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_answers_time_out_and_are_retried() {
    // The mock records the events and answers after 3 s; the forwarder gives up after 1 s and
    // sends again: the cost is one duplicate batch.
    let dups = deliver_through(
        faults(vec![ScriptedFault::Slow {
            delay_ms: 3000,
            times: 1,
        }]),
        "request_timeout_secs = 1",
        100,
    )
    .await;
    // One batch sent twice; more only if a loaded machine makes other requests time out too.
    assert!(dups <= 300, "{dups} duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_then_fail_costs_duplicates_not_losses() {
    let dups = deliver_through(
        faults(vec![ScriptedFault::AcceptThenFail { times: 2 }]),
        "",
        100,
    )
    .await;
    assert!(dups > 0 && dups <= 200, "{dups} duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_number_of_ids_is_not_an_acknowledgement() {
    let dups = deliver_through(
        faults(vec![ScriptedFault::WrongIds {
            delta: -1,
            times: 2,
        }]),
        "",
        100,
    )
    .await;
    assert!(
        dups > 0,
        "the batch was removed although not every event got an id"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn too_large_batches_are_split() {
    // 100 events of ~200 bytes: ~20 KB per batch; the intake takes at most 5 KB.
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        max_body_bytes: Some(5000),
        ..FaultConfig::default()
    });
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let acked = send_events(&reqwest::Client::new(), &fwd.url(), KEY, 0, 100, 100).await;
    assert_eq!(acked.len(), 100);
    wait_delivered_from(&fwd, &mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
    assert!(
        mock.stats().status_count(413) > 0,
        "no request was too large, so nothing was split: {:?}",
        mock.stats()
    );
    let status = fwd.status().await;
    assert_eq!(status["queue"]["dead_letters"], 0, "{status}");
}

/// A single event over the intake's limit is refused alone, whatever the split: it is
/// dead-lettered with the 413, and the events around it are delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_event_too_large_is_dead_lettered_with_413() {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        max_body_bytes: Some(5000),
        ..FaultConfig::default()
    });
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let mut batch: Vec<String> = (0..20).map(event).collect();
    let huge = format!("HUGE {}", "y".repeat(6000));
    batch[7] = huge.clone();
    assert!(post_jsons(&client, &fwd.url(), KEY, &batch).await);
    let good: Vec<String> = batch.iter().filter(|e| **e != huge).cloned().collect();
    wait_delivered_from(&fwd, &mock, &good).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &good), 0);
    assert!(mock.events().iter().all(|e| e.raw != huge));
    let letters: serde_json::Value = reqwest::get(format!("http://{}/dead-letters", fwd.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["status"], 413);
    assert_eq!(letters[0]["event"], huge.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_events_are_dead_lettered_and_the_rest_delivered() {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        reject_containing: Some("POISON".into()),
        ..FaultConfig::default()
    });
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let mut batch: Vec<String> = (0..64).map(event).collect();
    batch[17] = "POISON 17".into();
    batch[40] = "POISON 40".into();
    assert!(post_jsons(&client, &fwd.url(), KEY, &batch).await);
    let good: Vec<String> = batch
        .iter()
        .filter(|e| !e.contains("POISON"))
        .cloned()
        .collect();
    wait_delivered(&mock, &good).await;
    fwd.wait_drained().await;
    let status = fwd.status().await;
    assert_eq!(status["queue"]["dead_letters"], 2, "{status}");
    assert_eq!(assert_all_delivered(&mock, &good), 0);
    assert!(mock.events().iter().all(|e| !e.raw.contains("POISON")));
    // People can see what was refused and why, without the key.
    let letters: serde_json::Value = reqwest::get(format!("http://{}/dead-letters", fwd.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events: Vec<&str> = letters
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["POISON 17", "POISON 40"], "{letters}");
    assert_eq!(letters[0]["status"], 400);
    assert!(!letters.to_string().contains(KEY));
    // And with the forwarder stopped, from the command line.
    let mut fwd = fwd;
    let log = fwd.stop_and_log();
    assert!(!log.contains(KEY), "the intake key appeared in the logs");
    let (_, listed) = run_json_command("dead-letters", &fwd.config);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
}

/// A refused key (403) is retried slowly (`auth_retry_secs`, far above the backoff cap of
/// 1 s, so that a slow retry cannot pass for ordinary backoff) while another key flows.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_waits_while_other_keys_flow() {
    const AUTH_RETRY_SECS: u64 = 20;
    let mock = start_mock().await;
    let bad = "revoked-intake-key-0000000002";
    let mut config = FaultConfig::default();
    config.key_status.insert(bad.into(), 403);
    mock.set_faults(config);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("auth_retry_secs = {AUTH_RETRY_SECS}");
    let config = write_config(dir.path(), &mock.url(), &extra, "");
    let fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    let bad_events: Vec<String> = (0..20).map(|i| format!("bad-{i}")).collect();
    assert!(post_jsons(&client, &fwd.url(), bad, &bad_events).await);
    let refused = mock
        .wait_for_stats(|s| s.status_count(403) >= 1, DEADLINE)
        .await;
    assert!(refused, "{:?}", mock.stats());
    let first_403 = std::time::Instant::now();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 100, 20).await;
    // The other key is not held up by the refused one: delivered well before its slow retry.
    let flowed = mock
        .wait_for(
            |events| events.iter().filter(|e| e.intake_key == KEY).count() >= acked.len(),
            Duration::from_secs(AUTH_RETRY_SECS / 2),
        )
        .await;
    assert!(flowed, "the other key waited for the refused one");
    assert_all_delivered(&mock, &acked);
    // Backoff (capped at 1 s) would have tried again by now; the slow retry has not.
    let retried = mock
        .wait_for_stats(
            |s| s.status_count(403) >= 2,
            Duration::from_secs(AUTH_RETRY_SECS / 2).saturating_sub(first_403.elapsed()),
        )
        .await;
    assert!(
        !retried,
        "a refused key was retried like any failure: {:?}",
        mock.stats()
    );
    let status = fwd.status().await;
    assert_eq!(
        status["queue"]["events"], 20,
        "the refused key's events must stay queued: {status}"
    );
    assert_eq!(status["delivery"]["auth_failures"], 1, "{status}");
    // Once the key is accepted again, its events go through (at the slow retry).
    mock.set_faults(FaultConfig::default());
    wait_delivered_from(&fwd, &mock, &bad_events).await;
    fwd.wait_drained().await;
    assert_eq!(mock.stats().status_count(403), 1, "{:?}", mock.stats());
    let mut fwd = fwd;
    let log = fwd.stop_and_log();
    assert!(log.contains("refuses this intake key"), "{log}");
    assert!(!log.contains(bad), "the intake key appeared in the logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn intake_down_then_up_delivers_the_backlog() {
    // The intake is down: its port is bound but nothing accepts (requests time out). The test
    // holds the port all along, so that no other process can take it before the intake is up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, "request_timeout_secs = 2", "");
    let fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 300, 30).await;
    assert_eq!(acked.len(), 300);
    let status = fwd.status().await;
    assert_eq!(status["queue"]["events"], 300, "{status}");
    let mock = MockIntake::start_on(listener).await.expect("mock");
    wait_delivered_from(&fwd, &mock, &acked).await;
    fwd.wait_drained().await;
    assert_all_delivered(&mock, &acked);
}

/// Many first requests on new keys at once: every key gets a delivery task and drains (a new
/// key's lane created while delivery was reading the lane list once had none).
#[tokio::test(flavor = "multi_thread")]
async fn many_new_keys_at_once_all_drain() {
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let mut senders = tokio::task::JoinSet::new();
    for k in 0..300 {
        let (client, url) = (client.clone(), fwd.url());
        senders.spawn(async move {
            let key = format!("new-intake-key-{k:06}");
            let events = vec![event(k)];
            post_jsons(&client, &url, &key, &events)
                .await
                .then_some(events)
        });
    }
    let mut acked = Vec::new();
    while let Some(sent) = senders.join_next().await {
        acked.extend(
            sent.unwrap()
                .expect("the forwarder refused a first request"),
        );
    }
    assert_eq!(acked.len(), 300);
    wait_delivered_from(&fwd, &mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
    for e in mock.events() {
        let k: usize = e.raw[6..14].parse().unwrap();
        assert_eq!(e.intake_key, format!("new-intake-key-{k:06}"));
    }
}

/// Redirects are never followed: the intake key would go to wherever a proxy or a hijacked
/// DNS name points, and a 301/302/303 would turn the POST into a GET without its events. A 3xx
/// is a failed try: retried with backoff, nothing removed, the other listener gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_not_followed() {
    let mock = start_mock().await;
    let elsewhere = self::start_mock().await;
    let location = format!("{}/jsons", elsewhere.url());
    mock.set_faults(faults(vec![
        ScriptedFault::Redirect {
            status: 301,
            location: location.clone(),
            times: 2,
        },
        ScriptedFault::Redirect {
            status: 307,
            location,
            times: 1_000_000,
        },
    ]));
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 100, 50).await;
    assert_eq!(acked.len(), 100);
    let redirected = mock
        .wait_for_stats(|s| s.status_count(307) >= 3, DEADLINE)
        .await;
    assert!(redirected, "{:?}", mock.stats());
    assert_eq!(elsewhere.stats().requests, 0, "{:?}", elsewhere.stats());
    let status = fwd.status().await;
    assert_eq!(status["queue"]["events"], 100, "{status}");
    assert_eq!(status["delivery"]["acked_events"], 0, "{status}");
    assert_eq!(status["queue"]["dead_letters"], 0, "{status}");
    assert!(
        status["delivery"]["redirects"].as_u64() >= Some(5),
        "{status}"
    );
    // The intake stops redirecting: everything is delivered, once, to it alone.
    mock.set_faults(FaultConfig::default());
    wait_delivered_from(&fwd, &mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
    assert_eq!(elsewhere.stats().requests, 0, "{:?}", elsewhere.stats());
    let metrics = fwd.metrics().await;
    assert!(
        metrics.contains("sekoia_forwarder_delivery_redirects_total "),
        "{metrics}"
    );
    let mut fwd = fwd;
    let log = fwd.stop_and_log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("redirect")).collect();
    assert_eq!(
        lines.len(),
        2,
        "one line when it starts, one when it ends: {lines:#?}"
    );
    assert!(
        lines[0].contains(&elsewhere.addr().to_string()),
        "the location's host is not logged: {lines:#?}"
    );
    assert!(!log.contains(KEY), "the intake key appeared in the logs");
}

/// A failed or refused delivery never advances the queue: after many failed tries, every event
/// is still queued, and the queue's counters say so.
#[tokio::test(flavor = "multi_thread")]
async fn failed_deliveries_never_advance_the_queue() {
    let mock = start_mock().await;
    mock.set_faults(faults(vec![
        ScriptedFault::Status {
            status: 500,
            retry_after_secs: None,
            times: 3,
        },
        ScriptedFault::AcceptThenFail { times: 3 },
        ScriptedFault::WrongIds { delta: 1, times: 3 },
        ScriptedFault::Drop { times: 1_000_000 },
    ]));
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 100, 100).await;
    assert_eq!(acked.len(), 100);
    // Wait until every kind of failure was answered at least once, and then some drops.
    let ok = mock
        .wait_for_stats(|s| s.dropped_connections >= 3, DEADLINE)
        .await;
    assert!(ok, "{:?}", mock.stats());
    let status = fwd.status().await;
    assert_eq!(status["queue"]["events"], 100, "{status}");
    assert_eq!(status["delivery"]["acked_events"], 0, "{status}");
    assert_eq!(status["queue"]["dead_letters"], 0, "{status}");
}
