//! Unit tests of canonical JSON.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

/// The reference: canonical JSON through a `serde_json::Value` tree.
fn via_value<T: Serialize>(v: &T) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    walk(v, out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    walk(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }
    let mut out = String::new();
    walk(&serde_json::to_value(v).unwrap(), &mut out);
    out
}

fn direct<T: Serialize>(v: &T) -> String {
    let mut out = Vec::new();
    super::write(v, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[derive(Serialize)]
struct Order {
    zeta: u32,
    alpha: Option<String>,
    items: Vec<Item>,
    meta: HashMap<String, Value>,
    kind: Kind,
    nested: Option<Box<Order>>,
    #[serde(flatten)]
    extra: BTreeMap<String, i64>,
    unit: (),
    tuple: (u8, &'static str, f64),
    bytes: &'static [u8],
}

#[derive(Serialize)]
struct Item {
    sku: &'static str,
    qty: i64,
}

#[derive(Serialize)]
#[allow(dead_code)]
enum Kind {
    Unit,
    Newtype(u8),
    Tuple(u8, String),
    Struct { b: u8, a: u8 },
}

fn order(kind: Kind, nested: bool) -> Order {
    let mut meta = HashMap::new();
    for i in 0..20 {
        meta.insert(
            format!("k{i}"),
            serde_json::json!({"z": i, "a": [i, "é\"\\\n"]}),
        );
    }
    Order {
        zeta: 1,
        alpha: Some("ünïcode \u{1F600} \u{7f}".into()),
        items: vec![
            Item { sku: "a", qty: -3 },
            Item {
                sku: "b",
                qty: i64::MAX,
            },
        ],
        meta,
        kind,
        nested: nested.then(|| Box::new(order(Kind::Unit, false))),
        extra: [("mid".to_string(), 5), ("aaa".to_string(), 6)].into(),
        unit: (),
        tuple: (7, "t", 1.5e-7),
        bytes: b"\x00\xff",
    }
}

#[test]
fn matches_the_value_tree_reference() {
    for kind in [
        Kind::Unit,
        Kind::Newtype(3),
        Kind::Tuple(1, "x".into()),
        Kind::Struct { b: 2, a: 1 },
    ] {
        let o = order(kind, true);
        assert_eq!(direct(&o), via_value(&o));
    }
    let mut int_keys = HashMap::new();
    for i in -5i32..5 {
        int_keys.insert(i, vec![Some(i), None]);
    }
    assert_eq!(direct(&int_keys), via_value(&int_keys));
    assert_eq!(
        direct(&(1u64, -2i8, true, 'c', "s", f64::NAN)),
        via_value(&(1u64, -2i8, true, 'c', "s", f64::NAN))
    );
}

#[test]
fn struct_fields_are_sorted() {
    #[derive(Serialize)]
    struct S {
        b: u8,
        a: u8,
    }
    assert_eq!(direct(&S { b: 2, a: 1 }), r#"{"a":1,"b":2}"#);
}

#[test]
fn unrepresentable_keys_are_errors() {
    let mut m = HashMap::new();
    m.insert(vec![1u8], 1);
    assert!(super::write(&m, &mut Vec::new()).is_err());
}
