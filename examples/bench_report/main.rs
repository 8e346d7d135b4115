//! What idem costs, side by side with what users would use instead, measured in one run.
//!
//! ```text
//! cargo run --release --example bench_report --features redis,postgres         # a table
//! cargo run --release --example bench_report --features redis,postgres -- --json
//! cargo run --release --example bench_report --features redis,postgres -- wakeup  # section 5
//! ```
//!
//! Sections: (1) the in-memory hit and miss paths against a plain call, the `cached` crate and
//! a moka lookup; (2) contention; (3) Redis and PostgreSQL round trips and statements per call,
//! counted from the servers' own statistics, and calls per second against a raw client issuing
//! the same commands; (4) the first-request rate as the memory store fills to 1M records,
//! memory per record at 1M records and purge time against expired and live records; (5)
//! waking waiters in another process, with the stores' notification and with polling as
//! before it, wake-up latency and commands per waiter. Every figure is a ratio
//! against a baseline measured in the same run, a latency measured against the other side in
//! the same run, or a count. Runs in well under 3 minutes on 2 cores.
//!
//! Arguments naming sections (`memory`, `contention`, `stores`, `scale`, `wakeup`, `http`) run
//! only those; without any, all run.

#[cfg(feature = "http")]
mod http_part;
#[cfg(feature = "redis")]
mod local_part;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod measure;
#[cfg(feature = "postgres")]
mod postgres_part;
#[cfg(feature = "redis")]
mod redis_part;
mod scale;
mod stores;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod wakeup;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod wakeup_count;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod wakeup_report;

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use idem_support::workload::*;
use serde_json::{json, Map, Value};

/// Median ns per call of `f` over `rounds` rounds of `n` calls, each call given its index.
async fn ns_per_call<F, Fut>(rounds: usize, n: u64, mut f: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(rounds);
    let mut next = 0u64;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            f(next).await;
            next += 1;
        }
        samples.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

pub(crate) struct Report {
    fields: Map<String, Value>,
    lines: Vec<String>,
}

impl Report {
    pub(crate) fn section(&mut self, title: &str) {
        self.lines.push(String::new());
        self.lines.push(format!("## {title}"));
    }
    pub(crate) fn row(&mut self, label: &str, value: String) {
        self.lines.push(format!("  {label:<58} {value}"));
    }
    pub(crate) fn field(&mut self, name: &str, value: impl Into<Value>) {
        self.fields.insert(name.to_string(), value.into());
    }
}

/// The version of the `cached` crate this build compared against, as Cargo.lock pins it.
fn cached_crate_version() -> String {
    let lock = include_str!("../../Cargo.lock");
    lock.split("[[package]]")
        .find(|p| p.contains("\nname = \"cached\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map_or_else(|| "unknown".into(), |v| v.trim_matches('"').to_string())
}

/// Distinct order ids per measurement, so misses never hit an earlier measurement's record.
fn fresh_ids() -> u64 {
    rand::random::<u32>() as u64 * 1_000_000_000
}

async fn section_memory(r: &mut Report) {
    const N: u64 = 20_000;
    const ROUNDS: usize = 5;
    let warm = request(7);
    with_idem(warm.clone()).await.unwrap();
    with_idem_unfingerprinted(request(8)).await.unwrap();
    with_cached(warm.clone()).await.unwrap();
    with_moka(warm.clone()).await.unwrap();

    let plain_ns = ns_per_call(ROUNDS, N, |_| async {
        black_box(plain(black_box(warm.clone())).await.unwrap());
    })
    .await;
    let hit_ns = ns_per_call(ROUNDS, N, |_| async {
        black_box(with_idem(black_box(warm.clone())).await.unwrap());
    })
    .await;
    let hit_nofp_ns = ns_per_call(ROUNDS, N, |_| async {
        black_box(
            with_idem_unfingerprinted(black_box(request(8)))
                .await
                .unwrap(),
        );
    })
    .await;
    let cached_hit_ns = ns_per_call(ROUNDS, N, |_| async {
        black_box(with_cached(black_box(warm.clone())).await.unwrap());
    })
    .await;
    let moka_hit_ns = ns_per_call(ROUNDS, N, |_| async {
        black_box(with_moka(black_box(warm.clone())).await.unwrap());
    })
    .await;
    let base = fresh_ids();
    let miss_ns = ns_per_call(ROUNDS, N, |i| async move {
        black_box(with_idem(request(base + i)).await.unwrap());
    })
    .await;
    let plain_fresh_ns = ns_per_call(ROUNDS, N, |i| async move {
        black_box(plain(request(base + i)).await.unwrap());
    })
    .await;
    let base = fresh_ids();
    let cached_miss_ns = ns_per_call(ROUNDS, N, |i| async move {
        black_box(with_cached(request(base + i)).await.unwrap());
    })
    .await;

    r.section("1. in-memory store, ns per call (median of 5 x 20k calls)");
    r.row("plain call (no attribute)", format!("{plain_ns:>9.0} ns"));
    r.row(
        "#[idempotent] hit (replay)",
        format!(
            "{hit_ns:>9.0} ns   {:.2}x cached-crate hit",
            hit_ns / cached_hit_ns
        ),
    );
    r.row(
        "#[idempotent] hit, fingerprint = false",
        format!(
            "{hit_nofp_ns:>9.0} ns   {:.2}x cached-crate hit",
            hit_nofp_ns / cached_hit_ns
        ),
    );
    r.row(
        "cached crate #[cached] hit",
        format!("{cached_hit_ns:>9.0} ns"),
    );
    r.row("moka get_with hit", format!("{moka_hit_ns:>9.0} ns"));
    r.row(
        "#[idempotent] miss (first call)",
        format!(
            "{miss_ns:>9.0} ns   overhead {:.2} us over the plain call",
            (miss_ns - plain_fresh_ns) / 1000.0
        ),
    );
    r.row("cached crate miss", format!("{cached_miss_ns:>9.0} ns"));
    r.row(
        "target: hit <= 2x cached hit",
        verdict(hit_ns <= 2.0 * cached_hit_ns),
    );
    r.row(
        "target: miss overhead <= 3 us",
        verdict(miss_ns - plain_fresh_ns <= 3000.0),
    );
    r.field("plain_call_ns", plain_ns);
    r.field("memory_hit_ns", hit_ns);
    r.field("memory_hit_unfingerprinted_ns", hit_nofp_ns);
    r.field("memory_miss_ns", miss_ns);
    r.field("memory_miss_overhead_ns", miss_ns - plain_fresh_ns);
    r.field("cached_crate_hit_ns", cached_hit_ns);
    r.field("cached_crate_version", cached_crate_version());
    r.field("cached_crate_miss_ns", cached_miss_ns);
    r.field("moka_hit_ns", moka_hit_ns);
}

pub(crate) fn verdict(ok: bool) -> String {
    if ok {
        "reached".into()
    } else {
        "NOT reached".into()
    }
}

/// `tasks` tasks on a 2-worker runtime, each doing `per_task` hits over `keys` keys.
fn contention(tasks: usize, keys: u64, per_task: u64, moka: bool) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let base = fresh_ids();
        for k in 0..keys {
            if moka {
                with_moka(request(base + k)).await.unwrap();
            } else {
                with_idem(request(base + k)).await.unwrap();
            }
        }
        let reqs: Arc<Vec<ChargeRequest>> =
            Arc::new((0..keys).map(|k| request(base + k)).collect());
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let req = reqs[((t as u64 * 7919 + i) % keys) as usize].clone();
                        if moka {
                            black_box(with_moka(req).await.unwrap());
                        } else {
                            black_box(with_idem(req).await.unwrap());
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        (tasks as u64 * per_task) as f64 / start.elapsed().as_secs_f64()
    })
}

fn section_contention(r: &mut Report) {
    r.section("2. contention: hits per second on a 2-worker runtime (idem memory vs moka)");
    for tasks in [4usize, 64] {
        for keys in [10u64, 10_000] {
            let per_task = 200_000 / tasks as u64;
            let idem_rate = contention(tasks, keys, per_task, false);
            let moka_rate = contention(tasks, keys, per_task, true);
            r.row(
                &format!("{tasks:>2} tasks, {keys:>6} keys"),
                format!(
                    "{:>10.0}/s   moka {:>10.0}/s   ratio {:.2}",
                    idem_rate,
                    moka_rate,
                    idem_rate / moka_rate
                ),
            );
            r.field(&format!("contention_{tasks}t_{keys}k_per_sec"), idem_rate);
            r.field(
                &format!("contention_{tasks}t_{keys}k_moka_per_sec"),
                moka_rate,
            );
        }
    }
}

/// `--profile hit|miss|cached|plain|http-first|http-replay`: only run that path 20k times, for
/// `valgrind --tool=callgrind`.
fn profile(what: &str) {
    // `http-first`, `http-replay`: the IdempotencyLayer-wrapped router, without sockets.
    #[cfg(feature = "http")]
    if let Some(mode) = what.strip_prefix("http-") {
        return http_part::profile(mode);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let warm = request(7);
        with_idem(warm.clone()).await.unwrap();
        with_cached(warm.clone()).await.unwrap();
        let base = fresh_ids();
        for i in 0..20_000u64 {
            match what {
                "hit" => drop(black_box(with_idem(black_box(warm.clone())).await.unwrap())),
                "miss" => drop(black_box(with_idem(request(base + i)).await.unwrap())),
                "cached" => drop(black_box(
                    with_cached(black_box(warm.clone())).await.unwrap(),
                )),
                "plain" => drop(black_box(plain(black_box(warm.clone())).await.unwrap())),
                other => panic!("unknown profile {other}"),
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    #[cfg(any(feature = "redis", feature = "postgres"))]
    if args.get(1).map(String::as_str) == Some(wakeup::WAITER_FLAG) {
        return wakeup::waiter_main(&args[2..]);
    }
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        return profile(args.get(i + 1).map_or("hit", |s| s.as_str()));
    }
    let json_out = args.iter().any(|a| a == "--json");
    const SECTIONS: [&str; 6] = ["memory", "contention", "stores", "scale", "wakeup", "http"];
    let named: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(unknown) = named.iter().find(|a| !SECTIONS.contains(a)) {
        eprintln!("bench_report: unknown section {unknown}; sections: {SECTIONS:?}");
        std::process::exit(2);
    }
    let runs = |section: &str| named.is_empty() || named.contains(&section);
    let mut r = Report {
        fields: Map::new(),
        lines: vec!["# idem bench_report".into()],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if runs("memory") {
        rt.block_on(section_memory(&mut r));
    }
    if runs("contention") {
        section_contention(&mut r);
    }
    if runs("stores") {
        rt.block_on(stores::section_stores(&mut r));
    }
    if runs("scale") {
        rt.block_on(scale::section(&mut r));
    }
    if runs("wakeup") {
        #[cfg(any(feature = "redis", feature = "postgres"))]
        rt.block_on(wakeup_report::section(&mut r));
        #[cfg(not(any(feature = "redis", feature = "postgres")))]
        {
            r.section("5. waking waiters");
            r.row("not built", "run with --features redis,postgres".into());
        }
    }
    if runs("http") {
        #[cfg(feature = "http")]
        http_part::section(&mut r);
        #[cfg(not(feature = "http"))]
        {
            r.section("6. HTTP");
            r.row("not built", "run with --features http,redis".into());
        }
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(r.fields)).unwrap()
        );
    } else {
        println!("{}", r.lines.join("\n"));
    }
    let _ = json!(null);
}
