//! For operators: listing the table ([`Store::scan`](crate::store::Store::scan)) and deleting
//! expired items ([`Store::purge_expired`](crate::store::Store::purge_expired)), both by `Scan`.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::types::AttributeValue;

use super::item::{abandoned_before, Item, State};
use super::request::{n, now_ms, placeholders, s};
use super::{attr, sdk_error, DynamoDbStore};
use crate::error::Result;
use crate::key::StorageKey;
use crate::store::{RecordSummary, ScanPage};

/// What `purge_expired` deletes: a completed record past its ttl, a claim abandoned for longer
/// than the retention. Checked again by each delete, so a key claimed in between is kept.
const EXPIRED: &str =
    "(#st = :completed AND #until <= :now) OR (#st = :in_flight AND #until <= :abandoned)";

/// The most items one `Scan` request of `purge_expired` reads.
const PURGE_PAGE: i32 = 500;

impl DynamoDbStore {
    /// One page of [`Store::scan`](crate::store::Store::scan): a `Scan` of up to `limit` items
    /// from `cursor` (the last key of the page before), of which the live records are reported.
    pub(super) async fn scan_page(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        let mut request = self
            .client
            .scan()
            .table_name(&*self.table)
            .consistent_read(true)
            .limit(limit.clamp(1, i32::MAX as usize) as i32);
        if let Some(cursor) = cursor {
            request = request.exclusive_start_key(attr::KEY, s(cursor));
        }
        let out = request
            .send()
            .await
            .map_err(|e| sdk_error("could not list the table", e))?;
        let now = now_ms();
        let mut records = Vec::new();
        for attrs in out.items() {
            let Some(key) = key_of(attrs) else {
                continue;
            };
            let item = Item::parse(attrs).map_err(|e| e.with_key(&key))?;
            if item.exists(now) {
                let (until, claimed_at) = (item.until(), item.claimed_at());
                records.push(RecordSummary::new(key, item.stored(), until, claimed_at));
            }
        }
        let next = out
            .last_evaluated_key()
            .and_then(|k| match k.get(attr::KEY) {
                Some(AttributeValue::S(pk)) => Some(pk.clone()),
                _ => None,
            });
        Ok(ScanPage { records, next })
    }

    /// Deletes up to about `limit` expired records (see [`EXPIRED`]): a filtered `Scan` of the
    /// whole table, then one conditional `DeleteItem` per item found, which skips a key claimed
    /// or renewed in between.
    pub(super) async fn purge(&self, limit: u64) -> Result<u64> {
        let mut deleted = 0;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let now = now_ms();
            let values = || {
                vec![
                    (":completed", s(State::Completed.as_str())),
                    (":in_flight", s(State::InFlight.as_str())),
                    (":now", n(now)),
                    (":abandoned", n(abandoned_before(now))),
                ]
            };
            let (names, filter_values) = placeholders(&[EXPIRED, "#pk"], values());
            let out = self
                .client
                .scan()
                .table_name(&*self.table)
                .consistent_read(true)
                .limit(PURGE_PAGE)
                .filter_expression(EXPIRED)
                .projection_expression("#pk")
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(filter_values)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("could not scan for expired records", e))?;
            for attrs in out.items() {
                if deleted >= limit {
                    return Ok(deleted);
                }
                let Some(AttributeValue::S(pk)) = attrs.get(attr::KEY) else {
                    continue;
                };
                let (names, values) = placeholders(&[EXPIRED], values());
                let result = self
                    .client
                    .delete_item()
                    .table_name(&*self.table)
                    .key(attr::KEY, s(pk))
                    .condition_expression(EXPIRED)
                    .set_expression_attribute_names(Some(names))
                    .set_expression_attribute_values(values)
                    .send()
                    .await;
                match result {
                    Ok(_) => deleted += 1,
                    Err(SdkError::ServiceError(e))
                        if matches!(
                            e.err(),
                            DeleteItemError::ConditionalCheckFailedException(_)
                        ) => {}
                    Err(e) => return Err(sdk_error("could not delete an expired record", e)),
                }
            }
            match out.last_evaluated_key() {
                Some(k) if deleted < limit => start = Some(k.clone()),
                _ => return Ok(deleted),
            }
        }
    }
}

/// The storage key of an item, `None` for an item whose `pk` is not one (not idem's).
fn key_of(attrs: &HashMap<String, AttributeValue>) -> Option<StorageKey> {
    match attrs.get(attr::KEY) {
        Some(AttributeValue::S(pk)) => StorageKey::from_hex(pk),
        _ => None,
    }
}
