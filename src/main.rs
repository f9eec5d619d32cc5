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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = load(config.as_ref())?;
            init_logging(&config.log);
            runtime()?.block_on(sekoia_forwarder::app::run(config))
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
            Ok(())
        }
        Command::Status { config, json } => {
            let config = load(config.as_ref())?;
            sekoia_forwarder::admin::print_status(&config, json)
        }
        Command::DeadLetters { config, json } => {
            let config = load(config.as_ref())?;
            sekoia_forwarder::admin::print_dead_letters(&config, json)
        }
        Command::MockIntake(opts) => {
            init_logging(&LogConfig::default());
            runtime()?.block_on(sekoia_forwarder::mock_intake::run_cli(opts))
        }
    }
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
