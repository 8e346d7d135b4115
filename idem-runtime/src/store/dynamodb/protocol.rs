//! The claim protocol on DynamoDB: each method one conditional request (see the
//! [module docs](super#round-trips)).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use bytes::Bytes;

use super::item::{abandoned_before, Attributes, Item, State};
use super::request::{after, n, now_ms, now_us, placeholders, s, ttl_seconds};
use super::{attr, sdk_error, DynamoDbStore, FENCE_GRACE};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::steps_blob;
use crate::store::{
    Claim, FencingToken, Forgotten, ScanPage, Store, StoredRecord, ABANDONED_CLAIM_RETENTION,
};

/// The claim's condition: no item, or one whose lease or ttl ended (a tombstone's `until` is 0).
const CLAIM_CONDITION: &str = "attribute_not_exists(#pk) OR #until <= :now";

/// The guard of a holder's write: in flight under exactly `:tok`, not abandoned.
const HELD: &str = "#st = :in_flight AND #tok = :tok AND #until > :abandoned";

/// The largest record (or step frame) one write sends: DynamoDB's item limit (400 KB, 409 600
/// bytes, names and values) less room for the item's other attributes (key, state, token,
/// fingerprint, times: under 300 bytes). A larger one is [`Error::TooLarge`] before any request,
/// as it is on the other stores, instead of DynamoDB's `ValidationException` as a store error.
pub(super) const MAX_VALUE: usize = 409_600 - 1_024;

/// [`Error::TooLarge`] when `size` bytes cannot fit in an item.
fn fits(size: usize) -> Result<()> {
    if size > MAX_VALUE {
        return Err(Error::TooLarge {
            size,
            limit: MAX_VALUE,
        });
    }
    Ok(())
}

/// What a conditional `UpdateItem` did.
enum Written {
    /// The condition held; the item as it was before (with `ALL_OLD`), if there was one.
    Done(Option<Attributes>),
    /// The condition failed; the item as it is (with `ALL_OLD` on failure), if there is one.
    Refused(Option<Attributes>),
}

impl DynamoDbStore {
    /// One conditional `UpdateItem` of `key`'s item.
    async fn update(
        &self,
        key: &StorageKey,
        update: &str,
        condition: &str,
        values: Vec<(&'static str, AttributeValue)>,
        return_old: bool,
        what: &str,
    ) -> Result<Written> {
        let (names, values) = placeholders(&[update, condition], values);
        let mut request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key(attr::KEY, s(key.as_str()))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(values)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if return_old {
            request = request.return_values(ReturnValue::AllOld);
        }
        match request.send().await {
            Ok(out) => Ok(Written::Done(out.attributes)),
            Err(SdkError::ServiceError(e)) => match e.into_err() {
                UpdateItemError::ConditionalCheckFailedException(failed) => {
                    Ok(Written::Refused(failed.item))
                }
                other => Err(Error::store(
                    super::BACKEND,
                    format!(
                        "could not {what}: {}",
                        aws_sdk_dynamodb::error::DisplayErrorContext(&other)
                    ),
                )),
            },
            Err(e) => Err(sdk_error(&format!("could not {what}"), e)),
        }
    }

    /// A holder's write of `key` under `token`, guarded by [`HELD`]: `Ok(None)` once done, the
    /// item as it is (or `None` for no item) when the guard failed.
    async fn held_write(
        &self,
        key: &StorageKey,
        token: FencingToken,
        update: &str,
        mut values: Vec<(&'static str, AttributeValue)>,
        what: &str,
    ) -> Result<Option<Option<Item>>> {
        values.extend([
            (":in_flight", s(State::InFlight.as_str())),
            (":tok", n(token.0)),
            (":abandoned", n(abandoned_before(now_ms()))),
        ]);
        match self.update(key, update, HELD, values, false, what).await? {
            Written::Done(_) => Ok(None),
            Written::Refused(item) => Ok(Some(
                item.map(|attrs| Item::parse(&attrs))
                    .transpose()
                    .map_err(|e| e.with_key(key))?,
            )),
        }
    }

    /// The item of `key`, read strongly consistent.
    async fn read(&self, key: &StorageKey) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key(attr::KEY, s(key.as_str()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("could not read a record", e))?;
        out.item
            .map(|attrs| Item::parse(&attrs))
            .transpose()
            .map_err(|e| e.with_key(key))
    }
}

#[async_trait]
impl Store for DynamoDbStore {
    fn backend(&self) -> &'static str {
        super::BACKEND
    }

    fn keeps_steps(&self) -> bool {
        true
    }

    /// `false`: DynamoDB announces no changes, so waiting calls poll (see the
    /// [module docs](super#waiting)).
    fn notifies_changes(&self) -> bool {
        false
    }

    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim> {
        let now = now_ms();
        let base = now_us();
        let until = after(now, lease);
        let expires = ttl_seconds(after(until, ABANDONED_CLAIM_RETENTION));
        let mut update = String::from(
            "SET #st = :in_flight, #tok = if_not_exists(#tok, :base) + :one, #until = :until, #claimed_at = :now, #expires = :expires",
        );
        let mut values = vec![
            (":in_flight", s(State::InFlight.as_str())),
            (":base", n(base)),
            (":one", n(1)),
            (":until", n(until)),
            (":now", n(now)),
            (":expires", n(expires)),
        ];
        match fingerprint {
            Some(fp) => {
                update.push_str(", #fp = :fp REMOVE #rec");
                values.push((":fp", AttributeValue::B(fp.0.to_vec().into())));
            }
            None => update.push_str(" REMOVE #rec, #fp"),
        }
        let written = self
            .update(key, &update, CLAIM_CONDITION, values, true, "claim a key")
            .await?;
        match written {
            Written::Done(old) => {
                // The update ran atomically on `old`: the token it wrote follows from it.
                // Read leniently: the claim is written, and its holder must learn its token
                // (a `tok` that is no number would have failed the update).
                let old = old.unwrap_or_default();
                let last = match old.get(attr::TOKEN) {
                    Some(AttributeValue::N(t)) => t.parse().unwrap_or(base),
                    _ => base,
                };
                let takeover = matches!(old.get(attr::STATE),
                    Some(AttributeValue::S(st)) if st == State::InFlight.as_str());
                Ok(Claim::Acquired {
                    token: FencingToken(last + 1),
                    takeover,
                })
            }
            Written::Refused(Some(attrs)) => {
                let item = Item::parse(&attrs).map_err(|e| e.with_key(key))?;
                let completed = match item.state {
                    State::Completed => item.record.clone(),
                    State::InFlight => None,
                    // A tombstone's `until` is 0, which the condition lets through.
                    State::Released | State::Forgotten => {
                        return Err(Error::corrupt(format!(
                            "DynamoDB item: a {} tombstone with a future expiry",
                            item.state.as_str()
                        ))
                        .with_key(key));
                    }
                };
                Ok(Claim::on_live_record(
                    item.fingerprint.as_ref(),
                    fingerprint,
                    completed,
                ))
            }
            Written::Refused(None) => Err(Error::store(
                super::BACKEND,
                "the claim's condition failed and DynamoDB returned no item (ReturnValuesOnConditionCheckFailure unsupported?)",
            )),
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        fits(record.len())?;
        let until = after(now_ms(), ttl);
        let values = vec![
            (":completed", s(State::Completed.as_str())),
            (":rec", AttributeValue::B(record.to_vec().into())),
            (":until", n(until)),
            (":expires", n(ttl_seconds(until))),
        ];
        let update =
            "SET #st = :completed, #rec = :rec, #until = :until, #expires = :expires REMOVE #steps";
        match self
            .held_write(key, token, update, values, "store a result")
            .await?
        {
            None => Ok(()),
            // A retry of this very write (the SDK's, after a lost reply) finds it done.
            Some(Some(item))
                if item.state == State::Completed
                    && item.token == token
                    && item.record.as_deref() == Some(record) =>
            {
                Ok(())
            }
            Some(_) => Err(Error::lease_lost(key)),
        }
    }

    async fn release(&self, key: &StorageKey, token: FencingToken) -> Result<()> {
        let values = vec![
            (":released", s(State::Released.as_str())),
            (":zero", n(0)),
            (":expires", n(ttl_seconds(after(now_ms(), FENCE_GRACE)))),
        ];
        let update = "SET #st = :released, #until = :zero, #expires = :expires REMOVE #rec, #steps, #fp, #claimed_at";
        match self
            .held_write(key, token, update, values, "release a key")
            .await?
        {
            None => Ok(()),
            // A retry of this very release finds its own tombstone.
            Some(Some(item)) if item.state == State::Released && item.token == token => Ok(()),
            Some(_) => Err(Error::lease_lost(key)),
        }
    }

    async fn renew(&self, key: &StorageKey, token: FencingToken, lease: Duration) -> Result<()> {
        let until = after(now_ms(), lease);
        let values = vec![
            (":until", n(until)),
            (
                ":expires",
                n(ttl_seconds(after(until, ABANDONED_CLAIM_RETENTION))),
            ),
        ];
        let update = "SET #until = :until, #expires = :expires";
        match self
            .held_write(key, token, update, values, "renew a lease")
            .await?
        {
            None => Ok(()),
            Some(_) => Err(Error::lease_lost(key)),
        }
    }

    async fn get(&self, key: &StorageKey) -> Result<Option<StoredRecord>> {
        let now = now_ms();
        Ok(self
            .read(key)
            .await?
            .filter(|item| item.exists(now))
            .map(|item| item.stored()))
    }

    async fn purge_expired(&self) -> Result<u64> {
        self.purge(u64::MAX).await
    }

    async fn purge_expired_up_to(&self, limit: u64) -> Result<u64> {
        self.purge(limit).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten> {
        let now = now_ms();
        let condition = if force {
            "(#st = :completed AND #until > :now) OR (#st = :in_flight AND #until > :abandoned)"
        } else {
            "#st = :completed AND #until > :now"
        };
        let values = vec![
            (":completed", s(State::Completed.as_str())),
            (":in_flight", s(State::InFlight.as_str())),
            (":forgotten", s(State::Forgotten.as_str())),
            (":now", n(now)),
            (":abandoned", n(abandoned_before(now))),
            (":zero", n(0)),
            (":expires", n(ttl_seconds(after(now, FENCE_GRACE)))),
        ];
        let update = "SET #st = :forgotten, #until = :zero, #expires = :expires REMOVE #rec, #steps, #fp, #claimed_at";
        let written = self
            .update(key, update, condition, values, true, "forget a record")
            .await?;
        let parse = |attrs: Option<Attributes>| {
            attrs
                .filter(|attrs| !attrs.is_empty())
                .map(|attrs| Item::parse(&attrs))
                .transpose()
                .map_err(|e| e.with_key(key))
        };
        match written {
            Written::Done(old) => match parse(old)? {
                Some(item) if item.state == State::Completed => {
                    Ok(Forgotten::Completed { token: item.token })
                }
                Some(item) => Ok(Forgotten::InFlight { token: item.token }),
                None => Ok(Forgotten::Absent),
            },
            Written::Refused(item) => match parse(item)? {
                Some(item) if item.exists(now) && item.state == State::InFlight => {
                    Err(Error::InFlight {
                        key: Some(key.clone()),
                    })
                }
                _ => Ok(Forgotten::Absent),
            },
        }
    }

    async fn scan(&self, cursor: Option<&str>, limit: usize) -> Result<ScanPage> {
        self.scan_page(cursor, limit).await
    }

    async fn save_step(
        &self,
        key: &StorageKey,
        token: FencingToken,
        name: &str,
        record: &[u8],
    ) -> Result<()> {
        // The frame: two u32 lengths and the bytes. The steps of a call share its item, so
        // steps that each fit can still overflow it together: that is DynamoDB's
        // `ValidationException`, an `Error::Store`.
        fits(name.len().saturating_add(record.len()).saturating_add(8))?;
        let frame = steps_blob::append(None, name, record);
        let values = vec![
            (
                ":frame",
                AttributeValue::L(vec![AttributeValue::B(frame.into())]),
            ),
            (":none", AttributeValue::L(Vec::new())),
        ];
        let update = "SET #steps = list_append(if_not_exists(#steps, :none), :frame)";
        match self
            .held_write(key, token, update, values, "save a step")
            .await?
        {
            None => Ok(()),
            Some(_) => Err(Error::lease_lost(key)),
        }
    }

    async fn load_steps(
        &self,
        key: &StorageKey,
        token: FencingToken,
    ) -> Result<Vec<(String, Bytes)>> {
        let now = now_ms();
        let Some(item) = self.read(key).await?.filter(|i| i.held_by(token, now)) else {
            return Err(Error::lease_lost(key));
        };
        // Frames in the order saved: a name saved again counts by its last frame.
        let mut steps: Vec<(String, Bytes)> = Vec::new();
        for frame in &item.steps {
            for (name, record) in steps_blob::decode(frame).map_err(|e| e.with_key(key))? {
                match steps.iter_mut().find(|(n, _)| *n == name) {
                    Some(slot) => slot.1 = record,
                    None => steps.push((name, record)),
                }
            }
        }
        Ok(steps)
    }
}
