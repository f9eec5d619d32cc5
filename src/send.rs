//! The `send` command: lines of files (or of the standard input) queued durably and delivered
//! once, for backfills and scripts; it exits when the intake acknowledged every event, and
//! says otherwise how many are left, with an exit code of its own.
//!
//! It never shares a queue with a running forwarder: by default it makes a private queue in
//! the temporary directory (`$TMPDIR`, mode 0700), removed once everything is acknowledged
//! and kept, with its path said, when events are left in it (`--queue DIR` delivers them
//! later). `--queue DIR` names a queue of its own choosing; a queue in use by a forwarder (or
//! another `send`) is locked and refused. The configuration, when given, brings the intake's
//! settings and the queue's tuning, never the forwarder's queue directory.
//!
//! Lines are read only as fast as the queue makes them durable (the stdin source's
//! [`LineReader`]); delivery runs from the start, so a backfill larger than the queue flows
//! through it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::Signals;
use crate::config::{check_max_event_bytes, resolve_intake_key, Config};
use crate::delivery::Delivery;
use crate::queue::{Queue, QueueError};
use crate::sources::stdin::{LineReader, StdinSourceStats};
use crate::sources::syslog::framing::Oversize;

/// Exit code: events are still queued (the timeout passed, or the command was interrupted).
pub const EXIT_QUEUED: u8 = 3;
/// Exit code: every event is done, but the intake refused some for good (400, 413): they are
/// dead letters.
pub const EXIT_DEAD_LETTERS: u8 = 4;

/// Requests on the wire finish within this once the command stops delivering.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// How often the queue is looked at while waiting for the last acknowledgements.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// `sekoia-forwarder send`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("key").required(true).multiple(false)))]
pub struct SendArgs {
    /// Files to send, one event per line; none, or `-`, is the standard input.
    #[arg(value_name = "FILE")]
    pub inputs: Vec<PathBuf>,
    /// The name of an environment variable that holds the intake key.
    #[arg(long, value_name = "VAR", group = "key")]
    pub intake_key_env: Option<String>,
    /// A file that holds the intake key (surrounding whitespace ignored).
    #[arg(long, value_name = "FILE", group = "key")]
    pub intake_key_file: Option<PathBuf>,
    /// A configuration: its `[intake]` and `[queue]` tuning are used, not its queue path.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The intake's base URL (over the configuration's).
    #[arg(long, value_name = "URL")]
    pub intake_url: Option<url::Url>,
    /// The queue directory to use (and keep); by default a private one in the temporary
    /// directory, removed once everything is acknowledged.
    #[arg(long, value_name = "DIR")]
    pub queue: Option<PathBuf>,
    /// Give up after that long (reading included), saying how many events are still queued.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Largest event; a longer line is cut as --oversize says.
    #[arg(long, value_name = "BYTES", default_value_t = crate::intake_api::MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
    /// What becomes of a line longer than --max-event-bytes: `truncate`, `split` or
    /// `dead-letter` (kept in the queue's dead letters, not sent: exit 4).
    #[arg(long, value_name = "HOW", default_value = "truncate", value_parser = parse_oversize)]
    pub oversize: Oversize,
}

fn parse_oversize(text: &str) -> Result<Oversize, String> {
    match text {
        "truncate" => Ok(Oversize::Truncate),
        "split" => Ok(Oversize::Split),
        "dead-letter" | "dead_letter" => Ok(Oversize::DeadLetter),
        _ => Err("expected truncate, split or dead-letter".into()),
    }
}

/// Why the command stopped waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Every input was read and nothing is left in the queue.
    Done,
    TimedOut,
    /// SIGINT or SIGTERM.
    Interrupted,
    /// The queue's writer stopped (a storage failure): nothing more can be stored or removed.
    WriterGone(String),
}

/// What a `send` did.
#[derive(Debug)]
pub struct Report {
    pub ended: Ended,
    /// Events read from the inputs and made durable.
    pub read: u64,
    /// Events acknowledged by the intake.
    pub delivered: u64,
    /// Events still in the queue.
    pub left: u64,
    /// Events the intake refused for good during this send.
    pub dead: u64,
    pub invalid_utf8: u64,
    pub truncated: u64,
    pub split_pieces: u64,
    /// The queue directory, and whether it is still there.
    pub queue: PathBuf,
    pub queue_kept: bool,
    /// An input that could not be read to its end (what was read of it was sent).
    pub input_error: Option<String>,
}

impl Report {
    /// The process's exit code.
    pub fn exit_code(&self) -> u8 {
        if self.input_error.is_some() || matches!(self.ended, Ended::WriterGone(_)) {
            1
        } else if self.left > 0 || self.ended != Ended::Done {
            // Stopped early, the input may not have been read to its end even if nothing
            // read is left: never a success.
            EXIT_QUEUED
        } else if self.dead > 0 {
            EXIT_DEAD_LETTERS
        } else {
            0
        }
    }

    /// What to tell the user (one line or two), never the intake key.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} events read, {} acknowledged by the intake",
            self.read, self.delivered
        );
        let cut = [
            (self.invalid_utf8, "not valid UTF-8 (replaced)"),
            (self.truncated, "truncated"),
            (self.split_pieces, "pieces of split lines"),
        ];
        for (n, what) in cut {
            if n > 0 {
                s.push_str(&format!(", {n} {what}"));
            }
        }
        if self.dead > 0 {
            s.push_str(&format!(
                "; {} refused for good by the intake (dead letters)",
                self.dead
            ));
        }
        if self.left > 0 || self.ended != Ended::Done {
            let why = match &self.ended {
                Ended::TimedOut => "the timeout passed",
                Ended::Interrupted => "interrupted",
                Ended::WriterGone(_) => "the queue failed",
                Ended::Done => "stopped",
            };
            if self.left > 0 {
                s.push_str(&format!("; {why}: {} events still queued", self.left));
            } else {
                s.push_str(&format!(
                    "; {why} before the end of the input: what was read is delivered"
                ));
            }
        }
        if let Ended::WriterGone(why) = &self.ended {
            s.push_str(&format!("; the queue writer stopped: {why}"));
        }
        if let Some(e) = &self.input_error {
            s.push_str(&format!("; {e}"));
        }
        if self.queue_kept {
            s.push_str(&format!("\nthe queue is kept in {}", self.queue.display()));
            if self.left > 0 {
                s.push_str(
                    " (`sekoia-forwarder send --queue DIR --intake-key-env VAR /dev/null` \
                     delivers what is left)",
                );
            }
        }
        s
    }
}

/// One input, opened.
struct Input {
    name: String,
    reader: Box<dyn Read + Send>,
}

/// Opens every input before anything is queued: a missing file stops the command at once.
fn open_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<Input>> {
    if paths.is_empty() {
        return Ok(vec![stdin()]);
    }
    paths
        .iter()
        .map(|path| {
            if path == Path::new("-") {
                return Ok(stdin());
            }
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            Ok(Input {
                name: path.display().to_string(),
                reader: Box::new(file),
            })
        })
        .collect()
}

fn stdin() -> Input {
    Input {
        name: "the standard input".into(),
        reader: Box::new(std::io::stdin()),
    }
}

/// A fresh private queue directory in the temporary directory.
fn private_queue_dir() -> PathBuf {
    std::env::temp_dir().join(format!("sekoia-forwarder-send-{}", uuid::Uuid::new_v4()))
}

/// Runs `send`; `progress`: show a progress bar (on a terminal).
pub async fn run(args: SendArgs, mut config: Config, progress: bool) -> anyhow::Result<Report> {
    // --timeout counts from the start, the opening of the queue included.
    let deadline = args
        .timeout
        .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    if let Some(url) = &args.intake_url {
        config.intake.url = url.clone();
    }
    config
        .validate()
        .map_err(|(key, msg)| anyhow::anyhow!("`{key}`: {msg}"))?;
    check_max_event_bytes(args.max_event_bytes)
        .map_err(|msg| anyhow::anyhow!("--max-event-bytes: {msg}"))?;
    let key = resolve_intake_key(
        None,
        args.intake_key_env.as_deref(),
        args.intake_key_file.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("intake key: {e}"))?;
    let inputs = open_inputs(&args.inputs)?;
    let signals = Signals::install()?;

    let private = args.queue.is_none();
    let mut queue_config = config.queue.clone();
    queue_config.path = args.queue.clone().unwrap_or_else(private_queue_dir);
    let dir = queue_config.path.clone();
    let queue = match tokio::task::spawn_blocking(move || Queue::open(&queue_config)).await? {
        Err(QueueError::Locked(path)) => anyhow::bail!(
            "the queue at {} is in use by a running forwarder (or another send); send never \
             shares a queue: give another --queue, or none for a private one",
            path.display()
        ),
        other => other.with_context(|| format!("cannot open the queue at {}", dir.display()))?,
    };
    let (backlog, _) = queue.totals();
    let dead_before = queue.dead_letter_count();

    let delivery_stop = CancellationToken::new();
    let delivery = Delivery::new(config.intake.clone(), queue.clone(), delivery_stop.clone())?;
    let delivery_stats = delivery.stats();
    let delivery = delivery
        .start(DELIVERY_GRACE)
        .await
        .context("cannot start delivery's threads")?;

    let reader = LineReader::new(
        queue.clone(),
        key,
        args.max_event_bytes,
        args.oversize,
        "send".into(),
    );
    let stats = reader.stats();
    let bar_stop = CancellationToken::new();
    let bar = progress.then(|| {
        tokio::spawn(show_progress(
            queue.clone(),
            stats.clone(),
            backlog,
            bar_stop.clone(),
        ))
    });

    let mut input_error = None;
    let ended = tokio::select! {
        () = signals.wait() => Ended::Interrupted,
        () = sleep_until_or_never(deadline) => Ended::TimedOut,
        why = queue.writer_stopped() => Ended::WriterGone(why),
        () = read_and_drain(&reader, inputs, &queue, &mut input_error) => Ended::Done,
    };
    bar_stop.cancel();
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    delivery_stop.cancel();
    if let Err(e) = delivery.finished().await {
        tracing::error!(error = %e, "delivery failed");
    }
    let (left, _) = queue.totals();
    let dead = queue.dead_letter_count().saturating_sub(dead_before);
    let closed = queue.close().await;
    let s = stats.snapshot();
    let mut report = Report {
        ended,
        read: s.accepted_events,
        delivered: delivery_stats.snapshot().acked_events,
        left,
        dead,
        invalid_utf8: s.invalid_utf8_events,
        truncated: s.truncated_events,
        split_pieces: s.split_pieces,
        queue: dir,
        queue_kept: true,
        input_error,
    };
    if let Err(e) = closed {
        if !matches!(report.ended, Ended::WriterGone(_)) {
            report.ended = Ended::WriterGone(e.to_string());
        }
        return Ok(report);
    }
    // A private queue that holds nothing more of value goes; one with events left or dead
    // letters stays, so that nothing is lost with it.
    if private && left == 0 && dead == 0 {
        match std::fs::remove_dir_all(&report.queue) {
            Ok(()) => report.queue_kept = false,
            Err(e) => tracing::warn!(path = %report.queue.display(), error = %e,
                "cannot remove the private queue"),
        }
    }
    Ok(report)
}

/// Reads every input in turn, then waits until the queue holds nothing more (every event
/// acknowledged or dead-lettered). An input that fails stops the reading (the error is kept
/// in `input_error`); what was read is delivered all the same.
async fn read_and_drain(
    reader: &LineReader,
    inputs: Vec<Input>,
    queue: &Queue,
    input_error: &mut Option<String>,
) {
    // Only the select in `run` stops the reading: a timeout or a signal drops this future.
    let never = CancellationToken::new();
    for input in inputs {
        if let Err(e) = reader.read_to_end(input.reader, &never).await {
            *input_error = Some(format!("cannot read {}: {e}", input.name));
            break;
        }
    }
    while queue.totals().0 > 0 {
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A progress bar on stderr: events acknowledged (or dead-lettered) out of those queued, the
/// backlog of a reused queue included; the total grows while the inputs are read.
async fn show_progress(
    queue: Queue,
    stats: Arc<StdinSourceStats>,
    backlog: u64,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(backlog),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events acknowledged",
    ) {
        bar.set_style(style);
    }
    let update = || {
        let total = backlog + stats.accepted_events.load(Ordering::Relaxed);
        let left = queue.totals().0;
        bar.set_length(total);
        bar.set_position(total.saturating_sub(left));
    };
    loop {
        update();
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    // The summary that follows says where it ended.
    update();
    bar.finish_and_clear();
}
