//! One replayed session's connection: where to connect, logging in, and
//! reading the server's answers without holding more than the few
//! messages a replay looks at.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{SslMode, UpstreamConfig};
use crate::net::connect::Upstream;
use crate::net::Stream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::{decode_header, HEADER_LEN};
use crate::protocol::startup::StartupMessage;
use crate::upstream::passfile::PassFile;

/// Where replayed sessions go, from `--url`.
pub struct Target {
    upstream: Upstream,
    /// User and database from the URL; when absent, each session's own.
    user: Option<String>,
    database: Option<String>,
    password: Option<String>,
    passfile: Option<PassFile>,
}

impl Target {
    /// Parses a libpq URL or key=value string (tokio-postgres' parser).
    /// The password comes from the URL, `PGPASSWORD`, or the passfile
    /// (`PGPASSFILE`, else `~/.pgpass`), as libpq finds it.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| anyhow::anyhow!("--url: {e}"))?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(_) => {
                anyhow::bail!("--url: Unix-domain sockets are not supported; give a TCP host")
            }
            None => "localhost".into(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let sslmode = match cfg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let upstream = Upstream::new(
            "server",
            &UpstreamConfig {
                host,
                port,
                sslmode,
                sslrootcert: None,
                passfile: None,
                connect_timeout_ms: cfg
                    .get_connect_timeout()
                    .map_or(10_000, |d| d.as_millis() as u64),
                session_links: false,
                keepalive_s: 60,
                // As libpq: any method, unless PGREQUIREAUTH limits them.
                require_auth: match std::env::var("PGREQUIREAUTH") {
                    Ok(v) if !v.is_empty() => v
                        .parse()
                        .map_err(|e| anyhow::anyhow!("PGREQUIREAUTH: {e}"))?,
                    _ => crate::config::require_auth::RequireAuth::any(),
                },
            },
        )?;
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok());
        let passfile = std::env::var_os("PGPASSFILE")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")))
            .filter(|p| p.is_file())
            .and_then(|p| PassFile::load(&p).ok());
        Ok(Self {
            upstream,
            user: cfg.get_user().map(str::to_string),
            database: cfg.get_dbname().map(str::to_string),
            password,
            passfile,
        })
    }

    pub fn addr(&self) -> String {
        self.upstream.addr()
    }

    /// The startup a recorded session logs in with: its own parameters
    /// (application_name, DateStyle, extra_float_digits, ...), with the
    /// URL's user and database when it names them.
    pub fn startup(&self, recorded: &[(String, String)]) -> StartupMessage {
        let mut params: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut user = self.user.clone();
        let mut database = self.database.clone();
        for (k, v) in recorded {
            match k.as_str() {
                "user" => {
                    user.get_or_insert_with(|| v.clone());
                }
                "database" => {
                    database.get_or_insert_with(|| v.clone());
                }
                "replication" => {}
                _ => params.push((k.clone().into_bytes(), v.clone().into_bytes())),
            }
        }
        let user = user.unwrap_or_else(|| "postgres".into());
        params.insert(0, (b"user".to_vec(), user.into_bytes()));
        if let Some(db) = database {
            params.insert(1, (b"database".to_vec(), db.into_bytes()));
        }
        StartupMessage::new(3, 0, params)
    }

    /// Connects and logs in; errors are one line (with the SQLSTATE when
    /// the server refused).
    pub async fn connect(&self, startup: &StartupMessage) -> Result<(Stream, BytesMut), String> {
        let user = startup.get("user").unwrap_or_default();
        let database = startup.database().unwrap_or(user);
        let password = self.password.as_deref().or_else(|| {
            self.passfile
                .as_ref()
                .and_then(|pf| pf.lookup(&self.upstream.host, self.upstream.port, database, user))
        });
        let attempt = async {
            let mut stream = self
                .upstream
                .connect()
                .await
                .map_err(|e| format!("{e:#}"))?;
            let done = crate::upstream::login::login(
                &mut stream,
                startup,
                password,
                self.upstream.require_auth,
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok((stream, done.leftover))
        };
        let limit = self.upstream.connect_timeout + crate::upstream::login::LOGIN_TIMEOUT;
        tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no login within {} s", limit.as_secs())))
    }
}

/// What ended a wait for the server's answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// ReadyForQuery.
    Ready,
    /// CopyInResponse: the server waits for the client's COPY data.
    CopyIn,
}

/// Reads the server's messages, keeping only the ones a replay needs
/// (ErrorResponse codes, ReadyForQuery, CopyInResponse); everything else
/// (rows, above all) is skipped as it streams past.
pub struct Answers {
    buf: BytesMut,
    /// Bytes of a skipped message still to come.
    skip: usize,
}

/// Largest message body the replay buffers whole (errors are small).
const MAX_KEPT: usize = 1 << 20;

impl Answers {
    pub fn new(leftover: BytesMut) -> Self {
        Self {
            buf: leftover,
            skip: 0,
        }
    }

    /// Reads until ReadyForQuery or CopyInResponse; each ErrorResponse's
    /// SQLSTATE goes to `errors`.
    pub async fn until_ready<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        errors: &mut Vec<String>,
    ) -> std::io::Result<Answer> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len());
                self.buf.advance(n);
                self.skip -= n;
            }
            while self.skip == 0 {
                let Some(h) = decode_header(&self.buf, usize::MAX >> 2)
                    .map_err(crate::protocol::frame::invalid_data)?
                else {
                    break;
                };
                match h.tag {
                    b'E' | b'Z' | b'G' if h.body_len <= MAX_KEPT => {
                        if self.buf.len() < h.frame_len() {
                            break;
                        }
                        let frame = self.buf.split_to(h.frame_len());
                        let body = &frame[HEADER_LEN..];
                        match h.tag {
                            b'E' => errors
                                .push(parse_error_fields(body).code.unwrap_or("?????").to_string()),
                            b'Z' => return Ok(Answer::Ready),
                            _ => return Ok(Answer::CopyIn),
                        }
                    }
                    _ => {
                        let n = h.frame_len().min(self.buf.len());
                        self.buf.advance(n);
                        self.skip = h.frame_len() - n;
                    }
                }
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(64 << 10);
            }
            if rd.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
        }
    }
}
