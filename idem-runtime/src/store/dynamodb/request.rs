//! The parts of a request: the placeholders of its expressions and the clock values it sends.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;

/// The `ExpressionAttributeNames` and `ExpressionAttributeValues` of `expressions`: every
/// `#name` placeholder stands for the attribute `name`, and of `values` only those the
/// expressions use are kept (DynamoDB refuses unused ones).
pub(super) fn placeholders(
    expressions: &[&str],
    values: Vec<(&'static str, AttributeValue)>,
) -> (
    HashMap<String, String>,
    Option<HashMap<String, AttributeValue>>,
) {
    let mut names = HashMap::new();
    let mut used = Vec::new();
    for expression in expressions {
        let mut rest = *expression;
        while let Some(at) = rest.find(['#', ':']) {
            let word_len = rest[at + 1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len() - at - 1);
            let word = &rest[at..at + 1 + word_len];
            if let Some(name) = word.strip_prefix('#') {
                names.insert(word.to_owned(), name.to_owned());
            } else {
                used.push(word);
            }
            rest = &rest[at + 1 + word_len..];
        }
    }
    let values: HashMap<String, AttributeValue> = values
        .into_iter()
        .filter(|(name, _)| used.contains(name))
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    (names, (!values.is_empty()).then_some(values))
}

/// A number attribute.
pub(super) fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A string attribute.
pub(super) fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

/// The longest lease or ttl written (100 years); longer ones are cut to it.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The clock of this process, in Unix milliseconds.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The clock of this process, in Unix microseconds: the first token of a key without an item.
pub(super) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `now_ms` plus `d` in whole milliseconds, rounded up (a lease of 0.5 ms is not 0).
pub(super) fn after(now_ms: u64, d: Duration) -> u64 {
    let ms = d.min(MAX_DURATION).as_nanos().div_ceil(1_000_000) as u64;
    now_ms + ms
}

/// The TTL attribute (Unix seconds, rounded up) of an item to keep until `ms`.
pub(super) fn ttl_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_those_used() {
        let (names, values) = placeholders(
            &["SET #st = :a, #tok = #tok + :one", "#until <= :now"],
            vec![
                (":a", n(1)),
                (":one", n(1)),
                (":now", n(2)),
                (":unused", n(3)),
            ],
        );
        let mut names: Vec<_> = names.into_iter().collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("#st".into(), "st".into()),
                ("#tok".into(), "tok".into()),
                ("#until".into(), "until".into())
            ]
        );
        let mut values: Vec<_> = values.unwrap().into_keys().collect();
        values.sort();
        assert_eq!(values, [":a", ":now", ":one"]);
    }

    #[test]
    fn times_round_up() {
        assert_eq!(after(1000, Duration::from_micros(500)), 1001);
        assert_eq!(after(1000, Duration::ZERO), 1000);
        assert_eq!(ttl_seconds(1001), 2);
        assert_eq!(ttl_seconds(2000), 2);
        assert!(after(0, Duration::MAX) <= MAX_DURATION.as_millis() as u64);
    }
}
