//! examples/signed_webhook.rs over real HTTP: a signed webhook receiver applies each event once
//! however many times, in whatever order, it is delivered, answers every delivery of it 200,
//! treats a redelivery with other delivery metadata as the same event, refuses an event id
//! reused with other content, and refuses unsigned, forged or stale deliveries without running
//! anything.

#![cfg(feature = "http")]

#[allow(dead_code)]
#[path = "../examples/signed_webhook.rs"]
mod signed_webhook;

use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use idempotency::{MemoryStore, Store};
use rand::seq::SliceRandom;
use serde_json::json;
use signed_webhook::{
    deliver, event_body, sign, unix_now, v1_signature, Ack, HttpClient, Ledger, DEFAULT_TOLERANCE,
    REPLAYED_HEADER,
};

const SECRET: &[u8] = b"whsec_test_current";
const OLD_SECRET: &[u8] = b"whsec_test_previous";

/// A receiver on 127.0.0.1, its URL, its ledger and a client; counts deliveries and answers.
struct Harness {
    url: String,
    ledger: Arc<Ledger>,
    client: HttpClient,
    server: tokio::task::JoinHandle<()>,
    deliveries: u64,
}

/// One delivery's answer.
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Bytes,
}

impl Harness {
    async fn start(store: Arc<dyn Store>) -> Harness {
        let ledger = Arc::new(Ledger::default());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/webhooks/stripe", listener.local_addr().unwrap());
        let app = signed_webhook::router(SECRET, store, ledger.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Harness {
            url,
            ledger,
            client: signed_webhook::client(),
            server,
            deliveries: 0,
        }
    }

    async fn post(&mut self, signature: Option<&str>, body: &[u8]) -> Answer {
        self.deliveries += 1;
        post(&self.client, &self.url, signature, body).await
    }

    /// A delivery signed now with the endpoint's secret.
    async fn signed(&mut self, body: &[u8]) -> Answer {
        let header = sign(SECRET, unix_now(), body);
        self.post(Some(&header), body).await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn post(client: &HttpClient, url: &str, signature: Option<&str>, body: &[u8]) -> Answer {
    let (status, headers, body) = deliver(client, url, signature, body).await.unwrap();
    Answer {
        status,
        replayed: headers.get(REPLAYED_HEADER).is_some_and(|v| v == "true"),
        body,
    }
}

fn paid(amount: u64) -> serde_json::Value {
    json!({ "object": { "id": "pi_1", "amount": amount, "currency": "eur" } })
}

/// The same event 20 times and a newer event 6 times, all at once, shuffled: each event's
/// effect starts once, every delivery is answered 200 with its event's one acknowledgement,
/// and 19 + 5 deliveries are told apart as duplicates.
async fn concurrent_duplicates(h: &mut Harness, tag: &str) -> (u64, u64) {
    let (first, newer) = (format!("evt_{tag}_a"), format!("evt_{tag}_b"));
    let (n_first, n_newer) = (20usize, 6usize);
    let first_body = event_body(&first, "payment_intent.succeeded", paid(2500), 1);
    let newer_body = event_body(&newer, "charge.refunded", paid(500), 1);
    let mut order: Vec<bool> = std::iter::repeat_n(true, n_first)
        .chain(std::iter::repeat_n(false, n_newer))
        .collect();
    order.shuffle(&mut rand::thread_rng());

    let (before, dups_before) = (h.ledger.effects(), h.ledger.duplicates());
    let deliveries = order.iter().map(|is_first| {
        let (client, url) = (h.client.clone(), h.url.clone());
        let (id, body) = if *is_first {
            (first.clone(), first_body.clone())
        } else {
            (newer.clone(), newer_body.clone())
        };
        // Each delivery signed on its own, as a sender's retries are.
        let header = sign(SECRET, unix_now(), &body);
        tokio::spawn(async move { (id, post(&client, &url, Some(&header), &body).await) })
    });
    let answers = futures::future::join_all(deliveries).await;
    h.deliveries += answers.len() as u64;

    let mut replayed_headers = 0;
    let mut acks = std::collections::HashMap::<String, Bytes>::new();
    for answer in answers {
        let (id, answer) = answer.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "every delivery answered 200");
        replayed_headers += u64::from(answer.replayed);
        let ack: Ack = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(ack.event, id);
        let seen = acks.entry(id).or_insert_with(|| answer.body.clone());
        assert_eq!(
            *seen, answer.body,
            "every delivery of an event gets one acknowledgement"
        );
    }
    assert_eq!(
        h.ledger.effects_of(&first),
        1,
        "{first}: one effect for 20 deliveries"
    );
    assert_eq!(
        h.ledger.effects_of(&newer),
        1,
        "{newer}: one effect for 6 deliveries"
    );
    assert_eq!(h.ledger.effects() - before, 2);
    let duplicates = h.ledger.duplicates() - dups_before;
    let expected = (n_first - 1 + n_newer - 1) as u64;
    assert_eq!(
        duplicates, expected,
        "observe told every duplicate from the first delivery"
    );
    assert_eq!(replayed_headers, expected, "and the answers say so");
    (2, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhook_on_memory() {
    let mut h = Harness::start(Arc::new(MemoryStore::new())).await;
    let (mut events, _) = concurrent_duplicates(&mut h, "mem").await;

    // A redelivery differing only in its delivery metadata (so in its signature too) is the
    // same event: replayed, with the first acknowledgement, no second effect.
    let first = h
        .signed(&event_body("evt_redo", "invoice.paid", paid(700), 1))
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed);
    events += 1;
    let again_body = event_body("evt_redo", "invoice.paid", paid(700), 2);
    let again_header = sign(SECRET, unix_now(), &again_body);
    assert_ne!(
        again_header,
        sign(
            SECRET,
            unix_now(),
            &event_body("evt_redo", "invoice.paid", paid(700), 1)
        )
    );
    let again = h.post(Some(&again_header), &again_body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed, "a redelivery is a duplicate");
    assert_eq!(again.body, first.body);
    assert_eq!(h.ledger.effects_of("evt_redo"), 1);

    // The same id with other data is refused (422) and runs nothing; the stored
    // acknowledgement is still the one replayed afterwards.
    let effects = h.ledger.effects();
    let reused = h
        .signed(&event_body("evt_redo", "invoice.paid", paid(70_000), 3))
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h.ledger.effects(), effects, "key reuse ran nothing");
    let retyped = h
        .signed(&event_body("evt_redo", "invoice.voided", paid(700), 3))
        .await;
    assert_eq!(retyped.status, StatusCode::UNPROCESSABLE_ENTITY);
    let later = h.signed(&again_body).await;
    assert_eq!(
        (later.status, later.body),
        (StatusCode::OK, first.body.clone())
    );

    // Refused with 400 before anything runs: a fresh event, so a claim would show too.
    let body = event_body("evt_forged", "payment_intent.succeeded", paid(1), 1);
    let now = unix_now();
    let mut flipped = body.clone();
    let at = flipped
        .windows(4)
        .position(|w| w == b"eur\"")
        .expect("the currency in the body");
    flipped[at] = b'u'; // "uur": still valid JSON, only the signature can tell
    let good = sign(SECRET, now, &body);
    let bad_deliveries: Vec<(&str, Option<String>, &[u8])> = vec![
        (
            "wrong secret",
            Some(sign(b"whsec_guessed", now, &body)),
            &body[..],
        ),
        (
            "old secret only",
            Some(sign(OLD_SECRET, now, &body)),
            &body[..],
        ),
        ("flipped byte in body", Some(good.clone()), &flipped[..]),
        ("missing header", None, &body[..]),
        ("garbage header", Some("garbage".into()), &body[..]),
        (
            "no timestamp",
            Some(format!("v1={}", v1_signature(SECRET, now, &body))),
            &body[..],
        ),
        ("no v1", Some(format!("t={now}")), &body[..]),
        (
            "only v0",
            Some(format!("t={now},v0={}", v1_signature(SECRET, now, &body))),
            &body[..],
        ),
        ("non-hex v1", Some(format!("t={now},v1=zz")), &body[..]),
        (
            "signed timestamp",
            Some(format!("t=+{now},v1={}", v1_signature(SECRET, now, &body))),
            &body[..],
        ),
        ("two timestamps", Some(format!("{good},t={now}")), &body[..]),
        (
            "truncated signature",
            Some(good[..good.len() - 2].to_string()),
            &body[..],
        ),
    ];
    let stale = DEFAULT_TOLERANCE.as_secs() + 60;
    let mut bad_deliveries = bad_deliveries;
    bad_deliveries.push((
        "timestamp too old",
        Some(sign(SECRET, now - stale, &body)),
        &body[..],
    ));
    bad_deliveries.push((
        "timestamp in the future",
        Some(sign(SECRET, now + stale, &body)),
        &body[..],
    ));
    let effects = h.ledger.effects();
    let rejected = h.ledger.rejected();
    let n_bad = bad_deliveries.len() as u64;
    for (what, header, body) in bad_deliveries {
        let answer = h.post(header.as_deref(), body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}");
        assert!(!answer.body.is_empty(), "{what}: a short reason");
    }
    assert_eq!(h.ledger.effects(), effects, "no refused delivery ran");
    assert_eq!(h.ledger.rejected() - rejected, n_bad);
    // Nothing was claimed or stored for it either: the genuine delivery runs it now, once.
    let genuine = h.post(Some(&good), &body).await;
    assert_eq!(genuine.status, StatusCode::OK);
    assert!(!genuine.replayed);
    assert_eq!(h.ledger.effects_of("evt_forged"), 1);
    events += 1;
    // Within the window either way is fine (clocks differ).
    let skewed = event_body("evt_skewed", "payment_intent.succeeded", paid(3), 1);
    let early = sign(SECRET, now - DEFAULT_TOLERANCE.as_secs() + 30, &skewed);
    assert_eq!(h.post(Some(&early), &skewed).await.status, StatusCode::OK);
    let late = sign(SECRET, now + DEFAULT_TOLERANCE.as_secs() - 30, &skewed);
    assert_eq!(h.post(Some(&late), &skewed).await.status, StatusCode::OK);
    assert_eq!(h.ledger.effects_of("evt_skewed"), 1);
    events += 1;

    // While a secret is rolled the sender signs with both: any matching v1 is accepted, in
    // either position.
    let rotated = event_body("evt_rotated", "customer.updated", paid(4), 1);
    let header = format!(
        "{},v1={}",
        sign(OLD_SECRET, now, &rotated),
        v1_signature(SECRET, now, &rotated)
    );
    let answer = h.post(Some(&header), &rotated).await;
    assert_eq!(answer.status, StatusCode::OK, "the second v1 matches");
    assert!(!answer.replayed);
    let header = format!(
        "{},v1={}",
        sign(SECRET, now, &rotated),
        v1_signature(OLD_SECRET, now, &rotated)
    );
    let answer = h.post(Some(&header), &rotated).await;
    assert_eq!(answer.status, StatusCode::OK, "the first v1 matches");
    assert!(answer.replayed);
    assert_eq!(h.ledger.effects_of("evt_rotated"), 1);
    events += 1;

    assert_eq!(h.ledger.events() as u64, events);
    assert_eq!(h.ledger.effects(), events, "one effect per event");
    println!(
        "@figures signed_webhook deliveries={} events={} effects={} duplicates={} rejected={}",
        h.deliveries,
        h.ledger.events(),
        h.ledger.effects(),
        h.ledger.duplicates(),
        h.ledger.rejected()
    );
}

/// The concurrent deliveries on a durable store (SQLite, one file).
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhook_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = idempotency::SqliteStore::open(dir.path().join("webhooks.db"))
        .await
        .unwrap();
    let mut h = Harness::start(Arc::new(store)).await;
    let (events, duplicates) = concurrent_duplicates(&mut h, "sqlite").await;
    // A late redelivery still finds the record (ttl 96h).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let late = h
        .signed(&event_body(
            "evt_sqlite_a",
            "payment_intent.succeeded",
            paid(2500),
            9,
        ))
        .await;
    assert_eq!(late.status, StatusCode::OK);
    assert!(late.replayed);
    assert_eq!(h.ledger.effects(), events);
    println!(
        "@figures signed_webhook_sqlite deliveries={} events={events} effects={} duplicates={} rejected={}",
        h.deliveries,
        h.ledger.effects(),
        duplicates + 1,
        h.ledger.rejected()
    );
}
