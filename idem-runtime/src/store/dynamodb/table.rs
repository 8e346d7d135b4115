//! The table: checking that it exists with idem's key, creating it when missing, and turning
//! on its TTL.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TableDescription, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;

use super::{attr, sdk_error, BACKEND};
use crate::error::{Error, Result};

/// How long connecting waits for a table it created (or found being created) to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Makes sure `table` exists with idem's key (`pk`, a string) and, when `create` is set,
/// creates it if missing and turns on its TTL on `expires`.
pub(super) async fn prepare(client: &Client, table: &str, create: bool) -> Result<()> {
    let description = match describe(client, table).await? {
        Some(description) => description,
        None if !create => {
            return Err(Error::config(format!(
                "the DynamoDB table `{table}` does not exist (or these credentials cannot see it), and creating it is off (nothing was created): check the table name and region, or create it with a string partition key `{}` and TTL on `{}`, or connect once with `DynamoDbOptions::create_table(true)`",
                attr::KEY,
                attr::EXPIRES
            )));
        }
        None => {
            create_table(client, table).await?;
            wait_until_active(client, table).await?
        }
    };
    check_key(table, &description)?;
    if description.table_status() != Some(&TableStatus::Active) {
        wait_until_active(client, table).await?;
    }
    if create {
        enable_ttl(client, table).await?;
    }
    Ok(())
}

/// The table's description, or `None` if it does not exist.
async fn describe(client: &Client, table: &str) -> Result<Option<TableDescription>> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(out.table().cloned()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(sdk_error("could not describe the table", e)),
    }
}

/// Refuses a table whose key is not idem's: a partition key `pk` of type string, no sort key.
fn check_key(table: &str, description: &TableDescription) -> Result<()> {
    let keys = description.key_schema();
    let hash_is_pk =
        matches!(keys, [k] if k.attribute_name() == attr::KEY && *k.key_type() == KeyType::Hash);
    let pk_is_string = description
        .attribute_definitions()
        .iter()
        .any(|d| d.attribute_name() == attr::KEY && *d.attribute_type() == ScalarAttributeType::S);
    if hash_is_pk && pk_is_string {
        Ok(())
    } else {
        Err(Error::config(format!(
            "the DynamoDB table `{table}` is not idem's: its key must be a string partition key `{}` alone (no sort key); use a table of its own",
            attr::KEY
        )))
    }
}

/// Creates the table (on-demand capacity); another process creating it at the same time is
/// fine.
async fn create_table(client: &Client, table: &str) -> Result<()> {
    let built = |e: aws_sdk_dynamodb::error::BuildError| Error::store(BACKEND, e);
    let result = client
        .create_table()
        .table_name(table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(attr::KEY)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(built)?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(attr::KEY)
                .key_type(KeyType::Hash)
                .build()
                .map_err(built)?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(sdk_error("could not create the table", e)),
    }
}

/// Polls `DescribeTable` until the table is `ACTIVE`.
async fn wait_until_active(client: &Client, table: &str) -> Result<TableDescription> {
    let started = Instant::now();
    loop {
        if let Some(d) = describe(client, table).await? {
            if d.table_status() == Some(&TableStatus::Active) {
                return Ok(d);
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(Error::store(
                BACKEND,
                format!("the table `{table}` was not ACTIVE within {READY_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Turns on the table's TTL on `expires` unless it is on (or being turned on) already. A table
/// whose TTL is on another attribute is left alone, with a warning: the store's own expiry
/// check and `purge_expired` still honour every record's expiry.
async fn enable_ttl(client: &Client, table: &str) -> Result<()> {
    let status = || async {
        let out = client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error("could not read the table's TTL setting", e))?;
        Ok::<_, Error>(out.time_to_live_description().map(|d| {
            (
                d.time_to_live_status().cloned(),
                d.attribute_name().map(str::to_owned),
            )
        }))
    };
    if let Some((Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling), name)) =
        status().await?
    {
        if name.as_deref().is_some_and(|n| n != attr::EXPIRES) {
            tracing::warn!(target: "idem", table, ttl_attribute = ?name,
                "the DynamoDB table's TTL is on another attribute than `expires`: DynamoDB will not delete idem's expired records (the store still ignores them, and purge_expired deletes them)");
        }
        return Ok(());
    }
    let spec = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(attr::EXPIRES)
        .build()
        .map_err(|e| Error::store(BACKEND, e))?;
    let result = client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
        .send()
        .await;
    match result {
        Ok(_) => Ok(()),
        // Another process turned it on in between (DynamoDB refuses a second change).
        Err(_)
            if matches!(
                status().await?,
                Some((
                    Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling),
                    _
                ))
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(sdk_error("could not turn on the table's TTL", e)),
    }
}
