//! The `pgshift` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgshift::config::Config;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pgshift",
    version,
    about = "Transparent PostgreSQL proxy for zero-downtime migrations"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(
        short,
        long,
        global = true,
        default_value = "proxy.toml",
        env = "PGSHIFT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Run,
    /// Validate the config file and exit: non-zero, with the key and line, when it is wrong.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgshift: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            println!("{}: ok", cli.config.display());
            ExitCode::SUCCESS
        }
        Command::Run => run(config, cli.config),
    }
}

fn run(config: Config, path: PathBuf) -> ExitCode {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Each session holds two or three sockets: use all the descriptors allowed.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-files limit");
    }
    // The accept loop, admin API and signals; sessions get their own threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgshift: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pgshift::listener::run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pgshift: {e:#}");
            ExitCode::FAILURE
        }
    }
}
