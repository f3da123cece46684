//! [`FaultProxy`]: a TCP proxy in front of a server that injects latency,
//! partitions and connection resets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read from a socket at once.
const CHUNK: usize = 16 * 1024;
/// Chunks held per direction before the proxy stops reading (backpressure).
const QUEUE: usize = 64;

/// A TCP proxy on a free `127.0.0.1` port that forwards every connection to
/// a target and can inject faults on command.
///
/// Faults apply at once, to open connections too. Bytes are never lost or
/// reordered: a delayed or blackholed chunk is held and delivered in order
/// later, as TCP would after a partition heals — use
/// [`reset_all`](Self::reset_all) to discard what is in flight.
/// Dropping the proxy closes the listener and every connection.
///
/// ```no_run
/// # async fn demo() {
/// use distlock_tests::{FaultProxy, RedisServer};
///
/// let server = RedisServer::start().await;
/// let proxy = FaultProxy::start(server.addr()).await;
/// let client = redis::Client::open(proxy.url()).unwrap();
/// proxy.blackhole(); // requests through `client` now hang
/// proxy.restore();
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Ends the listener and every connection task.
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    faults: watch::Sender<Faults>,
    /// Cancelled by `reset_all`, then replaced for later connections.
    reset: Mutex<CancellationToken>,
    open: AtomicUsize,
    /// How many of the next accepted connections to reset at once.
    reset_next: AtomicUsize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    latency: Duration,
    blackhole: bool,
}

impl FaultProxy {
    /// Starts a proxy on a free `127.0.0.1` port that forwards to `target`.
    ///
    /// # Panics
    ///
    /// If no port can be bound.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("binding the fault proxy on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("reading the fault proxy's address: {e}"));
        let shared = Arc::new(Shared {
            target,
            faults: watch::Sender::new(Faults::default()),
            reset: Mutex::new(CancellationToken::new()),
            open: AtomicUsize::new(0),
            reset_next: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown.clone()));
        FaultProxy {
            addr,
            shared,
            shutdown,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT`, this proxy's address as a Redis URL.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Delays every forwarded chunk, in both directions, by `latency`
    /// (so a request and its reply take at least twice as long).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Forwards nothing in either direction until [`restore`](Self::restore);
    /// connections stay open and new ones are accepted (and reach the target
    /// only once restored).
    pub fn blackhole(&self) {
        self.shared.faults.send_modify(|f| f.blackhole = true);
    }

    /// Back to normal: no blackhole, no latency. Held bytes are delivered.
    pub fn restore(&self) {
        self.shared.faults.send_replace(Faults::default());
    }

    /// Closes every open connection abruptly (RST on both sides), dropping
    /// the bytes in flight. Later connections are accepted as usual.
    pub fn reset_all(&self) {
        let mut reset = self
            .shared
            .reset
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        reset.cancel();
        *reset = CancellationToken::new();
    }

    /// Resets each of the next `n` connections as soon as it is accepted
    /// (before any byte reaches the target): a connection that fails as it
    /// is set up.
    pub fn reset_next(&self, n: usize) {
        self.shared.reset_next.store(n, Ordering::SeqCst);
    }

    /// How many client connections are open now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                let doomed = shared
                    .reset_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if doomed {
                    abort(&client);
                    continue;
                }
                let open = OpenGuard::new(&shared);
                let reset = shared
                    .reset
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {}
                        () = serve(client, &open.0, reset) => {}
                    }
                    drop(open);
                });
            }
            // E.g. too many open files: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Counts a connection in [`FaultProxy::connections`] while alive.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Forwards one client connection until it closes, fails or is reset.
async fn serve(mut client: TcpStream, shared: &Shared, reset: CancellationToken) {
    let mut faults = shared.faults.subscribe();
    let connect = async {
        wait_unblocked(&mut faults).await;
        TcpStream::connect(shared.target).await
    };
    let mut upstream = tokio::select! {
        biased;
        () = reset.cancelled() => return abort(&client),
        upstream = connect => match upstream {
            Ok(upstream) => upstream,
            Err(_) => return abort(&client),
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let clean = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let forward = async {
            tokio::try_join!(
                pipe(client_read, upstream_write, shared.faults.subscribe()),
                pipe(upstream_read, client_write, shared.faults.subscribe()),
            )
        };
        tokio::select! {
            biased;
            () = reset.cancelled() => false,
            result = forward => result.is_ok(),
        }
    };
    if !clean {
        // A reset, or an error on one side: pass it on abruptly to both.
        abort(&client);
        abort(&upstream);
    }
}

/// Makes the coming close of `stream` send RST instead of FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

enum Packet {
    Data(Vec<u8>, Instant),
    Eof(Instant),
}

/// Copies `from` to `to` through a queue, each chunk delivered no earlier
/// than its arrival plus the latency and never while blackholed. Half-closes
/// `to` after `from` ends.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut faults: watch::Receiver<Faults>,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let read = async move {
        loop {
            let mut chunk = vec![0; CHUNK];
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                let _ = tx.send(Packet::Eof(Instant::now())).await;
                return Ok(());
            }
            chunk.truncate(n);
            if tx.send(Packet::Data(chunk, Instant::now())).await.is_err() {
                return Ok(()); // The writer failed and reports it.
            }
        }
    };
    let write = async move {
        while let Some(packet) = rx.recv().await {
            match packet {
                Packet::Data(chunk, arrived) => {
                    wait_due(&mut faults, arrived).await;
                    to.write_all(&chunk).await?;
                }
                Packet::Eof(arrived) => {
                    wait_due(&mut faults, arrived).await;
                    return to.shutdown().await;
                }
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Waits until no blackhole is on.
async fn wait_unblocked(faults: &mut watch::Receiver<Faults>) {
    while faults.borrow_and_update().blackhole {
        if faults.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Waits until a chunk that arrived at `arrived` may be delivered: no
/// blackhole and its latency elapsed, re-checked whenever the faults change.
async fn wait_due(faults: &mut watch::Receiver<Faults>, arrived: Instant) {
    loop {
        wait_unblocked(faults).await;
        let due = arrived + faults.borrow_and_update().latency;
        if Instant::now() >= due {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            changed = faults.changed() => if changed.is_err() {
                return std::future::pending().await;
            }
        }
    }
}
