//! The `sekoia-forwarder` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sekoia_forwarder::config::{Config, LogConfig, LogFormat};

#[derive(Parser)]
#[command(
    version,
    about = "Disk-buffered, reliable log forwarder for the Sekoia.io intake"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the forwarder (built-in default configuration without --config).
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Once the forwarder is up, write this JSON file (pid, the admin and source addresses);
        /// it is removed when the forwarder begins to stop.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the queue: backlog per intake key, disk use, dead letters.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the events the intake refused for good (kept in the queue's dead letters).
    DeadLetters {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put back into the queue what can still be read from damaged generations moved aside
    /// (`gen-N.corrupt`). Run it on a stopped forwarder.
    Salvage {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this generation (its number); all moved-aside generations without it.
        generation: Option<u64>,
    },
    /// Send the lines of FILEs (or of the standard input) to the intake once, then exit: 0 when
    /// the intake acknowledged every event, 3 when some are still queued (--timeout,
    /// interrupted), 4 when the intake refused some for good (dead letters), 1 on an error.
    Send(sekoia_forwarder::send::SendArgs),
    /// Run a mock of the Sekoia intake, to try a pipeline offline.
    MockIntake(sekoia_forwarder::mock_intake::MockCliOptions),
}

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _scenario = fail::FailScenario::setup();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

/// Runs `command`; the process's exit code (only `send` has more to say than 0 or an error).
fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Send(args) => send(args),
        Command::Run { config, ready_file } => {
            let config = load(config.as_ref())?;
            init_logging(&config.log);
            let readiness = sekoia_forwarder::ready::Readiness::new(ready_file);
            runtime()?.block_on(sekoia_forwarder::app::run(config, readiness))?;
            Ok(0)
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            println!(
                "{}: valid ({} source(s), queue at {}, intake {})",
                config.display(),
                c.sources.len(),
                c.queue.path.display(),
                c.intake.url
            );
            Ok(0)
        }
        Command::Status { config, json } => {
            let config = load(config.as_ref())?;
            sekoia_forwarder::admin::print_status(&config, json)?;
            Ok(0)
        }
        Command::DeadLetters { config, json } => {
            let config = load(config.as_ref())?;
            sekoia_forwarder::admin::print_dead_letters(&config, json)?;
            Ok(0)
        }
        Command::Salvage { config, generation } => {
            let config = load(config.as_ref())?;
            salvage(&config, generation)?;
            Ok(0)
        }
        Command::MockIntake(opts) => {
            init_logging(&LogConfig::default());
            runtime()?.block_on(sekoia_forwarder::mock_intake::run_cli(opts))?;
            Ok(0)
        }
    }
}

/// The `send` command; its exit code.
fn send(args: sekoia_forwarder::send::SendArgs) -> anyhow::Result<u8> {
    use std::io::IsTerminal;
    let mut config = load(args.config.as_ref())?;
    // Quiet unless asked: a script wants the outcome, not the forwarder's info lines.
    if std::env::var_os("RUST_LOG").is_none() && args.config.is_none() {
        config.log.level = "warn".into();
    }
    init_logging(&config.log);
    let terminal = std::io::stderr().is_terminal();
    let report = runtime()?.block_on(sekoia_forwarder::send::run(args, config, terminal))?;
    let code = report.exit_code();
    // Said on success only to a person; a failure is always said.
    if code != 0 || terminal {
        eprintln!("{}", report.summary());
    }
    Ok(code)
}

/// Events appended to the queue per request while salvaging.
const SALVAGE_BATCH: usize = 1000;

/// The `salvage` command: reads each moved-aside generation key by key back into the queue.
fn salvage(config: &Config, generation: Option<u64>) -> anyhow::Result<()> {
    use sekoia_forwarder::intake_api::IncomingEvent;
    use sekoia_forwarder::queue::{salvage, Queue, QueueError};
    use std::cell::RefCell;
    use std::io::IsTerminal;

    let queue = match Queue::open(&config.queue) {
        Err(QueueError::Locked(path)) => anyhow::bail!(
            "the queue at {} is in use: stop the forwarder before salvaging",
            path.display()
        ),
        other => other?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let notes = salvage::candidates(&config.queue.path, generation)?;
    if notes.is_empty() {
        println!(
            "nothing to salvage: no moved-aside generation in {}",
            config.queue.path.display()
        );
    }
    let terminal = std::io::stderr().is_terminal();
    let (mut recovered, mut unknown) = (0u64, false);
    for note in &notes {
        // Shared by the sink, which batches, and `done`, which appends the last batch before
        // the directory is marked salvaged.
        let pending: RefCell<Vec<IncomingEvent>> = RefCell::new(Vec::new());
        let flush = || -> Result<(), QueueError> {
            let events = std::mem::take(&mut *pending.borrow_mut());
            if events.is_empty() {
                return Ok(());
            }
            rt.block_on(queue.append(events))
        };
        let mut sink = |chunk: sekoia_forwarder::queue::Chunk| {
            let full = {
                let mut pending = pending.borrow_mut();
                for raw in chunk.events {
                    pending.push(IncomingEvent {
                        intake_key: chunk.intake_key.clone(),
                        timestamp: chunk.timestamp.clone(),
                        raw,
                    });
                }
                pending.len() >= SALVAGE_BATCH
            };
            if full {
                flush()?;
            }
            Ok(())
        };
        let mut progress = |o: &salvage::Outcome| {
            if terminal {
                eprint!(
                    "\r{}: {} events recovered, {} reads failed ",
                    o.dir.display(),
                    o.events,
                    o.failed_reads
                );
            }
        };
        let outcome = salvage::salvage_generation(note, &mut sink, &mut progress, &mut || flush());
        let outcome = outcome?;
        if terminal {
            eprintln!();
        }
        recovered += outcome.events;
        let lost = match outcome.lost_events {
            Some(n) => n.to_string(),
            None => {
                unknown = true;
                "an unknown number of".to_owned()
            }
        };
        if outcome.opened {
            println!(
                "{}: recovered {} events ({} chunks) into the queue; {} reads failed; {lost} events could not be recovered",
                outcome.dir.display(), outcome.events, outcome.chunks, outcome.failed_reads
            );
        } else {
            println!(
                "{}: sled cannot open it: recovered 0 events; {lost} events could not be recovered (the directory is kept)",
                outcome.dir.display()
            );
        }
    }
    if generation.is_none() {
        for note in salvage::meta_candidates(&config.queue.path)? {
            // Restored before the directory is marked salvaged.
            let pending = RefCell::new(Vec::new());
            let mut found = 0;
            let outcome = salvage::salvage_dead_letters(
                &note,
                &mut |dead| {
                    pending.borrow_mut().push(dead);
                    Ok(())
                },
                &mut || {
                    let dead = std::mem::take(&mut *pending.borrow_mut());
                    found = dead.len();
                    rt.block_on(queue.add_dead_letters(dead))
                },
            )?;
            if outcome.opened {
                println!(
                    "{}: recovered {found} dead letters into the queue; {} reads failed",
                    outcome.dir.display(),
                    outcome.failed_reads
                );
            } else {
                println!(
                    "{}: sled cannot open it: no dead letter recovered (the directory is kept)",
                    outcome.dir.display()
                );
            }
        }
    }
    if notes.len() > 1 {
        println!(
            "total: {recovered} events recovered{}",
            if unknown {
                " (some losses unknown)"
            } else {
                ""
            }
        );
    }
    rt.block_on(queue.close())?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sekoia-forwarder")
        .build()?)
}

fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a dead log pipe) must never stop the forwarder: with internal error
        // logging on, tracing would report the failed write with eprintln!, which panics.
        .log_internal_errors(false);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
