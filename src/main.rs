//! The `warren` command: runs a broker node; `warren perf` drives load; `warren ctl`
//! manages a running node.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warren::{Broker, Config};

/// mimalloc, with the largest blocks left to the system's malloc (see `warren::alloc`).
#[global_allocator]
static GLOBAL: warren::alloc::BrokerAlloc = warren::alloc::BrokerAlloc;

/// Warren, an AMQP 0-9-1 message broker compatible with RabbitMQ clients.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML) overriding the built-in defaults; WARREN_* env overrides both.
    /// WARREN_CONFIG_FILE names it too (the container image sets it).
    #[arg(long, global = true, env = "WARREN_CONFIG_FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Server,
    /// Drive a broker (this one or any AMQP 0-9-1 broker) with load and report rates,
    /// latency, loss and CPU per message.
    Perf(Box<warren::perf::PerfArgs>),
    /// Manage a running node through its management API, as rabbitmqctl does
    /// (list_queues, add_user, set_permissions, export_definitions, ...).
    Ctl(warren::ctl::CtlArgs),
    /// Exit 0 if the node on this host answers the AMQP protocol header with
    /// connection.start, 1 if not (the container image's HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// Host to check (default: loopback, or the first of `listen_addresses` when the node
    /// does not listen on every address).
    #[arg(long)]
    host: Option<String>,
    /// AMQP port (default: `port` from the settings).
    #[arg(long)]
    port: Option<u16>,
    /// Seconds to wait for connection.start.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

fn main() -> std::process::ExitCode {
    warren::alloc::configure();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Server) {
        Command::Server => server_main(cli.config),
        Command::Perf(args) => warren::perf::run(*args),
        Command::Ctl(args) => warren::ctl::run(args),
        Command::Healthcheck(args) => healthcheck_main(cli.config, args),
    }
}

fn healthcheck_main(config_file: Option<PathBuf>, args: HealthcheckArgs) -> std::process::ExitCode {
    let config = match Config::load(config_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren healthcheck: bad configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let host = args
        .host
        .unwrap_or_else(|| warren::healthcheck::local_host(&config.listen_addresses));
    let port = args.port.unwrap_or(config.port);
    match warren::healthcheck::check(&host, port, Duration::from_secs(args.timeout)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren healthcheck: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn server_main(config_file: Option<PathBuf>) -> std::process::ExitCode {
    let config = match Config::load(config_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: bad configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let filter = EnvFilter::new(&config.log);
        // openraft narrates every election at info; Warren logs the leader changes itself.
        match "openraft=warn".parse() {
            Ok(quiet) if !config.log.contains("openraft") => filter.add_directive(quiet),
            _ => filter,
        }
    });
    // Colours only on a terminal: `docker logs`, journald and log files get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        warren::LogFormat::Text => logs.init(),
        warren::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(warren::alloc::collect_if_asked)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run_server(config))
}

async fn run_server(config: Config) -> std::process::ExitCode {
    // Watch for the signals before starting: recovery can take seconds, and a SIGTERM
    // sent meanwhile must stop the node as soon as it is up, not be lost.
    let mut signals = match StopSignals::watch() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch for SIGTERM and SIGINT: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let broker = match Broker::start(config).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let why = tokio::select! {
        signal = signals.next() => signal,
        _ = broker.stop_requested() => "stop request (warren ctl stop)",
    };
    tracing::info!("{why} received: shutting down");
    broker.shutdown().await;
    tracing::info!("stopped: connections closed, store committed and closed");
    std::process::ExitCode::SUCCESS
}

/// SIGTERM (`docker stop`, systemd, `kill`) and SIGINT (Ctrl-C): both stop the node
/// gracefully. As PID 1 in a container a signal without a handler is ignored, so these
/// handlers are what makes `docker stop` work.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn watch() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next stop signal and names it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
