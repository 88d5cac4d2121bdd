//! `pgshift ctl`: the admin API from the command line. It finds the API and
//! its token in the same config file the proxy runs with, prints readable
//! text by default and the API's JSON with `--json`.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::Config;

pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// The API of the proxy running with `cfg`; `addr` overrides
    /// `admin.addr`.
    pub fn new(cfg: &Config, addr: Option<&str>) -> anyhow::Result<Self> {
        let addr = match (addr, cfg.admin.addr) {
            (Some(a), _) => a.to_string(),
            (None, Some(a)) => a.to_string(),
            (None, None) => bail!("the config has no admin.addr; pass --admin"),
        };
        let token = cfg
            .admin
            .token_file
            .as_deref()
            .map(crate::private_files::read_token)
            .transpose()?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Ok(Self {
            base: format!("http://{addr}"),
            token,
            agent,
        })
    }

    /// GETs `path` and parses the JSON answer; any status but 200 is an
    /// error carrying the API's message.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .call()
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        Self::answer("GET", path, resp)
    }

    /// PUTs or POSTs a JSON body to `path`; the answer as for `get`.
    pub fn send(&self, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "PUT" => self.agent.put(&url),
            _ => self.agent.post(&url),
        };
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        Self::answer(method, path, resp)
    }

    fn answer(
        method: &str,
        path: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> anyhow::Result<Value> {
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        if status != 200 {
            let v = serde_json::from_str::<Value>(&body).ok();
            let msg = v
                .as_ref()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            let key = v
                .as_ref()
                .and_then(|v| v["key"].as_str().map(|k| format!(" (key {k})")))
                .unwrap_or_default();
            bail!("{method} {path}: {status}: {}{key}", msg.trim());
        }
        serde_json::from_str(&body)
            .with_context(|| format!("{method} {path}: the answer is not JSON"))
    }
}

fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `GET /status` as a few readable lines.
pub fn status_text(s: &Value) -> String {
    let mut out = format!(
        "pgshift {} ({}), listening on {}\n",
        s["version"].as_str().unwrap_or("?"),
        s["phase"].as_str().unwrap_or("?"),
        s["listen"].as_str().unwrap_or("?"),
    );
    let c = &s["config"];
    out += &format!(
        "config: epoch {}, {} reloads applied, {} unchanged, {} rejected; audit log {}\n",
        num(&c["epoch"]),
        num(&c["reloads_applied"]),
        num(&c["reloads_unchanged"]),
        num(&c["reloads_rejected"]),
        c["audit_log"].as_str().unwrap_or("?"),
    );
    if let Some(r) = c["last_rejection"].as_object() {
        out += &format!(
            "  last rejected reload: {} (key {}, line {})\n",
            r.get("reason").and_then(Value::as_str).unwrap_or("?"),
            r.get("key").and_then(Value::as_str).unwrap_or("-"),
            r.get("line").map(num).unwrap_or_else(|| "-".into()),
        );
    }
    if s["routing"].is_object() {
        out += &routing_line(&s["routing"]);
        let r = &s["metrics"]["routing"];
        out += &format!(
            "  reads: {} on the target (p50 {} µs, p99 {} µs), {} on the source (p50 {} µs, p99 {} µs); fallbacks {}\n",
            num(&r["target"]["reads"]),
            num(&r["target"]["p50_us"]),
            num(&r["target"]["p99_us"]),
            num(&r["source"]["reads"]),
            num(&r["source"]["p50_us"]),
            num(&r["source"]["p99_us"]),
            ["connection", "timeout", "server_error", "setup"]
                .iter()
                .map(|k| r["fallbacks"][*k].as_u64().unwrap_or(0))
                .sum::<u64>(),
        );
    }
    let m = &s["metrics"]["clients"];
    out += &format!(
        "clients: {} sessions open, {} connections since start\n",
        num(&m["sessions_active"]),
        num(&m["connections_total"]),
    );
    out += &format!(
        "source {}, target {}\n",
        s["source"]["addr"].as_str().unwrap_or("?"),
        s["target"]["addr"].as_str().unwrap_or("?"),
    );
    out += &failback_lines(&s["failback"]);
    let mi = &s["mirror"];
    if mi.is_null() {
        out += "mirror: not configured\n";
    } else {
        let r = &mi["report"];
        out += &format!(
            "mirror: {}, {} units behind ({:.1} s), {} applied, spool {} bytes\n",
            mi["state"].as_str().unwrap_or("?"),
            num(&mi["lag_transactions"]),
            mi["lag_seconds"].as_f64().unwrap_or(0.0),
            num(&mi["applied_transactions"]),
            num(&mi["spool_bytes"]),
        );
        out += &format!(
            "  divergences {}, gaps {}, in doubt {}, without order key {}{}\n",
            num(&r["divergences_total"]),
            num(&r["gaps_total"]),
            num(&mi["in_doubt_transactions"]),
            num(&mi["units_without_order_key"]),
            if r["needs_resync"] == true {
                "; THE TARGET NEEDS A RE-SYNC"
            } else {
                ""
            },
        );
    }
    out
}

/// The health monitor's part of status: its state, what tripped it, and
/// the target's window against the source's.
fn failback_lines(f: &Value) -> String {
    if f.is_null() {
        return String::new();
    }
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1} ms"));
    let mut out = match f["state"].as_str().unwrap_or("?") {
        "healthy" => format!(
            "failback: healthy ({}, recovery {}, {} trips so far)\n",
            if f["enabled"] == true {
                "armed"
            } else {
                "DISABLED"
            },
            f["recovery"].as_str().unwrap_or("?"),
            num(&f["trips"]),
        ),
        state => {
            let scope = match &f["scope"] {
                Value::Array(shapes) => format!(
                    "{} query shape(s): {}",
                    shapes.len(),
                    shapes
                        .iter()
                        .map(|s| s["query"].as_str().unwrap_or("?").to_string())
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
                other => other.as_str().unwrap_or("?").to_string(),
            };
            let t = &f["last_trip"];
            format!(
                "failback: {} ({} at {}% for {:.0} s) by rule {}: measured {} vs threshold {} {}\n  next: {}\n",
                state.to_uppercase(),
                scope,
                f["cap_percent"].as_f64().map_or("-".into(), |p| p.to_string()),
                f["for_s"].as_f64().unwrap_or(0.0),
                f["rule"].as_str().unwrap_or("?"),
                t["measured"],
                t["threshold"],
                t["unit"].as_str().unwrap_or(""),
                f["next"].as_str().unwrap_or("-"),
            )
        }
    };
    for side in ["target", "source"] {
        let w = &f["windows"][side];
        out += &format!(
            "  {side} last {} s: {} requests, {} failed ({:.2}%), p50 {}, p95 {}, p99 {}; checks: {} failed in a row\n",
            num(&f["window_s"]),
            num(&w["requests"]),
            num(&w["errors"]),
            w["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&w["p50_ms"]),
            ms(&w["p95_ms"]),
            ms(&w["p99_ms"]),
            num(&f["checks"][side]["failures_in_a_row"]),
        );
    }
    out
}

/// The routing line of status, and of the answers to route, failback and
/// resume.
fn routing_line(r: &Value) -> String {
    let mut out = format!(
        "routing: {}% of eligible reads to the target, hashed by {}",
        num(&r["read_percent"]),
        r["hash_key"].as_str().unwrap_or("?"),
    );
    if r["hash_key"] == "comment" {
        out += &format!(" (key {})", r["comment_key"].as_str().unwrap_or("?"));
    }
    out += &format!(", target timeout {} ms", num(&r["target_timeout_ms"]));
    if r["failed_back"] == true {
        out += &format!(
            "; FAILED BACK (all reads on the source): {}",
            r["failback_reason"].as_str().unwrap_or("")
        );
    } else if let Some(why) = r["health_limit"]["why"].as_str() {
        out += &format!(
            "; health monitor: {why}, {}% in effect",
            num(&r["effective_percent"])
        );
    }
    out + "\n"
}

/// The answer to `ctl route`, `failback` and `resume`.
pub fn routing_text(v: &Value) -> String {
    format!(
        "epoch {}\n{}",
        num(&v["epoch"]),
        routing_line(&v["routing"])
    )
}

/// `GET /mismatches` as a table: one line per fingerprint, then noise.
pub fn mismatches_text(v: &Value) -> String {
    let c = &v["counts"];
    let mut out = format!(
        "shadow reads: {} matched, {} confirmed mismatches, {} transient, {} noise; skipped: {}\n",
        num(&c["compared"]["match"]),
        num(&c["compared"]["mismatch_confirmed"]),
        num(&c["compared"]["mismatch_transient"]),
        num(&c["compared"]["noise"]),
        c["skipped"]
            .as_object()
            .map(|m| {
                let parts: Vec<String> = m
                    .iter()
                    .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                    .map(|(k, n)| format!("{k} {}", num(n)))
                    .collect();
                if parts.is_empty() {
                    "none".into()
                } else {
                    parts.join(", ")
                }
            })
            .unwrap_or_default(),
    );
    out += &format!(
        "mismatch log: {}\n",
        v["mismatch_log"].as_str().unwrap_or("?")
    );
    let fps = v["fingerprints"].as_array().cloned().unwrap_or_default();
    if fps.is_empty() {
        out += "no mismatches\n";
    } else {
        out += &format!(
            "{:<16} {:>9} {:>9} {:>16}  {}\n",
            "fingerprint", "confirmed", "transient", "last seen (us)", "query"
        );
    }
    for f in &fps {
        out += &format!(
            "{:<16} {:>9} {:>9} {:>16}  {}\n",
            f["fingerprint"].as_str().unwrap_or("?"),
            num(&f["confirmed"]),
            num(&f["transient"]),
            num(&f["last_seen_us"]),
            one_line(f["query"].as_str().unwrap_or(""), 80),
        );
        let d = &f["last_confirmed"]["difference"];
        if let Some(detail) = d["detail"].as_str() {
            // The column is named even when the admin API redacts the detail.
            let column = d["first_column"]
                .as_str()
                .map(|c| format!(" (column {c})"))
                .unwrap_or_default();
            out += &format!("    last: {detail}{column}\n");
        }
    }
    for n in v["noise"].as_array().into_iter().flatten() {
        let detail = n["detail"]
            .as_str()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        out += &format!(
            "noise {} ({} reads skipped): {}{detail}  {}\n",
            n["fingerprint"].as_str().unwrap_or("?"),
            num(&n["skipped"]),
            n["reason"].as_str().unwrap_or("?"),
            one_line(n["query"].as_str().unwrap_or(""), 60),
        );
    }
    out
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut t: String = flat.chars().take(max).collect();
    t.push('…');
    t
}

/// `GET /audit` entries, one line each.
pub fn audit_text(entries: &Value) -> String {
    let mut out = String::new();
    for e in entries.as_array().into_iter().flatten() {
        let mut rest = e.clone();
        let mut head = String::new();
        for k in ["time_us", "kind", "who"] {
            head += &format!("{} ", num(&rest[k]).trim_matches('"'));
            if let Some(o) = rest.as_object_mut() {
                o.remove(k);
            }
        }
        out += &format!("{head}{rest}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_status_names_what_matters() {
        let s = serde_json::json!({
            "version": "0.1.0", "phase": "running", "listen": "127.0.0.1:6432",
            "config": {"epoch": 3, "reloads_applied": 2, "reloads_unchanged": 4, "reloads_rejected": 1,
                       "audit_log": "/x/audit.jsonl",
                       "last_rejection": {"reason": "unknown field", "key": "mirror.x", "line": 7}},
            "metrics": {"clients": {"sessions_active": 4, "connections_total": 10}},
            "source": {"addr": "s:1"}, "target": {"addr": "t:2"},
            "mirror": {"state": "applying", "lag_transactions": 5, "lag_seconds": 0.25,
                       "applied_transactions": 9, "spool_bytes": 100, "in_doubt_transactions": 1,
                       "units_without_order_key": 0,
                       "report": {"divergences_total": 0, "gaps_total": 0, "needs_resync": true}},
        });
        let t = status_text(&s);
        assert!(
            t.contains("config: epoch 3, 2 reloads applied, 4 unchanged, 1 rejected"),
            "{t}"
        );
        assert!(t.contains("unknown field (key mirror.x, line 7)"), "{t}");
        assert!(
            t.contains("mirror: applying, 5 units behind (0.2 s)"),
            "{t}"
        );
        assert!(t.contains("in doubt 1"), "{t}");
        assert!(t.contains("RE-SYNC"), "{t}");
        let a = audit_text(&serde_json::json!([
            {"time_us": 1, "kind": "start", "who": "start", "epoch": 1}
        ]));
        assert_eq!(a, "1 start start {\"epoch\":1}\n");
    }
}
