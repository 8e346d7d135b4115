//! Pinned digests: the fingerprint of fixed inputs and the storage keys of fixed keys, written
//! out in hex. Every honest retry depends on these bytes staying the same across releases, a
//! serde_json upgrade and a sha2 upgrade: if one of these tests fails, a stored fingerprint would
//! no longer match (every retry would be `KeyReuse`) or a stored record would no longer be found
//! (every retry would run the body again). Do not update the expectations: fix the change.

use std::collections::{BTreeMap, HashMap};

use idem_runtime::__private::fingerprint_with;
use idem_runtime::fingerprint::canonical_json;
use idempotency::Operation;
use idempotency::{Fingerprint, StorageKey};
use serde::Serialize;

#[derive(Serialize)]
enum Method {
    Card { last4: String },
    Transfer(u32, u32),
    Cash,
}

#[derive(Serialize)]
struct Charge {
    amount: u64,
    big: u128,
    small: i64,
    ratio: f64,
    huge: f64,
    negative_zero: f64,
    note: Option<String>,
    none: Option<u8>,
    text: String,
    methods: Vec<Method>,
    tags: HashMap<String, Vec<u8>>,
    nested: BTreeMap<String, HashMap<String, bool>>,
}

fn charge(insertion_order: &[usize]) -> Charge {
    let keys = ["zeta", "alpha", "Émile", "a\"b", "10", "9", "é"];
    let mut tags = HashMap::new();
    let mut inner = HashMap::new();
    for &i in insertion_order {
        tags.insert(keys[i].to_string(), vec![i as u8]);
        inner.insert(keys[i].to_string(), i % 2 == 0);
    }
    let mut nested = BTreeMap::new();
    nested.insert("inner".to_string(), inner);
    Charge {
        amount: 500,
        big: u128::MAX,
        small: i64::MIN,
        ratio: 0.1,
        huge: 1e300,
        negative_zero: -0.0,
        note: Some("naïve café ☕ \"quoted\" \\ back\nslash\ttab \u{1} ctl \u{2028}".into()),
        none: None,
        text: "日本語 and emoji 🦀".into(),
        methods: vec![
            Method::Card {
                last4: "4242".into(),
            },
            Method::Transfer(1, 2),
            Method::Cash,
        ],
        tags,
        nested,
    }
}

fn hex(fp: Fingerprint) -> String {
    fp.to_hex()
}

#[test]
fn canonical_json_is_pinned() {
    assert_eq!(
        canonical_json(&charge(&[0, 1, 2, 3, 4, 5, 6])).unwrap(),
        CANONICAL
    );
}

const CANONICAL: &str = r#"{"amount":500,"big":340282366920938463463374607431768211455,"huge":1e+300,"methods":[{"Card":{"last4":"4242"}},{"Transfer":[1,2]},"Cash"],"negative_zero":-0.0,"nested":{"inner":{"10":true,"9":false,"a\"b":false,"alpha":false,"zeta":true,"Émile":true,"é":true}},"none":null,"note":"naïve café ☕ \"quoted\" \\ back\nslash\ttab \u0001 ctl  ","ratio":0.1,"small":-9223372036854775808,"tags":{"10":[4],"9":[5],"a\"b":[3],"alpha":[1],"zeta":[0],"Émile":[2],"é":[6]},"text":"日本語 and emoji 🦀"}"#;

#[test]
fn fingerprints_are_pinned_whatever_the_map_order() {
    let orders: [&[usize]; 4] = [
        &[0, 1, 2, 3, 4, 5, 6],
        &[6, 5, 4, 3, 2, 1, 0],
        &[3, 0, 6, 1, 5, 2, 4],
        &[2, 4, 6, 0, 1, 3, 5],
    ];
    for order in orders {
        assert_eq!(
            hex(Fingerprint::of(&charge(order)).unwrap()),
            "74cdbb914bbe780dc049d51711cc8b05ca274b899cad6f6e6f4673b897f64db1",
            "insertion order {order:?}"
        );
    }
    let cases: [(&str, Fingerprint, &str); 8] = [
        (
            "0.1",
            Fingerprint::of(&0.1f64).unwrap(),
            "14be4b45f18e0d8c67b4f719b5144eee88497e413709d11d85b096d8e2346310",
        ),
        (
            "1e300",
            Fingerprint::of(&1e300f64).unwrap(),
            "2b0de494c41db4c1bf0b41b0a3483db71f2b53a5e37caf5a61abee2d4169a935",
        ),
        (
            "-0.0",
            Fingerprint::of(&-0.0f64).unwrap(),
            "c26617c7ccbcaa6631b45d851b8cf56e21d2ca624bdb1193afdbd4b560702cec",
        ),
        (
            "u128::MAX",
            Fingerprint::of(&u128::MAX).unwrap(),
            "f315ff319bf588e202110ab686fb8c3dbca12b4df9fbd844615b566a2fff3e75",
        ),
        (
            "None",
            Fingerprint::of(&None::<u8>).unwrap(),
            "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        ),
        (
            "Some(\"é\\n\")",
            Fingerprint::of(&Some("é\n")).unwrap(),
            "d7cacaecd26f631e9e758a76af59fe7887cb0ec8b0e5d54ff7012653c2c5de95",
        ),
        (
            "unit variant",
            Fingerprint::of(&Method::Cash).unwrap(),
            "4d59f75de7119de24591663348291759cea54f9884f67fd0190ef241278c3930",
        ),
        (
            "parameters (order_id, amount)",
            fingerprint_with(|b| {
                b.add(&42u64)?;
                b.add("usd")?;
                Ok(())
            })
            .unwrap(),
            "aa9e265134539e52121a002c56b356c2531a36e6a7cd30b8a23d8dabf4a86b34",
        ),
    ];
    for (what, fp, expected) in cases {
        assert_eq!(hex(fp), expected, "{what}");
    }
}

#[test]
fn storage_keys_are_pinned() {
    let cases: [(&str, StorageKey, &str); 6] = [
        (
            "http scope",
            StorageKey::derive("http", "order-42").unwrap(),
            "8abcdd40dcc523853e45f830bf1bf9e11531aed101d0db0a50fef0dfa1f2772e",
        ),
        (
            "integer key",
            StorageKey::derive("tenant-7", &42u64).unwrap(),
            "3ce066e11ea561cd92332cf6c9141a49f7f1237f64e67a589262793fd7fe7575",
        ),
        (
            "non-ASCII key",
            StorageKey::derive("", "clé-✓").unwrap(),
            "c5712d2e6c3ad47bdd0312b105e794b7646fa8d16b27c9705418bd57b291eccf",
        ),
        (
            "operation, no scope",
            StorageKey::derive_for(&Operation::named("billing.charge"), "", "order-42").unwrap(),
            "5070c31c59619d7ece709e018d00f7c24d1533bc60a5dcd5481a4c70a81de3df",
        ),
        (
            "operation and scope",
            StorageKey::derive_for(&Operation::named("billing.charge"), "tenant-7", "order-42")
                .unwrap(),
            "288848e5960292d01725bf6ba0b99f6a48ea8fd876caa84c69d849087d64556f",
        ),
        (
            "another operation, same scope and key",
            StorageKey::derive_for(&Operation::named("billing.refund"), "tenant-7", "order-42")
                .unwrap(),
            "2956536a6853341046da0ea38f1ef3352132cbad779f7ae6c7f69159e616ec8f",
        ),
    ];
    for (what, key, expected) in cases {
        assert_eq!(key.to_string(), expected, "{what}");
    }
}
