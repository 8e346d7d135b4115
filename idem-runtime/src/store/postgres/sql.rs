//! The statements of one table: the `.sql` files of this folder, with the table's names filled
//! into their placeholders.
//!
//! The files name the table, its sequence and its indexes `{table}`, `{sequence}`, `{index}`
//! (expiry) and `{status_index}`,
//! the channel its changes are announced on `{channel}`, and write
//! [`ABANDONED_CLAIM_RETENTION`] in microseconds as `{retention_us}`; [`fill`] puts in the
//! quoted names of [`Names`] and the number, once per store. `{exists}` stands for the
//! condition of a row that still exists ([`EXISTS`]).

use crate::error::{Error, Result};
use crate::record::STATUS_PROCESSING;
use crate::store::ABANDONED_CLAIM_RETENTION;

const SEQUENCE_SUFFIX: &str = "_token_seq";
const INDEX_SUFFIX: &str = "_expires_idx";
const STATUS_INDEX_SUFFIX: &str = "_status_idx";
/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// The table, its sequence and its indexes, created if missing.
const SCHEMA: &str = include_str!("schema.sql");
/// Run before [`SCHEMA`] in one simple query (an implicit transaction, so the lock is held to
/// the end), so processes starting together do not race.
const CREATE_LOCK: &str = include_str!("create_lock.sql");
/// Adds the `steps` column to a table made before steps existed: the statement of [`SCHEMA`]
/// that a store without DDL names when the column is missing.
const ADD_STEPS: &str = include_str!("add_steps.sql");
/// Adds the readable columns (`operation`, `status`, `result`, `created_at`, `completed_at`,
/// `fingerprint_hex`) to a table made before they existed: the statement of [`SCHEMA`] that a
/// store without DDL names when one is missing.
const ADD_READABLE: &str = include_str!("add_readable.sql");
/// Whether the table, its sequence, its `steps` and readable columns and its indexes exist,
/// for a store that may not create them.
const CHECK: &str = include_str!("check.sql");
/// The claim: one statement that reads, draws a token only if it acquires, and writes.
const CLAIM: &str = include_str!("claim.sql");
/// Stores a result, guarded by the claim's token.
const COMPLETE: &str = include_str!("complete.sql");
/// Deletes a claim, guarded by its token.
const RELEASE: &str = include_str!("release.sql");
/// Gives a claim a new lease, guarded by its token.
const RENEW: &str = include_str!("renew.sql");
/// The condition of a row that still exists, put in for `{exists}`: completed within its
/// ttl, or in flight and not abandoned (its lease may have ended).
const EXISTS: &str = include_str!("exists.sql");
/// The record of a key, unless it is gone (past its ttl, or abandoned).
const GET: &str = include_str!("get.sql");
/// Deletes one batch of completed rows past their ttl and abandoned claims.
const PURGE: &str = include_str!("purge.sql");
/// Removes a completed record, or an in-flight one if forced.
const FORGET: &str = include_str!("forget.sql");
/// A page of the listing, in key order.
const SCAN: &str = include_str!("scan.sql");
/// Appends a step to the steps of a claim, guarded by its token.
const SAVE_STEP: &str = include_str!("save_step.sql");
/// The steps of a claim, guarded by its token.
const LOAD_STEPS: &str = include_str!("load_steps.sql");

/// The statements of one table, formatted once.
pub(super) struct Sql {
    pub(super) table: String,
    /// The token sequence's name as the table was given (`app.t` → `app.t_token_seq`).
    pub(super) sequence: String,
    /// The `LISTEN` channel of the table's changes (a valid identifier, unquoted).
    pub(super) channel: String,
    pub(super) schema: String,
    /// `schema` behind an advisory lock, so processes starting together do not race.
    pub(super) create: String,
    /// The one statement that adds the `steps` column to a table made before steps existed
    /// (also in `schema`).
    pub(super) add_steps: String,
    /// The one statement that adds the readable columns to a table made before they existed
    /// (also in `schema`).
    pub(super) add_readable: String,
    /// Whether the table, its sequence, its `steps` column, its expiry index, its readable
    /// columns and its status index exist (six booleans).
    pub(super) check: String,
    pub(super) claim: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) renew: String,
    pub(super) get: String,
    pub(super) purge: String,
    pub(super) forget: String,
    pub(super) scan: String,
    pub(super) save_step: String,
    pub(super) load_steps: String,
}

impl Sql {
    pub(super) fn new(table: &str) -> Result<Self> {
        let names = Names::new(table)?;
        let schema = fill(SCHEMA, &names);
        Ok(Sql {
            table: table.to_owned(),
            sequence: format!("{table}{SEQUENCE_SUFFIX}"),
            channel: names.channel.clone(),
            create: fill(CREATE_LOCK, &names) + &schema,
            schema,
            add_steps: fill(ADD_STEPS, &names).trim().to_owned(),
            add_readable: fill(ADD_READABLE, &names).trim().to_owned(),
            check: fill(CHECK, &names),
            claim: fill(CLAIM, &names),
            complete: fill(COMPLETE, &names),
            release: fill(RELEASE, &names),
            renew: fill(RENEW, &names),
            get: fill(GET, &names),
            purge: fill(PURGE, &names),
            forget: fill(FORGET, &names),
            scan: fill(SCAN, &names),
            save_step: fill(SAVE_STEP, &names),
            load_steps: fill(LOAD_STEPS, &names),
        })
    }
}

/// `template` with its placeholders filled in: `{exists}` by [`EXISTS`] (first, as it holds a
/// placeholder itself), `{table}`, `{sequence}`, `{index}` and `{status_index}` by the quoted
/// names, `{processing}` by the status of a claim in flight ([`STATUS_PROCESSING`]),
/// `{retention_us}` by [`ABANDONED_CLAIM_RETENTION`] in microseconds.
fn fill(template: &str, names: &Names) -> String {
    template
        .replace("{exists}", EXISTS)
        .replace("{table}", &names.table)
        .replace("{sequence}", &names.sequence)
        .replace("{index}", &names.index)
        .replace("{status_index}", &names.status_index)
        .replace("{processing}", STATUS_PROCESSING)
        .replace("{channel}", &names.channel)
        .replace(
            "{retention_us}",
            &ABANDONED_CLAIM_RETENTION.as_micros().to_string(),
        )
}

/// The quoted names of a table and its sequence and indexes.
struct Names {
    table: String,
    sequence: String,
    index: String,
    status_index: String,
    /// `idem_` and the table's name (`.` as `__`), cut to an identifier's length.
    channel: String,
}

impl Names {
    fn new(table: &str) -> Result<Self> {
        let invalid = |why: &str| {
            Error::config(format!(
                "invalid PostgreSQL table name `{table}`: {why}; expected `name` or `schema.name` made of ASCII letters, digits and `_`"
            ))
        };
        let (schema, name) = match table.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, table),
        };
        for part in schema.into_iter().chain([name]) {
            let mut chars = part.chars();
            match chars.next() {
                None => return Err(invalid("empty identifier")),
                Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                    return Err(invalid("identifiers start with a letter or `_`"))
                }
                _ => {}
            }
            if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(invalid("only ASCII letters, digits and `_` are allowed"));
            }
        }
        if schema.is_some_and(|s| s.len() > MAX_IDENTIFIER) {
            return Err(invalid("the schema name is longer than 63 bytes"));
        }
        let longest_suffix = SEQUENCE_SUFFIX
            .len()
            .max(INDEX_SUFFIX.len())
            .max(STATUS_INDEX_SUFFIX.len());
        if name.len() + longest_suffix > MAX_IDENTIFIER {
            return Err(invalid(&format!(
                "the table name is longer than {} bytes (its index name must fit in 63)",
                MAX_IDENTIFIER - longest_suffix
            )));
        }
        // Validated above: no quotes inside, so plain double quotes are a correct quoting (also
        // inside the single quotes of `nextval('{sequence}')`), and they keep the case as given
        // and allow reserved words. No braces either, so a filled-in name holds no placeholder.
        let qualify = |n: &str| match schema {
            Some(s) => format!("\"{s}\".\"{n}\""),
            None => format!("\"{n}\""),
        };
        let mut channel = match schema {
            Some(s) => format!("idem_{s}__{name}"),
            None => format!("idem_{name}"),
        };
        channel.truncate(MAX_IDENTIFIER);
        Ok(Names {
            table: qualify(name),
            sequence: qualify(&format!("{name}{SEQUENCE_SUFFIX}")),
            index: format!("\"{name}{INDEX_SUFFIX}\""),
            status_index: format!("\"{name}{STATUS_INDEX_SUFFIX}\""),
            channel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        for ok in [
            "idem_records",
            "_x",
            "A1",
            "app.idem_records",
            "Order",
            "user",
        ] {
            assert!(Names::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "idem-records",
            "a.b.c",
            ".t",
            "s.",
            "t; DROP TABLE x",
            "\"t\"",
            "t'",
            "tä",
            &"x".repeat(52),
        ] {
            assert!(
                matches!(Names::new(bad), Err(Error::Config { .. })),
                "{bad}"
            );
        }
        assert!(Names::new(&"x".repeat(51)).is_ok());
    }

    #[test]
    fn names_are_quoted_and_derived() {
        let n = Names::new("app.Idem").unwrap();
        assert_eq!(n.table, "\"app\".\"Idem\"");
        assert_eq!(n.sequence, "\"app\".\"Idem_token_seq\"");
        assert_eq!(n.index, "\"Idem_expires_idx\"");
        assert_eq!(n.status_index, "\"Idem_status_idx\"");
    }

    #[test]
    fn every_placeholder_is_filled() {
        let sql = Sql::new("app.Idem").unwrap();
        for statement in [
            &sql.schema,
            &sql.create,
            &sql.check,
            &sql.claim,
            &sql.complete,
            &sql.release,
            &sql.renew,
            &sql.get,
            &sql.purge,
            &sql.forget,
            &sql.scan,
            &sql.add_steps,
            &sql.add_readable,
            &sql.save_step,
            &sql.load_steps,
        ] {
            assert!(!statement.contains(['{', '}']), "{statement}");
        }
        // The statement a store without DDL names is the one the schema runs.
        assert_eq!(
            sql.add_steps,
            "ALTER TABLE \"app\".\"Idem\" ADD COLUMN IF NOT EXISTS steps bytea;"
        );
        assert!(sql.schema.contains(&format!("\n{}\n", sql.add_steps)));
        assert!(sql
            .add_readable
            .starts_with("ALTER TABLE \"app\".\"Idem\" ADD COLUMN IF NOT EXISTS operation text, "));
        assert!(sql.schema.contains(&format!("\n{}\n", sql.add_readable)));
        assert!(sql
            .schema
            .contains("CREATE INDEX IF NOT EXISTS \"Idem_status_idx\" ON \"app\".\"Idem\" (status, created_at);"));
        assert!(sql
            .check
            .contains("to_regclass('\"app\".\"Idem_token_seq\"')"));
        assert!(sql.claim.contains("nextval('\"app\".\"Idem_token_seq\"')"));
        assert!(sql
            .claim
            .contains("NULL, 'processing', NULL, clock_timestamp()"));
        assert!(sql.create.starts_with(
            "SELECT pg_advisory_xact_lock(hashtext('idem_runtime.create_table:\"app\".\"Idem\"'));\nCREATE TABLE"
        ));
        let retention = format!(
            "now() - interval '{} microseconds'",
            ABANDONED_CLAIM_RETENTION.as_micros()
        );
        for guarded in [
            &sql.complete,
            &sql.release,
            &sql.renew,
            &sql.get,
            &sql.purge,
            &sql.forget,
            &sql.scan,
            &sql.save_step,
            &sql.load_steps,
        ] {
            assert!(guarded.contains(&retention), "{guarded}");
        }
    }
}
