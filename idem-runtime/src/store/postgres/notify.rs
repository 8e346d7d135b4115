//! Waking waiters without polling: `complete`, `release` and `forget` end in
//! `pg_notify(channel, key)`, and one connection per store, outside the pool, `LISTEN`s on the
//! table's channel and wakes the calls waiting for that key.
//!
//! The waiters a notification wakes all claim the key again at once. So that they do not queue
//! for the pool with one statement each, a claim of a key that other calls of this process wait
//! for *gathers*: it lets the woken calls run first, and each of them that claims the key with
//! the same fingerprint before the gathering claim has a connection joins it ([`Plan`]) and gets
//! its answer instead of sending a statement of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::poll_fn;
use tokio::sync::{watch, Notify};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::fingerprint::Fingerprint;
use crate::store::Claim;

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

/// The waiters of one key, and the claim of it gathering others, if one is.
struct Key {
    notify: Arc<Notify>,
    waiters: usize,
    gathering: Option<Gathering>,
}

/// A claim that others join until it has a connection: its fingerprint, and where it will
/// publish its answer.
struct Gathering {
    fingerprint: Option<[u8; 32]>,
    answer: Arc<watch::Sender<Option<Shared>>>,
}

/// A gathering claim's answer, as the claims that joined it get it.
#[derive(Clone)]
enum Shared {
    InFlight,
    Completed(Bytes),
    KeyReuse,
}

/// How a claim goes: alone, gathering others, or joined to a gathering claim.
pub(super) enum Plan<'a> {
    /// No other call of this process waits for the key: the claim sends its statement.
    Alone,
    /// Others wait for the key: the claim lets them run first ([`tokio::task::yield_now`]),
    /// gathers those that claim the key meanwhile, and shares its answer with them.
    Lead(Leader<'a>),
    /// A claim of the same key and fingerprint gathers: its answer is this claim's.
    Follow(Follower),
}

/// The gathering claim's side: closes the gathering once it has a connection (so every claim
/// that joined began before its statement was sent), then shares its answer.
pub(super) struct Leader<'a> {
    notifier: &'a Notifier,
    key: String,
    answer: Arc<watch::Sender<Option<Shared>>>,
}

/// A claim joined to a gathering one.
pub(super) struct Follower(watch::Receiver<Option<Shared>>);

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
            gathering: None,
        });
        entry.waiters += 1;
        Waiter {
            notifier: self,
            key: key.to_owned(),
            notify: entry.notify.clone(),
            was_listening,
        }
    }

    /// How a claim of `key` with `fingerprint` goes: it joins a claim of the same key and
    /// fingerprint that gathers, else gathers itself if other calls of this process wait for
    /// the key (and none gathers with another fingerprint), else goes alone.
    pub(super) fn plan(&self, key: &str, fingerprint: Option<&Fingerprint>) -> Plan<'_> {
        let fingerprint = fingerprint.map(|f| f.0);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = keys.get_mut(key) else {
            return Plan::Alone;
        };
        match &entry.gathering {
            Some(g) if g.fingerprint == fingerprint => Plan::Follow(Follower(g.answer.subscribe())),
            Some(_) => Plan::Alone,
            None if entry.waiters == 0 => Plan::Alone,
            None => {
                let answer = Arc::new(watch::Sender::new(None));
                entry.gathering = Some(Gathering {
                    fingerprint,
                    answer: answer.clone(),
                });
                Plan::Lead(Leader {
                    notifier: self,
                    key: key.to_owned(),
                    answer,
                })
            }
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
            // A gathering claim keeps the entry, for the woken waiters to find it.
            if entry.waiters == 0 && entry.gathering.is_none() {
                keys.remove(&self.key);
            }
        }
    }
}

impl Leader<'_> {
    /// Ends the gathering: no claim joins from now on. Called once the claim has a connection,
    /// before its statement is sent, and again (doing nothing) when the leader is dropped.
    pub(super) fn close(&self) {
        let mut keys = self.notifier.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = keys.get_mut(&self.key) else {
            return;
        };
        if entry
            .gathering
            .as_ref()
            .is_some_and(|g| Arc::ptr_eq(&g.answer, &self.answer))
        {
            entry.gathering = None;
            if entry.waiters == 0 {
                keys.remove(&self.key);
            }
        }
    }

    /// Gives the claims that joined the answer they would have had right after this one's:
    /// in flight if this one acquired the key. Errors are not shared: each of them then claims
    /// alone.
    pub(super) fn share(self, claim: &Claim) {
        let shared = match claim {
            Claim::Acquired { .. } | Claim::InFlight => Shared::InFlight,
            Claim::Completed(record) => Shared::Completed(record.clone()),
            Claim::KeyReuse => Shared::KeyReuse,
        };
        self.close();
        self.answer.send_replace(Some(shared));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

impl Follower {
    /// The gathering claim's answer, or `None` if it ended without one (an error, or it was
    /// dropped): the caller then claims alone.
    pub(super) async fn answer(mut self) -> Option<Claim> {
        let shared = self.0.wait_for(Option::is_some).await.ok()?.clone()?;
        Some(match shared {
            Shared::InFlight => Claim::InFlight,
            Shared::Completed(record) => Claim::Completed(record),
            Shared::KeyReuse => Claim::KeyReuse,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier() -> Notifier {
        Notifier::new(Listen {
            config: tokio_postgres::Config::new(),
            tls: None,
            channel: "idem_test".into(),
        })
    }

    const FP: Fingerprint = Fingerprint([7; 32]);

    #[test]
    fn a_claim_nobody_waits_for_goes_alone() {
        let n = notifier();
        assert!(matches!(n.plan("k", None), Plan::Alone));
        let _waiter = n.register("other");
        assert!(matches!(n.plan("k", Some(&FP)), Plan::Alone));
    }

    #[tokio::test]
    async fn woken_claims_join_the_gathering_one() {
        let n = notifier();
        let waiter = n.register("k");
        let Plan::Lead(leader) = n.plan("k", Some(&FP)) else {
            panic!("others wait for the key: the claim gathers");
        };
        // The last waiter leaves (woken): the gathering stays for it to find.
        drop(waiter);
        let Plan::Follow(same) = n.plan("k", Some(&FP)) else {
            panic!("same key and fingerprint: joins");
        };
        assert!(
            matches!(n.plan("k", None), Plan::Alone),
            "another fingerprint"
        );
        leader.share(&Claim::Completed(Bytes::from_static(b"rec")));
        assert_eq!(
            same.answer().await,
            Some(Claim::Completed(Bytes::from_static(b"rec")))
        );
        assert!(n.keys.lock().unwrap().is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn an_acquired_key_is_in_flight_for_those_who_joined() {
        let n = notifier();
        let _waiter = n.register("k");
        let Plan::Lead(leader) = n.plan("k", None) else {
            panic!("gathers");
        };
        let Plan::Follow(joined) = n.plan("k", None) else {
            panic!("joins");
        };
        leader.share(&Claim::Acquired {
            token: crate::store::FencingToken(3),
            takeover: false,
        });
        assert_eq!(joined.answer().await, Some(Claim::InFlight));
    }

    #[tokio::test]
    async fn once_closed_no_claim_joins_and_a_dropped_leader_answers_nothing() {
        let n = notifier();
        let _waiter = n.register("k");
        let Plan::Lead(first) = n.plan("k", None) else {
            panic!("gathers");
        };
        let Plan::Follow(joined) = n.plan("k", None) else {
            panic!("joins");
        };
        // The statement is about to be sent: later claims gather anew.
        first.close();
        let Plan::Lead(second) = n.plan("k", None) else {
            panic!("a new gathering");
        };
        // Closing the first again (its drop) leaves the second's gathering alone.
        drop(first);
        assert!(matches!(n.plan("k", None), Plan::Follow(_)));
        drop(second);
        assert_eq!(joined.answer().await, None, "claims alone instead");
    }
}
