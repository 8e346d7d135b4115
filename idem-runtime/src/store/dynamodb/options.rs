//! The settings of a [`DynamoDbStore`](super::DynamoDbStore) beyond its URL.

use super::DEFAULT_TABLE;

/// Settings of a [`DynamoDbStore`](super::DynamoDbStore) beyond its URL, for
/// [`DynamoDbStore::connect_with`](super::DynamoDbStore::connect_with) and
/// [`DynamoDbStore::from_client`](super::DynamoDbStore::from_client).
///
/// ```no_run
/// # use idem_runtime as idempotency;
/// # async fn demo() -> idempotency::Result<()> {
/// use idempotency::store::dynamodb::{DynamoDbOptions, DynamoDbStore};
///
/// // The table exists (made by infrastructure code): check it, create nothing.
/// let options = DynamoDbOptions::new().create_table(false);
/// let store = DynamoDbStore::connect_with("dynamodb://app_idem?region=eu-west-1", &options).await?;
/// # Ok(()) }
/// ```
///
/// # Without creating the table
///
/// By default connecting creates the table when it is missing (partition key `pk` of type
/// string, on-demand capacity) and turns on its TTL on the attribute `expires`, which needs
/// `dynamodb:CreateTable`, `dynamodb:DescribeTable`, `dynamodb:DescribeTimeToLive` and
/// `dynamodb:UpdateTimeToLive`. With [`create_table(false)`](Self::create_table) it only checks
/// (`DescribeTable`) that the table exists with that key: a missing table is
/// [`Error::Config`](crate::Error::Config) naming it, and nothing is created. The runtime then
/// needs `GetItem`, `UpdateItem`, `DeleteItem` and `Scan` (the last two for `purge_expired` and
/// the `idem` command only) on the table.
#[derive(Clone, Debug)]
pub struct DynamoDbOptions {
    pub(super) table: String,
    pub(super) create_table: bool,
}

impl Default for DynamoDbOptions {
    fn default() -> Self {
        DynamoDbOptions {
            table: DEFAULT_TABLE.to_owned(),
            create_table: true,
        }
    }
}

impl DynamoDbOptions {
    /// The defaults: table [`DEFAULT_TABLE`], created if missing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep records in `table` (3 to 255 characters of `a-z A-Z 0-9 _ - .`). A URL that names a
    /// table (`dynamodb://TABLE`) wins over this.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether connecting creates the table (and turns on its TTL) when it is missing: `true`
    /// by default. With `false` a missing table is [`Error::Config`](crate::Error::Config) and
    /// nothing is created (see [Without creating the table](#without-creating-the-table)).
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }
}
