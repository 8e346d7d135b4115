//! The command line: the global options, the subcommands and how a record is named.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// What `idem --help` ends with: the exit codes.
const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  no such record (get, forget)
  2  bad usage, a bad store URL, a store that cannot be reached or opened, or a
     missing SQLite file or table (idem never creates one)
  3  the store failed during the command (or a record could not be read)
  4  refused: forget of an in-flight record without --force";

/// `idem`: look at and repair the records of an idempotency store.
///
/// Works on every store URL that `idempotency::connect` accepts except `memory` (a store
/// inside the process that created it): `sqlite:PATH`, `sqlite:///abs/path`, `postgres://...`
/// or a PostgreSQL `key=value` string, `redis://...`, `rediss://...`,
/// `redis+unix:///path/to/redis.sock`, `redis+cluster://host:port,...`,
/// `dynamodb://TABLE?region=...&endpoint=...`. The password of a URL is never printed.
#[derive(Debug, Parser)]
#[command(name = "idem", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The store's URL: `sqlite:///abs/path` or `sqlite:PATH` (the file must exist),
    /// `postgres://USER@HOST/DB` or `host=HOST user=USER dbname=DB`, `redis://HOST:PORT`,
    /// `rediss://...`, `redis+unix:///path/to/redis.sock`, `redis+cluster://HOST:PORT,HOST:PORT`,
    /// `dynamodb://TABLE?region=REGION&endpoint=URL` (an existing table).
    /// Not `memory`: a memory store lives inside the process that created it.
    #[arg(long, env = "IDEM_STORE", value_name = "URL", global = true)]
    pub store: Option<String>,

    /// The PostgreSQL table the records live in, if the application chose one
    /// (`PostgresOptions::table`; default `idem_records`).
    #[arg(long, value_name = "TABLE", global = true)]
    pub table: Option<String>,

    /// The Redis key prefix of the records, if the application chose one
    /// (`RedisOptions::prefix`; default `idem`).
    #[arg(long, value_name = "PREFIX", global = true)]
    pub prefix: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show one record: state, token, expiry, fingerprint, operation, type, and the stored
    /// JSON. Exits 1 if there is none.
    Get {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove one record, so the next call with its key runs the body again. Exits 1 if there
    /// is none, 4 if it is in flight and --force is not given.
    Forget {
        /// Which record.
        #[command(flatten)]
        record: RecordArgs,
        /// Also remove a record that is in flight. Its holder (a running call, or a dead
        /// process's claim) is fenced off: its result is not stored, and the next call with the
        /// key runs the body again, possibly while the old body is still running.
        #[arg(long)]
        force: bool,
    },
    /// List the claims in flight (oldest first): storage key, token, lease left or expired,
    /// age. Reads the whole store.
    InFlight {
        /// Only claims at least this old (`30s`, `5m`, `2h`). Where a store does not keep the
        /// time of a claim, its age is taken to be how long ago its lease ended.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove expired records (results past their ttl, claims abandoned for a day) and print
    /// how many. Redis expires records itself: it reports 0.
    Purge {
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Count the records by state and outcome, the oldest claim in flight, and the bytes
    /// stored. Reads the whole store.
    Stats {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How a record is named: the key a call used, or its storage key.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The idempotency key the call used (`key = ...` of the attribute, the
    /// `Idempotency-Key` header, the key of a `Call`).
    #[arg(long, value_name = "KEY", required_unless_present = "storage_key")]
    pub key: Option<String>,

    /// The scope the call used: empty for `#[idempotent]` without `scope = ...` (the default
    /// here); for the HTTP layer, the client's principal (`per_client`) or the layer's shared
    /// scope name (`shared`); else the scope the application gives.
    #[arg(long, value_name = "SCOPE", default_value = "")]
    pub scope: String,

    /// The operation's stable name (`name = "billing.charge"` of `#[idempotent]`): give it
    /// for records of an attribute, whose storage key includes it. Leave it out for records of
    /// the HTTP layer and of plain `Call`s, whose storage key has no operation.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The record's storage key (64 hex digits), as idem's errors print it ("storage key
    /// ..."): use it instead of --key/--scope/--name when you have it.
    #[arg(
        long,
        value_name = "HEX",
        conflicts_with_all = ["key", "name", "scope"],
    )]
    pub storage_key: Option<String>,
}

/// Parses `30s`, `5m`, `1h 30m`, `250ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations as `30s`, `5m`, `2h`)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_in_human_units() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("five").is_err());
    }
}
