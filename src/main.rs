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
    /// Replay recorded sessions (a pgshift capture or a Postgres csvlog)
    /// against a server, and report latency, errors and rates.
    Replay(ReplayArgs),
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

#[derive(clap::Args)]
struct ReplayArgs {
    /// The capture (its base path, as in `record.path`, or one segment
    /// file), or a csvlog file with `--format csvlog`.
    input: PathBuf,
    /// Where to replay: a libpq URL or key=value string. Its user and
    /// database, when given, replace each session's recorded ones.
    #[arg(long)]
    url: String,
    /// `capture` (pgshift's own) or `csvlog` (a Postgres csvlog written with
    /// log_statement = 'all').
    #[arg(long, default_value = "capture", value_parser = ["capture", "csvlog"])]
    format: String,
    /// 1 = the recorded timing between messages, 2 = twice as fast, `max` =
    /// no waiting.
    #[arg(long, default_value = "1")]
    speed: pgshift::replay::Speed,
    /// Replay only the first N sessions.
    #[arg(long)]
    sessions: Option<u64>,
    /// Start over at the end of the input (until --duration, or forever).
    #[arg(long = "loop")]
    looped: bool,
    /// Stop after this long: seconds, or with a unit (90s, 5m, 1h).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<std::time::Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: give seconds or a number with s, m or h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?}: must be above 0"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn replay(args: ReplayArgs) -> ExitCode {
    let opts = pgshift::replay::Options {
        input: args.input,
        format: if args.format == "csvlog" {
            pgshift::replay::Format::Csvlog
        } else {
            pgshift::replay::Format::Capture
        },
        url: args.url,
        speed: args.speed,
        sessions: args.sessions,
        looped: args.looped,
        duration: args.duration,
        progress: !args.quiet && !args.json,
    };
    match pgshift::replay::run(opts) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("pgshift replay: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgshift replay: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Routing, mirror, config epoch and counters.
    Status,
    /// The configuration in force (JSON), with its epoch.
    Config,
    /// Shadow-read mismatches by statement fingerprint, and learned noise.
    Mismatches {
        /// Only this fingerprint (with its last confirmed mismatch in full).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Audit log entries (changes, rejected reloads, mirror gaps).
    Audit {
        /// Only entries at or after this time (Unix microseconds).
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Change read routing live (audited, new epoch); prints the result.
    Route {
        /// Share of eligible reads sent to the target, 0 to 100.
        #[arg(long)]
        read_percent: Option<f64>,
        /// session, user, application_name, client_addr or comment.
        #[arg(long)]
        hash_key: Option<String>,
        /// With hash key `comment`: the sqlcommenter key.
        #[arg(long)]
        comment_key: Option<String>,
        /// Routed reads without an answer within this run on the source.
        #[arg(long)]
        target_timeout_ms: Option<u64>,
    },
    /// Send every read to the source now, until `resume`.
    Failback {
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Route reads as configured again after a failback.
    Resume {
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Replaying needs no proxy config.
    if let Some(Command::Replay(_)) = cli.command {
        if let Some(Command::Replay(args)) = cli.command.take() {
            return replay(args);
        }
    }
    let config = match pgshift::preflight::load(&cli.config) {
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
        Command::Replay(_) => ExitCode::FAILURE, // handled above
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
            CtlCommand::Mismatches { fingerprint } => (
                client.get(&match fingerprint {
                    Some(f) => format!("/mismatches?fingerprint={f}"),
                    None => "/mismatches".into(),
                })?,
                pgshift::ctl::mismatches_text,
            ),
            CtlCommand::Audit { since } => (
                client.get(&format!("/audit?since={since}"))?,
                pgshift::ctl::audit_text,
            ),
            CtlCommand::Route {
                read_percent,
                hash_key,
                comment_key,
                target_timeout_ms,
            } => {
                let mut body = serde_json::Map::new();
                if let Some(p) = read_percent {
                    body.insert("read_percent".into(), p.into());
                }
                if let Some(k) = hash_key {
                    body.insert("hash_key".into(), k.into());
                }
                if let Some(k) = comment_key {
                    body.insert("comment_key".into(), k.into());
                }
                if let Some(t) = target_timeout_ms {
                    body.insert("target_timeout_ms".into(), t.into());
                }
                if body.is_empty() {
                    anyhow::bail!("nothing to change: give --read-percent, --hash-key, --comment-key or --target-timeout-ms");
                }
                (
                    client.send("PUT", "/routing", &body.into())?,
                    pgshift::ctl::routing_text,
                )
            }
            CtlCommand::Failback { reason } => (
                client.send(
                    "POST",
                    "/failback",
                    &serde_json::json!({ "reason": reason }),
                )?,
                pgshift::ctl::routing_text,
            ),
            CtlCommand::Resume { reason } => (
                client.send("POST", "/resume", &serde_json::json!({ "reason": reason }))?,
                pgshift::ctl::routing_text,
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
