//! idem's metrics through the `metrics` facade (feature `metrics`), scraped as Prometheus does:
//! a `metrics-exporter-prometheus` recorder, its rendering served at `/metrics` on a loopback
//! axum server, and a real HTTP request for it. A recorder is process-wide, so this binary holds
//! one test.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use idem_support::AppError;
use idempotency::{
    idempotent, Call, Error, ErrorPolicy, Fingerprint, MemoryStore, OnConflict, Operation, Store,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// `GET /metrics`: the recorder's metrics in the Prometheus text format. Add it to an app with
/// `app.merge(metrics_route(handle))`, `handle` from `PrometheusBuilder::install_recorder`.
pub fn metrics_route(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    handle.render(),
                )
            }
        }),
    )
}

/// One sample of the scrape: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format (the lines this exporter writes: no escapes in values).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            (name, labels, value)
        })
        .collect()
}

/// A scrape: `GET http://{addr}/metrics`.
struct Scrape(Vec<Sample>);

impl Scrape {
    async fn take(addr: std::net::SocketAddr) -> Scrape {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{addr}/metrics").parse().unwrap();
        let response = client.get(uri).await.expect("the scrape answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Scrape(parse(std::str::from_utf8(&body).unwrap()))
    }

    /// The sum of the samples named `name` whose labels include `labels` (0 if none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

const OPERATION: &str = "tests.metrics.charge";

#[idempotent(name = "tests.metrics.charge", key = id, store = store, skip(store))]
async fn charge(store: &MemoryStore, id: u64) -> Result<u64, AppError> {
    tokio::time::sleep(Duration::from_millis(2)).await;
    if id == 0 {
        return Err(AppError::Transient("try again".into()));
    }
    Ok(id * 100)
}

/// A call of the same operation, for what the attribute cannot hold still (a key in flight).
fn call(store: &MemoryStore, key: &str, fingerprint: u64) -> Call {
    Call::for_operation(Operation::named(OPERATION), "", key)
        .unwrap()
        .store(store)
        .fingerprint(Some(Fingerprint::of(&fingerprint).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_reach_prometheus() {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.01, 0.1, 1.0, 10.0])
        .unwrap()
        .install_recorder()
        .expect("the only recorder of this process");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
        listener,
        metrics_route(handle),
    )));

    let store = MemoryStore::new();
    let before = Scrape::take(addr).await;

    // A miss, then a hit.
    assert_eq!(charge(&store, 1).await.unwrap(), 100);
    assert_eq!(charge(&store, 1).await.unwrap(), 100);
    // A miss whose `Err` releases the claim.
    assert!(matches!(
        charge(&store, 0).await,
        Err(AppError::Transient(_))
    ));

    // A key in flight: one caller is refused (a conflict), one waits (a conflict, then a hit).
    let (started, start) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(
        call(&store, "held", 1).run(ErrorPolicy::never(), async move {
            started.send(()).unwrap();
            released.await.unwrap();
            Ok::<u32, Error>(7)
        }),
    );
    start.await.unwrap();
    let refused = call(&store, "held", 1)
        .run(ErrorPolicy::never(), async { Ok::<u32, Error>(8) })
        .await;
    assert!(
        matches!(refused, Err(Error::InFlight { .. })),
        "{refused:?}"
    );
    let waiter = tokio::spawn(
        call(&store, "held", 1)
            .on_conflict(OnConflict::Wait(Duration::from_secs(60)))
            .run(ErrorPolicy::never(), async { Ok::<u32, Error>(9) }),
    );
    // Bounded: until the waiter has counted its conflict (the refused call counted one).
    for _ in 0..1000 {
        if idempotency::counters().conflicts >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    release.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 7);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        7,
        "the waiter got the holder's result"
    );

    // The key reused with other arguments.
    let reused = call(&store, "held", 2)
        .run(ErrorPolicy::never(), async { Ok::<u32, Error>(10) })
        .await;
    assert!(matches!(reused, Err(Error::KeyReuse { .. })), "{reused:?}");

    let after = Scrape::take(addr).await;
    let ours = [("operation", OPERATION), ("backend", "memory")];
    let moved = |event: &str| {
        let labels = [ours[0], ours[1], ("event", event)];
        after.sum("idem_events_total", &labels) - before.sum("idem_events_total", &labels)
    };
    assert_eq!(moved("miss"), 3.0, "charge(1), charge(0), the holder");
    assert_eq!(moved("hit"), 2.0, "the retry of charge(1), the waiter");
    assert_eq!(moved("release"), 1.0, "charge(0)");
    assert_eq!(moved("conflict"), 2.0, "the refused call, the waiter");
    assert_eq!(moved("key_reuse"), 1.0);
    for event in ["takeover", "lease_lost", "store_error", "unknown_outcome"] {
        assert_eq!(moved(event), 0.0, "{event}");
    }

    // The process-wide snapshot counts the same events (this binary makes no other calls).
    let snapshot = idempotency::counters();
    for (event, count) in [
        ("hit", snapshot.hits),
        ("miss", snapshot.misses),
        ("conflict", snapshot.conflicts),
        ("key_reuse", snapshot.key_reuses),
        ("release", snapshot.releases),
    ] {
        assert_eq!(
            after.sum("idem_events_total", &[("event", event)]),
            count as f64,
            "{event}"
        );
    }

    // Histograms: one body sample per body run, store operations timed, one wait.
    let samples = |name: &str, labels: &[(&str, &str)]| {
        let name = format!("{name}_count");
        after.sum(&name, labels) - before.sum(&name, labels)
    };
    assert_eq!(samples("idem_body_duration_seconds", &ours), 3.0);
    let body_seconds = after.sum("idem_body_duration_seconds_sum", &ours)
        - before.sum("idem_body_duration_seconds_sum", &ours);
    assert!(body_seconds > 0.0, "bodies take time: {body_seconds}");
    assert_eq!(samples("idem_wait_seconds", &ours), 1.0, "the waiter");
    let memory = [("backend", "memory")];
    for op in ["claim", "complete", "release"] {
        let n = samples("idem_store_operation_seconds", &[memory[0], ("op", op)]);
        assert!(n >= 1.0, "{op}: {n} samples");
    }
    // At least one claim per call: charge ×3, holder, refused, waiter (once or more), reuse.
    let claims = samples(
        "idem_store_operation_seconds",
        &[memory[0], ("op", "claim")],
    );
    assert!(claims >= 7.0, "{claims} claims");
    // A background purger's work: 5 expired records removed, one pass timed.
    let purged_store = std::sync::Arc::new(MemoryStore::new());
    for i in 0..5 {
        let key = idempotency::StorageKey::derive("metrics-purge", &i.to_string()).unwrap();
        let token = match purged_store
            .claim(&key, None, Duration::from_secs(10))
            .await
            .unwrap()
        {
            idempotency::store::Claim::Acquired { token, .. } => token,
            other => panic!("{other:?}"),
        };
        purged_store
            .complete(&key, token, b"x", Duration::from_millis(1))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let purger = idempotency::store::Purger::new()
        .interval(Duration::from_millis(20))
        .spawn_for(&purged_store)
        .unwrap();
    for _ in 0..500 {
        if purger.stats().removed >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(purger.stats().removed, 5);
    let purged = Scrape::take(addr).await;
    assert_eq!(
        purged.sum("idem_purged_records_total", &[("backend", "memory")])
            - before.sum("idem_purged_records_total", &[("backend", "memory")]),
        5.0
    );
    assert!(purged.sum("idem_purge_pass_seconds_count", &[("backend", "memory")]) >= 1.0);

    // `le` buckets are there: the histograms are Prometheus histograms.
    assert!(
        after.sum(
            "idem_wait_seconds_bucket",
            &[ours[0], ours[1], ("le", "+Inf")]
        ) >= 1.0
    );
}
