//! `sekoia-forwarder mock-intake`: the mock as a command, printing the events it accepts.

use std::net::SocketAddr;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::state::Settings;
use super::{MockIntake, ReceivedEvent};
use crate::intake_api::redact_key;

/// Options of `sekoia-forwarder mock-intake`.
#[derive(Debug, Clone, clap::Args)]
pub struct MockCliOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Do not print the accepted events on stdout.
    #[arg(long)]
    pub quiet: bool,
    /// Keep at most this many events in memory for GET /_mock/events (oldest forgotten first).
    #[arg(long, default_value_t = 100_000)]
    pub keep_events: usize,
}

/// Runs the mock until Ctrl-C or SIGTERM, printing one JSON line per accepted event on stdout.
pub async fn run_cli(opts: MockCliOptions) -> anyhow::Result<()> {
    use anyhow::Context;

    let (tap, printed) = if opts.quiet {
        (None, None)
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    };
    let settings = Settings {
        tap,
        max_kept_events: opts.keep_events,
    };
    let mock = MockIntake::start_with(opts.listen, settings)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = mock.addr();
    tracing::info!(addr = %addr, "mock intake listening");
    eprintln!("mock intake listening on http://{addr}");
    let printer = printed.map(|rx| tokio::spawn(print_events(rx)));

    let stopped = stop_signal().await;
    tracing::info!("mock intake stopping");
    // Dropping the mock's state closes the printer's channel, so the printer ends.
    mock.shutdown().await;
    if let Some(printer) = printer {
        if let Err(e) = printer.await {
            tracing::warn!(error = %e, "mock intake printer failed");
        }
    }
    stopped.context("cannot wait for Ctrl-C/SIGTERM")
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

/// One printed line: the key redacted, the event verbatim.
#[derive(Serialize)]
struct PrintedEvent<'a> {
    intake_key: String,
    timestamp: Option<&'a str>,
    event: &'a str,
}

pub(super) fn event_line(e: &ReceivedEvent) -> String {
    let printed = PrintedEvent {
        intake_key: redact_key(&e.intake_key),
        timestamp: e.timestamp.as_deref(),
        event: &e.raw,
    };
    match serde_json::to_string(&printed) {
        Ok(mut line) => {
            line.push('\n');
            line
        }
        Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
    }
}

/// Prints events as they come, flushing after each burst.
async fn print_events(mut events: mpsc::UnboundedReceiver<ReceivedEvent>) {
    let mut out = tokio::io::stdout();
    while let Some(first) = events.recv().await {
        let mut text = event_line(&first);
        while let Ok(next) = events.try_recv() {
            text.push_str(&event_line(&next));
        }
        let written = async {
            out.write_all(text.as_bytes()).await?;
            out.flush().await
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "cannot print events on stdout; no longer printing them");
            return;
        }
    }
}
