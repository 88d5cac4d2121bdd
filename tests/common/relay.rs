//! A fault-injecting TCP relay that tests put between the proxy and a real
//! Postgres server (usually the target cluster), steered by the test while
//! it runs. The failback tests use it to give the target "50 ms added
//! latency", "stalled connections" (open but silent) and "refused
//! connections" (ECONNREFUSED), and to cut live connections.
//!
//! Only std: one accept thread polling a non-blocking listener, and per
//! relayed connection one thread client->server plus a reader and a writer
//! thread server->client joined by a timestamped queue (so added latency
//! does not limit throughput). No I/O error panics: a failing connection just
//! ends, so many relays can run in one test binary.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the accept thread and waiting connection threads poll flags.
const POLL: Duration = Duration::from_millis(5);
/// Stall waits poll a bit faster, so resuming adds little latency.
const STALL_POLL: Duration = Duration::from_millis(2);
/// How long to connect to the upstream before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `set_refuse(false)` retries re-binding the port.
const REBIND_FOR: Duration = Duration::from_secs(5);
/// How long `set_stall(true)` waits for writes already under way to finish.
const STALL_SETTLE: Duration = Duration::from_secs(1);
const BUF: usize = 64 * 1024;

/// A running relay: `127.0.0.1:port()` forwards to the upstream given to
/// [`Relay::start`]. Dropping it stops everything.
pub struct Relay {
    inner: Arc<Inner>,
    port: u16,
    accept_thread: Option<JoinHandle<()>>,
}

/// State shared by the relay handle and all its threads.
struct Inner {
    upstream: SocketAddr,
    /// `None` while refusing: the port is then closed, so connects fail.
    listener: Mutex<Option<TcpListener>>,
    /// Added server->client latency in nanoseconds (0 = none).
    delay_ns: AtomicU64,
    stall: AtomicBool,
    /// Writes currently under way; lets `set_stall(true)` wait them out.
    in_flight: AtomicUsize,
    shutdown: AtomicBool,
    accepted: AtomicU64,
    next_id: AtomicU64,
    /// Bumped by every `cut()`, so a connection accepted before a cut but
    /// still connecting upstream is closed rather than registered.
    cut_epoch: AtomicU64,
    conns: Mutex<Vec<Arc<Conn>>>,
}

/// One relayed connection: both sockets, shared by its threads and the
/// registry. `&TcpStream` is `Read + Write`, so no clones are needed.
struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    closed: AtomicBool,
}

impl Conn {
    /// Shuts both sockets down, which ends every thread of the connection
    /// (blocked reads return, blocked writes fail). Idempotent.
    fn close(&self) {
        self.closed.store(true, SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// Locks without propagating poison: a panicking test thread must not turn
/// every other relay operation into a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Listens on 127.0.0.1:<free port> and forwards every accepted
    /// connection to `upstream` (e.g. the target cluster at
    /// 127.0.0.1:54322). Panics only if no local port can be bound at all.
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("relay: cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay: no local address: {e}"))
            .port();
        if let Err(e) = listener.set_nonblocking(true) {
            panic!("relay: cannot make the listener non-blocking: {e}");
        }
        let inner = Arc::new(Inner {
            upstream,
            listener: Mutex::new(Some(listener)),
            delay_ns: AtomicU64::new(0),
            stall: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            cut_epoch: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let i = inner.clone();
        let accept_thread = thread::Builder::new()
            .name(format!("relay-accept-{port}"))
            .spawn(move || accept_loop(i))
            .unwrap_or_else(|e| panic!("relay: cannot spawn the accept thread: {e}"));
        Relay {
            inner,
            port,
            accept_thread: Some(accept_thread),
        }
    }

    /// The local port to point the proxy at (fixed for the relay's life,
    /// also across `set_refuse`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Added one-way latency on the server->client direction ("50 ms added
    /// latency"): every chunk read from the upstream is written to the
    /// client `d` after it was read. It is a timestamped queue per
    /// connection, so throughput is not limited and order is preserved.
    /// Applies to data read after the call, on existing and new
    /// connections. `Duration::ZERO` turns it off.
    pub fn set_delay(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.inner.delay_ns.store(ns, SeqCst);
    }

    /// Stall ("stalled connections"): while on, no bytes are forwarded in
    /// either direction on any connection, existing or new. Connections
    /// stay open and whatever arrives is held, not dropped; turning it off
    /// forwards everything held, in order. When `set_stall(true)` returns,
    /// writes that were already under way have finished (waited up to 1 s),
    /// so nothing more reaches either peer; bytes already in kernel buffers
    /// are of course beyond reach.
    pub fn set_stall(&self, on: bool) {
        self.inner.stall.store(on, SeqCst);
        if on {
            let deadline = Instant::now() + STALL_SETTLE;
            while self.inner.in_flight.load(SeqCst) > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Refuse ("refused connections"): while on, new TCP connections to the
    /// relay's port get ECONNREFUSED, because the listening socket is
    /// closed. Turning it off re-binds the same port before returning
    /// (std sets SO_REUSEADDR; retried for up to 5 s, then panics in the
    /// calling test, as the relay can no longer do its job). Existing
    /// connections, including ones connected but not yet picked up by the
    /// accept thread, are unaffected; use [`Relay::cut`] to end them too.
    /// (A connect racing the call itself may see a reset instead.)
    pub fn set_refuse(&self, on: bool) {
        let mut slot = lock(&self.inner.listener);
        if on {
            // Connections whose handshake the kernel already completed are
            // "existing" for the client: take them over before closing the
            // port, or closing would reset them.
            if let Some(l) = slot.take() {
                accept_pending(&self.inner, &l);
            }
            return;
        }
        if slot.is_some() {
            return;
        }
        let deadline = Instant::now() + REBIND_FOR;
        loop {
            let err = match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => match l.set_nonblocking(true) {
                    Ok(()) => {
                        *slot = Some(l);
                        return;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("relay: cannot re-bind 127.0.0.1:{}: {err}", self.port);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes every connection currently relayed: both sockets are shut
    /// down, so the proxy sees its upstream connection drop. Connections
    /// accepted but still connecting to the upstream are closed as well.
    pub fn cut(&self) {
        // Take over connections still in the backlog first (their clients
        // consider them connected); the epoch bump below then closes them.
        {
            let slot = lock(&self.inner.listener);
            if let Some(l) = slot.as_ref() {
                accept_pending(&self.inner, l);
            }
        }
        let conns = {
            let mut reg = lock(&self.inner.conns);
            self.inner.cut_epoch.fetch_add(1, SeqCst);
            std::mem::take(&mut *reg)
        };
        for c in conns {
            c.close();
        }
    }

    /// Connections accepted so far (including ones whose upstream connect
    /// failed).
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(SeqCst)
    }

    /// Relayed connections currently open.
    pub fn open(&self) -> usize {
        lock(&self.inner.conns).len()
    }
}

impl Drop for Relay {
    /// Stops accepting, closes the port and cuts every connection. The
    /// accept thread is joined (it polls, so this is quick); connection
    /// threads are detached and end on their own once their sockets are
    /// shut down.
    fn drop(&mut self) {
        self.inner.shutdown.store(true, SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        *lock(&self.inner.listener) = None;
        self.cut();
    }
}

/// Accepts while not shut down, polling so it notices refuse and shutdown.
fn accept_loop(inner: Arc<Inner>) {
    while !inner.shutdown.load(SeqCst) {
        {
            let slot = lock(&inner.listener);
            if let Some(l) = slot.as_ref() {
                accept_pending(&inner, l);
            }
        }
        thread::sleep(POLL);
    }
}

/// Accepts every connection waiting in the listener's backlog. Each gets
/// its own setup thread (the upstream connect must not block accepting).
fn accept_pending(inner: &Arc<Inner>, l: &TcpListener) {
    loop {
        match l.accept() {
            Ok((client, _)) => {
                inner.accepted.fetch_add(1, SeqCst);
                let epoch = inner.cut_epoch.load(SeqCst);
                let i = inner.clone();
                // If the thread cannot be spawned the closure (and the
                // client socket) is dropped, which closes the client.
                let _ = thread::Builder::new()
                    .name("relay-conn".into())
                    .spawn(move || run_conn(i, client, epoch));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // WouldBlock: backlog empty. Others (ECONNABORTED, EMFILE):
            // try again on the next poll.
            Err(_) => return,
        }
    }
}

/// Connects upstream, registers the connection, starts the server->client
/// threads and runs client->server itself.
fn run_conn(inner: Arc<Inner>, client: TcpStream, epoch: u64) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let server = match TcpStream::connect_timeout(&inner.upstream, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let conn = Arc::new(Conn {
        id: inner.next_id.fetch_add(1, SeqCst),
        client,
        server,
        closed: AtomicBool::new(false),
    });
    {
        let mut reg = lock(&inner.conns);
        if inner.shutdown.load(SeqCst) || inner.cut_epoch.load(SeqCst) != epoch {
            drop(reg);
            conn.close();
            return;
        }
        reg.push(conn.clone());
    }

    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let (i, c) = (inner.clone(), conn.clone());
    let reader = thread::Builder::new()
        .name("relay-s2c-read".into())
        .spawn(move || server_reader(i, c, tx));
    let (i, c) = (inner.clone(), conn.clone());
    let writer = thread::Builder::new()
        .name("relay-s2c-write".into())
        .spawn(move || client_writer(i, c, rx));
    if reader.is_err() || writer.is_err() {
        finish(&inner, &conn);
        return;
    }
    client_to_server(&inner, &conn);
}

/// Ends a connection: shuts both sockets (stopping its other threads) and
/// removes it from the registry.
fn finish(inner: &Inner, conn: &Conn) {
    conn.close();
    lock(&inner.conns).retain(|c| c.id != conn.id);
}

/// Whether the connection's threads should stop.
fn done(inner: &Inner, conn: &Conn) -> bool {
    conn.closed.load(SeqCst) || inner.shutdown.load(SeqCst)
}

/// Reads into `buf`, retrying on EINTR; `None` on EOF or error.
fn read_some(mut src: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    loop {
        match src.read(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

/// Writes `data` to `dst` once no stall is on; false if the connection
/// ended (closed, relay dropped, or the write failed). The in-flight count
/// is raised before re-checking the stall flag, so `set_stall(true)` either
/// sees this write and waits for it, or this write sees the stall.
fn forward(inner: &Inner, conn: &Conn, mut dst: &TcpStream, data: &[u8]) -> bool {
    loop {
        if done(inner, conn) {
            return false;
        }
        if !inner.stall.load(SeqCst) {
            inner.in_flight.fetch_add(1, SeqCst);
            if !inner.stall.load(SeqCst) {
                let ok = dst.write_all(data).is_ok();
                inner.in_flight.fetch_sub(1, SeqCst);
                return ok;
            }
            inner.in_flight.fetch_sub(1, SeqCst);
        }
        thread::sleep(STALL_POLL);
    }
}

/// Client->server: read, wait while stalled, write. Client EOF or any error
/// ends the whole connection.
fn client_to_server(inner: &Inner, conn: &Conn) {
    let mut buf = vec![0u8; BUF];
    while let Some(n) = read_some(&conn.client, &mut buf) {
        if !forward(inner, conn, &conn.server, &buf[..n]) {
            break;
        }
    }
    finish(inner, conn);
}

/// Server->client, reading half: stamps each chunk with the instant it is
/// due (now + current delay) and queues it. On upstream EOF it just stops,
/// so the writer still delivers what is queued (e.g. a final error message)
/// before closing; on an error the connection is closed at once.
fn server_reader(inner: Arc<Inner>, conn: Arc<Conn>, tx: mpsc::Sender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; BUF];
    loop {
        match (&conn.server).read(&mut buf) {
            Ok(0) => return, // dropping `tx` lets the writer drain and finish
            Ok(n) => {
                let due = Instant::now() + Duration::from_nanos(inner.delay_ns.load(SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return; // the writer has ended the connection
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                finish(&inner, &conn);
                return;
            }
        }
    }
}

/// Server->client, writing half: takes each chunk in order, sleeps until it
/// is due, waits while stalled, writes. Ends the connection when the queue
/// closes (upstream gone) or a write fails.
fn client_writer(inner: Arc<Inner>, conn: Arc<Conn>, rx: mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, data)) = rx.recv() {
        loop {
            if done(&inner, &conn) {
                finish(&inner, &conn);
                return;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            thread::sleep((due - now).min(POLL));
        }
        if !forward(&inner, &conn, &conn.client, &data) {
            break;
        }
    }
    finish(&inner, &conn);
}
