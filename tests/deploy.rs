//! A rolling deploy: two builds of one small payments service share one store at the same time.
//!
//! - **v1**: `billing::charge`, returning `billing::Receipt { id, amount }`.
//! - **v2**, the refactored build: the function moved to `payments::api::create_charge`, its
//!   result type renamed to `PaymentReceipt`, with a new field `currency` that has
//!   `#[serde(default)]`. Both say `name = "deploy.charge"`.
//! - **v3**, an incompatible build: `id` became a number. **v4**: v1's types, but `version = 1`.
//!
//! The builds are modules of this test binary, each run as its own process (this binary run again
//! with `--exact deploy_worker`), so two processes with different code and different type names
//! use one store at once, as during a deploy. Each body appends a line to a ledger file the moment
//! it starts (before any `.await`), so a body run twice shows as two lines.
//!
//! Checked on SQLite (a shared file), Redis and PostgreSQL:
//! - v1 and v2 run at the same time over the same orders, twice each, in opposite orders (so the
//!   calls of one order alternate between the builds): every order's body ran exactly once, every
//!   call of an order got the same receipt id, and each build replayed receipts the other wrote;
//! - records written by v1 are `TypeMismatch` for v3 and v4, and records written by v3 are
//!   `TypeMismatch` for v1: refused in both directions, and nothing runs again.
//!
//! `IDEM_DEPLOY_ORDERS` (default 30) sets the number of orders per store.
//!
//! ```text
//! IDEM_REQUIRE_SERVICES=1 cargo test --all-features --test deploy -- --nocapture
//! ```
#![cfg(all(feature = "sqlite", feature = "redis", feature = "postgres"))]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use idempotency::{Error, Store};

/// Appends one line per body start to a file shared by the worker processes.
struct Ledger(PathBuf);

impl Ledger {
    fn ran(&self, order: u64, build: &str) {
        idem_support::append_line(&self.0, &format!("{order} {build}\n"));
    }
}

mod v1 {
    pub mod billing {
        use std::sync::Arc;

        use idempotency::{idempotent, Error, Store};
        use serde::{Deserialize, Serialize};

        use crate::Ledger;

        #[derive(Debug, Serialize, Deserialize)]
        pub struct Receipt {
            pub id: String,
            pub amount: u64,
        }

        #[idempotent(name = "deploy.charge", key = order, store = store.clone(), skip(store, ledger), lease = "5s")]
        pub async fn charge(
            store: Arc<dyn Store>,
            ledger: Arc<Ledger>,
            order: u64,
            amount: u64,
        ) -> Result<Receipt, Error> {
            ledger.ran(order, "v1");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Ok(Receipt {
                id: format!("v1-{order}-{:08x}", rand::random::<u32>()),
                amount,
            })
        }
    }
}

mod v2 {
    pub mod payments {
        pub mod api {
            use std::sync::Arc;

            use idempotency::{idempotent, Error, Store};
            use serde::{Deserialize, Serialize};

            use crate::Ledger;

            #[derive(Debug, Serialize, Deserialize)]
            pub struct PaymentReceipt {
                pub id: String,
                pub amount: u64,
                #[serde(default)]
                pub currency: String,
            }

            #[idempotent(name = "deploy.charge", key = order, store = store.clone(), skip(store, ledger), lease = "5s")]
            pub async fn create_charge(
                store: Arc<dyn Store>,
                ledger: Arc<Ledger>,
                order: u64,
                amount: u64,
            ) -> Result<PaymentReceipt, Error> {
                ledger.ran(order, "v2");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(PaymentReceipt {
                    id: format!("v2-{order}-{:08x}", rand::random::<u32>()),
                    amount,
                    currency: "eur".into(),
                })
            }
        }
    }
}

mod v3 {
    use std::sync::Arc;

    use idempotency::{idempotent, Error, Store};
    use serde::{Deserialize, Serialize};

    use crate::Ledger;

    /// Incompatible: `id` is a number now, and nobody raised `version`.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Receipt {
        pub id: u64,
        pub amount: u64,
    }

    #[idempotent(name = "deploy.charge", key = order, store = store.clone(), skip(store, ledger), lease = "5s")]
    pub async fn charge(
        store: Arc<dyn Store>,
        ledger: Arc<Ledger>,
        order: u64,
        amount: u64,
    ) -> Result<Receipt, Error> {
        ledger.ran(order, "v3");
        Ok(Receipt { id: order, amount })
    }
}

mod v4 {
    use std::sync::Arc;

    use idempotency::{idempotent, Error, Store};

    use crate::v1::billing::Receipt;
    use crate::Ledger;

    /// v1's types, but the schema version was raised.
    #[idempotent(name = "deploy.charge", key = order, store = store.clone(), skip(store, ledger), lease = "5s", version = 1)]
    pub async fn charge(
        store: Arc<dyn Store>,
        ledger: Arc<Ledger>,
        order: u64,
        amount: u64,
    ) -> Result<Receipt, Error> {
        ledger.ran(order, "v4");
        Ok(Receipt {
            id: format!("v4-{order}"),
            amount,
        })
    }
}

/// One call of `build` for `order`: the receipt id, or what went wrong.
async fn call(build: &str, store: &Arc<dyn Store>, ledger: &Arc<Ledger>, order: u64) -> String {
    let amount = 500 + order % 7;
    let out: Result<String, Error> = match build {
        "v1" => v1::billing::charge(store.clone(), ledger.clone(), order, amount)
            .await
            .map(|r| r.id),
        "v2" => v2::payments::api::create_charge(store.clone(), ledger.clone(), order, amount)
            .await
            .map(|r| r.id),
        "v3" => v3::charge(store.clone(), ledger.clone(), order, amount)
            .await
            .map(|r| format!("v3-{}", r.id)),
        "v4" => v4::charge(store.clone(), ledger.clone(), order, amount)
            .await
            .map(|r| r.id),
        other => panic!("unknown build {other}"),
    };
    match out {
        Ok(id) => format!("ok {id}"),
        Err(Error::TypeMismatch { .. }) => "mismatch".into(),
        Err(Error::InFlight { .. }) => "inflight".into(),
        Err(e) => format!("error {e}"),
    }
}

/// The worker process: runs one build over a list of orders, printing one line per call.
#[test]
fn deploy_worker() {
    let Ok(build) = std::env::var("DEPLOY_BUILD") else {
        return; // the test run itself, not a worker
    };
    let url = std::env::var("DEPLOY_STORE").expect("DEPLOY_STORE");
    let ledger = Arc::new(Ledger(
        std::env::var("DEPLOY_LEDGER").expect("ledger").into(),
    ));
    let orders: Vec<u64> = std::env::var("DEPLOY_ORDERS")
        .expect("DEPLOY_ORDERS")
        .split(',')
        .map(|o| o.parse().expect("order"))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = idempotency::connect(&url).await.expect("store");
        for order in orders {
            // A retry while the other build's call of this order runs: try again, bounded.
            let mut answer = call(&build, &store, &ledger, order).await;
            for _ in 0..500 {
                if answer != "inflight" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer = call(&build, &store, &ledger, order).await;
            }
            println!("DEPLOY {order} {build} {answer}");
        }
    });
}

/// Runs the builds at the same time, each over its own list of orders; returns every answer.
fn run_builds(url: &str, ledger: &Path, runs: &[(&str, Vec<u64>)]) -> Vec<(u64, String, String)> {
    let exe = std::env::current_exe().expect("the test binary");
    let children: Vec<_> = runs
        .iter()
        .map(|(build, orders)| {
            let orders: Vec<String> = orders.iter().map(u64::to_string).collect();
            Command::new(&exe)
                .args([
                    "--exact",
                    "deploy_worker",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("DEPLOY_BUILD", build)
                .env("DEPLOY_STORE", url)
                .env("DEPLOY_LEDGER", ledger)
                .env("DEPLOY_ORDERS", orders.join(","))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("worker")
        })
        .collect();
    let mut answers = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("worker output");
        assert!(out.status.success(), "worker failed: {out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // libtest may print `test deploy_worker ... ` on the same line as the first answer.
            let Some(at) = line.find("DEPLOY ") else {
                continue;
            };
            let rest = &line[at + "DEPLOY ".len()..];
            let mut parts = rest.splitn(3, ' ');
            let order = parts.next().unwrap().parse().unwrap();
            let build = parts.next().unwrap().to_owned();
            answers.push((order, build, parts.next().unwrap().to_owned()));
        }
    }
    answers
}

/// Body starts per order, from the ledger.
fn starts(ledger: &Path) -> BTreeMap<u64, Vec<String>> {
    let mut starts: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(ledger).unwrap_or_default().lines() {
        let (order, build) = line.split_once(' ').unwrap();
        starts
            .entry(order.parse().unwrap())
            .or_default()
            .push(build.to_owned());
    }
    starts
}

fn deploy(name: &str, url: &str) {
    let count: u64 = std::env::var("IDEM_DEPLOY_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let base = u64::from(rand::random::<u32>()) * 1_000;

    // Rolling: v1 and v2 at once, over the same orders, in opposite orders, twice.
    let orders: Vec<u64> = (base..base + count).collect();
    let reversed: Vec<u64> = orders.iter().rev().copied().collect();
    let calls = 4 * orders.len();
    let mut answers = run_builds(
        url,
        &ledger,
        &[("v1", orders.clone()), ("v2", reversed.clone())],
    );
    answers.extend(run_builds(
        url,
        &ledger,
        &[("v1", reversed), ("v2", orders.clone())],
    ));
    assert_eq!(answers.len(), calls, "{name}: every call answered");
    let starts_by_order = starts(&ledger);
    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let (mut v1_replayed_v2, mut v2_replayed_v1) = (0, 0);
    for (order, build, answer) in &answers {
        let id = answer
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("{name}: order {order} via {build}: {answer}"));
        ids.entry(*order).or_default().insert(id.to_owned());
        match (build.as_str(), &id[..2]) {
            ("v1", "v2") => v1_replayed_v2 += 1,
            ("v2", "v1") => v2_replayed_v1 += 1,
            _ => {}
        }
    }
    for order in &orders {
        let ran = starts_by_order.get(order).map_or(0, Vec::len);
        assert_eq!(ran, 1, "{name}: order {order} ran {ran} times");
        assert_eq!(
            ids[order].len(),
            1,
            "{name}: order {order} got {:?}",
            ids[order]
        );
    }
    assert!(
        v1_replayed_v2 > 0 && v2_replayed_v1 > 0,
        "{name}: each build replays the other's records (v1 of v2: {v1_replayed_v2}, v2 of v1: {v2_replayed_v1})"
    );

    // Incompatible builds: refused in both directions, nothing runs again.
    let written_by_v1: Vec<u64> = (base + count..base + count + 5).collect();
    let written_by_v3: Vec<u64> = (base + count + 5..base + count + 10).collect();
    let mut first = run_builds(
        url,
        &ledger,
        &[("v1", written_by_v1.clone()), ("v3", written_by_v3.clone())],
    );
    first.retain(|(_, _, answer)| !answer.starts_with("ok "));
    assert!(first.is_empty(), "{name}: {first:?}");
    let refused = run_builds(
        url,
        &ledger,
        &[
            ("v3", written_by_v1.clone()),
            ("v4", written_by_v1.clone()),
            ("v1", written_by_v3.clone()),
        ],
    );
    assert_eq!(refused.len(), 15, "{name}: {refused:?}");
    for (order, build, answer) in &refused {
        assert_eq!(answer, "mismatch", "{name}: order {order} via {build}");
    }
    let starts_by_order = starts(&ledger);
    for order in written_by_v1.iter().chain(&written_by_v3) {
        assert_eq!(starts_by_order[order].len(), 1, "{name}: order {order}");
    }
    println!(
        "{name}: {count} orders through v1 and v2 at once, {} calls, 0 re-runs; v1 replayed v2's receipt {v1_replayed_v2} times, v2 replayed v1's {v2_replayed_v1} times; {} calls of incompatible builds refused with TypeMismatch, 0 re-runs",
        answers.len(),
        refused.len()
    );
}

#[test]
fn rolling_deploy_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("deploy.sqlite").display());
    deploy("sqlite", &url);
}

#[test]
fn rolling_deploy_on_redis() {
    let url = idem_support::redis_url();
    if reachable(&url) {
        deploy("redis", &url);
    }
}

#[test]
fn rolling_deploy_on_postgres() {
    let url = idem_support::postgres::url();
    if reachable(&url) {
        deploy("postgres", &url);
    }
}

/// Whether the store at `url` answers; if not, the fixtures' rule: a failure under
/// `IDEM_REQUIRE_SERVICES=1`, else a printed skip.
fn reachable(url: &str) -> bool {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    match runtime.block_on(idempotency::connect(url)) {
        Ok(_) => true,
        Err(e) => {
            idem_support::unavailable(url, e);
            false
        }
    }
}
