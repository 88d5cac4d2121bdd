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
use crate::upstream::roles::{Databases, Db};
use crate::upstream::target::TargetLinks;

use crate::lifecycle::Phase;

pub struct Proxy {
    pub config: Config,
    /// Both databases, by role: sessions go to the primary; target links,
    /// the mirror's applier and shadow reads to the secondary.
    pub databases: Arc<Databases>,
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
    /// Read routing settings in force.
    pub router: crate::router::Router,
    /// Classifier rules for routing (the mirror's when it has them).
    pub rules: Arc<crate::classify::Rules>,
    /// Serialises changes of the live settings (reloads, admin API), so
    /// each gets its own epoch and audit entry in order.
    pub change_lock: std::sync::Mutex<()>,
    /// The config file as last loaded: a reload applies only what changed
    /// in the file since, so a change made through the API stays until the
    /// file changes that key.
    pub file_config: std::sync::Mutex<Config>,
    /// Shadow reads, when the proxy has target links.
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
    /// The health monitor, when the proxy has a target to fail back from.
    pub health: Option<Arc<crate::health::Health>>,
    /// Session recording for replay (`[record]`), switchable live.
    pub record: crate::record::Recording,
    /// The shadow executor's queue, taken when it starts.
    pub shadow_jobs: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::shadow::Job>>>,
}

/// A live change that could not be applied.
#[derive(Debug)]
pub struct ChangeError {
    pub key: Option<String>,
    pub reason: String,
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
        let databases = Arc::new(Databases::new(&config)?);
        let targets = if config.target.session_links {
            let secondary = databases.secondary();
            Some(Arc::new(TargetLinks {
                upstream: secondary.upstream.clone(),
                passfile: secondary.passfile.clone(),
                keepalive: Duration::from_secs(config.target.keepalive_s),
                metrics: Arc::clone(&metrics.target_links),
                last_login_failed: std::sync::atomic::AtomicBool::new(false),
            }))
        } else {
            None
        };
        let mirror = config
            .mirror
            .as_ref()
            .map(|m| Mirror::open(m, Arc::clone(&metrics.mirror), Some(Arc::clone(&audit))))
            .transpose()?;
        let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::net::tls::server_config(cert, key)?,
            )),
            _ => None,
        };
        let router = crate::router::Router::new(&config.routing, targets.is_some());
        let rules = mirror.as_ref().map_or_else(
            || {
                Arc::new(crate::classify::Rules::new(
                    &config
                        .mirror
                        .as_ref()
                        .map(|m| m.write_functions.clone())
                        .unwrap_or_default(),
                ))
            },
            |m| Arc::clone(&m.rules),
        );
        let (shadow, shadow_jobs) = if targets.is_some() {
            let report = crate::shadow::MismatchReport::open(
                &config.shadow.mismatch_log,
                metrics.shadow.clone(),
            )?;
            let (s, rx) = crate::shadow::Shadow::new(&config.shadow, Arc::new(report));
            (Some(s), Some(rx))
        } else {
            (None, None)
        };
        let health = targets.as_ref().map(|_| {
            Arc::new(crate::health::Health::new(
                &config.failback,
                Arc::clone(&metrics.health),
            ))
        });
        if let (Some(m), Some(h)) = (&mirror, &health) {
            let _ = m.health.set(Arc::clone(h));
        }
        Ok(Self {
            health,
            shadow,
            record: crate::record::Recording::new(&config.record, Arc::clone(&metrics.record)),
            shadow_jobs: std::sync::Mutex::new(shadow_jobs),
            router,
            rules,
            change_lock: std::sync::Mutex::new(()),
            file_config: std::sync::Mutex::new(config.clone()),
            config,
            databases,
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
        let r = self.router.current();
        cfg.routing.read_percent = r.read_percent;
        cfg.routing.hash_key = r.hash_key;
        cfg.routing.comment_key = r.comment_key.clone();
        cfg.routing.target_timeout_ms = r.target_timeout.as_millis() as u64;
        if let Some(h) = &self.health {
            cfg.failback = (*h.settings()).clone();
        }
        cfg.record = self.record.config();
        if let Some(sh) = &self.shadow {
            let live = sh.settings();
            cfg.shadow.sample_percent = live.sample_percent;
            cfg.shadow.timeout_ms = live.timeout.as_millis() as u64;
            cfg.shadow.max_wait_ms = live.max_wait.as_millis() as u64;
            cfg.shadow.recheck_delay_ms = live.recheck_delay.as_millis() as u64;
            cfg.shadow.float_tolerance = live.compare.float_tolerance;
            cfg.shadow.max_rows_compared = live.compare.max_rows_compared;
            cfg.shadow.redact_parameters = live.redact_parameters;
        }
        serde_json::json!({
            "epoch": self.epoch.load(Ordering::Relaxed),
            "config": cfg,
        })
    }

    /// Applies new routing settings: audited (`kind`, `who`, old and new
    /// values, `extra`) before they take effect, with a new epoch. The
    /// caller holds `change_lock`.
    pub fn set_routing(
        &self,
        kind: &str,
        who: &str,
        new: crate::router::RoutingSettings,
        extra: serde_json::Value,
    ) -> Result<u64, ChangeError> {
        self.change_routing(kind, who, new, extra, false)
    }

    /// The same, applied first and audited after: a health monitor trip
    /// must not wait for the disk (the audit entry is fsynced, and the
    /// disk of a busy host can take seconds)
    /// while reads go to a failing target. The settings stay applied even
    /// when the audit write fails (the error says so).
    pub fn set_routing_urgently(
        &self,
        kind: &str,
        who: &str,
        new: crate::router::RoutingSettings,
        extra: serde_json::Value,
    ) -> Result<u64, ChangeError> {
        self.change_routing(kind, who, new, extra, true)
    }

    fn change_routing(
        &self,
        kind: &str,
        who: &str,
        new: crate::router::RoutingSettings,
        extra: serde_json::Value,
        urgent: bool,
    ) -> Result<u64, ChangeError> {
        let old = self.router.current();
        let epoch = self.epoch.load(Ordering::Relaxed) + 1;
        let mut entry = serde_json::json!({
            "epoch": epoch,
            "old": old.to_json(),
            "new": new.to_json(),
        });
        if let (Some(e), serde_json::Value::Object(x)) = (entry.as_object_mut(), extra) {
            e.extend(x);
        }
        if urgent {
            self.router.store(new.clone());
            self.bump_epoch(epoch);
        }
        self.audit
            .record(kind, who, entry)
            .map_err(|e| ChangeError {
                key: None,
                reason: if urgent {
                    format!("applied, but the audit log could not be written: {e}")
                } else {
                    format!("not applied: cannot write the audit log: {e}")
                },
            })?;
        if !urgent {
            self.router.store(new);
            self.bump_epoch(epoch);
        }
        tracing::info!(epoch, by = who, kind, "routing changed");
        Ok(epoch)
    }

    /// Makes `epoch` the running one (its audit entry is written).
    pub fn bump_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
        self.metrics.config_reloads.inc();
        self.metrics.config_epoch.set(epoch as i64);
    }

    /// What failback and resume record: the numbers an operator would
    /// want to see next to the decision.
    pub fn routing_evidence(&self) -> serde_json::Value {
        serde_json::json!({
            "routing": self.metrics.route.snapshot(),
            "mirror_lag_transactions": self.metrics.mirror.lag_transactions.get(),
            "mirror_lag_ms": self.metrics.mirror.lag_ms.get(),
        })
    }

    /// `GET /status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "phase": format!("{:?}", *self.shutdown.borrow()).to_lowercase(),
            "listen": self.config.listen.addr.to_string(),
            "source": {
                "addr": self.databases.source().upstream.addr(),
                "sslmode": format!("{:?}", self.databases.source().upstream.sslmode),
                "role": self.databases.role_of(Db::Source).label(),
            },
            "target": {
                "addr": self.databases.target().upstream.addr(),
                "session_links": self.config.target.session_links,
                "role": self.databases.role_of(Db::Target).label(),
            },
            "workers": self.worker_loads.get().map(|loads| {
                loads.iter().map(|l| l.load(Ordering::Relaxed)).collect::<Vec<_>>()
            }),
            "config": {
                "epoch": self.epoch.load(Ordering::Relaxed),
                "reloads_applied": self.metrics.config_reloads.get(),
                "reloads_rejected": self.metrics.config_rejections.get(),
                "reloads_unchanged": self.metrics.config_reloads_unchanged.get(),
                "last_rejection": self.last_rejection.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                "audit_log": self.audit.path().display().to_string(),
            },
            "metrics": self.metrics.snapshot(),
            "mirror": self.mirror.as_ref().map(|m| m.status()),
            "shadow": self.shadow.as_ref().map(|s| serde_json::json!({
                "settings": s.settings().to_json(),
                "mismatch_log": self.config.shadow.mismatch_log.display().to_string(),
            })),
            "routing": self.router.status(),
            "failback": self.health.as_ref().map(|h| h.status()),
            "record": self.record.status(),
        })
    }
}
