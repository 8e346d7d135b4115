//! Waking waiters without polling: the `complete`, `release` and `forget` scripts publish on
//! the key's channel (`{prefix}:{<hex>}:changed`, in the record's hash slot), and one
//! subscriber connection per store (sharded pub/sub on a cluster) wakes the calls waiting for
//! that key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{PushKind, Value};
use tokio::sync::{Notify, OnceCell};

use super::connection::{cluster_builder, Endpoint};

/// How long a subscription may take before a waiter falls back to its timeout.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The publishing command the scripts use for a store on this endpoint.
pub(super) fn publish_command(endpoint: Option<&Endpoint>) -> &'static str {
    match endpoint {
        Some(Endpoint::Single(_)) => "PUBLISH",
        Some(Endpoint::Cluster(_)) => "SPUBLISH",
        None => "",
    }
}

/// The channel a key's changes are published on.
pub(super) fn channel(record_key: &str) -> String {
    format!("{record_key}:changed")
}

/// The subscriber of one store, started on the first wait.
pub(super) struct Notifier {
    endpoint: Endpoint,
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// The waiters of one channel.
struct Channel {
    notify: Arc<Notify>,
    /// Set once the subscription is confirmed (`true`), or failed (`false`).
    subscribed: Arc<OnceCell<bool>>,
    waiters: usize,
}

#[derive(Clone)]
enum Subscriber {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

/// A registered waiter; leaving unregisters it (and unsubscribes the last one of a channel).
pub(super) struct Waiter<'a> {
    notifier: &'a Notifier,
    channel: String,
    pub(super) notify: Arc<Notify>,
    subscribed: Arc<OnceCell<bool>>,
    /// Whether the subscription was already confirmed when this waiter arrived: then no change
    /// published since can be missed, and the caller need not look at the record again.
    pub(super) was_subscribed: bool,
}

impl Notifier {
    pub(super) fn new(endpoint: Endpoint) -> Self {
        Notifier {
            endpoint,
            subscriber: tokio::sync::Mutex::new(None),
            channels: Arc::default(),
        }
    }

    /// Registers a waiter on `channel` (call [`Waiter::subscribed`] next).
    pub(super) fn register(&self, channel: String) -> Waiter<'_> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
            notify: Arc::new(Notify::new()),
            subscribed: Arc::new(OnceCell::new()),
            waiters: 0,
        });
        entry.waiters += 1;
        Waiter {
            notifier: self,
            was_subscribed: entry.subscribed.get() == Some(&true),
            notify: entry.notify.clone(),
            subscribed: entry.subscribed.clone(),
            channel,
        }
    }

    /// The subscriber connection, started if it is not running.
    async fn subscriber(&self) -> Option<Subscriber> {
        let mut slot = self.subscriber.lock().await;
        if slot.is_none() {
            *slot = self.start().await;
        }
        slot.clone()
    }

    async fn start(&self) -> Option<Subscriber> {
        let channels = self.channels.clone();
        let started = match &self.endpoint {
            Endpoint::Single(client) => {
                let (sink, mut stream) = client.get_async_pubsub().await.ok()?.split();
                tokio::spawn(async move {
                    use futures_util::StreamExt;
                    while let Some(msg) = stream.next().await {
                        wake(&channels, msg.get_channel_name());
                    }
                });
                Subscriber::Single(sink)
            }
            Endpoint::Cluster(nodes) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let con = cluster_builder(nodes, SUBSCRIBE_TIMEOUT)
                    .push_sender(tx)
                    .build()
                    .ok()?
                    .get_async_connection()
                    .await
                    .ok()?;
                tokio::spawn(async move {
                    while let Some(push) = rx.recv().await {
                        if matches!(push.kind, PushKind::SMessage | PushKind::Message) {
                            if let Some(Value::BulkString(name)) = push.data.first() {
                                wake(&channels, &String::from_utf8_lossy(name));
                            }
                        }
                    }
                });
                Subscriber::Cluster(con)
            }
        };
        Some(started)
    }

    /// Forgets a subscriber whose connection failed, so that the next wait starts another.
    async fn reset(&self) {
        *self.subscriber.lock().await = None;
    }
}

fn wake(channels: &Mutex<HashMap<String, Channel>>, name: &str) {
    let channels = channels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(channel) = channels.get(name) {
        channel.notify.notify_waiters();
    }
}

impl Waiter<'_> {
    /// Waits until the channel's subscription is confirmed: `false` if it could not be made
    /// (the caller then falls back to its timeout).
    pub(super) async fn subscribed(&self) -> bool {
        *self
            .subscribed
            .get_or_init(|| async {
                let subscribe = async {
                    let Some(subscriber) = self.notifier.subscriber().await else {
                        return false;
                    };
                    let done = match subscriber {
                        Subscriber::Single(mut sink) => sink.subscribe(&self.channel).await,
                        Subscriber::Cluster(mut con) => con.ssubscribe(&self.channel).await,
                    };
                    if done.is_err() {
                        self.notifier.reset().await;
                    }
                    done.is_ok()
                };
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
                    .await
                    .unwrap_or(false)
            })
            .await
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut channels = self
            .notifier
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(entry) = channels.get_mut(&self.channel) else {
            return;
        };
        entry.waiters -= 1;
        if entry.waiters > 0 {
            return;
        }
        let was_subscribed = entry.subscribed.get() == Some(&true);
        channels.remove(&self.channel);
        drop(channels);
        if !was_subscribed {
            return;
        }
        // The last waiter of the channel: unsubscribe, without holding up the caller.
        let Ok(slot) = self.notifier.subscriber.try_lock() else {
            return;
        };
        let Some(subscriber) = slot.clone() else {
            return;
        };
        drop(slot);
        let channel = std::mem::take(&mut self.channel);
        let channels = self.notifier.channels.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A waiter that came back meanwhile keeps the subscription. (One that comes
                // back between this check and the UNSUBSCRIBE may lose its notification: it
                // then wakes at its timeout, the bounded poll that backs every wait.)
                if channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&channel)
                {
                    return;
                }
                let _ = match subscriber {
                    Subscriber::Single(mut sink) => sink.unsubscribe(&channel).await,
                    Subscriber::Cluster(mut con) => con.sunsubscribe(&channel).await,
                };
            });
        }
    }
}
