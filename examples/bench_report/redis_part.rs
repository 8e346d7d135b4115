//! Section 3, Redis: round trips per call from the server's `MONITOR` feed
//! (`idem_support::monitor`) and `INFO commandstats`, and calls per second against a raw client
//! sending the store's own `EVALSHA`s.

use std::collections::BTreeMap;
use std::time::Duration;

use idem_support::monitor::{self, Monitor};
use idempotency::redis::redis::aio::{ConnectionManager, MultiplexedConnection};
use idempotency::redis::redis::{self, IntoConnectionInfo, ProtocolVersion, Value};
use idempotency::{RedisStore, StorageKey};

use crate::measure::*;

pub(crate) async fn run(r: &mut Report) {
    let url = idem_support::redis::url();
    let admin = match idem_support::redis::connect(&url).await {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("bench_report: Redis unreachable ({e}); skipping its part");
            r.row("Redis (IDEM_REDIS_URL): unreachable, part skipped", e);
            return;
        }
    };
    let prefix = format!("idem-bench-{:016x}", rand::random::<u64>());
    if let Some(side) =
        std::env::args().find_map(|a| a.strip_prefix(PROFILE_FLAG).map(str::to_owned))
    {
        let outcome = within(
            Duration::from_secs(600),
            profile(&side, &url, &prefix, &admin),
        )
        .await;
        idem_support::redis::delete_prefix(&prefix);
        if let Err(e) = outcome {
            eprintln!("bench_report: Redis profile stopped: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    let outcome = within(Duration::from_secs(30), measure(r, &url, &prefix, &admin)).await;
    if let Err(e) = outcome {
        eprintln!("bench_report: Redis part stopped: {e}");
        r.row("Redis: stopped", e);
    }
    // The section's records and fences.
    idem_support::redis::delete_prefix(&prefix);
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// `bench_report stores --redis-profile=idem` (or `=raw`): instead of the section, only
/// [`PROFILE_HITS`] hits by [`TASKS`] concurrent tasks, through the store (`idem`) or the raw
/// client sending the store's `EVALSHA` (`raw`), then exit: for a profiler, e.g.
/// `valgrind --tool=callgrind --toggle-collect='*redis_part*hits*' <binary> stores --redis-profile=idem`.
const PROFILE_FLAG: &str = "--redis-profile=";
/// Hits of a profile run.
const PROFILE_HITS: u64 = 20_000;

async fn profile(side: &str, url: &str, prefix: &str, admin: &MultiplexedConnection) -> Res<()> {
    let (store, raw) = connect(url, prefix).await?;
    let hit_id = fresh_ids();
    call(&store, hit_id).await?;
    call(&store, hit_id).await?;
    let seen = monitor(url, admin, prefix, &store, hit_id).await?;
    let hit_claim = seen
        .hit_sent
        .first()
        .ok_or("no hit claim in the MONITOR feed")?;
    let per_task = PROFILE_HITS / TASKS as u64;
    let started = std::time::Instant::now();
    match side {
        "idem" => hits(per_task, || call(&store, hit_id)).await?,
        "raw" => hits(per_task, || send_raw_hit(raw.clone(), hit_claim)).await?,
        other => return Err(format!("{PROFILE_FLAG}{other}: expected idem or raw")),
    }
    let elapsed = started.elapsed();
    eprintln!(
        "bench_report: {} {side} hits by {TASKS} tasks in {elapsed:?}: {:.0}/s",
        per_task * TASKS as u64,
        (per_task * TASKS as u64) as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// [`TASKS`] concurrent loops of `per_task` calls of `f` each.
#[inline(never)]
async fn hits<F, Fut>(per_task: u64, f: F) -> Res<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let f = &f;
    let loops = (0..TASKS).map(|_| async move {
        for _ in 0..per_task {
            f().await?;
        }
        Res::Ok(())
    });
    for result in futures::future::join_all(loops).await {
        result?;
    }
    Ok(())
}

/// The store under `prefix`, and the raw client: a ConnectionManager speaking the protocol the
/// store speaks.
async fn connect(url: &str, prefix: &str) -> Res<(RedisStore, ConnectionManager)> {
    let store = RedisStore::connect_with_prefix(url, prefix)
        .await
        .map_err(err)?;
    let mut info = url.into_connection_info().map_err(err)?;
    if !url.contains("protocol=") {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(settings);
    }
    let raw = redis::Client::open(info)
        .map_err(err)?
        .get_connection_manager()
        .await
        .map_err(err)?;
    Ok((store, raw))
}

async fn measure(
    r: &mut Report,
    url: &str,
    prefix: &str,
    admin: &MultiplexedConnection,
) -> Res<()> {
    let (store, raw) = connect(url, prefix).await?;

    // Warm up: the hit key exists, and the server knows the scripts (a NOSCRIPT answer
    // costs one SCRIPT LOAD, once).
    let hit_id = fresh_ids();
    call(&store, hit_id).await?;
    call(&store, hit_id).await?;
    call(&store, hit_id + 1).await?;

    // 1. Every command the server executed, from INFO commandstats.
    let miss_cmds = commandstats_per_call(admin, |round| {
        let base = fresh_ids() + round as u64 * CALLS;
        let store = &store;
        async move {
            for i in 0..CALLS {
                call(store, base + i).await?;
            }
            Ok(())
        }
    })
    .await?;
    let hit_cmds = commandstats_per_call(admin, |_| {
        let store = &store;
        async move {
            for _ in 0..CALLS {
                call(store, hit_id).await?;
            }
            Ok(())
        }
    })
    .await?;

    // 2. Round trips: the store's own commands in the MONITOR feed.
    let seen = monitor(url, admin, prefix, &store, hit_id).await?;
    let miss_rt = seen.miss_sent.len() as f64 / CALLS as f64;
    let hit_rt = seen.hit_sent.len() as f64 / CALLS as f64;

    let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
    let breakdown = |m: &BTreeMap<String, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The same round trips from commandstats: the calls of the commands the store's
    // connection sent (scripts cannot call EVALSHA, so none of these ran inside a script).
    let hit_rt_stats = top_level(&hit_cmds, &seen.hit_sent);
    let miss_rt_stats = top_level(&miss_cmds, &seen.miss_sent);
    r.row(
        &format!("Redis round trips per hit ({CALLS} hits, MONITOR)"),
        format!(
            "{hit_rt:>9.2}     {}; commandstats {hit_rt_stats:.2}",
            command_names(&seen.hit_sent, CALLS)
        ),
    );
    r.row(
        &format!("Redis round trips per miss ({CALLS} misses, MONITOR)"),
        format!(
            "{miss_rt:>9.2}     {}; commandstats {miss_rt_stats:.2}",
            command_names(&seen.miss_sent, CALLS)
        ),
    );
    r.row(
        "Redis commands run per hit, scripts incl. (commandstats)",
        format!("{:>9.2}     {}", total(&hit_cmds), breakdown(&hit_cmds)),
    );
    r.row(
        "Redis commands run per miss, scripts incl. (commandstats)",
        format!("{:>9.2}     {}", total(&miss_cmds), breakdown(&miss_cmds)),
    );
    r.row(
        "target: Redis 1 round trip per hit and 2 per miss",
        verdict(
            exactly(hit_rt, 1.0)
                && exactly(miss_rt, 2.0)
                && exactly(hit_rt_stats, 1.0)
                && exactly(miss_rt_stats, 2.0),
        ),
    );
    r.field("redis_hit_roundtrips", hit_rt);
    r.field("redis_miss_roundtrips", miss_rt);
    r.field("redis_hit_roundtrips_commandstats", hit_rt_stats);
    r.field("redis_miss_roundtrips_commandstats", miss_rt_stats);
    r.field("redis_hit_server_commands", total(&hit_cmds));
    r.field("redis_miss_server_commands", total(&miss_cmds));
    r.field("redis_hit_lua_commands", seen.hit_lua as f64 / CALLS as f64);
    r.field(
        "redis_miss_lua_commands",
        seen.miss_lua as f64 / CALLS as f64,
    );

    // 3. Calls per second against the raw client sending the same EVALSHAs.
    let Some(hit_claim) = seen.hit_sent.first() else {
        return Err("no hit claim in the MONITOR feed".into());
    };
    let (Some(miss_claim), Some(miss_complete)) = (seen.miss_sent.first(), seen.miss_sent.get(1))
    else {
        return Err("no miss claim and complete in the MONITOR feed".into());
    };
    for (what, args) in [
        ("hit claim", hit_claim),
        ("miss claim", miss_claim),
        ("complete", miss_complete),
    ] {
        // EVALSHA sha 2 record fence ARGV...: the keys are the store's, the rest replayed.
        if args.len() < 6
            || !args[0].eq_ignore_ascii_case(b"EVALSHA")
            || args[2] != b"2"
            || !args[3].starts_with(prefix.as_bytes())
        {
            return Err(format!(
                "the store's {what} is not `EVALSHA sha 2 record fence ...`: {:?}",
                args.iter()
                    .map(|a| String::from_utf8_lossy(a))
                    .collect::<Vec<_>>()
            ));
        }
    }
    let raw = &raw;
    let store = &store;
    let idem_hit = |_: usize, _: u64| call(store, hit_id);
    let raw_hit = |_: usize, _: u64| send_raw_hit(raw.clone(), hit_claim);
    let idem_miss = |base: u64| move |_: usize, i: u64| call(store, base + i);
    let raw_miss = |base: u64| {
        move |_: usize, i: u64| {
            let key = StorageKey::derive("bench-raw", &(base + i)).expect("a valid key");
            send_raw_miss(
                raw.clone(),
                store.record_key(&key),
                miss_claim,
                miss_complete,
            )
        }
    };
    let rates = Rates {
        hit_1: versus(1, idem_hit, raw_hit).await?,
        hit_n: versus(TASKS, idem_hit, raw_hit).await?,
        miss_1: versus(1, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?,
        miss_n: versus(TASKS, idem_miss(fresh_ids()), raw_miss(fresh_ids())).await?,
    };
    rates.report(
        r,
        "Redis",
        "redis",
        [
            "raw EVALSHA of the same claim",
            "raw claim + complete EVALSHAs",
        ],
    );
    // The 16-task hit ratio (also `redis_hit_16_tasks_vs_raw_ratio`) under the name the
    // targets use.
    r.field(
        &format!("redis_vs_raw_ratio_{TASKS}_tasks"),
        rates.hit_n.ratio,
    );
    Ok(())
}

/// Per call, the commandstats calls of the commands in `sent` (by name; `script|load` for
/// `SCRIPT LOAD`).
fn top_level(stats: &BTreeMap<String, f64>, sent: &[Vec<Vec<u8>>]) -> f64 {
    let mut names = std::collections::BTreeSet::new();
    for args in sent {
        let word = |i: usize| String::from_utf8_lossy(&args[i]).to_lowercase();
        let name = word(0);
        if !stats.contains_key(&name) && args.len() > 1 {
            names.insert(format!("{name}|{}", word(1)));
        } else {
            names.insert(name);
        }
    }
    names.iter().filter_map(|n| stats.get(n)).sum()
}

/// `EVALSHA 4.00` for 4 EVALSHAs per call.
fn command_names(sent: &[Vec<Vec<u8>>], calls: u64) -> String {
    let mut names = BTreeMap::<String, usize>::new();
    for args in sent {
        let name = String::from_utf8_lossy(args.first().map_or(&[][..], |a| a));
        *names.entry(name.to_uppercase()).or_default() += 1;
    }
    names
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", *v as f64 / calls as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds a command from captured arguments, `replace`ing some of them.
fn command(args: &[Vec<u8>], replace: &[(usize, &[u8])]) -> redis::Cmd {
    let name = String::from_utf8_lossy(&args[0]);
    let mut cmd = redis::cmd(&name);
    for (i, arg) in args.iter().enumerate().skip(1) {
        match replace.iter().find(|(at, _)| *at == i) {
            Some((_, with)) => cmd.arg(*with),
            None => cmd.arg(arg.as_slice()),
        };
    }
    cmd
}

/// The store's hit, sent by the raw client: the same EVALSHA of the claim script, same keys
/// and arguments; its reply must be the completed record.
async fn send_raw_hit(mut con: ConnectionManager, claim: &[Vec<u8>]) -> Res<()> {
    let reply: Value = command(claim, &[])
        .query_async(&mut con)
        .await
        .map_err(err)?;
    match reply {
        Value::Array(items) if matches!(items.first(), Some(Value::BulkString(t)) if t == b"completed") =>
        {
            std::hint::black_box(items);
            Ok(())
        }
        other => Err(format!("raw claim of the hit key answered {other:?}")),
    }
}

/// The store's miss, sent by the raw client on a fresh key: the claim EVALSHA, then the
/// complete EVALSHA with the token the claim returned and the record the store wrote.
async fn send_raw_miss(
    mut con: ConnectionManager,
    record: String,
    claim: &[Vec<u8>],
    complete: &[Vec<u8>],
) -> Res<()> {
    let fence = format!("{record}:fence");
    let keys: [(usize, &[u8]); 2] = [(3, record.as_bytes()), (4, fence.as_bytes())];
    let reply: Value = command(claim, &keys)
        .query_async(&mut con)
        .await
        .map_err(err)?;
    let token = match &reply {
        Value::Array(items) => match (items.first(), items.get(1)) {
            (Some(Value::BulkString(tag)), Some(Value::BulkString(token)))
                if tag == b"acquired" =>
            {
                token.clone()
            }
            _ => return Err(format!("raw claim of a fresh key answered {reply:?}")),
        },
        _ => return Err(format!("raw claim of a fresh key answered {reply:?}")),
    };
    // ARGV[1] of the complete script is the token.
    let done: Value = command(complete, &[keys[0], keys[1], (5, token.as_slice())])
        .query_async(&mut con)
        .await
        .map_err(err)?;
    match done {
        Value::Int(1) => Ok(()),
        other => Err(format!("raw complete answered {other:?}")),
    }
}

async fn info_commandstats(admin: &MultiplexedConnection) -> Res<BTreeMap<String, u64>> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin.clone())
        .await
        .map_err(err)?;
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if let Some(n) = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
        {
            calls.insert(name.to_owned(), n);
        }
    }
    Ok(calls)
}

/// Commands the server executed per call (by name), over [`CALLS`] calls between two
/// `INFO commandstats`: the round of [`ROUNDS`] with the fewest, less the first `INFO`.
async fn commandstats_per_call<F, Fut>(
    admin: &MultiplexedConnection,
    mut calls: F,
) -> Res<BTreeMap<String, f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let mut best: Option<BTreeMap<String, u64>> = None;
    for round in 0..ROUNDS {
        let before = info_commandstats(admin).await?;
        calls(round).await?;
        let after = info_commandstats(admin).await?;
        let mut delta = BTreeMap::new();
        for (name, n) in &after {
            let mut d = n - before.get(name).copied().unwrap_or(0);
            if name == "info" {
                d = d.saturating_sub(1); // our own first INFO
            }
            if d > 0 {
                delta.insert(name.clone(), d);
            }
        }
        let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        if best.as_ref().is_none_or(|b| sum(&delta) < sum(b)) {
            best = Some(delta);
        }
    }
    Ok(best
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v as f64 / CALLS as f64))
        .collect())
}

/// What the MONITOR feed showed: the arguments of each command the store's connection sent
/// during the misses and during the hits, and how many commands scripts ran.
struct Seen {
    miss_sent: Vec<Vec<Vec<u8>>>,
    hit_sent: Vec<Vec<Vec<u8>>>,
    miss_lua: usize,
    hit_lua: usize,
}

/// Runs [`CALLS`] misses, then [`CALLS`] hits, between markers sent on another connection,
/// and reads the MONITOR feed up to the last marker.
async fn monitor(
    url: &str,
    admin: &MultiplexedConnection,
    prefix: &str,
    store: &RedisStore,
    hit_id: u64,
) -> Res<Seen> {
    let mut feed = Monitor::start(url, admin.clone()).await?;
    let base = fresh_ids();
    feed.mark().await?;
    for i in 0..CALLS {
        call(store, base + i).await?;
    }
    feed.mark().await?;
    for _ in 0..CALLS {
        call(store, hit_id).await?;
    }
    feed.mark().await?;
    let windows = feed.windows(Duration::from_secs(10)).await?;
    // The store's connection is the client whose commands name the store's prefix.
    let sent = monitor::sent_by_store(&windows, prefix)?;
    let args = |w: &[monitor::Command]| w.iter().map(|c| c.args.clone()).collect();
    Ok(Seen {
        miss_sent: args(&sent[0]),
        hit_sent: args(&sent[1]),
        miss_lua: monitor::lua_commands(&windows[0]),
        hit_lua: monitor::lua_commands(&windows[1]),
    })
}
