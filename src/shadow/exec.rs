//! The shadow executor: runs each sampled read on the other database and
//! compares the answers, on its own thread.
//!
//! For one job:
//! 1. The served answer streams in from the session's tap while the other
//!    side runs. A read served by the source runs on the target only once
//!    the mirror has applied everything the source had acknowledged when
//!    the read started (`shadow.max_wait_ms`, else skipped), so mirror lag
//!    does not look like a mismatch.
//! 2. Equal: counted. Different: after `recheck_delay_ms` the read runs
//!    twice on the source and then (after the same wait) on the target. Two
//!    source answers that differ make the statement noise (learned, and its
//!    reads are skipped from then on); a source/target difference that
//!    persists is confirmed and reported; otherwise it was transient.
//!
//! Shadow connections stand in for sessions: one pool per side and per
//! set of startup parameters, logged in as the session's user. Each runs
//! with `default_transaction_read_only = on` and the session's settings
//! (the SETs the source got, replayed when they differ from the
//! connection's). Named statements are prepared under names derived from
//! their text, so sessions can share connections.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

use super::compare::{self, Answer, Collector, Comparison, Difference, IgnoredTableColumns, Order};
use super::query::QueryInfo;
use super::{Db, Job, Request, SessionInfo, Shadow, ShadowSettings};
use crate::mirror::Mirror;
use crate::net::Stream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::{decode_header, read_message, HEADER_LEN};
use crate::protocol::message::{
    parse_bind, parse_bind_names, put_message, take_cstr, BindNames, BIND, DESCRIBE,
    ERROR_RESPONSE, EXECUTE, PARSE, READY_FOR_QUERY,
};
use crate::protocol::rows;
use crate::tracker::StateOp;
use crate::upstream::roles::Databases;

/// Statement analyses kept (by text).
const MAX_INFOS: usize = 10_000;
/// Statements prepared per shadow connection before it is cleared.
const MAX_PREPARED: usize = 256;
/// Idle connections kept per side and startup-parameter set.
const MAX_IDLE_PER_KEY: usize = 8;
/// An idle shadow connection is closed after this long: it holds its
/// database, which a client may need to itself (`CREATE DATABASE ...
/// TEMPLATE` refuses a database anyone else is connected to).
const MAX_IDLE: Duration = Duration::from_secs(10);

/// Idle connections per side and startup-parameter set, with when each
/// went idle.
type Pools = HashMap<(Db, u64), Vec<(Instant, Conn)>>;

pub struct Exec {
    shadow: Arc<Shadow>,
    /// Where each side lives (`upstream::roles`).
    databases: Arc<Databases>,
    mirror: Option<Arc<Mirror>>,
    max_inflight: usize,
    max_message: usize,
    pools: Mutex<Pools>,
    infos: Mutex<HashMap<Box<str>, Arc<QueryInfo>>>,
    /// `table.column` ignores resolved to each side's table OIDs, per
    /// database, for the settings they were resolved under.
    ignored: Mutex<(usize, IgnoredBySide)>,
    /// Where a shadow read's verdict on the target is reported.
    pub health: Option<Arc<crate::health::Health>>,
}

/// Per side and database.
type IgnoredBySide = HashMap<(Db, String), Arc<IgnoredTableColumns>>;

/// A logged-in shadow connection.
struct Conn {
    stream: Stream,
    buf: BytesMut,
    /// Key of the session state it has (0: none beyond the guard).
    state: u64,
    prepared: HashSet<u64>,
    /// `shadow_connections`, counted while this exists.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Stream::Plain(tcp) = &self.stream {
            let _ = tcp.try_write(b"X\0\0\0\x04");
        }
    }
}

/// Why a side could not be compared.
#[derive(Debug)]
struct Skip(&'static str, String);

type Run<T> = Result<T, Skip>;

/// What the proxy adds to every shadow session: reads only.
fn guard(timeout: Duration) -> String {
    format!(
        "SET default_transaction_read_only = on;\nSET statement_timeout = {};\n",
        timeout.as_millis().max(1)
    )
}

impl Exec {
    pub fn new(
        shadow: Arc<Shadow>,
        databases: Arc<Databases>,
        mirror: Option<Arc<Mirror>>,
        max_inflight: usize,
        max_message: usize,
    ) -> Self {
        Self {
            shadow,
            databases,
            mirror,
            max_inflight,
            max_message,
            pools: Mutex::default(),
            infos: Mutex::default(),
            ignored: Mutex::default(),
            health: None,
        }
    }

    /// A compared shadow read, for the health monitor: the target failed
    /// it when a confirmed difference is the target erroring alone.
    fn report_health(&self, target_failed: bool) {
        use crate::health::{Db, Fault, Sample, SampleKind};
        if let Some(h) = &self.health {
            let fault = target_failed.then_some(Fault::Diverged);
            h.record(Sample::new(Db::Target, SampleKind::Shadow, fault));
        }
    }

    fn metrics(&self) -> &super::ShadowMetrics {
        &self.shadow.report.metrics
    }

    /// Takes jobs until the proxy ends, at most `max_inflight` at once.
    pub async fn run(self: Arc<Self>, mut jobs: mpsc::Receiver<Job>) {
        let slots = Arc::new(Semaphore::new(self.max_inflight));
        let mut prune = tokio::time::interval(MAX_IDLE / 2);
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let job = loop {
                tokio::select! {
                    j = jobs.recv() => break j,
                    _ = prune.tick() => self.prune_idle(),
                }
            };
            let Some(job) = job else {
                return;
            };
            self.metrics().queued.dec();
            self.metrics().inflight.inc();
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.job(job).await;
                me.metrics().inflight.dec();
                me.metrics().tap_bytes.set(
                    me.shadow
                        .tap_bytes
                        .load(std::sync::atomic::Ordering::Relaxed) as i64,
                );
                drop(permit);
            });
        }
    }

    async fn job(&self, mut job: Job) {
        // A template database must stay free for CREATE DATABASE: shadow
        // connections never sit in one.
        if matches!(
            job.session.startup.database(),
            Some("template0" | "template1")
        ) {
            self.metrics().skip("template_database");
            return;
        }
        let settings = self.shadow.settings();
        let texts = executed_texts(&job.request);
        let info = self.info(&texts);
        if let Some(reason) = &info.noise {
            self.shadow
                .report
                .learn_noise(&info.fingerprint, &texts.join(";\n"), reason, None);
        }
        if self.shadow.report.is_noise(&info.fingerprint) {
            self.metrics().skip("noise");
            return;
        }
        let started = job.started;
        let Some(answer) = job.answer.take() else {
            return;
        };
        let result =
            tokio::time::timeout(settings.timeout, self.first(&job, answer, &settings, &info))
                .await;
        let first = match result {
            Ok(Ok(c)) => c,
            Ok(Err(Skip(reason, detail))) => {
                debug!(reason, detail, "shadow read skipped");
                self.metrics().skip(reason);
                return;
            }
            Err(_) => {
                debug!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "shadow read timed out"
                );
                self.metrics().skip("timeout");
                return;
            }
        };
        let Comparison::Differ(first) = first else {
            self.metrics().outcome("match");
            self.report_health(false);
            return;
        };
        debug!(fingerprint = %info.fingerprint, detail = %first.detail, "shadow mismatch; re-checking");
        tokio::time::sleep(settings.recheck_delay).await;
        let again = tokio::time::timeout(
            settings.timeout * 3,
            self.recheck(&job, &settings, &info, &first),
        )
        .await;
        let text = texts.join(";\n");
        match again {
            Ok(Ok(Recheck::Same)) => {
                self.report_health(false);
                self.shadow.report.transient(&info.fingerprint, &text)
            }
            Ok(Ok(Recheck::Noise(d))) => {
                self.metrics().outcome("noise");
                self.shadow.report.learn_noise(
                    &info.fingerprint,
                    &text,
                    "two runs on the source differ",
                    Some(&d.detail),
                );
            }
            Ok(Ok(Recheck::Differ(d))) => {
                self.report_health(d.second_side_failed());
                let entry = self.entry(&job, &settings, &info, &text, &first, &d);
                self.shadow
                    .report
                    .confirmed(&info.fingerprint, &text, entry);
            }
            Ok(Err(Skip(reason, detail))) => {
                // The re-check could not run: the mismatch stays unconfirmed.
                debug!(reason, detail, "shadow re-check skipped");
                self.metrics().skip(reason);
                self.shadow.report.transient(&info.fingerprint, &text);
            }
            Err(_) => {
                self.metrics().skip("timeout");
                self.shadow.report.transient(&info.fingerprint, &text);
            }
        }
    }

    /// The served answer against the other side's.
    async fn first(
        &self,
        job: &Job,
        answer: mpsc::Receiver<super::Chunk>,
        s: &Arc<ShadowSettings>,
        info: &QueryInfo,
    ) -> Run<Comparison> {
        let served_ignored = self.ignored(job.served, &job.session, s).await?;
        let served = Collector::new(
            Arc::clone(&s.compare),
            served_ignored,
            info.orders.clone(),
            HashSet::new(),
        );
        let shadow_side = job.served.other();
        let other = async {
            if shadow_side == Db::Target {
                self.wait_applied(job.watermark, s.max_wait).await?;
            }
            // Exactly what the client sent, so both answers have the same shape.
            self.run_on(shadow_side, job, s, info, HashSet::new(), false)
                .await
        };
        // Both at once: the served answer is still streaming in.
        let (a, b) = tokio::join!(self.served_answer(answer, served), other);
        let (a, b) = (a?, b?);
        Ok(compare::compare(&a, &b, &s.compare))
    }

    /// Twice on the source, then on the target once it has caught up.
    async fn recheck(
        &self,
        job: &Job,
        s: &Arc<ShadowSettings>,
        info: &QueryInfo,
        first: &Difference,
    ) -> Run<Recheck> {
        let wanted: HashSet<u64> = first
            .wanted_a
            .iter()
            .chain(first.wanted_b.iter())
            .copied()
            .collect();
        // With a Describe before each Execute (the client may have sent
        // none): column names and formats for the report.
        let s1 = self
            .run_on(Db::Source, job, s, info, wanted.clone(), true)
            .await?;
        let watermark = self.mirror.as_ref().map_or(0, |m| m.spool.last_seq());
        let s2 = self
            .run_on(Db::Source, job, s, info, wanted.clone(), true)
            .await?;
        if let Comparison::Differ(d) = compare::compare(&s1, &s2, &s.compare) {
            return Ok(Recheck::Noise(d));
        }
        self.wait_applied(watermark, s.max_wait).await?;
        let t = self.run_on(Db::Target, job, s, info, wanted, true).await?;
        Ok(match compare::compare(&s2, &t, &s.compare) {
            Comparison::Same => Recheck::Same,
            Comparison::Differ(d) => Recheck::Differ(d),
        })
    }

    /// Waits until the mirror has applied `seq` on the target.
    async fn wait_applied(&self, seq: u64, max_wait: Duration) -> Run<()> {
        let Some(m) = &self.mirror else {
            return Ok(());
        };
        let deadline = Instant::now() + max_wait;
        while !m.is_applied(seq) {
            if Instant::now() >= deadline {
                return Err(Skip(
                    "mirror_wait",
                    format!("the mirror did not apply seq {seq} within shadow.max_wait_ms"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The served answer, as the tap copied it.
    async fn served_answer(
        &self,
        mut answer: mpsc::Receiver<super::Chunk>,
        mut c: Collector,
    ) -> Run<Answer> {
        let mut buf = BytesMut::new();
        loop {
            let Some(chunk) = answer.recv().await else {
                return Err(Skip(
                    "served_incomplete",
                    "the served answer was not copied whole".into(),
                ));
            };
            buf.extend_from_slice(&chunk.bytes);
            drop(chunk);
            loop {
                let h = decode_header(&buf, self.max_message)
                    .map_err(|e| Skip("too_large", e.to_string()))?;
                let Some(h) = h else { break };
                if buf.len() < h.frame_len() {
                    break;
                }
                let frame = buf.split_to(h.frame_len());
                let done = c
                    .message(h.tag, &frame[HEADER_LEN..])
                    .map_err(|e| Skip("malformed", e.to_string()))?;
                if done {
                    return Ok(c.finish());
                }
            }
        }
    }

    /// Runs the job's request on one side and collects its answer.
    async fn run_on(
        &self,
        side: Db,
        job: &Job,
        s: &Arc<ShadowSettings>,
        info: &QueryInfo,
        wanted: HashSet<u64>,
        describe: bool,
    ) -> Run<Answer> {
        let ignored = self.ignored(side, &job.session, s).await?;
        let mut c = Collector::new(Arc::clone(&s.compare), ignored, info.orders.clone(), wanted);
        let mut conn = self.conn(side, &job.session, s).await?;
        self.sync_state(&mut conn, job, s).await?;
        let out = self
            .request_frames(&mut conn, &job.request, describe)
            .await?;
        send(&mut conn, &out).await?;
        loop {
            let m = read_message(&mut conn.stream, &mut conn.buf, self.max_message)
                .await
                .map_err(|e| Skip("too_large", e.to_string()))?
                .ok_or_else(|| Skip("connect", "the server closed the connection".into()))?;
            let done = c
                .message(m.tag, m.body())
                .map_err(|e| Skip("malformed", e.to_string()))?;
            if done {
                break;
            }
        }
        self.put_back(side, &job.session, conn);
        Ok(c.finish())
    }

    /// The next message on a shadow connection.
    async fn next(&self, conn: &mut Conn) -> Run<crate::protocol::frame::Message> {
        read_message(&mut conn.stream, &mut conn.buf, self.max_message)
            .await
            .map_err(|e| Skip("connect", e.to_string()))?
            .ok_or_else(|| Skip("connect", "the server closed the connection".into()))
    }

    /// An idle connection for this side and session, or a new one.
    async fn conn(&self, side: Db, session: &SessionInfo, s: &ShadowSettings) -> Run<Conn> {
        let pooled = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(side, session.key))
            .and_then(Vec::pop);
        if let Some((_, c)) = pooled {
            return Ok(c);
        }
        let db = self.databases.named(side);
        let (stream, buf, _key) = crate::upstream::login::connect_and_login(
            &db.upstream,
            db.passfile.as_ref(),
            &session.startup,
        )
        .await
        .map_err(|e| Skip("connect", format!("{}: {e}", side.label())))?;
        let gauge = self.metrics().connections.clone();
        gauge.inc();
        let mut conn = Conn {
            stream,
            buf,
            state: 0,
            prepared: HashSet::new(),
            gauge,
        };
        self.simple(&mut conn, &guard(s.timeout)).await?;
        Ok(conn)
    }

    fn put_back(&self, side: Db, session: &SessionInfo, conn: Conn) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pools.entry((side, session.key)).or_default();
        if idle.len() < MAX_IDLE_PER_KEY.min(self.max_inflight) {
            idle.push((Instant::now(), conn));
        }
        Self::prune(&mut pools);
    }

    /// Closes connections idle past `MAX_IDLE`.
    fn prune(pools: &mut Pools) {
        pools.retain(|_, idle| {
            idle.retain(|(since, _)| since.elapsed() < MAX_IDLE);
            !idle.is_empty()
        });
    }

    /// Closes idle connections past their time (called now and then, so a
    /// quiet proxy lets go of every database).
    pub fn prune_idle(&self) {
        Self::prune(&mut self.pools.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Runs SQL of the proxy's own (state, guard); an error fails the job.
    async fn simple(&self, conn: &mut Conn, sql: &str) -> Run<()> {
        let mut out = BytesMut::new();
        put_message(&mut out, b'Q', &[sql.as_bytes(), b"\0"]);
        send(conn, &out).await?;
        let mut failed = None;
        loop {
            let m = self.next(conn).await?;
            match m.tag {
                ERROR_RESPONSE => {
                    let f = parse_error_fields(m.body());
                    failed.get_or_insert_with(|| {
                        format!("{} {}", f.code.unwrap_or("?"), f.message.unwrap_or(""))
                    });
                }
                READY_FOR_QUERY => break,
                _ => {}
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => Err(Skip("setup", e)),
        }
    }

    /// Brings the connection to the session's settings when they differ.
    async fn sync_state(&self, conn: &mut Conn, job: &Job, s: &ShadowSettings) -> Run<()> {
        let key = state_key(&job.state);
        if conn.state == key {
            return Ok(());
        }
        let mut sql = String::from("RESET ALL;\n");
        for op in &job.state {
            if let StateOp::Sql(t) | StateOp::Reset(t, _) = op {
                sql.push_str(t.trim_end_matches([';', ' ', '\n', '\t', '\r']));
                sql.push_str(";\n");
            }
        }
        sql.push_str(&guard(s.timeout));
        conn.state = u64::MAX;
        self.simple(conn, &sql).await?;
        conn.state = key;
        Ok(())
    }

    /// The request as this connection runs it: named statements prepared
    /// under derived names (on first use), Binds and Describes renamed.
    async fn request_frames(
        &self,
        conn: &mut Conn,
        req: &Request,
        describe: bool,
    ) -> Run<BytesMut> {
        let mut out = BytesMut::new();
        match req {
            Request::Simple(body) => put_message(&mut out, b'Q', &[body]),
            Request::Extended { frames, statements } => {
                let mut names: HashMap<&[u8], String> = HashMap::new();
                let mut prepare = BytesMut::new();
                for (name, st) in statements {
                    let id = statement_id(&st.query, &st.types);
                    let derived = format!("pgshift_shadow_{id:016x}");
                    if !conn.prepared.contains(&id) {
                        put_message(
                            &mut prepare,
                            PARSE,
                            &[derived.as_bytes(), b"\0", &st.query, b"\0", &st.types],
                        );
                        conn.prepared.insert(id);
                    }
                    names.insert(name, derived);
                }
                if conn.prepared.len() > MAX_PREPARED {
                    // Start over: the next requests prepare what they use.
                    self.simple(conn, "DEALLOCATE ALL").await?;
                    conn.prepared.clear();
                    return Box::pin(self.request_frames(conn, req, describe)).await;
                }
                if !prepare.is_empty() {
                    put_message(&mut prepare, b'S', &[]);
                    self.prepare(conn, &prepare).await?;
                }
                rename(frames, &names, describe, &mut out)
                    .map_err(|e| Skip("malformed", format!("request: {e}")))?;
                put_message(&mut out, b'S', &[]);
            }
        }
        Ok(out)
    }

    async fn prepare(&self, conn: &mut Conn, frames: &[u8]) -> Run<()> {
        send(conn, frames).await?;
        loop {
            let m = self.next(conn).await?;
            match m.tag {
                ERROR_RESPONSE => {
                    let f = parse_error_fields(m.body());
                    conn.prepared.clear();
                    return Err(Skip(
                        "setup",
                        format!(
                            "preparing a statement failed: {} {}",
                            f.code.unwrap_or("?"),
                            f.message.unwrap_or("")
                        ),
                    ));
                }
                READY_FOR_QUERY => return Ok(()),
                _ => {}
            }
        }
    }

    /// `ignore_columns` entries naming a table, as this side's table OIDs.
    async fn ignored(
        &self,
        side: Db,
        session: &SessionInfo,
        s: &Arc<ShadowSettings>,
    ) -> Run<Arc<IgnoredTableColumns>> {
        if s.ignore_table_columns.is_empty() {
            return Ok(Arc::default());
        }
        let db = session.startup.database().unwrap_or_default().to_string();
        let generation = Arc::as_ptr(s) as usize;
        {
            let mut cache = self.ignored.lock().unwrap_or_else(|p| p.into_inner());
            if cache.0 != generation {
                *cache = (generation, HashMap::new());
            }
            if let Some(v) = cache.1.get(&(side, db.clone())) {
                return Ok(Arc::clone(v));
            }
        }
        let mut conn = self.conn(side, session, s).await?;
        let names: Vec<String> = s
            .ignore_table_columns
            .iter()
            .map(|(t, _)| format!("'{}'", t.replace('\'', "''")))
            .collect();
        let sql = format!(
            "SELECT c.oid, c.relname FROM pg_catalog.pg_class c WHERE c.relname IN ({})",
            names.join(", ")
        );
        let mut out = BytesMut::new();
        put_message(&mut out, b'Q', &[sql.as_bytes(), b"\0"]);
        send(&mut conn, &out).await?;
        let mut resolved = Vec::new();
        loop {
            let m = self.next(&mut conn).await?;
            match m.tag {
                rows::DATA_ROW => {
                    if let Some((oid, name)) = oid_and_name(m.body()) {
                        for (t, col) in &s.ignore_table_columns {
                            if *t == name {
                                resolved.push((oid, col.clone()));
                            }
                        }
                    }
                }
                READY_FOR_QUERY => break,
                _ => {}
            }
        }
        self.put_back(side, session, conn);
        let v = Arc::new(resolved);
        self.ignored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .insert((side, db), Arc::clone(&v));
        Ok(v)
    }

    /// The analysis of the statements a request runs (cached per text).
    fn info(&self, texts: &[String]) -> Arc<QueryInfo> {
        let joined = texts.join(";\n");
        let mut infos = self.infos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = infos.get(joined.as_str()) {
            return Arc::clone(i);
        }
        let info = match texts {
            [one] => super::query::analyze(one),
            many => {
                // Extended protocol: one statement per Execute.
                let parts: Vec<QueryInfo> = many.iter().map(|t| super::query::analyze(t)).collect();
                let mut fps: Vec<&str> = parts.iter().map(|p| p.fingerprint.as_str()).collect();
                fps.dedup();
                QueryInfo {
                    fingerprint: fps.join("+"),
                    orders: parts
                        .iter()
                        .map(|p| p.orders.first().cloned().unwrap_or(Order::Unordered))
                        .collect(),
                    noise: parts.iter().find_map(|p| p.noise.clone()),
                }
            }
        };
        if infos.len() >= MAX_INFOS {
            infos.clear();
        }
        let info = Arc::new(info);
        infos.insert(joined.into(), Arc::clone(&info));
        info
    }

    /// The mismatch log entry.
    fn entry(
        &self,
        job: &Job,
        s: &ShadowSettings,
        info: &QueryInfo,
        text: &str,
        first: &Difference,
        confirmed: &Difference,
    ) -> serde_json::Value {
        let parameters = if s.redact_parameters {
            serde_json::Value::Null
        } else {
            serde_json::json!(bind_parameters(&job.request))
        };
        serde_json::json!({
            "fingerprint": info.fingerprint,
            "query": text,
            "parameters": parameters,
            "parameters_redacted": s.redact_parameters,
            "served": job.served.label(),
            "user": job.session.startup.get("user"),
            "database": job.session.startup.database(),
            "difference": {
                "kind": confirmed.kind,
                "result_set": confirmed.result_set,
                "first_column": confirmed.first_column,
                "detail": confirmed.detail.replace("served", "source").replace("shadow", "target"),
                "source_rows": confirmed.rows_a,
                "target_rows": confirmed.rows_b,
            },
            "first_seen": {
                "kind": first.kind,
                "detail": first.detail.replace("served", job.served.label()).replace("shadow", job.served.other().label()),
            },
        })
    }
}

enum Recheck {
    Same,
    Noise(Difference),
    Differ(Difference),
}

async fn send(conn: &mut Conn, bytes: &[u8]) -> Run<()> {
    crate::net::send_all(&mut conn.stream, bytes)
        .await
        .map_err(|e| Skip("connect", format!("write failed: {e}")))
}

/// Identifies a session's state for shadow connections (0: none).
fn state_key(ops: &[StateOp]) -> u64 {
    let mut h = 0u64;
    for op in ops {
        if let StateOp::Sql(t) | StateOp::Reset(t, _) = op {
            h = (h ^ crate::classify::analyze::fnv1a(t.as_bytes())).wrapping_mul(0x100000001b3) | 1;
        }
    }
    h
}

fn statement_id(query: &[u8], types: &[u8]) -> u64 {
    let mut v = Vec::with_capacity(query.len() + types.len() + 1);
    v.extend_from_slice(query);
    v.push(0);
    v.extend_from_slice(types);
    crate::classify::analyze::fnv1a(&v)
}

/// The statement texts a request runs: the Query's, or one per Execute.
pub fn executed_texts(req: &Request) -> Vec<String> {
    match req {
        Request::Simple(body) => {
            let text = body.strip_suffix(b"\0").unwrap_or(body);
            vec![String::from_utf8_lossy(text).into_owned()]
        }
        Request::Extended { frames, statements } => {
            let mut unnamed: &[u8] = b"";
            let mut portals: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            let mut out = Vec::new();
            for_each_frame(frames, |tag, body| {
                let mut b = body;
                match tag {
                    PARSE => {
                        if let (Ok(b""), Ok(q)) = (take_cstr(&mut b), take_cstr(&mut b)) {
                            unnamed = q;
                        }
                    }
                    BIND => {
                        if let Ok(BindNames {
                            portal,
                            statement: name,
                            ..
                        }) = parse_bind_names(body)
                        {
                            let text = if name.is_empty() {
                                Some(unnamed)
                            } else {
                                statements
                                    .iter()
                                    .find(|(n, _)| &n[..] == name)
                                    .map(|(_, st)| &st.query[..])
                            };
                            if let Some(t) = text {
                                portals.insert(portal.to_vec(), t.to_vec());
                            }
                        }
                    }
                    EXECUTE => {
                        if let Ok(portal) = take_cstr(&mut b) {
                            if let Some(t) = portals.get(portal) {
                                out.push(String::from_utf8_lossy(t).into_owned());
                            }
                        }
                    }
                    _ => {}
                }
            });
            out
        }
    }
}

/// Calls `f` with each complete message in `frames`.
fn for_each_frame<'a>(frames: &'a [u8], mut f: impl FnMut(u8, &'a [u8])) {
    let mut at = 0;
    while let Ok(Some(h)) = decode_header(&frames[at..], usize::MAX >> 1) {
        if frames.len() - at < h.frame_len() {
            return;
        }
        f(h.tag, &frames[at + HEADER_LEN..at + h.frame_len()]);
        at += h.frame_len();
    }
}

/// Copies `frames` to `out` with named statements renamed (and, with
/// `describe`, a Describe of the portal before each Execute).
fn rename(
    frames: &[u8],
    names: &HashMap<&[u8], String>,
    describe: bool,
    out: &mut BytesMut,
) -> Result<(), crate::protocol::frame::FrameError> {
    let mut err = None;
    for_each_frame(frames, |tag, body| {
        let mut b = body;
        match tag {
            EXECUTE if describe => match take_cstr(&mut b) {
                Ok(portal) => {
                    put_message(out, DESCRIBE, &[b"P", portal, b"\0"]);
                    put_message(out, tag, &[body]);
                }
                Err(e) => err = Some(e),
            },
            BIND => match parse_bind_names(body) {
                Ok(BindNames {
                    portal,
                    statement: name,
                    rest,
                }) if !name.is_empty() => match names.get(name) {
                    Some(n) => {
                        put_message(out, BIND, &[portal, b"\0", n.as_bytes(), b"\0", rest]);
                    }
                    None => put_message(out, tag, &[body]),
                },
                Err(e) => err = Some(e),
                _ => put_message(out, tag, &[body]),
            },
            DESCRIBE if body.first() == Some(&b'S') => {
                let mut rest = &body[1..];
                match take_cstr(&mut rest) {
                    Ok(name) if !name.is_empty() => match names.get(name) {
                        Some(n) => put_message(out, DESCRIBE, &[b"S", n.as_bytes(), b"\0"]),
                        None => put_message(out, tag, &[body]),
                    },
                    _ => put_message(out, tag, &[body]),
                }
            }
            _ => put_message(out, tag, &[body]),
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `(oid, relname)` from a text-format DataRow of two columns.
fn oid_and_name(body: &[u8]) -> Option<(u32, String)> {
    let vals = rows::data_row(body).ok()?;
    let oid = std::str::from_utf8(vals.first()?.as_ref()?)
        .ok()?
        .parse()
        .ok()?;
    let name = String::from_utf8_lossy(vals.get(1)?.as_ref()?).into_owned();
    Some((oid, name))
}

/// The parameters of each Bind, as text (binary ones as `\x` hex).
fn bind_parameters(req: &Request) -> Vec<Vec<Option<String>>> {
    let Request::Extended { frames, .. } = req else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for_each_frame(frames, |tag, body| {
        if tag == BIND {
            if let Some(p) = parse_bind_parameters(body) {
                out.push(p);
            }
        }
    });
    out
}

fn parse_bind_parameters(body: &[u8]) -> Option<Vec<Option<String>>> {
    let bind = parse_bind(body).ok()?;
    let text = |(i, v): (usize, &Option<&[u8]>)| {
        v.map(|v| {
            if bind.is_binary(i) {
                let mut s = String::from("\\x");
                for byte in v {
                    let _ = write!(s, "{byte:02x}");
                }
                s
            } else {
                String::from_utf8_lossy(v).into_owned()
            }
        })
    };
    Some(bind.values.iter().enumerate().map(text).collect())
}

/// Starts the executor on its own thread.
pub fn start(exec: Exec, jobs: mpsc::Receiver<Job>) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pgshift-shadow".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(Arc::new(exec).run(jobs)),
                Err(e) => warn!(error = %e, "cannot start the shadow executor"),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Statement;
    use bytes::{BufMut, Bytes};

    fn msg(tag: u8, parts: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        put_message(&mut b, tag, parts);
        b
    }

    #[test]
    fn texts_and_renames_follow_binds_and_executes() {
        let mut f = BytesMut::new();
        f.put(msg(PARSE, &[b"\0", b"SELECT $1::int\0", b"\0\0"]));
        f.put(msg(BIND, &[b"\0\0", b"\0\0\0\x01\0\0\0\x0242", b"\0\0"]));
        f.put(msg(EXECUTE, &[b"\0", b"\0\0\0\0"]));
        f.put(msg(
            BIND,
            &[
                b"p\0S_1\0",
                b"\0\x01\0\x01\0\x01\0\0\0\x02\xab\xcd",
                b"\0\0",
            ],
        ));
        f.put(msg(DESCRIBE, &[b"SS_1\0"]));
        f.put(msg(EXECUTE, &[b"p\0", b"\0\0\0\0"]));
        let st = Statement {
            query: Arc::from(&b"SELECT * FROM t WHERE id = $1"[..]),
            types: Arc::from(&b"\0\0"[..]),
        };
        let req = Request::Extended {
            frames: f.clone().freeze(),
            statements: vec![(b"S_1"[..].into(), st)],
        };
        assert_eq!(
            executed_texts(&req),
            vec!["SELECT $1::int", "SELECT * FROM t WHERE id = $1"]
        );
        assert_eq!(
            bind_parameters(&req),
            vec![
                vec![Some("42".to_string())],
                vec![Some("\\xabcd".to_string())]
            ]
        );
        let mut names = HashMap::new();
        names.insert(&b"S_1"[..], "pgshift_shadow_1".to_string());
        let mut out = BytesMut::new();
        rename(&f, &names, false, &mut out).unwrap();
        let mut seen = Vec::new();
        for_each_frame(&out, |tag, body| seen.push((tag, body.to_vec())));
        assert_eq!(seen.len(), 6);
        assert!(seen[3].1.starts_with(b"p\0pgshift_shadow_1\0\0\x01"));
        assert_eq!(seen[4].1, b"Spgshift_shadow_1\0");
        assert_eq!(seen[0].1, f[5..5 + seen[0].1.len()].to_vec());
        let mut described = BytesMut::new();
        rename(&f, &names, true, &mut described).unwrap();
        let mut tags = Vec::new();
        for_each_frame(&described, |tag, body| tags.push((tag, body.to_vec())));
        assert_eq!(tags.len(), 8);
        assert_eq!(tags[2], (DESCRIBE, b"P\0".to_vec()));
        assert_eq!(tags[6], (DESCRIBE, b"Pp\0".to_vec()));
        assert_eq!(
            executed_texts(&Request::Simple(Bytes::from_static(b"SELECT 1\0"))),
            vec!["SELECT 1"]
        );
    }

    #[test]
    fn data_rows_give_oid_and_name() {
        let row = b"\0\x02\0\0\0\x0516384\0\0\0\x04acct";
        assert_eq!(oid_and_name(row), Some((16384, "acct".to_string())));
        // A NULL, a truncated row: nothing, and no panic.
        assert_eq!(oid_and_name(b"\0\x02\xff\xff\xff\xff\0\0\0\x01a"), None);
        assert_eq!(oid_and_name(&row[..9]), None);
    }

    #[test]
    fn state_keys_differ_by_content_and_none_is_zero() {
        assert_eq!(state_key(&[]), 0);
        let a = state_key(&[StateOp::Sql("SET x = 1".into())]);
        let b = state_key(&[StateOp::Sql("SET x = 2".into())]);
        assert_ne!(a, 0);
        assert_ne!(a, b);
        assert_eq!(state_key(&[StateOp::CloseAll]), 0);
    }
}
