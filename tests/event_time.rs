//! Event time across outages, through the real binary and the mock intake: an event that
//! waited in the queue reaches the intake dated by when the forwarder received it, not by when
//! the link came back (`event_time = "reception"`, the default); a request never carries
//! events received further apart than `event_time_tolerance_ms`; `event_time = "intake"`
//! sends undated events without a date; a sender's own date is kept in both.

mod common;

use common::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEY: &str = "event-time-test-key-000001";

/// The wall clock, ms since the Unix epoch (what the forwarder stamps events with).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Waits until the wall clock reads at least `at_ms`: the time gap a test needs, made by a
/// condition on the clock rather than a fixed sleep.
async fn wait_for_clock(at_ms: u64) {
    while now_ms() < at_ms {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The event date the mock received with `event`, in ms since the Unix epoch.
fn date_ms(event: &ReceivedEvent) -> u64 {
    let ts = event
        .timestamp
        .as_deref()
        .unwrap_or_else(|| panic!("{:?} arrived without a date", event.raw));
    chrono::DateTime::parse_from_rfc3339(ts)
        .unwrap_or_else(|e| panic!("{ts:?} is not RFC 3339: {e}"))
        .timestamp_millis() as u64
}

/// Events sent in two rounds 2+ s apart while the intake is down, delivered once it comes back
/// 1.5+ s after the second round: every event is dated within the time its round was sent
/// (so never by the delivery time), and no request mixed the rounds (its one date would be
/// outside one of the two windows).
#[tokio::test(flavor = "multi_thread")]
async fn events_queued_through_an_outage_arrive_with_their_reception_time() {
    let mock = refusing_intake().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
    let client = reqwest::Client::new();

    let first_from = now_ms();
    let first = send_events(&client, &fwd.url(), KEY, 0, 200, 50).await;
    let first_to = now_ms();
    assert_eq!(first.len(), 200, "{}", fwd.log());
    wait_for_clock(first_to + 2_100).await;

    let second_from = now_ms();
    let second = send_events(&client, &fwd.url(), KEY, 200, 200, 50).await;
    let second_to = now_ms();
    assert_eq!(second.len(), 200, "{}", fwd.log());
    // The outage goes on a while: delivery tried and was refused.
    let refused = mock
        .wait_for_stats(|s| s.status_count(503) >= 2, DEADLINE)
        .await;
    assert!(refused, "the intake was never tried:\n{}", fwd.log());
    wait_for_clock(second_to + 1_500).await;
    let back = now_ms();
    mock.set_faults(FaultConfig::default());

    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    wait_delivered_from(&fwd, &mock, &all).await;
    fwd.wait_drained().await;
    let status = fwd.status().await;
    assert_eq!(
        status["delivery"]["reception_dated_events"], 400,
        "{status}"
    );
    let rounds = [
        (&first, first_from, first_to),
        (&second, second_from, second_to),
    ];
    let events = mock.events();
    for (round, from, to) in rounds {
        let round: std::collections::HashSet<&str> = round.iter().map(String::as_str).collect();
        for e in events.iter().filter(|e| round.contains(e.raw.as_str())) {
            let date = date_ms(e);
            assert!(
                (from..=to).contains(&date),
                "{:?} dated {:?}, sent between {from} and {to} ms; the intake came back at {back}",
                e.raw,
                e.timestamp
            );
            assert!(date + 1_500 <= back, "dated by its delivery");
        }
    }
}

/// With `event_time = "intake"`, events without a date of their own go without one (the
/// intake dates them when they reach it), as before the option; events with a date of their
/// own keep it in both modes, and undated events get their reception time by default.
#[tokio::test(flavor = "multi_thread")]
async fn intake_mode_sends_no_date_and_senders_dates_are_kept() {
    const OWN: &str = "2021-04-05T19:33:31.123Z";
    for (mode, extra) in [("reception", ""), ("intake", "event_time = \"intake\"")] {
        let mock = start_mock().await;
        let (fwd, _dir) = forwarder_for(&mock, extra, "");
        let client = reqwest::Client::new();
        let from = now_ms();
        let undated = send_events(&client, &fwd.url(), KEY, 0, 20, 10).await;
        let to = now_ms();
        assert_eq!(undated.len(), 20);
        let dated: Vec<String> = (100..110).map(event).collect();
        let answer = client
            .post(format!("{}/jsons", fwd.url()))
            .header("X-SEKOIAIO-INTAKE-KEY", KEY)
            .header("X-SEKOIAIO-EVENT-TIMESTAMP", OWN)
            .json(&dated)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", fwd.log());
        let in_array = event(200);
        let answer = client
            .post(format!("{}/array", fwd.url()))
            .json(&serde_json::json!([
                {"intake_key": KEY, "json": in_array, "timestamp": "2021-04-05T21:33:31+02:00"}
            ]))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", fwd.log());

        let mut all = undated.clone();
        all.extend(dated.iter().cloned());
        all.push(in_array.clone());
        wait_delivered_from(&fwd, &mock, &all).await;
        fwd.wait_drained().await;
        let status = fwd.status().await;
        let dated_by_reception = if mode == "intake" { 0 } else { 20 };
        assert_eq!(
            status["delivery"]["reception_dated_events"], dated_by_reception,
            "{mode}: {status}"
        );
        for e in mock.events() {
            if dated.contains(&e.raw) {
                assert_eq!(e.timestamp.as_deref(), Some(OWN), "{mode}: {e:?}");
            } else if e.raw == in_array {
                assert_eq!(
                    e.timestamp.as_deref(),
                    Some("2021-04-05T21:33:31+02:00"),
                    "{mode}: {e:?}"
                );
            } else if mode == "intake" {
                assert_eq!(e.timestamp, None, "{mode}: {e:?}");
            } else {
                let date = date_ms(&e);
                assert!(
                    (from..=to).contains(&date),
                    "{mode}: {e:?}, sent {from}..{to}"
                );
            }
        }
    }
}

/// A tolerance of 0 is allowed: each request then carries only events received in the same
/// millisecond (in practice, of one append), and they all still arrive, each dated within
/// the time it was sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_zero_tolerance_cuts_at_every_reception_time() {
    let mock = refusing_intake().await;
    let (fwd, _dir) = forwarder_for(&mock, "event_time_tolerance_ms = 0", "");
    let client = reqwest::Client::new();
    let mut rounds = Vec::new();
    for r in 0..5 {
        let from = now_ms();
        let acked = send_events(&client, &fwd.url(), KEY, r * 10, 10, 10).await;
        let to = now_ms();
        assert_eq!(acked.len(), 10);
        rounds.push((acked, from, to));
        // Each round in a millisecond of its own.
        wait_for_clock(to + 5).await;
    }
    let refused = mock
        .wait_for_stats(|s| s.status_count(503) >= 1, DEADLINE)
        .await;
    assert!(refused);
    let before = mock.stats().accepted_requests;
    mock.set_faults(FaultConfig::default());
    let all: Vec<String> = rounds.iter().flat_map(|r| r.0.clone()).collect();
    wait_delivered_from(&fwd, &mock, &all).await;
    let events = mock.events();
    for (acked, from, to) in &rounds {
        let dates: std::collections::BTreeSet<u64> = events
            .iter()
            .filter(|e| acked.contains(&e.raw))
            .map(date_ms)
            .collect();
        assert_eq!(dates.len(), 1, "one append, one date: {dates:?}");
        assert!(dates.iter().all(|d| (from..=to).contains(&d)), "{dates:?}");
    }
    assert!(
        mock.stats().accepted_requests - before >= 5,
        "one request per reception time at least: {:?}",
        mock.stats()
    );
}
