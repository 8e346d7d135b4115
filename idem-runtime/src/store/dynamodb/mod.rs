//! `DynamoDbStore`: records in an Amazon DynamoDB table, for many processes on AWS without a
//! server to run (feature `dynamodb`).
//!
//! ```no_run
//! # use idem_runtime as idempotency;
//! # async fn demo() -> idempotency::Result<()> {
//! use idempotency::DynamoDbStore;
//!
//! let store = DynamoDbStore::connect("dynamodb://idem_records?region=eu-west-1").await?;
//! idempotency::install(store);
//! # Ok(()) }
//! ```
//!
//! # URL and credentials
//!
//! `dynamodb://TABLE?region=REGION&endpoint=URL`: the table (else [`DynamoDbOptions::table`],
//! [`DEFAULT_TABLE`] by default), the AWS region (else the SDK's: `AWS_REGION`, the profile),
//! and an endpoint to send requests to instead of AWS's (DynamoDB Local, LocalStack, moto).
//! Credentials are the AWS SDK's default chain (environment, profile, web identity, ECS, EC2
//! instance role). With an `endpoint` and no credentials in the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_PROFILE`, a web identity or container credentials), the store signs with the static
//! dummy credentials `idem-local`, which local servers accept, and the region defaults to
//! `us-east-1`. For anything else (your own retry or timeout settings, a credentials provider)
//! build a [`Client`] and use [`DynamoDbStore::from_client`].
//!
//! # Table
//!
//! One item per storage key, partition key `pk` (string: the key's 64 hex digits, never the
//! user's key), no sort key:
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `pk` | S | the storage key |
//! | `st` | S | `in_flight`, `completed`, or a tombstone: `released`, `forgotten` |
//! | `tok` | N | the token of the key's latest claim (kept by tombstones) |
//! | `fp` | B | the 32 fingerprint bytes (absent: none) |
//! | `until` | N | end of the lease (in flight) or of the ttl (completed), Unix ms; 0 for a tombstone |
//! | `claimed_at` | N | when the key was claimed, Unix ms |
//! | `rec` | B | the encoded record (completed only) |
//! | `steps` | L of B | the call's steps (in flight only): one frame per save, the last of a name counts |
//! | `expires` | N | the TTL attribute, Unix **seconds**: when DynamoDB may delete the item |
//!
//! [`DynamoDbStore::connect`] creates the table when missing (on-demand capacity) and turns on
//! its TTL on `expires` (`UpdateTimeToLive`); with [`DynamoDbOptions::create_table`]`(false)` it
//! only checks that the table exists with that key, and refuses with [`Error::Config`] naming it
//! otherwise. An item, steps included, must fit DynamoDB's 400 KB item limit: a result or a
//! step larger than 399 KiB fails with [`Error::TooLarge`] before any request (the call's
//! outcome is then unknown, as on the other stores); steps that each fit but together overflow
//! their call's item fail with DynamoDB's `ValidationException`, an [`Error::Store`].
//!
//! # Round trips
//!
//! Every [`Store`](crate::store::Store) method of a call is one request:
//!
//! - **claim, hit or miss: one `UpdateItem`.** The claim is a conditional write
//!   (`ConditionExpression`: no item, or its `until` has passed) that writes the claim and bumps
//!   the key's token in the same item. When the condition fails (a live record is there),
//!   `ReturnValuesOnConditionCheckFailure = ALL_OLD` returns that record with the failure, so a
//!   replay (or in flight, or key reuse) is known from that one request, with no read first. A
//!   miss costs one request too, because the token is a counter kept in the key's own item (see
//!   below), not a table-wide counter that would need a request of its own. A replayed call
//!   therefore costs one request, a first call two (claim, complete).
//! - `complete`, `renew`, `release`, `save_step`, `forget`: one conditional `UpdateItem` each,
//!   guarded by `st = in_flight AND tok = <token> AND until > now - ABANDONED_CLAIM_RETENTION`
//!   (a lease that ended still lets its holder act while nobody took over); a failed condition
//!   is [`Error::LeaseLost`] and changed nothing.
//! - `get`, `load_steps`: one strongly consistent `GetItem`.
//! - `scan` and `purge_expired`: a `Scan` of the whole table (for operators and local servers;
//!   on AWS the TTL deletes expired items), plus one conditional `DeleteItem` per expired item.
//!
//! A hit's failed conditional write costs a write capacity unit (DynamoDB charges failed
//! conditional writes), the price of answering in one round trip.
//!
//! The SDK retries requests that failed on throttling, a timeout or a 5xx (3 attempts). A
//! retried `complete` that had stored its result finds it there (same token, same bytes) and
//! succeeds; a retried `release` finds its own tombstone and succeeds; a retried claim that had
//! reached the table finds that claim in flight, as a retrying caller would; a retried
//! `save_step` saves the same frame again, which counts once.
//!
//! # Fencing tokens
//!
//! The claim sets `tok = if_not_exists(tok, now_us) + 1`: the key's last token plus one, or, for
//! a key without an item, the claiming process's clock in microseconds plus one. The item, and
//! with it the counter, outlives every record of the key: `release` and `forget` leave a
//! tombstone (no record, the last token, a TTL of [`FENCE_GRACE`]) instead of deleting the item,
//! so a released or forgotten holder stays fenced off, and a key claimed again continues its
//! count. Tokens therefore strictly increase per key, across takeovers, releases, forgets and
//! expiry. Once DynamoDB (or `purge_expired`) deleted a key's item (its record expired, its
//! tombstone's grace ended) the count restarts from the clock, which is still larger unless a
//! clock went back by more than the time since. Across keys, tokens follow the clocks of the
//! claiming processes, as the Redis store's do: only the per-key order matters for fencing.
//!
//! A table-wide counter item (`ADD` on one item) would order tokens across keys exactly, at the
//! cost of a second request per miss and of one hot item that every claim of the table writes
//! (a partition serves at most 1000 writes a second): the per-key counter keeps a miss at one
//! request and spreads the writes.
//!
//! # Expiry
//!
//! Leases and ttls are measured on the clocks of the processes that write and read them
//! (DynamoDB has no server time in its expressions), in milliseconds: keep the clocks of the
//! processes sharing a table synchronised (NTP), as a skew of `s` moves leases by `s`.
//!
//! Every item carries `expires`, DynamoDB's TTL attribute (Unix seconds, rounded up): the ttl's end
//! for a completed record, the lease's end plus
//! [`ABANDONED_CLAIM_RETENTION`](crate::store::ABANDONED_CLAIM_RETENTION) for a claim,
//! [`FENCE_GRACE`] after the release for a tombstone. DynamoDB deletes expired items late (within
//! days, not at once), so every read applies the expiry itself: a completed record past its `until`
//! is absent to `claim` (the claim's condition compares `until`, not `expires`), `get`, `forget`
//! and `scan`, and a claim whose lease ended longer than the retention ago is abandoned.
//! [`purge_expired`](crate::store::Store::purge_expired) deletes such items at once (a `Scan` with
//! a filter, then conditional deletes), for servers without TTL (DynamoDB Local, moto) or a cleanup
//! that cannot wait; on AWS it is not needed, and no purger runs in the background.
//!
//! # Waiting
//!
//! DynamoDB tells no client about changes (Streams are read by polling too), so the store does
//! not [notify changes](crate::store::Store::notifies_changes): a call waiting with
//! `on_conflict = "wait"` polls with a claim (one request) at the engine's short pauses.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The AWS SDK crate this store is built on, for building a [`Client`] of the matching version
/// to hand to [`DynamoDbStore::from_client`].
#[doc(no_inline)]
pub use ::aws_sdk_dynamodb;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::Client;

use crate::error::{Error, Result};

mod address;
mod item;
mod options;
mod protocol;
mod request;
mod scan;
mod table;

pub(crate) use address::DynamoDbUrl;
pub use options::DynamoDbOptions;

/// The table [`DynamoDbStore::connect`] uses when the URL names none.
pub const DEFAULT_TABLE: &str = "idem_records";

/// How long a tombstone (a released or forgotten key's last token) is kept before DynamoDB may
/// delete it (see the [module docs](self#fencing-tokens)).
pub const FENCE_GRACE: Duration = Duration::from_secs(3600);

/// How long one request may take, each attempt, before it fails with [`Error::Store`].
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

const BACKEND: &str = "dynamodb";

/// The names of the item's attributes (see the [module docs](self#table)).
mod attr {
    pub(super) const KEY: &str = "pk";
    pub(super) const STATE: &str = "st";
    pub(super) const TOKEN: &str = "tok";
    pub(super) const FINGERPRINT: &str = "fp";
    pub(super) const UNTIL: &str = "until";
    pub(super) const CLAIMED_AT: &str = "claimed_at";
    pub(super) const RECORD: &str = "rec";
    pub(super) const STEPS: &str = "steps";
    pub(super) const EXPIRES: &str = "expires";
}

/// A store in a DynamoDB table, shared by every process that uses the same table.
///
/// Cloning gives another handle to the same client and table. See the [module docs](self) for
/// the table, round trips, fencing tokens and expiry.
#[derive(Clone)]
pub struct DynamoDbStore {
    client: Client,
    table: Arc<str>,
}

impl fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// An SDK error as [`Error::Store`], with its whole chain of causes in the message.
fn sdk_error<E, R>(what: &str, e: SdkError<E, R>) -> Error
where
    E: std::error::Error + 'static,
    R: fmt::Debug,
{
    Error::store(BACKEND, format!("{what}: {}", DisplayErrorContext(&e)))
}

/// Whether the environment holds AWS credentials the SDK's default chain would use.
fn credentials_in_environment() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

impl DynamoDbStore {
    /// Connects to the table `url` names (`dynamodb://TABLE?region=...&endpoint=...`, see the
    /// [module docs](self#url-and-credentials)), creating it if missing.
    ///
    /// A URL it cannot read, a missing region, a bad table name, and a table whose key is not
    /// idem's are [`Error::Config`]; a service it cannot reach is [`Error::Store`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &DynamoDbOptions::default()).await
    }

    /// [`connect`](Self::connect) with `options` (the table when the URL names none, and
    /// whether a missing table is created).
    pub async fn connect_with(url: &str, options: &DynamoDbOptions) -> Result<Self> {
        let parsed = DynamoDbUrl::parse(url)?;
        let table = parsed.table.unwrap_or_else(|| options.table.clone());
        address::check_table(&table)?;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(region) = &parsed.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &parsed.endpoint {
            loader = loader.endpoint_url(endpoint);
            if !credentials_in_environment() {
                loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                    "idem-local",
                    "idem-local",
                    None,
                    None,
                    "idem-static",
                ));
            }
        }
        let sdk = loader.load().await;
        let mut config = aws_sdk_dynamodb::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            if parsed.endpoint.is_none() {
                return Err(Error::config(format!(
                    "no AWS region for the DynamoDB store URL `{}`: add `?region=...`, or set AWS_REGION",
                    crate::store::redact_url(url)
                )));
            }
            config = config.region(aws_config::Region::new("us-east-1"));
        }
        Self::from_client(
            Client::from_conf(config.build()),
            &options.clone().table(table),
        )
        .await
    }

    /// A store over a client you configured yourself (credentials, retries, timeouts), with
    /// records in [`DynamoDbOptions::table`]: creates the table when it is missing, unless
    /// [`DynamoDbOptions::create_table`] is off (then a missing table is [`Error::Config`]).
    pub async fn from_client(client: Client, options: &DynamoDbOptions) -> Result<Self> {
        address::check_table(&options.table)?;
        table::prepare(&client, &options.table, options.create_table).await?;
        Ok(DynamoDbStore {
            client,
            table: options.table.as_str().into(),
        })
    }

    /// The table the records live in.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}
