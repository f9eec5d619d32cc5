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
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::{DeliverySnapshot, DeliveryStats};
use crate::intake_api::redact_key;
use crate::queue::{DeadLetter, Queue, QueueError, QueueStatus, ReadOnlyQueue, StatsSnapshot};
use crate::sources::file::{FileSourceSnapshot, FileSourceStats};
use crate::sources::http::{HttpSourceSnapshot, HttpSourceStats};
use crate::sources::stdin::{StdinSourceSnapshot, StdinSourceStats};
use crate::sources::syslog::{SyslogSourceSnapshot, SyslogSourceStats};
use crate::stats;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Observed {
    pub queue: Queue,
    pub delivery: Arc<DeliveryStats>,
    /// One per HTTP source, labelled by its listening address.
    pub http_sources: Vec<(String, Arc<HttpSourceStats>)>,
    /// One per syslog source, labelled `udp://ADDR`, `tcp://ADDR` or `tls://ADDR`.
    pub syslog_sources: Vec<(String, Arc<SyslogSourceStats>)>,
    /// One per file source, labelled by its `paths` (comma-separated).
    pub file_sources: Vec<(String, Arc<FileSourceStats>)>,
    /// The stdin source, if configured, labelled `stdin`.
    pub stdin_sources: Vec<(String, Arc<StdinSourceStats>)>,
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

/// `/status` body: the queue as [`Queue::status`] shows it, and every counter of
/// `/metrics`, drawn from the same stats tables (`stats.rs`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub queue: QueueStatus,
    /// Absent from a `status` that read a stopped queue (nothing was counted).
    #[serde(default)]
    pub queue_counters: StatsSnapshot,
    #[serde(default)]
    pub delivery: DeliverySnapshot,
    /// One per HTTP source, by listening address.
    #[serde(default)]
    pub http_sources: Vec<SourceReport<HttpSourceSnapshot>>,
    /// One per syslog source, by `udp://`, `tcp://` or `tls://` address.
    #[serde(default)]
    pub syslog_sources: Vec<SourceReport<SyslogSourceSnapshot>>,
    /// One per file source, by its `paths` (in `listen`, comma-separated).
    #[serde(default)]
    pub file_sources: Vec<SourceReport<FileSourceSnapshot>>,
    /// The stdin source, if configured (`listen` is `stdin`).
    #[serde(default)]
    pub stdin_sources: Vec<SourceReport<StdinSourceSnapshot>>,
}

/// One source in `/status`: where it listens, and its counters.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SourceReport<S> {
    pub listen: String,
    #[serde(flatten)]
    pub stats: S,
}

fn source_reports<T, S>(
    sources: &[(String, Arc<T>)],
    snapshot: fn(&T) -> S,
) -> Vec<SourceReport<S>> {
    sources
        .iter()
        .map(|(listen, stats)| SourceReport {
            listen: listen.clone(),
            stats: snapshot(stats),
        })
        .collect()
}

impl Observed {
    fn report(&self) -> StatusReport {
        StatusReport {
            queue: self.queue.status(),
            queue_counters: self.queue.stats().snapshot(),
            delivery: self.delivery.snapshot(),
            http_sources: source_reports(&self.http_sources, HttpSourceStats::snapshot),
            syslog_sources: source_reports(&self.syslog_sources, SyslogSourceStats::snapshot),
            file_sources: source_reports(&self.file_sources, FileSourceStats::snapshot),
            stdin_sources: source_reports(&self.stdin_sources, StdinSourceStats::snapshot),
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
        stats::encode(
            &mut encoder,
            &[(Vec::new(), &self.queue.stats().snapshot())],
        )?;
        stats::encode(&mut encoder, &[(Vec::new(), &self.queue.levels())])?;
        stats::encode(&mut encoder, &[(Vec::new(), &self.delivery.snapshot())])?;
        encode_sources(
            &mut encoder,
            "listen",
            &self.http_sources,
            HttpSourceStats::snapshot,
        )?;
        encode_sources(
            &mut encoder,
            "listen",
            &self.syslog_sources,
            SyslogSourceStats::snapshot,
        )?;
        encode_sources(
            &mut encoder,
            "paths",
            &self.file_sources,
            FileSourceStats::snapshot,
        )?;
        encode_sources(
            &mut encoder,
            "input",
            &self.stdin_sources,
            StdinSourceStats::snapshot,
        )
    }
}

/// The families of one kind of source, a series per source labelled (`label`) by where it
/// listens or reads.
fn encode_sources<T, S: stats::Table>(
    encoder: &mut DescriptorEncoder,
    label: &'static str,
    sources: &[(String, Arc<T>)],
    snapshot: fn(&T) -> S,
) -> Result<(), std::fmt::Error> {
    let snapshots: Vec<_> = sources.iter().map(|(l, s)| (l, snapshot(s))).collect();
    let labelled: Vec<_> = snapshots
        .iter()
        .map(|(listen, s)| (vec![(label, listen.as_str())], s))
        .collect();
    stats::encode(encoder, &labelled)
}

/// The `status` command: asks the running forwarder, or reads the queue when none runs.
pub fn print_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = match open_stopped(config)? {
        Some(queue) => StatusReport {
            queue: queue.status(),
            queue_counters: StatsSnapshot::default(),
            delivery: DeliverySnapshot::default(),
            http_sources: Vec::new(),
            syslog_sources: Vec::new(),
            file_sources: Vec::new(),
            stdin_sources: Vec::new(),
        },
        None => fetch(config, "status")?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status_text(&report));
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

/// What `status` prints (without `--json`).
pub fn status_text(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let q = &r.queue;
    let _ = writeln!(out, "queue        {}", q.path.display());
    let _ = writeln!(
        out,
        "backlog      {} events, {} bytes of payload",
        q.events, q.bytes
    );
    let _ = writeln!(
        out,
        "disk         {} bytes (limit {}){}",
        q.disk_bytes,
        q.max_bytes,
        if q.full { ", FULL" } else { "" }
    );
    let _ = writeln!(
        out,
        "generations  {} sled databases, {} open",
        q.generations, q.open_generations
    );
    let _ = writeln!(out, "dead letters {}", q.dead_letters);
    for n in &q.corrupt_generations {
        let events = n.events.map_or("unknown".to_owned(), |e| e.to_string());
        let what = match n.generation {
            Some(_) => format!("{events} events; see `sekoia-forwarder salvage`"),
            None => "the meta database (lane map rebuilt; its dead letters stay there)".into(),
        };
        let _ = writeln!(
            out,
            "DAMAGED      {} moved aside: {what}; {} bytes on disk ({})",
            n.dir.display(),
            n.disk_bytes,
            n.reason
        );
    }
    for l in &q.lanes {
        let _ = writeln!(
            out,
            "  lane {:>3}  key {:<8} {:>10} events {:>14} bytes",
            l.lane, l.intake_key, l.events, l.bytes
        );
    }
    let d = &r.delivery;
    if d.requests > 0 {
        let _ = writeln!(
            out,
            "delivery     {} requests, {} events acknowledged, {} retries, {} in flight",
            d.requests, d.acked_events, d.retries, d.in_flight
        );
    }
    sources_text(r, &mut out);
    out
}

/// One line per source of a running forwarder (a stopped queue has none): what it made
/// durable, and what an operator looks for first when events do not arrive.
fn sources_text(r: &StatusReport, out: &mut String) {
    use std::fmt::Write;
    for s in &r.http_sources {
        let _ = writeln!(
            out,
            "source       http {}: {} events accepted",
            s.listen, s.stats.accepted_events
        );
    }
    for s in &r.syslog_sources {
        let t = &s.stats;
        let _ = writeln!(
            out,
            "source       syslog {}: {} events, {} truncated, {} split pieces, {} dead-lettered, \
             {} invalid UTF-8, {} open connections, {} datagrams dropped by the kernel",
            s.listen,
            t.accepted_events,
            t.truncated_events,
            t.split_pieces,
            t.dead_lettered_events,
            t.invalid_utf8_events,
            t.open_connections,
            t.kernel_dropped_datagrams
        );
    }
    for s in &r.file_sources {
        let t = &s.stats;
        let _ = writeln!(
            out,
            "source       file {}: {} events, {} files read, {} waiting, {} truncated, \
             {} dead-lettered, {} invalid UTF-8, {} read errors",
            s.listen,
            t.accepted_events,
            t.open_files,
            t.files_waiting,
            t.truncated_events,
            t.dead_lettered_events,
            t.invalid_utf8_events,
            t.read_errors
        );
    }
    for s in &r.stdin_sources {
        let t = &s.stats;
        let _ = writeln!(
            out,
            "source       stdin: {} events, {} truncated, {} dead-lettered, {} invalid UTF-8{}",
            t.accepted_events,
            t.truncated_events,
            t.dead_lettered_events,
            t.invalid_utf8_events,
            if t.ended > 0 { ", input ended" } else { "" }
        );
    }
}
