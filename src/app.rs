//! Wires sources, queue and delivery together, and stops them in the order that loses nothing.
//!
//! Shutdown (SIGTERM or SIGINT):
//! 1. sources stop accepting; requests in flight finish (their events are appended and
//!    acknowledged) within `SOURCE_GRACE`; later requests get 503 + Retry-After;
//! 2. delivery stops starting batches; requests on the wire finish within `DELIVERY_GRACE` and
//!    their acknowledgements are recorded;
//! 3. the queue commits and fsyncs what is left, and the process exits 0.
//!
//! Whatever is still queued is delivered by the next start.
//!
//! If the queue writer thread ends while running (a panic, an error it cannot go on after),
//! nothing can be stored or removed any more: the process says why once and exits non-zero at
//! once, so that its supervisor (systemd's `Restart=`) starts it again. What senders saw
//! acknowledged is on disk; the rest they were refused.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Observed};
use crate::config::{Config, SourceConfig};
use crate::delivery::Delivery;
use crate::queue::Queue;
use crate::ready::{Readiness, ReadyInfo, ReadySource};
use crate::sources::file::FileSource;
use crate::sources::http::HttpSource;
use crate::sources::stdin::StdinSource;
use crate::sources::syslog::SyslogSource;

const SOURCE_GRACE: Duration = Duration::from_secs(10);
const DELIVERY_GRACE: Duration = Duration::from_secs(5);

/// Runs the forwarder until SIGTERM or SIGINT; `readiness` is told once it is up and when it
/// begins to stop.
pub async fn run(config: Config, readiness: Readiness) -> anyhow::Result<()> {
    // Installed first: a signal that comes while the queue opens must stop us cleanly, not kill
    // us with the default action.
    let signals = Signals::install()?;
    // The admin listener first: probes get an answer ("starting") while a large queue opens.
    let admin_state = AdminState::default();
    let admin_stop = CancellationToken::new();
    let mut ready = ReadyInfo {
        pid: std::process::id(),
        admin: None,
        sources: Vec::new(),
    };
    let admin = if config.admin.enabled {
        let listener = admin::bind(config.admin.listen).await?;
        ready.admin = Some(listener.local_addr()?);
        Some(tokio::spawn(admin::serve(
            listener,
            admin_state.clone(),
            admin_stop.clone(),
        )))
    } else {
        None
    };
    let queue_config = config.queue.clone();
    let queue = tokio::task::spawn_blocking(move || Queue::open(&queue_config))
        .await?
        .with_context(|| format!("cannot open the queue at {}", config.queue.path.display()))?;
    let status = queue.status();
    tracing::info!(
        path = %status.path.display(),
        backlog_events = status.events,
        backlog_bytes = status.bytes,
        disk_bytes = status.disk_bytes,
        intake_keys = status.lanes.len(),
        dead_letters = status.dead_letters,
        "queue opened"
    );

    let sources_stop = CancellationToken::new();
    let delivery_stop = CancellationToken::new();
    let mut sources = tokio::task::JoinSet::new();
    let mut http_sources = Vec::new();
    let mut syslog_sources = Vec::new();
    let mut file_sources = Vec::new();
    let mut stdin_sources = Vec::new();
    for source in &config.sources {
        match source {
            SourceConfig::Http(http) => {
                let src = HttpSource::bind(http.clone(), queue.clone())
                    .await
                    .with_context(|| format!("cannot listen on {}", http.listen))?;
                http_sources.push((src.local_addr().to_string(), src.stats()));
                ready.sources.push(ReadySource {
                    kind: "http".into(),
                    listen: src.local_addr(),
                    transport: None,
                });
                sources.spawn(src.run(sources_stop.clone()));
            }
            SourceConfig::Syslog(syslog) => {
                let src = SyslogSource::bind(syslog.clone(), queue.clone()).await?;
                let listen = format!("{}://{}", src.scheme(), src.local_addr());
                syslog_sources.push((listen, src.stats()));
                ready.sources.push(ReadySource {
                    kind: "syslog".into(),
                    listen: src.local_addr(),
                    transport: Some(src.scheme().into()),
                });
                sources.spawn(src.run(sources_stop.clone()));
            }
            SourceConfig::File(file) => {
                let src = FileSource::new(file.clone(), queue.clone())?;
                file_sources.push((src.label().to_owned(), src.stats()));
                sources.spawn(src.run(sources_stop.clone()));
            }
            SourceConfig::Stdin(stdin) => {
                // It finishes at the end of the input; the forwarder goes on until stopped.
                let src = StdinSource::new(stdin, queue.clone())?;
                stdin_sources.push(("stdin".to_owned(), src.stats()));
                sources.spawn(src.run(sources_stop.clone()));
            }
        }
    }

    let delivery = Delivery::new(config.intake.clone(), queue.clone(), delivery_stop.clone())?;
    tracing::info!(endpoint = delivery.endpoint(), "delivering to the intake");
    admin_state.running(Observed {
        queue: queue.clone(),
        delivery: delivery.stats(),
        http_sources,
        syslog_sources,
        file_sources,
        stdin_sources,
    });
    let delivery = delivery
        .start(DELIVERY_GRACE)
        .await
        .context("cannot start delivery's threads")?;
    readiness.ready(&ready);

    let writer_gone = tokio::select! {
        () = signals.wait() => None,
        why = queue.writer_stopped() => Some(why),
    };
    admin_state.stopping();
    readiness.stopping();
    if let Some(why) = writer_gone {
        tracing::error!(
            reason = %why,
            "the queue writer stopped: nothing can be stored or removed any more; exiting so \
             that the service manager restarts the forwarder"
        );
        sources_stop.cancel();
        delivery_stop.cancel();
        admin_stop.cancel();
        anyhow::bail!("cannot run without the queue writer");
    }
    tracing::info!("stopping: no new events accepted, finishing requests in flight");
    sources_stop.cancel();
    let drained = tokio::time::timeout(SOURCE_GRACE, async {
        while let Some(res) = sources.join_next().await {
            match res {
                Ok(Err(e)) => tracing::error!(error = %e, "source failed while stopping"),
                Err(e) => tracing::error!(error = %e, "source task failed"),
                Ok(Ok(())) => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "some source requests did not finish in time; their senders were not acknowledged"
        );
        sources.abort_all();
    }
    delivery_stop.cancel();
    if let Err(e) = delivery.finished().await {
        tracing::error!(error = %e, "delivery failed");
    }
    queue.close().await.context("cannot close the queue")?;
    admin_stop.cancel();
    if let Some(admin) = admin {
        match admin.await {
            Ok(Err(e)) => tracing::error!(error = %e, "admin listener failed"),
            Err(e) => tracing::error!(error = %e, "admin task failed"),
            Ok(Ok(())) => {}
        }
    }
    let (events, bytes) = queue.totals();
    tracing::info!(
        backlog_events = events,
        backlog_bytes = bytes,
        "stopped; the backlog is delivered at next start"
    );
    Ok(())
}

/// SIGTERM and SIGINT, listened to from the start (also by `send`).
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    pub(crate) async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
