//! Waking waiters without polling: `complete`, `release` and `forget` end in
//! `pg_notify(channel, key)`, and one connection per store, outside the pool, `LISTEN`s on the
//! table's channel and wakes the calls waiting for that key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::Notify;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long starting the listener may take before a waiter falls back to its timeout.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to open the listener's connection: the pool's settings and TLS.
#[derive(Clone)]
pub(super) struct Listen {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: Option<MakeRustlsConnect>,
    pub(super) channel: String,
}

/// The listener of one store, started on the first wait and again after its connection fails.
pub(super) struct Notifier {
    listen: Listen,
    /// Whether the listener is up (`LISTEN` confirmed), and its start serialised.
    running: tokio::sync::Mutex<bool>,
    up: Arc<std::sync::atomic::AtomicBool>,
    keys: Arc<Mutex<HashMap<String, Key>>>,
    /// The listening connection's client (the connection closes when it is dropped).
    client: Mutex<Option<tokio_postgres::Client>>,
}

/// The waiters of one key.
struct Key {
    notify: Arc<Notify>,
    waiters: usize,
}

/// A registered waiter; dropping it unregisters it.
pub(super) struct Waiter<'a> {
    notifier: &'a Notifier,
    key: String,
    pub(super) notify: Arc<Notify>,
    /// Whether the listener was already up when this waiter arrived: then no change made since
    /// can be missed, and the caller need not look at the record again.
    pub(super) was_listening: bool,
}

impl Notifier {
    pub(super) fn new(listen: Listen) -> Self {
        Notifier {
            listen,
            running: tokio::sync::Mutex::new(false),
            up: Arc::default(),
            keys: Arc::default(),
            client: Mutex::new(None),
        }
    }

    /// Registers a waiter for `key` (then [`listening`](Self::listening)).
    pub(super) fn register(&self, key: &str) -> Waiter<'_> {
        let was_listening = self.up.load(std::sync::atomic::Ordering::Acquire);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let entry = keys.entry(key.to_owned()).or_insert_with(|| Key {
            notify: Arc::new(Notify::new()),
            waiters: 0,
        });
        entry.waiters += 1;
        Waiter {
            notifier: self,
            key: key.to_owned(),
            notify: entry.notify.clone(),
            was_listening,
        }
    }

    /// Whether the listener is up, starting it if need be.
    pub(super) async fn listening(&self) -> bool {
        if self.up.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        let mut running = self.running.lock().await;
        if self.up.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        let started = match self.listen.tls.clone() {
            Some(tls) => tokio::time::timeout(LISTEN_TIMEOUT, self.start(tls)).await,
            None => tokio::time::timeout(LISTEN_TIMEOUT, self.start(NoTls)).await,
        };
        *running = matches!(started, Ok(true));
        *running
    }

    /// Opens the connection, drives it on a task of its own, and `LISTEN`s.
    async fn start<T>(&self, tls: T) -> bool
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
    {
        let Ok((client, mut connection)) = self.listen.config.connect(tls).await else {
            return false;
        };
        let (keys, up) = (self.keys.clone(), self.up.clone());
        tokio::spawn(async move {
            // Messages until the connection ends; then waiters fall back to their timeouts
            // and the next wait starts a new listener.
            while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
                if let AsyncMessage::Notification(n) = message {
                    let keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(key) = keys.get(n.payload()) {
                        key.notify.notify_waiters();
                    }
                }
            }
            up.store(false, std::sync::atomic::Ordering::Release);
        });
        let listen = format!("LISTEN \"{}\"", self.listen.channel);
        if client.batch_execute(&listen).await.is_err() {
            return false;
        }
        // The connection lives as long as its client: keep it (replacing a dead one).
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        self.up.store(true, std::sync::atomic::Ordering::Release);
        true
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut keys = self.notifier.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                keys.remove(&self.key);
            }
        }
    }
}
