//! Holding an extended-protocol batch (Parse/Bind/Describe/Execute up to
//! Sync) while it is received: each message either keeps it held, shows it
//! may go to the target at its Sync, or releases it to the source.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::protocol::message::{
    parse_bind_names, put_message, take_cstr, BindNames, BIND, CLOSE, DESCRIBE, EXECUTE, FLUSH,
    PARSE, SYNC,
};
use crate::shadow::{Db, Request};
use crate::tracker::PreparedStatements;

use super::decide::{Batch, Decider, ReadKind};
use super::link::Routed;

/// Most bytes of one extended-protocol batch held back while deciding.
pub const MAX_BATCH: usize = 256 << 10;

/// Where a held batch goes, decided at one of its messages.
pub enum BatchStep {
    /// Keep holding: the message is in the batch.
    Held,
    /// Send it to the target (at its Sync).
    Routed,
    /// Release it to the source: these frames go just before this message,
    /// which is then handled as usual.
    Release(Bytes),
}

impl Decider<'_> {
    /// Whether an extended-protocol message at this point is held back:
    /// inside a batch being held (if it fits), or starting one that might
    /// be routed.
    pub fn collects(&self, tag: u8, len: usize, source_idle: bool) -> bool {
        if self.link.source_ended.load(Relaxed) {
            return false;
        }
        let in_txn = self.txn.is_some();
        if !matches!(
            tag,
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | SYNC | FLUSH
        ) {
            return false;
        }
        if let Some(b) = &self.batch {
            return b.frames.len() + len + 5 <= MAX_BATCH;
        }
        if len + 5 > MAX_BATCH {
            return false;
        }
        if in_txn {
            return source_idle;
        }
        if !source_idle || !self.engaged() {
            return false;
        }
        // Held to be routed, or to copy it for a shadow read.
        self.gate(source_idle).is_some_and(|s| self.may_route(&s)) || self.picked()
    }

    /// A held (or first) extended-protocol message, complete; `statements`
    /// already records a Parse in it.
    pub fn batch_message(
        &mut self,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> BatchStep {
        let in_txn = self.in_txn();
        let mut batch = match self.batch.take() {
            Some(b) => b,
            None => Batch {
                in_txn,
                started: Some(Instant::now()),
                shadow: !in_txn && self.pick.take().unwrap_or_else(|| self.sample()),
                ..Batch::default()
            },
        };
        let ok = if batch.in_txn {
            self.txn_batch_message(&mut batch, tag, body, statements)
        } else {
            self.read_batch_message(&mut batch, tag, body, statements)
        };
        if !ok {
            return BatchStep::Release(batch.frames.freeze());
        }
        // Inside the routed transaction a Flush sends what is held (the
        // client waits for those answers before it goes on).
        let flushed = batch.in_txn && tag == FLUSH;
        if tag != SYNC && !flushed {
            put_message(&mut batch.frames, tag, &[body]);
            self.batch = Some(batch);
            return BatchStep::Held;
        }
        if batch.in_txn {
            let executed = std::mem::take(&mut batch.executed);
            let texts: Vec<String> = executed
                .iter()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect();
            if !self.judge_request(texts.iter().map(String::as_str)) {
                // The transaction moved to the source: so does the batch,
                // then this message.
                return BatchStep::Release(batch.frames.freeze());
            }
            // Statements parsed here exist on the target now; the source
            // gets them before a later Bind or Describe there uses them.
            for name in &batch.named_parses {
                self.link.mark_source_stale(name);
            }
        }
        let eligible_read = !batch.in_txn && batch.executes;
        // An unnamed statement parsed but not used here will be bound by a
        // later batch, which may go to the source: it must be parsed there.
        let self_contained = !batch.parsed_unnamed || batch.bound_unnamed;
        let to_target =
            batch.in_txn || (batch.keyed_in && self_contained && self.own_writes_applied());
        let shadowed = eligible_read && batch.shadow;
        if !to_target {
            let frames = batch.frames.freeze();
            if eligible_read {
                self.metrics.read(false);
                self.link.time_source_read(batch.started);
                let statements = std::mem::take(&mut batch.statements);
                if let Some(tap) = shadowed
                    .then(|| {
                        self.shadow_submit(Db::Source, || Request::Extended {
                            frames: frames.clone(),
                            statements,
                        })
                    })
                    .flatten()
                {
                    self.link.arm_tap(tap);
                }
            }
            // All of it goes to the source now, then the Sync.
            return BatchStep::Release(frames);
        }
        let shadow = shadowed
            .then(|| {
                self.shadow_submit(Db::Target, || Request::Extended {
                    frames: Bytes::copy_from_slice(&batch.frames),
                    statements: batch.statements.clone(),
                })
            })
            .flatten();
        put_message(&mut batch.frames, tag, &[body]);
        if batch.parsed_unnamed {
            self.link.mark_source_stale(b"");
        }
        let mut r = Routed::new(batch.frames, batch.in_txn);
        r.statements = batch.statements;
        r.started = batch.started.unwrap_or_else(Instant::now);
        r.shadow = shadow;
        r.shape = batch.shape;
        r.counted = eligible_read;
        r.flushed = flushed;
        self.link.enqueue(r);
        BatchStep::Routed
    }

    /// A message of a batch outside a routed transaction: whether it can
    /// still be a routed read.
    fn read_batch_message(
        &mut self,
        batch: &mut Batch,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> bool {
        let settings = self.router.settings();
        match tag {
            PARSE => {
                let mut b = body;
                match (take_cstr(&mut b), take_cstr(&mut b)) {
                    (Ok(b""), Ok(query)) => {
                        batch.parsed_unnamed = true;
                        batch.bound_unnamed = false;
                        if batch.shape == 0 {
                            batch.shape = self.shape_of(query);
                        }
                        let read = self.kind(query) == ReadKind::Read;
                        batch.keyed_in |= read && self.in_cohort(&settings, query);
                        read
                    }
                    // A named statement must exist on the source, where
                    // writes will use it: prepared there, lazily here.
                    _ => false,
                }
            }
            BIND => match parse_bind_names(body) {
                Ok(BindNames {
                    statement: name, ..
                }) => match statements.statement(name) {
                    Some(st) if !name.is_empty() || batch.parsed_unnamed => {
                        batch.bound_unnamed |= name.is_empty();
                        if batch.shape == 0 {
                            batch.shape = self.shape_of(&st.query);
                        }
                        let read = self.statement_kind(name, &st.query) == ReadKind::Read;
                        batch.keyed_in |= read && self.in_cohort(&settings, &st.query);
                        if read && !name.is_empty() {
                            batch.statements.push((name.into(), st.clone()));
                        }
                        read
                    }
                    _ => false,
                },
                Err(_) => false,
            },
            DESCRIBE | SYNC => true,
            EXECUTE => {
                batch.executes = true;
                true
            }
            // A Close must reach the source; a Flush wants answers now.
            _ => false,
        }
    }

    /// A message of a batch inside the routed transaction: it is held to
    /// its Sync (then judged whole); what it binds is noted.
    fn txn_batch_message(
        &mut self,
        batch: &mut Batch,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> bool {
        let mut b = body;
        match tag {
            PARSE => {
                if let Ok(name) = take_cstr(&mut b) {
                    if name.is_empty() {
                        batch.parsed_unnamed = true;
                    } else {
                        batch.named_parses.push(name.into());
                    }
                }
                true
            }
            BIND => {
                if let Ok(names) = parse_bind_names(body) {
                    let name = names.statement;
                    if let Some(st) = statements.statement(name) {
                        batch.executed.push(Arc::clone(&st.query));
                        // Prepared before the transaction (on the source):
                        // the target gets it first.
                        let parsed_here = if name.is_empty() {
                            batch.parsed_unnamed
                        } else {
                            batch.named_parses.iter().any(|n| &**n == name)
                        };
                        if !parsed_here {
                            batch.statements.push((name.into(), st.clone()));
                        }
                    }
                }
                true
            }
            _ => true,
        }
    }

    /// A held batch must go to the source now (a message too big to hold,
    /// or one that is not extended protocol): its frames.
    pub fn release(&mut self) -> Option<Bytes> {
        self.batch.take().map(|b| b.frames.freeze())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::router::decide::tests::{body, World};

    fn released(step: BatchStep) -> Bytes {
        match step {
            BatchStep::Release(f) => f,
            BatchStep::Held => panic!("held"),
            BatchStep::Routed => panic!("routed"),
        }
    }

    #[test]
    fn a_read_batch_is_held_and_routed_at_its_sync_with_its_statements() {
        let w = World::new(100.0);
        let mut d = w.decider();
        let mut st = PreparedStatements::new(10, 1 << 20);
        st.on_parse_typed(b"s1", b"select $1::int", &[0, 1, 0, 0, 0, 23]);
        assert!(d.collects(BIND, 20, true));
        assert!(matches!(
            d.batch_message(BIND, &body(&[b"\0s1\0", &[0, 0, 0, 0, 0, 0]]), &st),
            BatchStep::Held
        ));
        assert!(matches!(
            d.batch_message(EXECUTE, b"\0\0\0\0\0", &st),
            BatchStep::Held
        ));
        assert!(matches!(d.batch_message(SYNC, b"", &st), BatchStep::Routed));
        let q = w.link.queue.lock().unwrap();
        let r = q.front().unwrap();
        assert_eq!(r.statements.len(), 1);
        assert_eq!(&*r.statements[0].0, b"s1");
        assert_eq!(&*r.statements[0].1.types, &[0, 1, 0, 0, 0, 23]);
        assert_eq!(r.frames[0], BIND);
        assert_eq!(r.frames[r.frames.len() - 5], SYNC);
        assert_eq!(w.link.target_in_flight.load(Relaxed), 1);
        // Counted once the target has answered it (by the responder).
        assert!(r.counted);
    }

    #[test]
    fn writes_named_parses_closes_and_flushes_release_the_batch_to_the_source() {
        let w = World::new(100.0);
        let mut st = PreparedStatements::new(10, 1 << 20);
        st.on_parse(b"w", b"update t set a = 1");
        st.on_parse(b"", b"select 1");
        // A named Parse: straight to the source, nothing held.
        let mut d = w.decider();
        let f = released(d.batch_message(PARSE, b"n\0select 1\0\0\0", &st));
        assert!(f.is_empty());
        // A read held, then a Bind of a write: both go to the source, in order.
        let mut d = w.decider();
        assert!(matches!(
            d.batch_message(PARSE, b"\0select 1\0\0\0", &st),
            BatchStep::Held
        ));
        let f = released(d.batch_message(BIND, b"\0w\0\0\0\0\0\0\0", &st));
        assert_eq!(f[0], PARSE);
        assert!(!d.holding());
        // A Flush wants answers now.
        let mut d = w.decider();
        assert!(matches!(
            d.batch_message(PARSE, b"\0select 1\0\0\0", &st),
            BatchStep::Held
        ));
        assert!(!released(d.batch_message(FLUSH, b"", &st)).is_empty());
        // An unnamed statement parsed and not bound here: the next batch
        // will bind it, maybe on the source, so this one stays there.
        let mut d = w.decider();
        d.batch_message(PARSE, b"\0select 1\0\0\0", &st);
        d.batch_message(DESCRIBE, b"S\0", &st);
        assert!(!released(d.batch_message(SYNC, b"", &st)).is_empty());
        assert_eq!(w.link.target_in_flight.load(Relaxed), 0);
    }
}
