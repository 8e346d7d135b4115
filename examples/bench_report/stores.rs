//! Section 3: the Redis and PostgreSQL stores (features `redis`, `postgres`).
//!
//! Every count comes from the server, around calls made through `#[idempotent]`:
//!
//! - Redis round trips (`redis_part.rs`): the server's `MONITOR` feed, counting the commands
//!   sent on the store's own connection between two markers (`idem_support::monitor`, as
//!   `tests/redis_roundtrips.rs` does), so other clients
//!   do not disturb the count. Cross-checked with `INFO commandstats` deltas (the round of 3
//!   with the fewest commands, less the section's own `INFO`): the calls of the commands the
//!   store sent. The sum over all of commandstats is not the round-trip count, since it also
//!   counts the commands a Lua script runs inside its one round trip; it is reported as the
//!   commands the server executed per call.
//! - PostgreSQL statements (`postgres_part.rs`): `pg_stat_database.xact_commit` deltas in a database of the run's
//!   own, through a pool of one connection, flushed with `pg_stat_force_next_flush()` (as
//!   `tests/postgres_statements.rs` does); the round of 3 with the fewest.
//!
//! Calls per second compare idem against a raw client sending the same commands in the same
//! run: for Redis the `EVALSHA`s the store sent (script hash, keys and arguments taken from the
//! `MONITOR` feed), for PostgreSQL the claim and complete statements the store prepared (their
//! text read from `pg_prepared_statements`). Both run on the report's one-thread runtime, in
//! 9 pairs of back-to-back 100 ms windows, each after an untimed 40 ms lead-in; the rates are
//! the medians of each side, the ratio the median of the pairs' ratios.

use crate::Report;

/// Section 3 needs the `redis` and `postgres` features and the servers.
pub async fn section_stores(r: &mut Report) {
    r.section("3. Redis and PostgreSQL stores: counted by the servers, rates vs raw clients");
    #[cfg(feature = "redis")]
    crate::redis_part::run(r).await;
    #[cfg(feature = "redis")]
    crate::local_part::run(r).await;
    #[cfg(feature = "postgres")]
    crate::postgres_part::run(r).await;
    #[cfg(not(all(feature = "redis", feature = "postgres")))]
    {
        let missing: Vec<&str> = [
            (!cfg!(feature = "redis")).then_some("Redis"),
            (!cfg!(feature = "postgres")).then_some("PostgreSQL"),
        ]
        .into_iter()
        .flatten()
        .collect();
        eprintln!(
            "bench_report: section 3 ({}) needs `--features redis,postgres`",
            missing.join(", ")
        );
        r.row(
            &format!("{}: not built", missing.join(" and ")),
            "run with --features redis,postgres".into(),
        );
    }
}
