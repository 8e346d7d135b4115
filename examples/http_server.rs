//! A small payments API whose `POST /payments` is safe to retry, with
//! `idempotency::http::IdempotencyLayer` on an axum router.
//!
//! ```text
//! cargo run --example http_server --features http
//! ```
//!
//! Environment:
//! - `PORT`: where to listen on 127.0.0.1 (default 3000);
//! - `PAYMENT_DELAY_MS`: how long the simulated payment processor takes (default 300);
//! - `IDEM_STORE`: `memory` (default), `sqlite:PATH`, `redis://...` or `postgres://...`
//!   (with the matching cargo feature);
//! - `RUST_LOG`: log filter (default `info,idem=debug`).
//!
//! Built with the `metrics` feature too (`--features http,metrics`), it serves idem's counters
//! and histograms at `GET /metrics` in the Prometheus text format
//! (`metrics-exporter-prometheus`; the names are listed in `idempotency::metrics`).
//!
//! ```text
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: order-1' \
//!      -H 'Content-Type: application/json' -d '{"amount": 500, "currency": "usd"}'
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotency::http::IdempotencyLayer;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Clone, Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    status: &'static str,
    created: u64,
}

struct AppState {
    payments: Mutex<HashMap<String, Payment>>,
    processor_delay: Duration,
}

/// Charges a payment: the call a client must be able to retry without paying twice.
async fn create_payment(
    State(state): State<Arc<AppState>>,
    Json(req): Json<NewPayment>,
) -> impl IntoResponse {
    // The payment processor takes its time; a client that times out will retry.
    tokio::time::sleep(state.processor_delay).await;
    let payment = Payment {
        id: format!("pay_{:016x}", rand::random::<u64>()),
        amount: req.amount,
        currency: req.currency,
        status: "succeeded",
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    tracing::info!(id = %payment.id, amount = payment.amount, currency = %payment.currency, "charged");
    state
        .payments
        .lock()
        .unwrap()
        .insert(payment.id.clone(), payment.clone());
    let location = format!("/payments/{}", payment.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    )
}

/// Reads a payment (a GET: the idempotency layer passes it through).
async fn get_payment(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, StatusCode> {
    state
        .payments
        .lock()
        .unwrap()
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

/// `GET /metrics`: what idem (and anything else using the `metrics` crate) recorded, in the
/// Prometheus text format, from a recorder installed for this process.
#[cfg(feature = "metrics")]
fn metrics_route() -> Result<Router, Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::PrometheusBuilder;
    let handle = PrometheusBuilder::new().install_recorder()?;
    // A recorder installed after idem first counted something would miss the descriptions.
    idempotency::metrics::describe();
    Ok(Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,idem=debug")),
        )
        .init();

    let port: u16 = std::env::var("PORT")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(3000);
    let delay_ms: u64 = std::env::var("PAYMENT_DELAY_MS")
        .ok()
        .map(|d| d.parse())
        .transpose()?
        .unwrap_or(300);
    let store_url = std::env::var("IDEM_STORE").unwrap_or_else(|_| "memory".to_owned());
    let store = idempotency::connect(&store_url).await?;

    let state = Arc::new(AppState {
        payments: Mutex::new(HashMap::new()),
        processor_delay: Duration::from_millis(delay_ms),
    });
    // One namespace per client, here its `Authorization` header: two clients that pick the same
    // key never see each other's payments. A request without the header, or with one that is
    // not visible ASCII, is refused with 401 and never charged: it is not put in a scope shared
    // with other unknown clients. (A real service would use the principal its authentication
    // layer found, added with `.layer(auth)` after this layer so that it runs first.)
    let idempotency = IdempotencyLayer::per_client(store, |req| {
        let credentials = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        (!credentials.is_empty()).then(|| credentials.to_owned())
    })
    // Replay the new payment's URL too, not only its content type and body.
    .replay_headers([header::LOCATION])
    // One client may keep at most 10 000 payments (or 64 MiB of them) in the store at a time.
    .limit_per_scope(10_000, 64 << 20)
    .ttl(Duration::from_secs(24 * 3600));
    let app = Router::new()
        .route("/payments", post(create_payment))
        .route("/payments/{id}", get(get_payment))
        .with_state(state)
        .layer(idempotency);
    #[cfg(feature = "metrics")]
    let app = app.merge(metrics_route()?);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(
        "payments API on http://{} (store: {store_url}, processor delay: {delay_ms} ms)",
        listener.local_addr()?
    );
    // On SIGTERM (a deploy) or Ctrl-C: stop taking requests, then drain the handlers whose
    // clients left (they run on by themselves). Returning from `main` without the drain would
    // drop them mid-way, as a crash would.
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let report = idempotency::drain(Duration::from_secs(20)).await;
    tracing::info!(?report, "drained");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
