//! Issue 24, the idem side: the workload of `benches/powertools_dynamodb/powertools.py` (AWS
//! Powertools' `idempotent_function` on DynamoDB) through `#[idempotent]` on [`DynamoDbStore`],
//! against the same local DynamoDB server behind the same counting proxy.
//!
//! ```text
//! benches/powertools_dynamodb/run.sh            # both sides in one run, and the table
//! cargo run --release --example dynamodb_vs_powertools --features dynamodb -- \
//!     --endpoint http://127.0.0.1:8024 --table idem_issue24 --n 200
//! ```
//!
//! `--endpoint` is `benches/powertools_dynamodb/count_proxy.py`, which counts every request by
//! its `X-Amz-Target` and the time the server took to answer it (`GET /__counts`, `/__times`). The example runs N first calls (misses: the
//! body runs) and N replays of the same keys (hits), reads the proxy's counts and times around
//! each batch, and checks that the body ran once per miss, never on a hit, and that every replay
//! returned the first call's result. The baseline is a raw `GetItem` of one existing item from
//! the store's own SDK client, through the same proxy, in the same run; the three kinds of call
//! alternate in 5 rounds. Prints one JSON object on stdout (the driver's input) and a summary on
//! stderr. The rounds stop after `--max-seconds` (120).

use std::collections::BTreeMap;
use std::future::Future;
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use idempotency::{idempotent, DynamoDbStore};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The call's input: Powertools hashes this whole payload into its key; idem keys by the id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order_id: String,
    amount: u64,
}

/// The call's result, stored by the first call and replayed to the others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Charged {
    order_id: String,
    charged: u64,
}

/// How many times the body really ran.
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

/// The same body as the Powertools side: one hour of ttl, the default fingerprint.
#[idempotent(name = "issue24.charge", key = order.order_id, ttl = "1h", store = store, skip(store))]
async fn charge(store: &DynamoDbStore, order: Order) -> Result<Charged, idempotency::Error> {
    BODY_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Charged {
        order_id: order.order_id,
        charged: order.amount,
    })
}

struct Args {
    endpoint: String,
    table: String,
    n: u64,
    max_seconds: f64,
}

fn args() -> Args {
    let mut a = Args {
        endpoint: String::new(),
        table: "idem_issue24".into(),
        n: 200,
        max_seconds: 120.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--endpoint" => a.endpoint = value,
            "--table" => a.table = value,
            "--n" => a.n = value.parse().unwrap_or_else(|_| usage("--n: a number")),
            "--max-seconds" => {
                a.max_seconds = value
                    .parse()
                    .unwrap_or_else(|_| usage("--max-seconds: a number"))
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.endpoint.is_empty() || a.n == 0 {
        usage("--endpoint is required, --n at least 1");
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!(
        "dynamodb_vs_powertools: {why}\nusage: --endpoint http://127.0.0.1:PORT [--table T] [--n N] [--max-seconds S]"
    );
    exit(2)
}

/// The proxy's requests (`what = "counts"`) or upstream ns (`"times"`) so far, by operation.
async fn read_proxy(endpoint: &str, what: &str) -> BTreeMap<String, u64> {
    let addr = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| usage("the endpoint is the proxy's http:// address"))
        .trim_end_matches('/');
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(format!("GET /__{what} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => fail(&format!("reading the proxy's counts at {addr}: {e}")),
        Err(_) => fail(&format!(
            "reading the proxy's counts at {addr}: no answer in 5 s"
        )),
    };
    let reply = String::from_utf8_lossy(&reply);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_else(|| fail("the proxy's answer has no body"));
    serde_json::from_str(body).unwrap_or_else(|e| fail(&format!("the proxy's counts: {e}")))
}

/// Rounds of baseline, misses and hits, as on the Powertools side.
const ROUNDS: u64 = 5;

/// One kind of call: calls made, their total time, and the proxy's counts across them.
#[derive(Default)]
struct Phase {
    calls: u64,
    ns: u128,
    requests: BTreeMap<String, u64>,
    server_ns: u64,
}

impl Phase {
    /// Runs `f(i)` for each of `keys`, timed, between two readings of the proxy's counts.
    async fn measure<F, Fut>(&mut self, endpoint: &str, keys: std::ops::Range<u64>, mut f: F)
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (before, before_ns) = (
            read_proxy(endpoint, "counts").await,
            read_proxy(endpoint, "times").await,
        );
        let start = Instant::now();
        for i in keys.clone() {
            f(i).await;
        }
        self.ns += start.elapsed().as_nanos();
        let (after, after_ns) = (
            read_proxy(endpoint, "counts").await,
            read_proxy(endpoint, "times").await,
        );
        self.server_ns += after_ns.values().sum::<u64>() - before_ns.values().sum::<u64>();
        self.calls += keys.end - keys.start;
        for (op, n) in after {
            let d = n - before.get(&op).copied().unwrap_or(0);
            if d > 0 {
                *self.requests.entry(op).or_default() += d;
            }
        }
    }

    fn report(&self) -> Value {
        let per_call: serde_json::Map<String, Value> = self
            .requests
            .iter()
            .map(|(op, n)| (op.clone(), json!(*n as f64 / self.calls as f64)))
            .collect();
        json!({
            "calls": self.calls,
            "ns_per_call": self.ns as f64 / self.calls as f64,
            "server_ns_per_call": self.server_ns as f64 / self.calls as f64,
            "requests_per_call": per_call,
        })
    }
}

fn fail(why: &str) -> ! {
    eprintln!("dynamodb_vs_powertools: {why}");
    exit(1)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    let url = format!(
        "dynamodb://{}?region=us-east-1&endpoint={}",
        a.table, a.endpoint
    );
    let store = DynamoDbStore::connect(&url)
        .await
        .unwrap_or_else(|e| fail(&format!("connecting to {url}: {e}")));
    let client = store.client().clone();
    let run = format!("{:012x}", rand::random::<u64>() >> 16);
    let order = |phase: &str, i: u64| Order {
        order_id: format!("{run}-{phase}-{i}"),
        amount: i,
    };

    // The baseline's item (in the store's table, under a key no storage key can take: those
    // are 64 hex digits), and a warm-up of every path.
    let base_key = AttributeValue::S(format!("baseline-{run}"));
    client
        .put_item()
        .table_name(&a.table)
        .item("pk", base_key.clone())
        .item("v", AttributeValue::S("x".into()))
        .send()
        .await
        .unwrap_or_else(|e| fail(&format!("PutItem of the baseline's item: {e}")));
    let get = || async {
        client
            .get_item()
            .table_name(&a.table)
            .key("pk", base_key.clone())
            .send()
            .await
            .unwrap_or_else(|e| fail(&format!("GetItem: {e}")));
    };
    let call = |o: Order| {
        let store = &store;
        async move {
            charge(store, o)
                .await
                .unwrap_or_else(|e| fail(&format!("charge: {e}")))
        }
    };
    for i in 0..5 {
        get().await;
        call(order("warm", i)).await;
        call(order("warm", i)).await;
    }

    // ROUNDS rounds of: GetItem (the baseline), first calls of new keys, replays of those keys,
    // so that the machine's load moves all three alike. Bounded by --max-seconds overall.
    let (mut base, mut miss, mut hit) = (Phase::default(), Phase::default(), Phase::default());
    let per_round = a.n.div_ceil(ROUNDS);
    let deadline = Instant::now() + Duration::from_secs_f64(a.max_seconds);
    for r in 0..ROUNDS {
        if Instant::now() > deadline {
            break;
        }
        let keys = r * per_round..((r + 1) * per_round).min(a.n);
        base.measure(&a.endpoint, keys.clone(), |_| get()).await;
        let before = BODY_RUNS.load(Ordering::SeqCst);
        miss.measure(&a.endpoint, keys.clone(), |i| async move {
            call(order("k", i)).await;
        })
        .await;
        let ran = BODY_RUNS.load(Ordering::SeqCst) - before;
        if ran != keys.end - keys.start {
            fail(&format!(
                "the body ran {ran} times on {} misses",
                keys.end - keys.start
            ));
        }
        let before = BODY_RUNS.load(Ordering::SeqCst);
        hit.measure(&a.endpoint, keys.clone(), |i| async move {
            let want = Charged {
                order_id: order("k", i).order_id,
                charged: i,
            };
            let got = call(order("k", i)).await;
            if got != want {
                fail(&format!("replay {i} returned {got:?}"));
            }
        })
        .await;
        let ran = BODY_RUNS.load(Ordering::SeqCst) - before;
        if ran != 0 {
            fail(&format!(
                "the body ran {ran} times on {} hits",
                keys.end - keys.start
            ));
        }
    }

    let mut baseline = base.report();
    baseline["name"] = json!("aws-sdk-dynamodb GetItem");
    let out = json!({
        "side": "idem",
        "versions": {"idempotency": env!("CARGO_PKG_VERSION")},
        "baseline": baseline,
        "miss": miss.report(),
        "hit": hit.report(),
    });
    println!("{out}");
    eprintln!(
        "idem: {}",
        ["miss", "hit", "baseline"]
            .map(|k| format!(
                "{k} {} {:.0} us",
                out[k]["requests_per_call"],
                out[k]["ns_per_call"].as_f64().unwrap_or(0.0) / 1e3
            ))
            .join(", ")
    );
}
