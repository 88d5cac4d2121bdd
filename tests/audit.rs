//! The audit log and config epochs on a real proxy: every applied change is
//! in the log (with its epoch, old and new values) before it takes effect,
//! a rejected reload is logged, counted and shown while the old config keeps
//! serving, and `GET /audit` serves the entries behind the admin token.
mod common;
use common::mirror::*;
use common::*;

fn audit_entries(p: &Proxy) -> Vec<serde_json::Value> {
    p.audit_entries()
}

#[test]
fn config_changes_and_rejections_are_audited_and_served() {
    let spool = tempfile::tempdir().unwrap();
    let secret = tempfile::tempdir().unwrap();
    let token_file = secret.path().join("admin.token");
    write_secret(&token_file, "s3cret-token\n");
    let (sp, tf) = (spool.path().to_path_buf(), token_file.display().to_string());
    let p = Proxy::start_with(move |cfg| {
        mirror_config(cfg, &sp);
        cfg["admin"]["token_file"] = toml_edit::value(tf);
    });
    let start = audit_entries(&p);
    assert_eq!(start.len(), 1, "{start:?}");
    assert_eq!(start[0]["kind"], "start");
    assert_eq!(start[0]["epoch"], 1);
    assert_eq!(p.stat("/config/epoch"), 1);

    // The API needs the token.
    assert_eq!(http_get(p.admin_port, "/audit", None).0, 401);
    assert_eq!(http_get(p.admin_port, "/audit", Some("wrong")).0, 401);
    let (code, body) = p.admin_get("/audit?since=nonsense");
    assert_eq!(code, 400, "{body}");

    // A live change: mirroring off, by editing the file (it is watched).
    let cfg_path = p.dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("enabled = true"), "{text}");
    let before_reload = now_us();
    std::fs::write(&cfg_path, text.replace("enabled = true", "enabled = false")).unwrap();
    p.wait_for(60, "epoch 2", |p| p.stat("/config/epoch") == 2);
    assert_eq!(p.status()["mirror"]["enabled"], false);
    // GET /config shows the configuration in force, live change included.
    let (code, body) = p.admin_get("/config");
    assert_eq!(code, 200, "{body}");
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["epoch"], 2);
    assert_eq!(cfg["config"]["mirror"]["enabled"], false);
    assert_eq!(cfg["config"]["mirror"]["on_full"], "stop_mirroring");
    assert_eq!(
        cfg["config"]["listen"]["addr"],
        format!("127.0.0.1:{}", p.port)
    );
    let entries = audit_entries(&p);
    let reload = entries
        .iter()
        .find(|e| e["kind"] == "config_reload")
        .unwrap_or_else(|| panic!("no reload entry in {entries:?}"));
    assert_eq!(reload["who"], "file");
    assert_eq!(reload["epoch"], 2);
    assert_eq!(reload["changes"][0]["key"], "mirror.enabled");
    assert_eq!(reload["changes"][0]["old"], true);
    assert_eq!(reload["changes"][0]["new"], false);
    assert!(
        entries.iter().any(|e| e["kind"] == "mirror_gap"),
        "switching mirroring off is a gap: {entries:?}"
    );

    // An invalid file: rejected with key and line, the old config serves.
    std::fs::write(
        &cfg_path,
        text.replace("enabled = true", "enabled = false\nno_such_key = 1"),
    )
    .unwrap();
    p.wait_for(60, "the rejection", |p| {
        p.stat("/config/reloads_rejected") == 1
    });
    let st = p.status();
    assert_eq!(st["config"]["epoch"], 2, "{st:#}");
    let rejection = &st["config"]["last_rejection"];
    assert!(
        rejection["reason"]
            .as_str()
            .unwrap()
            .contains("no_such_key"),
        "{rejection}"
    );
    assert!(rejection["line"].as_u64().is_some(), "{rejection}");
    psql_ok(&p.url(SUPERUSER, "postgres"), &["-c", "select 1"], None);
    let entries = audit_entries(&p);
    let rejected = entries.last().unwrap();
    assert_eq!(rejected["kind"], "config_rejected");
    assert_eq!(rejected["who"], "file");
    assert_eq!(rejected["reason"], rejection["reason"]);
    // Watching does not reject the same file again every second.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(p.stat("/config/reloads_rejected"), 1);

    // GET /audit serves the same entries, from a point in time.
    let (code, body) = p.admin_get(&format!("/audit?since={before_reload}"));
    assert_eq!(code, 200, "{body}");
    let served: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(served, audit_entries(&p)[1..].to_vec());
    // SIGHUP re-reads the file too. The watcher may see the edit first
    // (a write and a signal race); either way the change is audited once.
    std::fs::write(&cfg_path, &text).unwrap();
    p.signal("HUP");
    p.wait_for(60, "epoch 3", |p| p.stat("/config/epoch") == 3);
    assert_eq!(p.status()["mirror"]["enabled"], true);
    let entries = audit_entries(&p);
    let reloads: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "config_reload")
        .collect();
    assert_eq!(reloads.len(), 2, "{entries:?}");
    assert_eq!(reloads[1]["epoch"], 3);
    assert_eq!(reloads[1]["changes"][0]["new"], true);
    assert!(["signal", "file"].contains(&reloads[1]["who"].as_str().unwrap()));
    let metrics = p.metrics_text();
    assert!(metrics.contains("pgshift_config_epoch 3"), "{metrics}");
    assert!(
        metrics.contains(r#"pgshift_config_reloads_total{result="rejected"} 1"#),
        "{metrics}"
    );
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn ctl_reads_status_and_audit_through_the_token_protected_api() {
    let secret = tempfile::tempdir().unwrap();
    let token_file = secret.path().join("admin.token");
    write_secret(&token_file, "ctl-token\n");
    let tf = token_file.display().to_string();
    let p = Proxy::start_with(move |cfg| {
        cfg["admin"]["token_file"] = toml_edit::value(tf);
    });
    let out = p.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("config: epoch 1, 0 reloads applied, 0 unchanged, 0 rejected"),
        "{text}"
    );
    assert!(text.contains("mirror: not configured"), "{text}");

    let out = p.ctl(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, {
        let mut live = p.status();
        // Counters move between the two reads; compare the stable parts.
        live["metrics"] = v["metrics"].clone();
        live
    });

    let out = p.ctl(&["config"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["epoch"], 1);
    assert_eq!(v["config"]["source"]["port"], p.clusters.source_port);

    let out = p.ctl(&["audit"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(" start start "), "{text}");

    // A wrong token: a clear error and a failing exit code.
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    let out = p.ctl(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("bearer token"), "{err}");
}

/// Files the spool itself writes (src/mirror/spool.rs, inflight.rs and the
/// applier's progress file), not yet created through `private_files`:
/// under a permissive umask they take its mode, but they sit in the spool
/// directory, which is 0700.
/// Every file (0600) and directory (0700) under `dir`, the spool's own
/// files included; returns (path, mode) of each one checked.
fn check_private(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:04o}", path.display());
            out.push((path.clone(), mode));
            check_private(&path, out);
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:04o}", path.display());
            out.push((path, mode));
        }
    }
}

#[test]
fn files_the_proxy_writes_are_private_under_a_permissive_umask() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_path_buf();
    // A spool directory anyone may enter, holding a divergence log anyone
    // may read: both are tightened.
    let spool = r.join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
    let divergences = spool.join("divergences.jsonl");
    std::fs::write(&divergences, "").unwrap();
    std::fs::set_permissions(&divergences, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (audit_log, mismatch_log, capture) = (
        r.join("logs/audit/audit.jsonl"),
        r.join("logs/shadow/mismatches.jsonl"),
        r.join("rec/day1/capture"),
    );
    let (sp, al, ml, cap) = (
        spool.clone(),
        audit_log.clone(),
        mismatch_log.clone(),
        capture.clone(),
    );
    let p = Proxy::start_under_umask("000", move |cfg| {
        mirror_config(cfg, &sp);
        cfg["shadow"]["sample_percent"] = toml_edit::value(100.0);
        cfg["shadow"]["mismatch_log"] = toml_edit::value(ml.display().to_string());
        cfg["audit"]["path"] = toml_edit::value(al.display().to_string());
        cfg["record"]["path"] = toml_edit::value(cap.display().to_string());
    });
    // The proxy really runs under the permissive umask.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    assert!(
        proc_status
            .lines()
            .any(|l| l.split_whitespace().eq(["Umask:", "0000"])),
        "{proc_status}"
    );
    let c = p.clusters.clone();
    let db = "private_files";
    c.fresh_db(db);
    let url = p.url(SUPERUSER, db);
    psql_ok(
        &url,
        &[
            "-c",
            "CREATE TABLE t(id int PRIMARY KEY, secret text)",
            "-c",
            "INSERT INTO t VALUES (1, 'private-value')",
            "-c",
            "SELECT * FROM t WHERE id = 1",
        ],
        None,
    );
    p.wait_mirror_drained(30);
    // Mirroring off by editing the file: a gap, in gaps.jsonl.
    let cfg_path = p.dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("enabled = true", "enabled = false")).unwrap();
    let gaps = spool.join("gaps.jsonl");
    p.wait_for(60, "the gap", |_| {
        std::fs::read_to_string(&gaps).is_ok_and(|t| t.contains("\"gap\""))
    });
    p.wait_for(60, "the recording to reach its segment", |p| {
        p.status()["record"]["current"]["messages"].as_u64() >= Some(3)
    });

    let mut checked = Vec::new();
    check_private(&r, &mut checked);
    let checked: Vec<_> = checked.into_iter().map(|(p, _)| p).collect();
    for wanted in [
        &spool,
        &divergences,
        &gaps,
        &audit_log,
        &mismatch_log,
        &r.join("logs"),
        &r.join("rec/day1"),
        &r.join("rec/day1/capture.000001"),
    ] {
        assert!(
            checked.contains(wanted),
            "{} not written: {checked:?}",
            wanted.display()
        );
    }
    assert!(std::fs::read_to_string(&audit_log)
        .unwrap()
        .contains("config_reload"));
    let log = p.log();
    assert!(
        log.contains("tightened permissions") && log.contains("divergences.jsonl"),
        "the tightening is logged, naming the file:\n{log}"
    );
}
