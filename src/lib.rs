//! pgshift: a transparent PostgreSQL wire-protocol proxy for zero-downtime
//! migrations from a source database to a target database.
//!
//! Where things are:
//! - `lifecycle`: the proxy's phase (running, draining, closing).
//! - `listener`: accept loop, connection limits, graceful shutdown.
//! - `workers`: the thread-per-core runtimes sessions run on.
//! - `tracker`: what the proxy knows of one session (transaction status,
//!   prepared statements, the settings log), kept once for every policy.
//! - `pump`: the session core: the hot path (`forward`), the bookkeeping
//!   every session needs and the hook traits policies implement (`core`).
//! - `session`: one client session: `startup` (TLS, auth relay), then the
//!   core with the configured policies as its hooks (`policies`).
//! - `clock`: wall-clock time and per-thread shards (the bottom layer).
//! - `protocol`: framing and the few message decoders the proxy needs.
//! - `net`: the stream type, TLS, and connecting upstream with sslmode.
//! - `upstream`: the proxy's own target connections and their logins.
//! - `cancel`: mapping proxy-issued cancel keys to source backends.
//! - `admin`, `metrics`: the HTTP API and its counters.
//! - `audit`: the append-only log of every change, flushed before it applies.
//! - `config`: the TOML config as plain data, and its validation.
//! - `preflight`: loading a config with the files it names (TLS, passfiles,
//!   the admin token), for `check`, `run` and every reload.
//! - `private_files`: creating the files and directories that hold data
//!   owner-only (0600 / 0700), whatever the umask.
//! - `redact`: what the admin API hides without `admin.show_data`.
//! - `ctl`: `pgshift ctl`, the admin API's command-line client.
//! - `classify`: the statement classifier (read, write, lock, ...).
//! - `mirror`: write mirroring: capture, spool, commit order, applier.
//! - `router`: read routing: settings, per-request decisions, the responder.
//! - `shadow`: shadow reads and result diffing.
//! - `health`: health samples, windows, checks and the failback state
//!   machine; `failback` runs it and applies its caps to routing.
//! - `record`: recording client sessions into captures.
//! - `replay`: `pgshift replay` of captures and Postgres csvlogs.

pub mod admin;
pub mod audit;
pub mod cancel;
pub mod classify;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod failback;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod preflight;
pub mod private_files;
pub mod protocol;
pub mod proxy;
pub mod pump;
pub mod record;
pub mod redact;
pub mod replay;
pub mod router;
pub mod session;
pub mod shadow;
pub mod tracker;
pub mod upstream;
pub mod workers;
