//! Observability: `/health` (liveness), `/ready` (readiness), `/status` and Prometheus
//! `/metrics` on the admin listener, and the `status` command.
//!
//! The admin listener is separate from the sources so that a scrape or a health probe never
//! competes with event senders, and so that it can stay on loopback when a source does not.
//! It comes up before the queue opens, so that probes get an answer ("starting") while a large
//! queue is loaded.
//!
//! Liveness fails only when the process is broken (a restart would help); readiness fails
//! whenever events would be refused now (queue full, stopping, starting), which a restart
//! would not cure.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::DeliveryStats;
use crate::intake_api::redact_key;
use crate::queue::{DeadLetter, Queue, QueueError, QueueStatus, ReadOnlyQueue};
use crate::sources::http::HttpSourceStats;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Observed {
    pub queue: Queue,
    pub delivery: Arc<DeliveryStats>,
    /// One per HTTP source, labelled by its listening address.
    pub http_sources: Vec<(String, Arc<HttpSourceStats>)>,
}

/// What the admin endpoints answer from: the running parts once the queue is open, and
/// whether a stop has begun.
#[derive(Debug, Clone, Default)]
pub struct AdminState {
    observed: Arc<OnceLock<Observed>>,
    stopping: CancellationToken,
}

impl AdminState {
    /// The queue is open and every part wired: everything answers from now on.
    pub fn running(&self, observed: Observed) {
        let _ = self.observed.set(observed);
    }

    /// A stop has begun: `/ready` says so from now on.
    pub fn stopping(&self) {
        self.stopping.cancel();
    }

    /// The running parts; `None` while the queue opens.
    fn observed(&self) -> Option<&Observed> {
        self.observed.get()
    }
}

/// The answer of every endpoint but `/health` while the queue opens.
fn starting() -> Response {
    probe(false, "starting")
}

/// `/status` body.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub queue: QueueStatus,
    pub delivery: DeliveryView,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeliveryView {
    pub requests: u64,
    pub acked_events: u64,
    pub retries: u64,
    pub auth_failures: u64,
    pub dead_letters: u64,
    pub in_flight: u64,
    #[serde(default)]
    pub redirects: u64,
    #[serde(default)]
    pub undated_events: u64,
}

impl Observed {
    fn report(&self) -> StatusReport {
        let d = &self.delivery;
        StatusReport {
            queue: self.queue.status(),
            delivery: DeliveryView {
                requests: d.requests.load(Ordering::Relaxed),
                acked_events: d.acked_events.load(Ordering::Relaxed),
                retries: d.retries.load(Ordering::Relaxed),
                auth_failures: d.auth_failures.load(Ordering::Relaxed),
                dead_letters: d.dead_letters.load(Ordering::Relaxed),
                in_flight: d.in_flight.load(Ordering::Relaxed),
                redirects: d.redirects.load(Ordering::Relaxed),
                undated_events: d.undated_events.load(Ordering::Relaxed),
            },
        }
    }
}

/// Binds the admin listener: at start, so that a taken port stops the start with a clear error.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (admin)"))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        addr = %addr,
        "admin listening (/health, /ready, /status, /metrics)"
    );
    Ok(listener)
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/dead-letters", get(dead_letters))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// A probe's answer: 200 or 503, and why.
fn probe(ok: bool, status: &str) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(serde_json::json!({ "status": status }))).into_response()
}

/// `GET /health`, liveness: 503 only when the process is broken and a restart would help (the
/// queue writer is gone; the process is then on its way out). A full queue waiting out an
/// outage, a start or a stop are not failures of liveness.
async fn health(State(a): State<AdminState>) -> Response {
    let Some(o) = a.observed() else {
        return probe(true, "starting");
    };
    let broken = !o.queue.writer_alive() && !a.stopping.is_cancelled();
    let status = if broken { "queue_writer_stopped" } else { "ok" };
    let errors = o.queue.stats().storage_errors.load(Ordering::Relaxed);
    let code = if broken {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(serde_json::json!({ "status": status, "storage_errors": errors })),
    )
        .into_response()
}

/// `GET /ready`, readiness: 200 only while events are accepted.
async fn ready(State(a): State<AdminState>) -> Response {
    let Some(o) = a.observed() else {
        return starting();
    };
    let status = if a.stopping.is_cancelled() {
        "stopping"
    } else if !o.queue.writer_alive() {
        "queue_writer_stopped"
    } else if o.queue.is_full() {
        "queue_full"
    } else {
        "ok"
    };
    probe(status == "ok", status)
}

async fn status(State(a): State<AdminState>) -> Response {
    match a.observed() {
        Some(o) => Json(o.report()).into_response(),
        None => starting(),
    }
}

/// A dead letter as shown to people: the intake key redacted.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterView {
    pub intake_key: String,
    pub timestamp: Option<String>,
    pub received_at_ms: u64,
    pub dead_at_ms: u64,
    pub status: u16,
    pub reason: String,
    pub event: String,
}

/// `letters` as shown to people.
fn dead_letter_views(letters: Vec<DeadLetter>) -> Vec<DeadLetterView> {
    letters
        .into_iter()
        .map(|d| DeadLetterView {
            intake_key: redact_key(&d.intake_key),
            timestamp: d.timestamp,
            received_at_ms: d.received_at_ms,
            dead_at_ms: d.dead_at_ms,
            status: d.status,
            reason: d.reason,
            event: d.event,
        })
        .collect()
}

async fn dead_letters(State(a): State<AdminState>) -> Response {
    let Some(queue) = a.observed().map(|o| o.queue.clone()) else {
        return starting();
    };
    match tokio::task::spawn_blocking(move || queue.dead_letters()).await {
        Ok(Ok(letters)) => Json(dead_letter_views(letters)).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(a): State<AdminState>) -> Response {
    let Some(o) = a.observed().cloned() else {
        return starting();
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(o));
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl Collector for Observed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let q = self.queue.stats();
        let (events, bytes) = self.queue.totals();
        let corrupt = self.queue.corrupt_generations();
        let aside = corrupt.iter().filter(|n| n.generation.is_some());
        let (aside_gens, aside_events) =
            aside.fold((0, 0), |(g, e), n| (g + 1, e + n.events.unwrap_or(0)));
        let d = &self.delivery;
        let (from_memory, decompressed) = self.queue.fresh_reads();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "queue_appended_events",
                "Events made durable in the queue",
                load(&q.appended_events),
            ),
            ("queue_commits", "Group commits", load(&q.commits)),
            (
                "queue_group_waits",
                "Times a commit waited a moment for more appends",
                load(&q.group_waits),
            ),
            (
                "queue_group_wait_gained_ops",
                "Operations those waits gained",
                load(&q.group_wait_gained),
            ),
            (
                "queue_fsyncs",
                "fsyncs of the queue's data file",
                load(&q.fsyncs),
            ),
            (
                "queue_chunks_read_from_memory",
                "Compressed chunks read for delivery from the bodies kept since their commit",
                from_memory,
            ),
            (
                "queue_chunks_decompressed",
                "Compressed chunks read for delivery and decompressed from the store",
                decompressed,
            ),
            (
                "queue_meta_fsyncs",
                "fsyncs of the queue's meta database (new intake keys, dead letters)",
                load(&q.meta_fsyncs),
            ),
            (
                "queue_meta_blob_fsyncs",
                "Blob files of the queue's meta database fsynced (dead letters of large events)",
                load(&q.meta_blob_fsyncs),
            ),
            (
                "queue_storage_errors",
                "Failed queue commits",
                load(&q.storage_errors),
            ),
            (
                "queue_rotations",
                "Queue generations sealed",
                load(&q.rotations),
            ),
            (
                "queue_deleted_generations",
                "Delivered queue generations deleted (their disk space given back)",
                load(&q.deleted_generations),
            ),
            (
                "delivery_requests",
                "Requests sent to the intake",
                load(&d.requests),
            ),
            (
                "delivery_acked_events",
                "Events acknowledged by the intake",
                load(&d.acked_events),
            ),
            (
                "delivery_retries",
                "Failed requests that will be retried",
                load(&d.retries),
            ),
            (
                "delivery_auth_failures",
                "Requests refused for their intake key (401/403)",
                load(&d.auth_failures),
            ),
            (
                "delivery_dead_letters",
                "Events refused for good and kept aside",
                load(&d.dead_letters),
            ),
            (
                "delivery_redirects",
                "Redirects (3xx) answered by the intake: never followed, retried",
                load(&d.redirects),
            ),
            (
                "delivery_undated_events",
                "Events sent without their event date, which could not be sent as a header",
                load(&d.undated_events),
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(
                &format!("sekoia_forwarder_{name}"),
                help,
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            ("queue_events", "Events waiting in the queue", events as i64),
            (
                "queue_bytes",
                "Payload bytes waiting in the queue",
                bytes as i64,
            ),
            (
                "queue_disk_bytes",
                "Bytes the queue holds on disk",
                load(&q.disk_bytes) as i64,
            ),
            (
                "queue_generations",
                "sled databases (generations) the queue is split into",
                load(&q.generations) as i64,
            ),
            (
                "queue_open_generations",
                "Queue generations open (in memory) now",
                load(&q.open_generations) as i64,
            ),
            (
                "queue_corrupt_generations",
                "Damaged queue generations moved aside (gen-N.corrupt), waiting for `salvage`",
                aside_gens,
            ),
            (
                "queue_corrupt_events",
                "Events the moved-aside generations were known to hold",
                aside_events as i64,
            ),
            (
                "queue_full",
                "1 while sources get back-pressure",
                i64::from(self.queue.is_full()),
            ),
            (
                "delivery_in_flight",
                "Requests on the wire",
                load(&d.in_flight) as i64,
            ),
        ];
        self.encode_http_sources(&mut encoder)?;
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(
                &format!("sekoia_forwarder_{name}"),
                help,
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

impl Observed {
    /// The HTTP sources' counters, one series per source (`listen` label) and status.
    fn encode_http_sources(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        type Pick = fn(&HttpSourceStats) -> &std::sync::atomic::AtomicU64;
        let plain: [(&str, &str, Pick); 4] = [
            ("http_requests", "Requests to the HTTP source", |s| {
                &s.requests
            }),
            (
                "http_accepted_events",
                "Events acknowledged by the HTTP source (durable)",
                |s| &s.accepted_events,
            ),
            (
                "http_body_bytes",
                "Request body bytes read by the HTTP source",
                |s| &s.bytes,
            ),
            (
                "http_rejected_max_intake_keys",
                "Requests refused (403) because their new intake keys would exceed max_intake_keys",
                |s| &s.rejected_max_intake_keys,
            ),
        ];
        for (name, help, pick) in plain {
            let name = format!("sekoia_forwarder_{name}");
            let mut family = encoder.encode_descriptor(
                &name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (listen, stats) in &self.http_sources {
                let labels = [("listen", listen.as_str())];
                ConstCounter::new(load(pick(stats))).encode(family.encode_family(&labels)?)?;
            }
        }
        let rejected: [(&str, Pick); 5] = [
            ("400", |s| &s.rejected_400),
            ("401", |s| &s.rejected_401),
            ("413", |s| &s.rejected_413),
            ("503", |s| &s.rejected_503),
            ("other", |s| &s.rejected_other),
        ];
        let mut family = encoder.encode_descriptor(
            "sekoia_forwarder_http_rejected_requests",
            "Requests the HTTP source refused, by status (the sender keeps their events)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (listen, stats) in &self.http_sources {
            for (status, pick) in rejected {
                let labels = [("listen", listen.as_str()), ("status", status)];
                ConstCounter::new(load(pick(stats))).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The `status` command: asks the running forwarder, or reads the queue when none runs.
pub fn print_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = match open_stopped(config)? {
        Some(queue) => StatusReport {
            queue: queue.status(),
            delivery: DeliveryView::default(),
        },
        None => fetch(config, "status")?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

/// The `dead-letters` command: the events the intake refused for good, oldest first.
pub fn print_dead_letters(config: &Config, json: bool) -> anyhow::Result<()> {
    let letters: Vec<DeadLetterView> = match open_stopped(config)? {
        Some(queue) => dead_letter_views(queue.dead_letters()?),
        None => fetch(config, "dead-letters")?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(());
    }
    println!("{} dead letter(s)", letters.len());
    for d in &letters {
        println!(
            "- key {} status {} at {} ms: {}\n  {}",
            d.intake_key, d.status, d.dead_at_ms, d.reason, d.event
        );
    }
    Ok(())
}

/// The queue, opened read-only, if no forwarder holds it; `None` if a running forwarder does
/// (it answers instead).
fn open_stopped(config: &Config) -> anyhow::Result<Option<ReadOnlyQueue>> {
    match Queue::open_read_only(&config.queue) {
        Ok(queue) => Ok(Some(queue)),
        Err(QueueError::Locked(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// GETs `/{what}` from the running forwarder's admin listener.
fn fetch<T: serde::de::DeserializeOwned>(config: &Config, what: &str) -> anyhow::Result<T> {
    let url = format!("http://{}/{what}", config.admin.listen);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let answer = reqwest::get(&url).await.with_context(|| {
            format!("the queue is in use, and the running forwarder does not answer at {url}")
        })?;
        Ok(answer.error_for_status()?.json::<T>().await?)
    })
}

fn print_text(r: &StatusReport) {
    let q = &r.queue;
    println!("queue        {}", q.path.display());
    println!(
        "backlog      {} events, {} bytes of payload",
        q.events, q.bytes
    );
    println!(
        "disk         {} bytes (limit {}){}",
        q.disk_bytes,
        q.max_bytes,
        if q.full { ", FULL" } else { "" }
    );
    println!(
        "generations  {} sled databases, {} open",
        q.generations, q.open_generations
    );
    println!("dead letters {}", q.dead_letters);
    for n in &q.corrupt_generations {
        let events = n.events.map_or("unknown".to_owned(), |e| e.to_string());
        let what = match n.generation {
            Some(_) => format!("{events} events; see `sekoia-forwarder salvage`"),
            None => "the meta database (lane map rebuilt; its dead letters stay there)".into(),
        };
        println!(
            "DAMAGED      {} moved aside: {what}; {} bytes on disk ({})",
            n.dir.display(),
            n.disk_bytes,
            n.reason
        );
    }
    for l in &q.lanes {
        println!(
            "  lane {:>3}  key {:<8} {:>10} events {:>14} bytes",
            l.lane, l.intake_key, l.events, l.bytes
        );
    }
    let d = &r.delivery;
    if d.requests > 0 {
        println!(
            "delivery     {} requests, {} events acknowledged, {} retries, {} in flight",
            d.requests, d.acked_events, d.retries, d.in_flight
        );
    }
}
