//! Opening a connection to an upstream server the way libpq does: TCP, then
//! SSLRequest and a TLS handshake according to sslmode.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Stream;
use crate::config::{SslMode, UpstreamConfig};
use crate::protocol::startup::SSL_REQUEST_CODE;

/// An upstream server with its TLS settings prepared once.
#[derive(Clone)]
pub struct Upstream {
    pub name: &'static str,
    pub host: String,
    pub port: u16,
    pub sslmode: SslMode,
    pub connect_timeout: Duration,
    /// The authentication methods the proxy's own logins accept.
    pub require_auth: crate::config::require_auth::RequireAuth,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Upstream {
    pub fn new(name: &'static str, cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let tls = match cfg.sslmode {
            SslMode::Disable => None,
            mode => Some(super::tls::client_config(mode, cfg.sslrootcert.as_deref())?),
        };
        Ok(Self {
            name,
            host: cfg.host.clone(),
            port: cfg.port,
            sslmode: cfg.sslmode,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            require_auth: cfg.require_auth,
            tls,
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// TCP connect plus TLS negotiation, bounded by the connect timeout.
    pub async fn connect(&self) -> anyhow::Result<Stream> {
        tokio::time::timeout(self.connect_timeout, self.connect_inner())
            .await
            .map_err(|_| anyhow!("timed out connecting to {} at {}", self.name, self.addr()))?
    }

    async fn connect_inner(&self) -> anyhow::Result<Stream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {} at {}", self.name, self.addr()))?;
        tcp.set_nodelay(true)?;
        set_keepalive(&tcp);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let mut tcp = tcp;
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&8i32.to_be_bytes());
        req[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&req).await?;
        // Exactly one byte: anything after it belongs to the TLS handshake and
        // must not be read as plaintext (CVE-2021-23222).
        let answer = tcp
            .read_u8()
            .await
            .context("server closed the connection after SSLRequest")?;
        match answer {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let peer = tcp.peer_addr()?.ip();
                let name =
                    super::tls::server_name(&self.host, self.sslmode, peer).with_context(|| {
                        format!("cannot connect to {} at {}", self.name, self.addr())
                    })?;
                let tls = connector.connect(name, tcp).await.with_context(|| {
                    format!("TLS handshake with {} at {} failed", self.name, self.addr())
                })?;
                Ok(Stream::ClientTls(Box::new(tls)))
            }
            b'N' if self.sslmode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => bail!(
                "{} at {} does not support SSL, but sslmode requires it",
                self.name,
                self.addr()
            ),
            other => bail!(
                "{} answered SSLRequest with unexpected byte {other:#04x}",
                self.name
            ),
        }
    }
}

/// TCP keepalive so a vanished peer is noticed on an idle connection.
pub fn set_keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}
