//! The conformance suite against `DynamoDbStore`, plus what only DynamoDB has: items DynamoDB
//! has not deleted yet after their TTL, tokens kept in the key's item across forget and expiry,
//! claims racing on conditional writes, the table created (or refused) at connect, and the URL.
//!
//! Needs a server at `IDEM_DYNAMODB_URL` (default
//! `dynamodb://idem_test?region=us-east-1&endpoint=http://127.0.0.1:8000`, moto's server; `.ci/run`
//! starts one); without one the tests print why and pass, unless `IDEM_REQUIRE_SERVICES=1`. Each
//! test works in a table of its own.
#![cfg(feature = "dynamodb")]

use std::sync::Arc;
use std::time::Duration;

use idem_support::dynamodb::{fresh_table, url_for};
use idempotency::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use idempotency::dynamodb::DynamoDbOptions;
use idempotency::store::{Claim, FencingToken, Forgotten, RecordState};
use idempotency::{DynamoDbStore, Error, Fingerprint, StorageKey, Store};

const LONG: Duration = Duration::from_secs(60);

async fn fresh_store() -> Option<Arc<dyn Store>> {
    idem_support::dynamodb::fresh("c").await
}

idem_testkit::conformance!(fresh_store, native_expiry = false);

async fn fresh_dynamodb() -> Option<DynamoDbStore> {
    idem_support::dynamodb::store("t").await
}

fn key(label: &str) -> StorageKey {
    idem_support::unique(label)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn record(token: u64) -> Vec<u8> {
    idem_testkit::record_bytes(token, "7", "u32")
}

async fn acquire(store: &dyn Store, key: &StorageKey, lease: Duration) -> FencingToken {
    match store.claim(key, Some(&fp(1)), lease).await.unwrap() {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// The item of `key` as DynamoDB holds it.
async fn raw_item(
    store: &DynamoDbStore,
    key: &StorageKey,
) -> Option<std::collections::HashMap<String, AttributeValue>> {
    store
        .client()
        .get_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(key.as_str().to_owned()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

/// A completed record past its ttl that DynamoDB has not deleted yet (its TTL sweep runs
/// late; moto's never does) is absent to every read, and a claim acquires it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_past_their_ttl_that_dynamodb_kept_are_absent() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let k = key("late-ttl");
    let t = acquire(&store, &k, LONG).await;
    store
        .complete(&k, t, &record(t.0), Duration::from_millis(200))
        .await
        .unwrap();
    let item = raw_item(&store, &k).await.unwrap();
    let Some(AttributeValue::N(expires)) = item.get("expires") else {
        panic!("the TTL attribute is set: {item:?}");
    };
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires: u64 = expires.parse().unwrap();
    assert!(
        (now_s..=now_s + 2).contains(&expires),
        "epoch seconds of the ttl's end: {expires} vs now {now_s}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        raw_item(&store, &k).await.is_some(),
        "DynamoDB still holds it"
    );
    assert_eq!(store.get(&k).await.unwrap(), None);
    assert_eq!(store.forget(&k, false).await.unwrap(), Forgotten::Absent);
    let page = store.scan(None, 100).await.unwrap();
    assert!(page.records.iter().all(|r| r.key != k), "{page:?}");
    match store.claim(&k, Some(&fp(2)), LONG).await.unwrap() {
        Claim::Acquired { token, takeover } => {
            assert!(!takeover, "a result past its ttl is no takeover");
            assert!(token > t);
        }
        other => panic!("{other:?}"),
    }
}

/// Tokens live in the key's item: they keep growing across release, forget (forced or not),
/// expiry and purge, and a forgotten holder stays fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_across_forget_and_expiry() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let k = key("tokens");
    let t1 = acquire(&store, &k, LONG).await;
    store.release(&k, t1).await.unwrap();
    let t2 = acquire(&store, &k, LONG).await;
    assert_eq!(
        t2.0,
        t1.0 + 1,
        "the key's counter continues after a release"
    );
    assert_eq!(
        store.forget(&k, true).await.unwrap(),
        Forgotten::InFlight { token: t2 }
    );
    let t3 = acquire(&store, &k, LONG).await;
    assert!(t3 > t2);
    for result in [
        store.complete(&k, t2, &record(t2.0), LONG).await,
        store.renew(&k, t2, LONG).await,
        store.release(&k, t2).await,
    ] {
        assert!(matches!(result, Err(Error::LeaseLost { .. })), "{result:?}");
    }
    store.complete(&k, t3, &record(t3.0), LONG).await.unwrap();
    assert_eq!(
        store.forget(&k, false).await.unwrap(),
        Forgotten::Completed { token: t3 }
    );
    let t4 = acquire(&store, &k, LONG).await;
    assert_eq!(t4.0, t3.0 + 1);
    store
        .complete(&k, t4, &record(t4.0), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t5 = acquire(&store, &k, Duration::from_millis(100)).await;
    assert_eq!(t5.0, t4.0 + 1, "across a ttl's end");
    store
        .complete(&k, t5, &record(t5.0), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert!(raw_item(&store, &k).await.is_none(), "purged");
    let t6 = acquire(&store, &k, LONG).await;
    assert!(
        t6 > t5,
        "after the item is gone, from the clock: {t6:?} after {t5:?}"
    );
}

/// A retried `complete` (the SDK's, after a lost reply) that finds its own result stored
/// succeeds; a different result under the same token is still refused, and so is a renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_complete_of_the_same_result_succeeds() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let k = key("again");
    let t = acquire(&store, &k, LONG).await;
    store.complete(&k, t, &record(t.0), LONG).await.unwrap();
    store.complete(&k, t, &record(t.0), LONG).await.unwrap();
    assert!(matches!(
        store.complete(&k, t, b"other", LONG).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store.renew(&k, t, LONG).await,
        Err(Error::LeaseLost { .. })
    ));
    // A retried release finds its own tombstone; another token's release is refused.
    let k2 = key("again-release");
    let t2 = acquire(&store, &k2, LONG).await;
    store.release(&k2, t2).await.unwrap();
    store.release(&k2, t2).await.unwrap();
    assert!(matches!(
        store.release(&k2, FencingToken(t2.0 + 1)).await,
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(store.get(&k2).await.unwrap(), None);
}

/// Many claims of one key at once: one conditional write wins, and every loser learns from its
/// own failed condition what the winner holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_have_one_winner() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let store = Arc::new(store);
    let k = key("race");
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20u8)
        .map(|i| {
            let (store, k, barrier) = (store.clone(), k.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let f = i % 2 + 1;
                (f, store.claim(&k, Some(&fp(f)), LONG).await.unwrap())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let winners: Vec<_> = results
        .iter()
        .filter(|(_, c)| matches!(c, Claim::Acquired { .. }))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner_fp = winners[0].0;
    for (f, c) in &results {
        match c {
            Claim::Acquired { .. } => {}
            Claim::InFlight => assert_eq!(*f, winner_fp),
            Claim::KeyReuse => assert_ne!(*f, winner_fp),
            other => panic!("{other:?}"),
        }
    }
}

/// Without permission to create it, a missing table is a configuration error naming it, and
/// nothing is created; with it, the table is created once even by concurrent connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_created_or_refused() {
    if fresh_dynamodb().await.is_none() {
        return;
    }
    let table = fresh_table("missing");
    let url = url_for(&table);
    let err = DynamoDbStore::connect_with(&url, &DynamoDbOptions::new().create_table(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { .. }) && !err.is_retryable(),
        "{err}"
    );
    assert!(err.to_string().contains(&table), "{err}");
    assert!(err.to_string().contains("create_table(true)"), "{err}");
    let err = DynamoDbStore::connect_with(&url, &DynamoDbOptions::new().create_table(false))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "still missing: {err}");

    let connects: Vec<_> = (0..4).map(|_| DynamoDbStore::connect(&url)).collect();
    let stores = futures::future::try_join_all(connects).await.unwrap();
    let k = key("created");
    let t = acquire(&stores[0], &k, LONG).await;
    assert_eq!(
        stores[3].claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    stores[2].complete(&k, t, &record(t.0), LONG).await.unwrap();
    let checked = DynamoDbStore::connect_with(&url, &DynamoDbOptions::new().create_table(false))
        .await
        .unwrap();
    assert!(matches!(
        checked.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(_)
    ));
    let ttl = checked
        .client()
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires"), "{ttl:?}");
}

/// `connect` opens `dynamodb://` URLs; the table named in the URL is the one used; mistakes in
/// the URL are configuration errors before any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reads_the_url() {
    for (bad, says) in [
        ("dynamodb://t1x?regoin=eu-west-1", "`regoin`"),
        (
            "dynamodb://ab?region=eu-west-1",
            "invalid DynamoDB table name",
        ),
        ("dynamodb://t1x?endpoint=localhost:8000", "not an `http://`"),
        ("dynamodb://t1x/more?region=eu-west-1", "only a table name"),
    ] {
        let err = idempotency::connect(bad).await.err().expect("refused");
        assert!(matches!(&err, Error::Config { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(says), "{bad}: {err}");
    }
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let opened = idempotency::connect(&url_for(store.table())).await.unwrap();
    assert_eq!(opened.backend(), "dynamodb");
    let k = key("url");
    let t = acquire(&*opened, &k, LONG).await;
    assert_eq!(
        store.get(&k).await.unwrap().unwrap().state,
        RecordState::InFlight { token: t },
        "the URL's table is the store's"
    );
}

/// Items idem did not write are errors, never panics and never silent re-runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_items_are_errors_not_panics() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let k = key("altered");
    let t = acquire(&store, &k, LONG).await;
    store.complete(&k, t, &record(t.0), LONG).await.unwrap();
    store
        .client()
        .update_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(k.as_str().to_owned()))
        .update_expression("REMOVE rec")
        .send()
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&k, Some(&fp(1)), LONG).await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(store.get(&k).await, Err(Error::Corrupt { .. })));
    store
        .client()
        .update_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(k.as_str().to_owned()))
        .update_expression("SET rec = :r, fp = :f")
        .expression_attribute_values(":r", AttributeValue::B(vec![0].into()))
        .expression_attribute_values(":f", AttributeValue::B(vec![1, 2].into()))
        .send()
        .await
        .unwrap();
    assert!(matches!(store.get(&k).await, Err(Error::Corrupt { .. })));
}

/// Counts the requests a client sends (each attempt), at the SDK's last step before the wire.
#[derive(Debug, Clone, Default)]
struct Requests(Arc<std::sync::atomic::AtomicUsize>);

impl idempotency::dynamodb::aws_sdk_dynamodb::config::Intercept for Requests {
    fn name(&self) -> &'static str {
        "Requests"
    }

    fn read_before_transmit(
        &self,
        _: &idempotency::dynamodb::aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &idempotency::dynamodb::aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut idempotency::dynamodb::aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), idempotency::dynamodb::aws_sdk_dynamodb::error::BoxError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Requests {
    /// The requests sent since the last call.
    fn take(&self) -> usize {
        self.0.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
}

/// The round trips the README and the module docs promise: a claim is one request, hit or
/// miss (and key reuse); complete, renew, save_step, load_steps, get one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_call() {
    use idempotency::dynamodb::aws_sdk_dynamodb::Client;

    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let requests = Requests::default();
    let config = store
        .client()
        .config()
        .to_builder()
        .interceptor(requests.clone())
        .build();
    let options = DynamoDbOptions::new()
        .table(store.table())
        .create_table(false);
    let counted = DynamoDbStore::from_client(Client::from_conf(config), &options)
        .await
        .unwrap();
    assert_eq!(requests.take(), 1, "connecting: DescribeTable");
    let k = key("trips");
    let t = acquire(&counted, &k, LONG).await;
    assert_eq!(requests.take(), 1, "a claim that acquires (a miss)");
    counted.save_step(&k, t, "one", b"1").await.unwrap();
    assert_eq!(requests.take(), 1, "save_step");
    counted.renew(&k, t, LONG).await.unwrap();
    assert_eq!(requests.take(), 1, "renew");
    assert_eq!(counted.load_steps(&k, t).await.unwrap().len(), 1);
    assert_eq!(requests.take(), 1, "load_steps");
    assert_eq!(
        counted.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::InFlight
    );
    assert_eq!(requests.take(), 1, "a claim finding it in flight");
    counted.complete(&k, t, &record(t.0), LONG).await.unwrap();
    assert_eq!(requests.take(), 1, "complete");
    assert!(matches!(
        counted.claim(&k, Some(&fp(1)), LONG).await.unwrap(),
        Claim::Completed(_)
    ));
    assert_eq!(requests.take(), 1, "a claim that replays (a hit)");
    assert_eq!(
        counted.claim(&k, Some(&fp(2)), LONG).await.unwrap(),
        Claim::KeyReuse
    );
    assert_eq!(requests.take(), 1, "a claim finding key reuse");
    assert!(counted.get(&k).await.unwrap().is_some());
    assert_eq!(requests.take(), 1, "get");
}

/// A result or step too large for a DynamoDB item is `TooLarge` before any request, as on the
/// other stores, and leaves the claim held: its holder can still store a smaller one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_item_limit_is_too_large() {
    let Some(store) = fresh_dynamodb().await else {
        return;
    };
    let k = key("too_large");
    let token = acquire(&store, &k, LONG).await;
    let big = vec![7u8; 400 * 1024];
    match store.complete(&k, token, &big, LONG).await {
        Err(Error::TooLarge { size, limit }) => {
            assert_eq!(size, big.len());
            assert!(limit < 409_600, "{limit}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match store.save_step(&k, token, "charge", &big).await {
        Err(Error::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Still held, and a result that fits lands.
    store
        .save_step(&k, token, "charge", b"small")
        .await
        .unwrap();
    store
        .complete(&k, token, &record(token.0), LONG)
        .await
        .unwrap();
    let stored = store.get(&k).await.unwrap().expect("a record");
    assert!(
        matches!(stored.state, RecordState::Completed { .. }),
        "{stored:?}"
    );
}
