//! Thread-per-core session workers.
//!
//! Sessions run on N single-threaded tokio runtimes, one per thread, rather
//! than on a work-stealing pool: a session's two pumps and its target link
//! then always wake on the thread that owns them, which avoids cross-thread
//! wake-ups on every message (measured on this project's 2-core machine: a
//! multi-threaded runtime spent about 20% more CPU per forwarded transaction
//! than a single-threaded one). The accept loop hands each new connection to
//! the worker with the fewest live sessions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::warn;

use crate::proxy::Proxy;

/// An accepted connection on its way to a worker.
struct Job {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Sessions handed to this worker and not yet ended.
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` worker threads (0 = one per available core).
    pub fn start(count: usize, proxy: &Arc<Proxy>) -> anyhow::Result<Workers> {
        let count = if count == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            count
        };
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            // Unbounded, but never longer than max_client_connections: every
            // job carries one of those permits.
            let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
            let load = Arc::new(AtomicUsize::new(0));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a worker runtime")?;
            let (proxy, worker_load) = (Arc::clone(proxy), Arc::clone(&load));
            let thread = std::thread::Builder::new()
                .name(format!("pgshift-worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            let (proxy, load) = (Arc::clone(&proxy), Arc::clone(&worker_load));
                            tokio::spawn(async move {
                                match tokio::net::TcpStream::from_std(job.tcp) {
                                    Ok(tcp) => {
                                        crate::session::serve(proxy, tcp, job.peer, job.permit)
                                            .await
                                    }
                                    Err(e) => {
                                        warn!(error = %e, "could not register a client socket")
                                    }
                                }
                                load.fetch_sub(1, Ordering::AcqRel);
                            });
                        }
                        // The accept loop is gone: give the last sessions (forced
                        // closed by now) and their target links a moment to finish.
                        for _ in 0..40 {
                            if worker_load.load(Ordering::Acquire) == 0 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    })
                })
                .context("cannot start a worker thread")?;
            workers.push(Worker {
                jobs,
                load,
                thread: Some(thread),
            });
        }
        let _ = proxy
            .worker_loads
            .set(workers.iter().map(|w| Arc::clone(&w.load)).collect());
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Hands an accepted connection to the least-loaded worker.
    pub fn dispatch(
        &self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => return warn!(error = %e, "could not hand over a client socket"),
        };
        // Least loaded, starting the scan at a rotating worker to break ties.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.workers.len();
        let w = (0..n)
            .map(|k| &self.workers[(start + k) % n])
            .min_by_key(|w| w.load.load(Ordering::Acquire))
            .expect("at least one worker");
        w.load.fetch_add(1, Ordering::AcqRel);
        if w.jobs.send(Job { tcp, peer, permit }).is_err() {
            w.load.fetch_sub(1, Ordering::AcqRel);
            warn!("a worker has stopped; connection dropped");
        }
    }

    /// Closes the job channels and waits for the worker threads to finish.
    pub fn join(mut self) {
        for w in &mut self.workers {
            // Replacing the sender drops the original: its worker's loop ends.
            let (closed, _) = mpsc::unbounded_channel();
            w.jobs = closed;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}
