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
    /// Talk to a running proxy's admin API (found through the config file).
    Ctl {
        /// Print the API's JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        /// Admin API address (default: admin.addr from the config).
        #[arg(long, global = true)]
        admin: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Routing, mirror, config epoch and counters.
    Status,
    /// The configuration in force (JSON), with its epoch.
    Config,
    /// Audit log entries (changes, rejected reloads, mirror gaps).
    Audit {
        /// Only entries at or after this time (Unix microseconds).
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
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
        Command::Ctl {
            json,
            admin,
            command,
        } => ctl(&config, admin.as_deref(), json, command),
    }
}

fn ctl(config: &Config, admin: Option<&str>, json: bool, command: CtlCommand) -> ExitCode {
    let run = || -> anyhow::Result<String> {
        let client = pgshift::ctl::AdminClient::new(config, admin)?;
        let (value, text): (_, fn(&serde_json::Value) -> String) = match command {
            CtlCommand::Status => (client.get("/status")?, pgshift::ctl::status_text),
            CtlCommand::Config => (client.get("/config")?, |v| format!("{v:#}\n")),
            CtlCommand::Audit { since } => (
                client.get(&format!("/audit?since={since}"))?,
                pgshift::ctl::audit_text,
            ),
        };
        Ok(if json {
            format!("{value:#}\n")
        } else {
            text(&value)
        })
    };
    match run() {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgshift ctl: {e:#}");
            ExitCode::FAILURE
        }
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
