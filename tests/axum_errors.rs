//! An axum handler that calls an `#[idempotent]` function and uses `?` on its
//! `idempotency::Error` (feature `axum`): the error becomes the problem+json response the HTTP
//! layer would send for it. Against a real server on 127.0.0.1 (port 0), driven by a real client.
#![cfg(feature = "axum")]

use idem_support::DownStore;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idempotency::{idempotent, MemoryStore, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    order: String,
    amount: u64,
}

#[derive(Deserialize)]
struct PayRequest {
    amount: u64,
}

/// The payment processor: each charge waits for a permit of `gate` after it started.
struct Processor {
    store: Arc<dyn Store>,
    runs: AtomicUsize,
    started: Notify,
    gate: Semaphore,
}

impl Processor {
    fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Processor {
            store,
            runs: AtomicUsize::new(0),
            started: Notify::new(),
            gate: Semaphore::new(0),
        })
    }

    fn runs(&self) -> usize {
        self.runs.load(SeqCst)
    }

    #[idempotent(name = "payments.charge", key = order.clone(), store = self.store.clone())]
    async fn charge(&self, order: String, amount: u64) -> Result<Receipt, idempotency::Error> {
        self.runs.fetch_add(1, SeqCst);
        self.started.notify_one();
        self.gate.acquire().await.unwrap().forget();
        Ok(Receipt {
            id: format!("pay_{:016x}", rand::random::<u64>()),
            order,
            amount,
        })
    }
}

/// `POST /pay/{order}`: `?` turns the idempotency error into its response.
async fn pay(
    State(processor): State<Arc<Processor>>,
    Path(order): Path<String>,
    Json(req): Json<PayRequest>,
) -> Result<Json<Receipt>, idempotency::Error> {
    Ok(Json(processor.charge(order, req.amount).await?))
}

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    /// Checks this is a problem document of `status` and type `#slug`, that it names no
    /// storage key (64 hex digits), and returns it.
    fn problem(&self, status: u16, slug: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.headers[CONTENT_TYPE], "application/problem+json");
        let doc: Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(doc["status"], status);
        let r#type = doc["type"].as_str().unwrap();
        assert!(r#type.ends_with(&format!("#{slug}")), "{doc}");
        for member in ["title", "detail"] {
            assert!(doc[member].as_str().is_some_and(|s| !s.is_empty()), "{doc}");
        }
        let text = String::from_utf8_lossy(&self.body);
        let longest_hex_run = text
            .split(|c: char| !c.is_ascii_hexdigit())
            .map(str::len)
            .max();
        assert!(longest_hex_run < Some(64), "no storage key in {text}");
        doc
    }
}

async fn serve(processor: Arc<Processor>) -> Server {
    let router = Router::new()
        .route("/pay/{order}", post(pay))
        .with_state(processor);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Server {
    async fn pay(&self, order: &str, amount: u64) -> Reply {
        let request = Request::post(format!("http://{}/pay/{order}", self.addr))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(format!(r#"{{"amount":{amount}}}"#))))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let (head, body) = response.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

#[tokio::test]
async fn a_call_in_flight_is_409_with_retry_after_then_the_result_is_replayed() {
    let processor = Processor::new(Arc::new(MemoryStore::new()));
    let s = Arc::new(serve(processor.clone()).await);
    let first = tokio::spawn({
        let s = s.clone();
        async move { s.pay("order-1", 500).await }
    });
    processor.started.notified().await;

    // The same order while the first charge holds its key: 409, the body did not run again.
    let conflict = s.pay("order-1", 500).await;
    conflict.problem(409, "request-in-progress");
    assert_eq!(conflict.headers[RETRY_AFTER], "1");
    // The same key with other arguments: 422.
    s.pay("order-1", 900).await.problem(422, "key-reused");
    assert_eq!(processor.runs(), 1);

    processor.gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let receipt: Receipt = serde_json::from_slice(&first.body).unwrap();
    assert_eq!((receipt.order.as_str(), receipt.amount), ("order-1", 500));

    // Later: 200 with the first charge's receipt, replayed; the body ran once.
    let later = s.pay("order-1", 500).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Receipt>(&later.body).unwrap(),
        receipt
    );
    assert_eq!(processor.runs(), 1);
}

#[tokio::test]
async fn a_store_failure_is_503_with_retry_after_and_no_backend_detail() {
    let processor = Processor::new(Arc::new(DownStore {
        message: "connection to redis://:hunter2@db.internal refused",
    }));
    let s = serve(processor.clone()).await;
    let reply = s.pay("order-1", 500).await;
    reply.problem(503, "store-unavailable");
    assert_eq!(reply.headers[RETRY_AFTER], "1");
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        !text.contains("hunter2") && !text.contains("db.internal"),
        "{text}"
    );
    assert_eq!(processor.runs(), 0, "no claim, no run");
}
