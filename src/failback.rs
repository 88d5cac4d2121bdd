//! Automatic failback, the control half: the thread that ticks the health
//! monitor (`health::monitor`, a state machine that knows neither the
//! proxy nor the router) with what the proxy reports, and applies the caps
//! on routing it decides on as audited routing changes.
//!
//! It sits above `proxy` and `router`: it reads the routing settings, the
//! mirror's lag and whether there is a target, and changes routing through
//! `Proxy::set_routing` like any operator change (an epoch, an audit
//! entry), a trip urgently (applied first, audited after).

use std::sync::Arc;
use std::time::Instant;

use tracing::error;

use crate::health::monitor::{Outside, RoutingCap, TICK};
use crate::health::Db;
use crate::proxy::Proxy;
use crate::router::{policy, Limit, RoutingSettings};

/// Starts the monitor thread (when failback is configured); it runs until
/// the process ends.
pub fn start(proxy: Arc<Proxy>) -> anyhow::Result<()> {
    let Some(health) = proxy.health.clone() else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("pgshift-health".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            // Held through the change, so no reload or API change lands
            // between the decision and its application.
            let _serial = proxy.change_lock.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let outside = outside(&proxy, &health);
            let change = {
                let mut st = health.state.lock().unwrap_or_else(|p| p.into_inner());
                st.tick(&health, &outside, now);
                st.take_change()
            };
            let Some(c) = change else {
                continue;
            };
            let settings = capped(&proxy.router.current(), c.cap.as_ref());
            let r = if c.force {
                proxy.set_routing_urgently(c.kind(), "health", settings, c.extra.clone())
            } else {
                proxy.set_routing(c.kind(), "health", settings, c.extra.clone())
            };
            let applied = match r {
                Ok(_) => true,
                Err(e) => {
                    error!(error = %e.reason, kind = c.kind(), "failback change");
                    c.force
                }
            };
            if applied {
                let mut st = health.state.lock().unwrap_or_else(|p| p.into_inner());
                st.commit(&health, c);
            }
        })?;
    Ok(())
}

/// What the monitor reads from the rest of the proxy this tick.
fn outside(proxy: &Proxy, health: &crate::health::Health) -> Outside {
    let routing = proxy.router.current();
    Outside {
        read_percent: routing.read_percent,
        effective_percent: routing.effective_percent(),
        uncapped: routing.limit.is_none(),
        has_target: proxy.targets.is_some(),
        mirror_lag_ms: proxy
            .mirror
            .as_ref()
            .map(|_| proxy.metrics.mirror.lag_ms.get()),
        check_failures: health.checks[Db::Target as usize]
            .failures
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// The routing settings in force with the monitor's cap in place of any
/// earlier one (`None` lifts it).
fn capped(current: &RoutingSettings, cap: Option<&RoutingCap>) -> RoutingSettings {
    let mut settings = current.clone();
    settings.limit = cap.map(|cap| {
        Arc::new(Limit {
            percent: cap.percent,
            threshold: policy::threshold(cap.percent),
            shapes: cap.shapes.clone(),
            why: cap.why.clone(),
        })
    });
    settings
}
