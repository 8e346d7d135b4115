//! The settings of a [`SqliteStore`](super::SqliteStore) beyond its path.

use crate::engine::Purger;

/// Settings of a [`SqliteStore`](super::SqliteStore) beyond its path, for
/// [`SqliteStore::open_with`](super::SqliteStore::open_with);
/// [`SqliteStore::open`](super::SqliteStore::open) uses the defaults.
///
/// # Background purge
///
/// By default the store starts a [`Purger`] with its defaults when it opens: every minute (± 10%,
/// so processes started together drift apart) it deletes completed records past their ttl and
/// claims abandoned for [`ABANDONED_CLAIM_RETENTION`](crate::ABANDONED_CLAIM_RETENTION), in
/// batches of at most 1000 rows, each batch one `DELETE` in a transaction of its own, until a
/// batch removes fewer. Its cost: one
/// bounded `DELETE` (an index range scan up to now) per interval per process that opened the
/// file, more only while there is a backlog; each batch holds the file's write lock for as
/// long as it runs, like any other write. The task holds the store only by a weak reference,
/// so it ends once the store (every clone of it) is dropped. Turn it off with
/// [`purge_in_background(false)`](Self::purge_in_background), for example where a periodic
/// job runs `idem purge`.
///
/// ```no_run
/// # use idem_runtime as idempotency;
/// # async fn demo() -> idempotency::Result<()> {
/// use std::time::Duration;
/// use idempotency::store::sqlite::SqliteOptions;
/// use idempotency::{Purger, SqliteStore};
///
/// let options = SqliteOptions::new().purger(Purger::new().interval(Duration::from_secs(300)));
/// let store = SqliteStore::open_with("idem.sqlite", &options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub(super) create_tables: bool,
    pub(super) purge_in_background: bool,
    pub(super) purger: Purger,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            create_tables: true,
            purge_in_background: true,
            purger: Purger::new(),
        }
    }
}

impl SqliteOptions {
    /// The defaults: the file and its tables are created if missing, and a [`Purger`] with its
    /// defaults runs in the background.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether opening may create the file and the tables `idem_meta` and `idem_records` (and
    /// add a column a table made by an older build lacks): `true` by default. With `false` the
    /// store writes no schema: a file that does not exist, one without idem's tables, or one
    /// whose `idem_records` lacks a column of this build (`claimed_at`, `steps`; the error names
    /// the `ALTER TABLE` to run), is [`Error::Config`](crate::Error::Config) and is left as it
    /// was. For tools that must not
    /// change what they inspect (the `idem` command), and for files whose schema a migration
    /// owns.
    pub fn create_tables(mut self, create: bool) -> Self {
        self.create_tables = create;
        self
    }

    /// Whether to purge expired records in the background (see
    /// [Background purge](#background-purge)): `true` by default.
    pub fn purge_in_background(mut self, purge: bool) -> Self {
        self.purge_in_background = purge;
        self
    }

    /// The schedule of the background purge (interval, batch, jitter), [`Purger::new`]'s by
    /// default; whether it runs is [`purge_in_background`](Self::purge_in_background). A zero
    /// interval or batch, or a jitter outside `[0, 1)`, is
    /// [`Error::Config`](crate::Error::Config) when the store opens with the purge on.
    pub fn purger(mut self, purger: Purger) -> Self {
        self.purger = purger;
        self
    }
}
