//! The proxy's shared context: configuration, upstreams, registries and
//! metrics, handed to every session and to the admin API.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::Audit;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::net::connect::Upstream;
use crate::upstream::passfile::PassFile;
use crate::upstream::target::TargetLinks;

/// Lifecycle of the whole proxy, watched by every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; end each session at its next idle moment.
    Draining,
    /// The drain deadline passed: end every session now.
    Closing,
}

pub struct Proxy {
    pub config: Config,
    pub source: Upstream,
    pub targets: Option<Arc<TargetLinks>>,
    /// The write mirror, when `[mirror]` is configured.
    pub mirror: Option<Arc<Mirror>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancels: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<Phase>,
    /// Live sessions per worker thread, set once the workers start.
    pub worker_loads: OnceLock<Vec<Arc<AtomicUsize>>>,
    next_session_id: AtomicU64,
    pub audit: Arc<Audit>,
    /// The running config's epoch: 1 at start, one more per applied change.
    pub epoch: AtomicU64,
    /// The last rejected reload (key, line, reason), for status.
    pub last_rejection: std::sync::Mutex<Option<serde_json::Value>>,
}

impl Proxy {
    pub fn new(config: Config, shutdown: watch::Receiver<Phase>) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let audit = Arc::new(Audit::open(&config.audit.path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the audit log {}: {e}",
                config.audit.path.display()
            )
        })?);
        let source = Upstream::new("source", &config.source)?;
        let targets = if config.target.session_links {
            let passfile = config
                .target
                .passfile
                .as_deref()
                .map(PassFile::load)
                .transpose()?;
            Some(Arc::new(TargetLinks {
                upstream: Upstream::new("target", &config.target)?,
                passfile,
                keepalive: Duration::from_secs(config.target.keepalive_s),
                metrics: Arc::clone(&metrics),
            }))
        } else {
            None
        };
        let mirror = config
            .mirror
            .as_ref()
            .map(|m| Mirror::open(m, Arc::clone(&metrics), Some(Arc::clone(&audit))))
            .transpose()?;
        let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::net::tls::server_config(cert, key)?,
            )),
            _ => None,
        };
        Ok(Self {
            config,
            source,
            targets,
            mirror,
            tls,
            cancels: Arc::new(CancelRegistry::default()),
            metrics,
            shutdown,
            worker_loads: OnceLock::new(),
            next_session_id: AtomicU64::new(1),
            audit,
            epoch: AtomicU64::new(1),
            last_rejection: std::sync::Mutex::new(None),
        })
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `GET /config`: the configuration in force, as JSON, with its epoch.
    /// Keys changed live (today `mirror.enabled`) show their live value.
    pub fn effective_config(&self) -> serde_json::Value {
        let mut cfg = self.config.clone();
        if let (Some(m), Some(c)) = (&self.mirror, cfg.mirror.as_mut()) {
            c.enabled = m.enabled();
        }
        serde_json::json!({
            "epoch": self.epoch.load(Ordering::Relaxed),
            "config": cfg,
        })
    }

    /// `GET /status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "phase": format!("{:?}", *self.shutdown.borrow()).to_lowercase(),
            "listen": self.config.listen.addr.to_string(),
            "source": { "addr": self.source.addr(), "sslmode": format!("{:?}", self.source.sslmode) },
            "target": {
                "addr": format!("{}:{}", self.config.target.host, self.config.target.port),
                "session_links": self.config.target.session_links,
            },
            "workers": self.worker_loads.get().map(|loads| {
                loads.iter().map(|l| l.load(Ordering::Relaxed)).collect::<Vec<_>>()
            }),
            "config": {
                "epoch": self.epoch.load(Ordering::Relaxed),
                "reloads_applied": self.metrics.config_reloads.get(),
                "reloads_rejected": self.metrics.config_rejections.get(),
                "last_rejection": self.last_rejection.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                "audit_log": self.audit.path().display().to_string(),
            },
            "metrics": self.metrics.snapshot(),
            "mirror": self.mirror.as_ref().map(|m| m.status()),
        })
    }
}
