//! The subcommands: each reads or changes the store and returns what to print on stdout.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::record::{Outcome as RecordOutcome, Record};
use idem_runtime::{Error, Forgotten, RecordState, RecordSummary, StorageKey, Store, StoredRecord};
use serde_json::{json, Map, Value};

use crate::args::RecordArgs;
use crate::failure::{Exit, Failure, Outcome};
use crate::output::{human, millis, timestamp, until, Table};

/// How many records one [`Store::scan`] call asks for.
const PAGE: usize = 500;

/// The most pages a listing reads: a bound on the loop (500 million records), far above any
/// store this command is meant for.
const MAX_PAGES: usize = 1_000_000;

/// The storage key `args` names: `--storage-key` as given, else derived from `--scope`,
/// `--key` and `--name` as the application derived it.
pub fn storage_key(args: &RecordArgs) -> Outcome<StorageKey> {
    if let Some(hex) = &args.storage_key {
        return StorageKey::from_hex(&hex.to_ascii_lowercase()).ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                format!("--storage-key `{hex}` is not a storage key: expected 64 hex digits"),
            )
        });
    }
    let Some(key) = args.key.as_deref() else {
        return Err(Failure::new(
            Exit::Usage,
            "give --key (with --scope and --name as the application uses them) or --storage-key",
        ));
    };
    let derived = match &args.name {
        Some(name) => StorageKey::derive_named(name, args.scope.as_str(), key),
        None => StorageKey::derive(args.scope.as_str(), key),
    };
    derived.map_err(|e| Failure::new(Exit::Usage, format!("cannot derive the storage key: {e}")))
}

/// "No record" with what was looked for, and what to check when the key was derived.
fn no_record(key: &StorageKey, args: &RecordArgs) -> Failure {
    let mut message = format!("no record under storage key {key}");
    if let Some(user_key) = &args.key {
        let name = match &args.name {
            Some(name) => format!("operation {name:?}"),
            None => "no operation (--name not given)".to_owned(),
        };
        message.push_str(&format!(
            " (key {user_key:?}, scope {:?}, {name}): records of #[idempotent] functions need --name; the HTTP layer's need --scope set to the client's principal (or the layer's shared scope name)",
            args.scope
        ));
    }
    Failure::new(Exit::NoRecord, message)
}

/// `idem get`: one record, as a table or one JSON object.
pub async fn get(store: &dyn Store, args: &RecordArgs, json: bool) -> Outcome<String> {
    let key = storage_key(args)?;
    let stored = store
        .get(&key)
        .await
        .map_err(|e| Failure::during("could not read the record", e))?
        .ok_or_else(|| no_record(&key, args))?;
    let fields = describe(&key, &stored)?;
    if json {
        let object: Map<String, Value> = fields
            .into_iter()
            .map(|field| (field.name.to_owned(), field.json))
            .collect();
        return Ok(pretty(&Value::Object(object)));
    }
    let mut table = Table::new();
    let mut value = None;
    for field in fields {
        match (field.name, field.human) {
            ("value", _) => value = Some(pretty(&field.json)),
            (name, Some(human)) => {
                let label = name.strip_suffix("_ms").unwrap_or(name).replace('_', " ");
                table.pair(&label, human);
            }
            (_, None) => {}
        }
    }
    let mut text = table.to_string();
    if let Some(value) = value {
        text.push_str("value:\n");
        text.push_str(&value);
    }
    Ok(text)
}

/// One field of `idem get`: its JSON name and value, and how a person reads it (`None`: only
/// in the JSON).
struct Field {
    name: &'static str,
    json: Value,
    human: Option<String>,
}

impl Field {
    /// A field printed alike in both forms.
    fn plain(name: &'static str, value: impl Into<Value> + ToString) -> Self {
        Field {
            name,
            human: Some(value.to_string()),
            json: value.into(),
        }
    }

    /// A field with a form of its own for people.
    fn shown(name: &'static str, json: Value, human: impl Into<String>) -> Self {
        Field {
            name,
            json,
            human: Some(human.into()),
        }
    }

    /// A field only in the JSON.
    fn json_only(name: &'static str, json: Value) -> Self {
        Field {
            name,
            json,
            human: None,
        }
    }
}

/// The fields of a record, in the order `get` prints them. In the JSON, durations are in
/// milliseconds and times in RFC 3339; `value` is the stored JSON, decoded.
fn describe(key: &StorageKey, stored: &StoredRecord) -> Outcome<Vec<Field>> {
    let fingerprint = match stored.fingerprint {
        Some(f) => Field::plain("fingerprint", f.to_hex()),
        None => Field::shown("fingerprint", Value::Null, "none"),
    };
    let mut fields = vec![Field::plain("storage_key", key.as_str())];
    let (token, record) = match &stored.state {
        RecordState::InFlight { token } => {
            fields.push(Field::plain("state", "in_flight"));
            fields.push(Field::plain("token", token.0));
            fields.push(fingerprint);
            return Ok(fields);
        }
        RecordState::Completed { token, record } => (token, record),
    };
    fields.push(Field::plain("state", "completed"));
    fields.push(Field::plain("token", token.0));
    fields.push(fingerprint);
    let decoded = Record::decode(record).map_err(|e| {
        Failure::new(
            Exit::Store,
            format!(
                "the record under storage key {key} cannot be read: {e} (`idem forget` removes it)"
            ),
        )
    })?;
    let outcome = match decoded.outcome {
        RecordOutcome::Ok => "ok",
        RecordOutcome::Err => "err",
        RecordOutcome::Unknown => "unknown",
    };
    fields.push(Field::plain("outcome", outcome));
    fields.push(Field::plain("operation", decoded.operation));
    fields.push(Field::plain("schema_version", decoded.result_version));
    fields.push(Field::plain("type", decoded.type_name));
    // The writer's clock: the store's own expiry may differ by that clock's skew.
    let completed_at = UNIX_EPOCH + Duration::from_millis(decoded.completed_at_ms);
    let ttl = Duration::from_millis(decoded.ttl_ms);
    let expires_at = completed_at + ttl;
    let expires_in = expires_at
        .duration_since(SystemTime::now())
        .map_err(|passed| passed.duration());
    fields.push(Field::plain("completed_at", timestamp(completed_at)));
    fields.push(Field::shown("ttl_ms", millis(ttl), human(ttl)));
    fields.push(Field::shown(
        "expires_at",
        timestamp(expires_at).into(),
        format!("{} ({})", timestamp(expires_at), until(expires_in)),
    ));
    fields.push(Field::json_only(
        "expires_in_ms",
        expires_in.ok().map_or(Value::Null, millis),
    ));
    let size = record.len() as u64;
    fields.push(Field::shown("size", size.into(), format!("{size} bytes")));
    if decoded.outcome == RecordOutcome::Unknown {
        fields.push(Field::plain("reason", decoded.reason()));
    } else {
        let value = serde_json::from_slice(decoded.payload).unwrap_or_else(|_| {
            // Not JSON (a custom payload): its bytes as text.
            Value::from(String::from_utf8_lossy(decoded.payload).into_owned())
        });
        fields.push(Field::json_only("value", value));
    }
    Ok(fields)
}

/// `idem forget`: removes one record; an in-flight one only with `force`.
pub async fn forget(store: &dyn Store, args: &RecordArgs, force: bool) -> Outcome<String> {
    let key = storage_key(args)?;
    match store.forget(&key, force).await {
        Ok(Forgotten::Completed { token }) => Ok(format!(
            "forgot the completed record under storage key {key} (token {}): the next call with this key runs the body\n",
            token.0
        )),
        Ok(Forgotten::InFlight { token }) => Ok(format!(
            "forgot the in-flight record under storage key {key}: its holder (token {}) is fenced off, and the next call with this key runs the body\n",
            token.0
        )),
        Ok(Forgotten::Absent) => Err(no_record(&key, args)),
        Err(Error::InFlight { .. }) => Err(Failure::new(
            Exit::Refused,
            format!(
                "the record under storage key {key} is in flight (a call may be running its body, or its holder died): not removed. Add --force to remove it anyway: its holder is fenced off (its result is not stored), and the next call with this key runs the body again, even if the old body is still running"
            ),
        )),
        Err(e) => Err(Failure::during("could not forget the record", e)),
    }
}

/// Calls `visit` with every record of the store, page by page.
async fn scan_all(store: &dyn Store, mut visit: impl FnMut(RecordSummary)) -> Outcome<()> {
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = store
            .scan(cursor.as_deref(), PAGE)
            .await
            .map_err(|e| Failure::during("could not list the records", e))?;
        page.records.into_iter().for_each(&mut visit);
        match page.next {
            None => return Ok(()),
            Some(next) if cursor.as_deref() == Some(next.as_str()) => {
                return Err(Failure::new(
                    Exit::Store,
                    format!(
                        "the {} store's listing does not advance (cursor {next:?} returned twice)",
                        store.backend()
                    ),
                ))
            }
            Some(next) => cursor = Some(next),
        }
    }
    Err(Failure::new(
        Exit::Store,
        format!("the listing did not end after {MAX_PAGES} pages"),
    ))
}

/// `idem in-flight`: the claims in flight at least `older_than` old, oldest first.
pub async fn in_flight(
    store: &dyn Store,
    older_than: Option<Duration>,
    json: bool,
) -> Outcome<String> {
    let mut claims = Vec::new();
    scan_all(store, |record| {
        if record.in_flight() {
            claims.push(record);
        }
    })
    .await?;
    let now = SystemTime::now();
    if let Some(min) = older_than {
        claims.retain(|c| at_least_age(c, now) >= min);
    }
    claims.sort_by(|a, b| {
        at_least_age(b, now)
            .cmp(&at_least_age(a, now))
            .then_with(|| a.key.cmp(&b.key))
    });
    if json {
        let items: Vec<Value> = claims.iter().map(|c| claim_json(c, now)).collect();
        return Ok(pretty(&Value::Array(items)));
    }
    if claims.is_empty() {
        return Ok(match older_than {
            Some(min) => format!("no claims in flight older than {}\n", human(min)),
            None => "no claims in flight\n".to_owned(),
        });
    }
    let mut table = Table::with_header(&["STORAGE KEY", "TOKEN", "LEASE", "AGE"]);
    for claim in &claims {
        let lease = match claim.expires_in(now) {
            Ok(left) => format!("{} left", human(left)),
            Err(passed) => format!("expired {} ago", human(passed)),
        };
        table.row(vec![
            claim.key.to_string(),
            token(claim).to_string(),
            lease,
            claim.age(now).map_or_else(|| "unknown".to_owned(), human),
        ]);
    }
    Ok(table.to_string())
}

/// How old a claim is at least: its age where the store keeps the time of the claim, else
/// how long ago its lease ended (zero while the lease runs).
fn at_least_age(claim: &RecordSummary, now: SystemTime) -> Duration {
    claim
        .age(now)
        .unwrap_or_else(|| claim.expires_in(now).err().unwrap_or_default())
}

/// The token of a record's state.
fn token(record: &RecordSummary) -> u64 {
    match &record.state {
        RecordState::InFlight { token } | RecordState::Completed { token, .. } => token.0,
    }
}

/// One claim of `idem in-flight --json`.
fn claim_json(claim: &RecordSummary, now: SystemTime) -> Value {
    let lease = claim.expires_in(now);
    json!({
        "storage_key": claim.key.as_str(),
        "token": token(claim),
        "fingerprint": claim.fingerprint.map(|f| f.to_hex()),
        "lease_expires_at": timestamp(claim.expires_at),
        "lease_expired": lease.is_err(),
        "lease_left_ms": lease.ok().map(millis),
        "lease_expired_ago_ms": lease.err().map(millis),
        "claimed_at": claim.claimed_at.map(timestamp),
        "age_ms": claim.age(now).map(millis),
    })
}

/// `idem purge`: removes expired records and says how many.
pub async fn purge(store: &dyn Store, json: bool) -> Outcome<String> {
    let removed = store
        .purge_expired()
        .await
        .map_err(|e| Failure::during("could not purge", e))?;
    if json {
        return Ok(pretty(&json!({ "removed": removed })));
    }
    let note = if store.backend() == "redis" {
        " (the Redis server expires records itself)"
    } else {
        ""
    };
    let noun = if removed == 1 { "record" } else { "records" };
    Ok(format!("removed {removed} expired {noun}{note}\n"))
}

/// What `idem stats` counts.
#[derive(Debug, Default)]
struct Stats {
    records: u64,
    completed: u64,
    ok: u64,
    err: u64,
    unknown: u64,
    unreadable: u64,
    in_flight: u64,
    lease_expired: u64,
    /// The oldest claim in flight whose age is known: its age and storage key.
    oldest: Option<(Duration, StorageKey)>,
    bytes: u64,
}

impl Stats {
    /// Counts one record, seen at `now`.
    fn add(&mut self, record: &RecordSummary, now: SystemTime) {
        self.records += 1;
        self.bytes += record.size;
        match &record.state {
            RecordState::InFlight { .. } => {
                self.in_flight += 1;
                if record.expires_in(now).is_err() {
                    self.lease_expired += 1;
                }
                if let Some(age) = record.age(now) {
                    if self.oldest.as_ref().is_none_or(|(oldest, _)| age > *oldest) {
                        self.oldest = Some((age, record.key.clone()));
                    }
                }
            }
            RecordState::Completed { record, .. } => {
                self.completed += 1;
                match Record::decode(record).map(|r| r.outcome) {
                    Ok(RecordOutcome::Ok) => self.ok += 1,
                    Ok(RecordOutcome::Err) => self.err += 1,
                    Ok(RecordOutcome::Unknown) => self.unknown += 1,
                    Err(_) => self.unreadable += 1,
                }
            }
        }
    }
}

/// `idem stats`: counts by state and outcome, the oldest claim in flight, the bytes stored.
pub async fn stats(store: &dyn Store, json: bool) -> Outcome<String> {
    let now = SystemTime::now();
    let mut stats = Stats::default();
    scan_all(store, |record| stats.add(&record, now)).await?;
    if json {
        return Ok(pretty(&json!({
            "backend": store.backend(),
            "records": stats.records,
            "completed": stats.completed,
            "outcomes": {
                "ok": stats.ok,
                "err": stats.err,
                "unknown": stats.unknown,
                "unreadable": stats.unreadable,
            },
            "in_flight": stats.in_flight,
            "lease_expired": stats.lease_expired,
            "oldest_in_flight_age_ms": stats.oldest.as_ref().map(|(age, _)| millis(*age)),
            "oldest_in_flight_key": stats.oldest.as_ref().map(|(_, key)| key.as_str()),
            "bytes": stats.bytes,
        })));
    }
    let mut table = Table::new();
    table
        .pair("backend", store.backend())
        .pair("records", stats.records)
        .pair("completed", stats.completed)
        .pair("  ok", stats.ok)
        .pair("  err", stats.err)
        .pair("  unknown outcome", stats.unknown)
        .pair("  unreadable", stats.unreadable)
        .pair("in flight", stats.in_flight)
        .pair("  lease expired", stats.lease_expired);
    match &stats.oldest {
        Some((age, key)) => table.pair("oldest in flight", format!("{} ({key})", human(*age))),
        None => table.pair("oldest in flight", "-"),
    };
    table.pair("bytes", stats.bytes);
    Ok(table.to_string())
}

/// A JSON document, pretty-printed, with a final newline.
fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_runtime::{Claim, MemoryStore};

    fn by_storage_key(key: &StorageKey) -> RecordArgs {
        RecordArgs {
            key: None,
            scope: String::new(),
            name: None,
            storage_key: Some(key.as_str().to_owned()),
        }
    }

    async fn claim(store: &MemoryStore, key: &StorageKey, lease: Duration) -> u64 {
        match store.claim(key, None, lease).await.unwrap() {
            Claim::Acquired { token, .. } => token.0,
            other => panic!("a fresh key is claimed, not {other:?}"),
        }
    }

    #[test]
    fn keys_derive_as_the_application_derives_them() {
        let mut args = RecordArgs {
            key: Some("order-1".into()),
            scope: "acme".into(),
            name: Some("billing.charge".into()),
            storage_key: None,
        };
        let with_name = StorageKey::derive_named("billing.charge", "acme", "order-1");
        assert_eq!(storage_key(&args).ok(), with_name.ok());
        args.name = None;
        assert_eq!(
            storage_key(&args).ok(),
            StorageKey::derive("acme", "order-1").ok()
        );
        let given = StorageKey::derive("x", "y").unwrap();
        let mut upper = by_storage_key(&given);
        upper.storage_key = Some(given.as_str().to_ascii_uppercase());
        assert_eq!(storage_key(&upper).ok(), Some(given));
        args.key = Some(String::new());
        assert_eq!(storage_key(&args).err().map(|f| f.exit), Some(Exit::Usage));
    }

    #[tokio::test]
    async fn forget_refuses_a_claim_in_flight_unless_forced() {
        let store = MemoryStore::new();
        let key = StorageKey::derive("s", "k").unwrap();
        let token = claim(&store, &key, Duration::from_secs(60)).await;
        let args = by_storage_key(&key);
        let refused = forget(&store, &args, false).await.unwrap_err();
        assert_eq!(refused.exit, Exit::Refused);
        assert!(refused.message.contains("--force"), "{refused}");
        let forced = forget(&store, &args, true).await.unwrap();
        assert!(forced.contains(&format!("token {token}")), "{forced}");
        let absent = forget(&store, &args, true).await.unwrap_err();
        assert_eq!(absent.exit, Exit::NoRecord);
    }

    #[tokio::test]
    async fn in_flight_and_stats_count_what_the_store_holds() {
        let store = MemoryStore::new();
        let done = StorageKey::derive("s", "done").unwrap();
        let token = claim(&store, &done, Duration::from_secs(60)).await;
        let record = Record::now(
            RecordOutcome::Err,
            token,
            Duration::from_secs(60),
            b"\"no\"",
        );
        store
            .complete(
                &done,
                idem_runtime::FencingToken(token),
                &record.encode(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        // More records than a page holds, so the listing takes several pages.
        let mut keys = Vec::new();
        for i in 0..(PAGE + 3) {
            let key = StorageKey::derive("s", format!("claim-{i}").as_str()).unwrap();
            claim(&store, &key, Duration::from_secs(60)).await;
            keys.push(key);
        }
        let listed: Value =
            serde_json::from_str(&in_flight(&store, None, true).await.unwrap()).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), PAGE + 3);
        let young: Value = serde_json::from_str(
            &in_flight(&store, Some(Duration::from_secs(3600)), true)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            young.as_array().map(Vec::len),
            Some(0),
            "none is an hour old"
        );
        let stats: Value = serde_json::from_str(&stats(&store, true).await.unwrap()).unwrap();
        assert_eq!(stats["records"], PAGE as u64 + 4, "{stats}");
        assert_eq!(stats["completed"], 1);
        assert_eq!(stats["outcomes"]["err"], 1);
        assert_eq!(stats["in_flight"], PAGE as u64 + 3);
        assert_eq!(stats["lease_expired"], 0);
        assert!(stats["bytes"].as_u64().is_some_and(|b| b > 0), "{stats}");
        let table = in_flight(&store, None, false).await.unwrap();
        assert!(table.starts_with("STORAGE KEY"), "{table}");
        assert!(table.contains(keys[0].as_str()), "{table}");
    }

    #[tokio::test]
    async fn get_shows_an_unknown_outcome_with_its_reason() {
        let store = MemoryStore::new();
        let key = StorageKey::derive("s", "lost").unwrap();
        let token = claim(&store, &key, Duration::from_secs(60)).await;
        let record = Record::unknown(token, "the body panicked", Duration::from_secs(60));
        store
            .complete(
                &key,
                idem_runtime::FencingToken(token),
                &record.encode(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let got: Value =
            serde_json::from_str(&get(&store, &by_storage_key(&key), true).await.unwrap()).unwrap();
        assert_eq!(got["outcome"], "unknown", "{got}");
        assert_eq!(got["reason"], "the body panicked");
        assert_eq!(got["value"], Value::Null);
        let text = get(&store, &by_storage_key(&key), false).await.unwrap();
        assert!(text.contains("reason          the body panicked"), "{text}");
    }
}
