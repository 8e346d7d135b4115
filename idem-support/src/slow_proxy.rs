//! A slow TCP proxy for tests: listens on `127.0.0.1:0` and forwards every connection to an
//! upstream server (Redis, PostgreSQL), holding back each chunk it reads, in each direction, for
//! a random delay between 0 and a maximum (seeded, bounded), without ever reordering bytes.
//!
//! A chunk read at `t` with a drawn delay `d` is written at `max(t + d, release of the previous
//! chunk of that direction)`: order is kept, and no chunk waits longer than the maximum after
//! the proxy read it (the previous chunk's release is itself at most the maximum after a read
//! that came earlier). So one request/answer round trip through the proxy takes at most twice
//! the maximum.
//!
//! The maximum can be changed while connections are open ([`SlowProxy::set_max_delay`]): a test
//! connects and warms up its store through a fast proxy, then makes it slow. Dropping the proxy
//! stops listening and cuts every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Chunks read but not yet written, per direction of a connection: the reader waits (and so
/// stops reading from its socket) when this many are queued.
const QUEUED_CHUNKS: usize = 1024;
/// The largest chunk read at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// What the proxy did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Chunks forwarded client → server.
    pub chunks_up: u64,
    /// Chunks forwarded server → client.
    pub chunks_down: u64,
    /// The longest a chunk was held back, in milliseconds (its drawn delay, or longer when an
    /// earlier chunk was still held).
    pub max_held_ms: u64,
}

struct Shared {
    upstream: SocketAddr,
    seed: u64,
    max_delay_ms: AtomicU64,
    connections: AtomicU64,
    chunks_up: AtomicU64,
    chunks_down: AtomicU64,
    max_held_ms: AtomicU64,
}

/// A running proxy; see the [module docs](self).
pub struct SlowProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Starts a proxy on a free loopback port to `upstream`, holding chunks back for up to
    /// `max_delay`, with delays drawn from a generator seeded with `seed` (one stream per
    /// connection and direction).
    pub async fn start(
        upstream: SocketAddr,
        max_delay: Duration,
        seed: u64,
    ) -> std::io::Result<SlowProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            seed,
            max_delay_ms: AtomicU64::new(max_delay.as_millis() as u64),
            connections: AtomicU64::new(0),
            chunks_up: AtomicU64::new(0),
            chunks_down: AtomicU64::new(0),
            max_held_ms: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(SlowProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address to connect to instead of the upstream server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the longest delay, for chunks read from now on.
    pub fn set_max_delay(&self, max_delay: Duration) {
        self.shared
            .max_delay_ms
            .store(max_delay.as_millis() as u64, SeqCst);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections: s.connections.load(SeqCst),
            chunks_up: s.chunks_up.load(SeqCst),
            chunks_down: s.chunks_down.load(SeqCst),
            max_held_ms: s.max_held_ms.load(SeqCst),
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        // The accept loop owns the connections' tasks: aborting it drops (and aborts) them.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let index = shared.connections.fetch_add(1, SeqCst);
                connections.spawn(pipe(client, index, shared.clone()));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn pipe(client: TcpStream, index: u64, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = direction(
        client_read,
        server_write,
        rng(&shared, index, 0),
        &shared,
        true,
    );
    let down = direction(
        server_read,
        client_write,
        rng(&shared, index, 1),
        &shared,
        false,
    );
    tokio::join!(up, down);
}

fn rng(shared: &Shared, index: u64, direction: u64) -> StdRng {
    StdRng::seed_from_u64(
        shared.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (direction << 63),
    )
}

/// Forwards `from` to `to`, each chunk held back as the module docs say; when `from` ends, the
/// queued chunks are still written, then `to` is shut down.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut rng: StdRng,
    shared: &Shared,
    up: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let reader = async move {
        let mut buf = vec![0; CHUNK_BYTES];
        let mut previous = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            let max = shared.max_delay_ms.load(SeqCst);
            let delay = Duration::from_millis(rng.gen_range(0..=max));
            let release = (now + delay).max(previous);
            previous = release;
            let held = (release - now).as_millis() as u64;
            shared.max_held_ms.fetch_max(held, SeqCst);
            if tx.send((release, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            let counter = if up {
                &shared.chunks_up
            } else {
                &shared.chunks_down
            };
            counter.fetch_add(1, SeqCst);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The upstream `host:port` of a `scheme://[user[:password]@]host[:port][/...]` URL, with
/// `default_port` when it has none.
pub fn upstream_of(url: &str, default_port: u16) -> String {
    let (_, host_port, _) = split(url);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// The same URL, pointing at `proxy` instead of its host and port.
pub fn through(url: &str, proxy: SocketAddr) -> String {
    let (head, _, tail) = split(url);
    format!("{head}{proxy}{tail}")
}

/// `(scheme://[userinfo@], host[:port], rest)`.
fn split(url: &str) -> (&str, &str, &str) {
    let start = url.find("://").expect("a URL with a scheme") + 3;
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let host = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    (&url[..host], &url[host..end], &url[end..])
}

#[cfg(test)]
mod tests {
    use super::{through, upstream_of};

    #[test]
    fn urls_are_rerouted() {
        let proxy = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            upstream_of("redis://127.0.0.1:6379", 6379),
            "127.0.0.1:6379"
        );
        assert_eq!(
            through("redis://127.0.0.1:6379", proxy),
            "redis://127.0.0.1:4000"
        );
        let pg = "postgres://postgres@localhost/test?x=1";
        assert_eq!(upstream_of(pg, 5432), "localhost:5432");
        assert_eq!(
            through(pg, proxy),
            "postgres://postgres@127.0.0.1:4000/test?x=1"
        );
    }
}
