//! Section 3, the local cache tier (feature `redis`): a replay through `LocalCache` in front of
//! Redis against a replay from Redis itself and from the memory store, in the same run, and the
//! Redis commands a local hit sends, counted by the server (`INFO stats`
//! `total_commands_processed`, less the `INFO` itself): none.

use std::time::Instant;

use idempotency::redis::redis::{self, aio::MultiplexedConnection};
use idempotency::{LocalCache, MemoryStore, RedisStore};

use crate::measure::{call, Res};
use crate::Report;

/// Hits per measured round, and rounds (the median is reported).
const HITS: u64 = 5_000;
const ROUNDS: usize = 5;

pub(crate) async fn run(r: &mut Report) {
    if let Err(e) = measure(r).await {
        eprintln!("bench_report: the local cache tier was not measured: {e}");
        r.row("local cache tier", format!("not measured: {e}"));
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Median ns per hit of `store` on one order, already answered.
async fn hit_ns<S: idempotency::Store + Clone + 'static>(store: &S, order: u64) -> Res<f64> {
    call(store, order).await?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..HITS {
            call(store, order).await?;
        }
        rounds.push(start.elapsed().as_nanos() as f64 / HITS as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[ROUNDS / 2])
}

async fn commands_processed(admin: &mut MultiplexedConnection) -> Res<u64> {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(admin)
        .await
        .map_err(err)?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO stats without total_commands_processed".to_string())
}

async fn measure(r: &mut Report) -> Res<()> {
    let url = idem_support::redis_url();
    let prefix = format!("idem-bench-local-{}:", crate::fresh_ids());
    let redis = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .map_err(err)?;
    let local = LocalCache::new(redis.clone());
    let memory = MemoryStore::new();
    let mut admin = idem_support::redis::connect(&url).await?;
    let order = crate::fresh_ids();

    let redis_ns = hit_ns(&redis, order).await?;
    let local_ns = hit_ns(&local, order + 1).await?;
    let memory_ns = hit_ns(&memory, order + 2).await?;

    // Commands the server processed while this process replayed locally.
    let before = commands_processed(&mut admin).await?;
    for _ in 0..HITS {
        call(&local, order + 1).await?;
    }
    let after = commands_processed(&mut admin).await?;
    // The second INFO is counted once processed; other clients of a shared server would add
    // theirs, so this is an upper bound.
    let per_hit = after.saturating_sub(before + 1) as f64 / HITS as f64;

    r.row(
        "Redis hit (replay), #[idempotent] on RedisStore",
        format!("{redis_ns:>9.0} ns"),
    );
    r.row(
        "local cache tier hit: LocalCache in front of Redis",
        format!(
            "{local_ns:>9.0} ns   {:.1}x faster than Redis; {:.2}x the memory store's hit ({memory_ns:.0} ns)",
            redis_ns / local_ns,
            local_ns / memory_ns
        ),
    );
    r.row(
        "Redis commands per local hit (server's count)",
        format!("{per_hit:>9.3}"),
    );
    r.field("redis_hit_ns", redis_ns);
    r.field("local_cache_redis_hit_ns", local_ns);
    r.field("local_cache_memory_hit_ns", memory_ns);
    r.field("redis_commands_per_local_hit", per_hit);

    // Remove what this part wrote.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut admin)
        .await
        .map_err(err)?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut admin)
            .await
            .map_err(err)?;
    }
    Ok(())
}
