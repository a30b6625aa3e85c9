//! The `warren` command: runs a broker node; `warren perf` drives load; `warren ctl`
//! manages a running node.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warren::{Broker, Config};

/// Warren, an AMQP 0-9-1 message broker compatible with RabbitMQ clients.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML) overriding the built-in defaults; WARREN_* env overrides both.
    #[arg(long, global = true)]
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Server) {
        Command::Server => server_main(cli.config),
        Command::Perf(args) => warren::perf::run(*args),
        Command::Ctl(args) => warren::ctl::run(args),
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        warren::LogFormat::Text => logs.init(),
        warren::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
    let broker = match Broker::start(config).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    broker.shutdown().await;
    std::process::ExitCode::SUCCESS
}
