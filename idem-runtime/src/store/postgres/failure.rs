//! What went wrong with a statement: the error for the caller, and whether the connection is
//! broken (taken out of the pool) and the statement may run again on another one.

use std::fmt;

use deadpool_postgres::Object;
use tokio_postgres::error::{Severity, SqlState};

use super::BACKEND;
use crate::error::Error;

/// A failed statement: the [`Error::Store`] for the caller, and whether another connection
/// might do better.
pub(super) struct Failure {
    pub(super) error: Error,
    /// The connection was closed or is closing; it has been taken out of the pool.
    pub(super) broken: bool,
    /// The failure came after the statement was sent for execution.
    pub(super) executing: bool,
}

impl Failure {
    /// Takes the connection out of the pool if it is broken (or clears its statement cache if
    /// its prepared statements went stale), so the next call starts afresh.
    pub(super) fn new(
        client: Object,
        context: &'static str,
        e: tokio_postgres::Error,
        executing: bool,
    ) -> Self {
        let db = e.as_db_error();
        let broken = match db {
            Some(db) => matches!(
                db.parsed_severity(),
                Some(Severity::Fatal | Severity::Panic)
            ),
            None => true,
        } || client.is_closed();
        if let Some(code) = db.map(|db| db.code()) {
            // A prepared statement the server no longer has, or whose result type changed
            // under it (the table was altered): prepare afresh next time.
            if *code == SqlState::INVALID_SQL_STATEMENT_NAME
                || *code == SqlState::FEATURE_NOT_SUPPORTED
            {
                client.statement_cache.clear();
            }
        }
        if broken {
            // Closed, I/O, protocol, or the server ended the session: never hand it out again.
            drop(Object::take(client));
        }
        Failure {
            error: pg_error(context, e),
            broken,
            executing,
        }
    }
}

pub(super) fn pg_error(context: &'static str, e: tokio_postgres::Error) -> Error {
    Error::store(BACKEND, PgError { context, inner: e })
}

/// A tokio-postgres error with context, displaying the server's message too (tokio-postgres
/// shows only "db error" and keeps the message in its source).
#[derive(Debug)]
struct PgError {
    context: &'static str,
    inner: tokio_postgres::Error,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.inner)?;
        if let Some(source) = std::error::Error::source(&self.inner) {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}
