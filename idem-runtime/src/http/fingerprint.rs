//! The fingerprint of a request: what must match when its key is reused.
//!
//! It is the SHA-256 of the method, the path and query, and the body. A body whose
//! `Content-Type` is JSON (`application/json`, or any `type/subtype+json` such as
//! `application/merge-patch+json`) counts by its canonical form: object members sorted by their
//! keys' UTF-8 bytes, no whitespace, strings written as serde_json escapes them (the canonical
//! form of the attribute's fingerprints). So a retry whose JSON differs only in member order,
//! whitespace or string escapes (`"\u0041"` and `"A"`) is the same request. Numbers are kept as
//! written (`1`, `1.0` and `1e0` differ): parsing them as floats would merge numbers that differ
//! beyond a float's precision, which a handler using big integers or decimals tells apart.
//! Members with the same key keep their order. A body that is not valid JSON (or nests deeper
//! than [`MAX_DEPTH`]) counts by its bytes, as do bodies of every other type.

use std::borrow::Cow;

use http::header::CONTENT_TYPE;
use http::{request, HeaderMap};

use crate::fingerprint::Fingerprint;

/// How deep a JSON body may nest to be fingerprinted by its canonical form (serde_json's own
/// limit); a deeper body counts by its bytes.
pub(super) const MAX_DEPTH: usize = 128;

/// The fingerprint of a request with these parts and this body.
pub(super) fn of_request(parts: &request::Parts, body: &[u8]) -> Fingerprint {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let canonical = is_json(&parts.headers)
        .then(|| canonical_json(body))
        .flatten();
    let body = canonical.as_deref().unwrap_or(body);
    Fingerprint::of_bytes(&[parts.method.as_str().as_bytes(), target.as_bytes(), body])
}

/// Whether the request's one `Content-Type` is `application/json` or `*/*+json` (parameters
/// such as `charset` ignored, case-insensitive).
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    !kind.is_empty()
        && !kind.contains(char::is_whitespace)
        && (subtype == "json" && kind.eq_ignore_ascii_case("application")
            || subtype.len() > "+json".len() && subtype.ends_with("+json"))
}

/// The canonical form of the JSON text `input`, or `None` if it is not one JSON value (with
/// optional whitespace around it) nesting at most [`MAX_DEPTH`] deep.
pub(super) fn canonical_json(input: &[u8]) -> Option<Vec<u8>> {
    let mut parser = Parser { input, pos: 0 };
    let mut out = Vec::with_capacity(input.len());
    parser.skip_whitespace();
    parser.value(&mut out, 0)?;
    parser.skip_whitespace();
    (parser.pos == input.len()).then_some(out)
}

/// A JSON string of the input: its decoded bytes (what keys sort by) and its canonical encoding.
struct JsonString<'a> {
    decoded: Cow<'a, [u8]>,
    encoded: Cow<'a, [u8]>,
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| self.pos += 1)
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(out, depth + 1),
            b'[' => self.array(out, depth + 1),
            b'"' => {
                let s = self.string()?;
                out.extend_from_slice(&s.encoded);
                Some(())
            }
            b't' => self.literal(out, b"true"),
            b'f' => self.literal(out, b"false"),
            b'n' => self.literal(out, b"null"),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => None,
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.input.get(self.pos..end)? == word).then(|| {
            out.extend_from_slice(word);
            self.pos = end;
        })
    }

    /// A number per RFC 8259 (`-? int frac? exp?`), copied as written.
    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.pos;
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        out.extend_from_slice(&self.input[start..self.pos]);
        Some(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// A string: its decoded UTF-8 bytes and its canonical encoding (as serde_json writes it,
    /// quotes included). One without escapes is both its own bytes, borrowed (serde_json
    /// escapes nothing else in a string without control characters); one with escapes is
    /// decoded and written again by serde_json, which checks the escapes.
    fn string(&mut self) -> Option<JsonString<'a>> {
        let start = self.pos;
        self.eat(b'"')?;
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.pos += 2
                }
                0x00..=0x1f => return None,
                _ => self.pos += 1,
            }
        }
        self.pos += 1;
        let input: &'a [u8] = self.input;
        let raw = &input[start..self.pos];
        if !escaped {
            std::str::from_utf8(&raw[1..raw.len() - 1]).ok()?;
            return Some(JsonString {
                decoded: Cow::Borrowed(&raw[1..raw.len() - 1]),
                encoded: Cow::Borrowed(raw),
            });
        }
        let decoded: String = serde_json::from_slice(raw).ok()?;
        let encoded = serde_json::to_vec(&decoded).ok()?;
        Some(JsonString {
            decoded: Cow::Owned(decoded.into_bytes()),
            encoded: Cow::Owned(encoded),
        })
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.eat(b'[')?;
        out.push(b'[');
        self.skip_whitespace();
        if self.eat(b']').is_some() {
            out.push(b']');
            return Some(());
        }
        loop {
            self.skip_whitespace();
            self.value(out, depth)?;
            self.skip_whitespace();
            if self.eat(b',').is_some() {
                out.push(b',');
                continue;
            }
            self.eat(b']')?;
            out.push(b']');
            return Some(());
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        // The members' values are written one after another into `values`; each member keeps
        // its key and the range of its value.
        let mut members: Vec<(JsonString<'a>, usize, usize)> = Vec::new();
        let mut values = Vec::new();
        self.skip_whitespace();
        if self.eat(b'}').is_none() {
            loop {
                self.skip_whitespace();
                let key = self.string()?;
                self.skip_whitespace();
                self.eat(b':')?;
                self.skip_whitespace();
                let start = values.len();
                self.value(&mut values, depth)?;
                members.push((key, start, values.len()));
                self.skip_whitespace();
                if self.eat(b',').is_some() {
                    continue;
                }
                self.eat(b'}')?;
                break;
            }
        }
        // Stable: members with equal keys keep their order (the last one wins in most parsers).
        members.sort_by(|a, b| a.0.decoded.cmp(&b.0.decoded));
        out.push(b'{');
        for (i, (key, start, end)) in members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&key.encoded);
            out.push(b':');
            out.extend_from_slice(&values[*start..*end]);
        }
        out.push(b'}');
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Option<String> {
        canonical_json(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn members_are_sorted_and_whitespace_dropped() {
        assert_eq!(
            canon(" { \"b\" : [1, {\"z\": true, \"a\": null}],\n\t\"a\": \"x\" } ").as_deref(),
            Some(r#"{"a":"x","b":[1,{"a":null,"z":true}]}"#)
        );
        assert_eq!(canon("[]").as_deref(), Some("[]"));
        assert_eq!(canon("{ }").as_deref(), Some("{}"));
        assert_eq!(canon("\"s\"").as_deref(), Some("\"s\""));
    }

    #[test]
    fn agrees_with_the_attributes_canonical_form() {
        let text = r#"{"é": 1, "e": [true, false, null, "\u0041\n", -2.5, 10], "E": {}}"#;
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            canon(text).unwrap(),
            crate::fingerprint::canonical_json(&value).unwrap()
        );
    }

    #[test]
    fn numbers_are_kept_as_written() {
        assert_eq!(
            canon("[1, 1.0, 1e0, -0]").as_deref(),
            Some("[1,1.0,1e0,-0]")
        );
        // Beyond a float's precision: still two numbers.
        assert_ne!(
            canon(r#"{"n": 12345678901234567890123}"#),
            canon(r#"{"n": 12345678901234567890124}"#)
        );
    }

    #[test]
    fn equal_keys_keep_their_order() {
        assert_eq!(
            canon(r#"{"a": 2, "b": 0, "a": 1}"#).as_deref(),
            Some(r#"{"a":2,"a":1,"b":0}"#)
        );
        assert_ne!(canon(r#"{"a": 2, "a": 1}"#), canon(r#"{"a": 1, "a": 2}"#));
    }

    #[test]
    fn invalid_json_is_none() {
        for bad in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "nul",
            "\"a",
            "\"\\x\"",
            "\"\u{1}\"",
            "{} {}",
            "[1] x",
            "{1: 2}",
            "\"\\ud800\"",
        ] {
            assert_eq!(canon(bad), None, "{bad:?}");
        }
        assert_eq!(canonical_json(b"\"\xff\""), None, "not UTF-8");
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(canon(&deep), None);
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(canon(&ok), Some(ok));
    }

    fn parts(content_type: &[&str]) -> request::Parts {
        let mut builder = http::Request::post("/payments?x=1");
        for ct in content_type {
            builder = builder.header(CONTENT_TYPE, *ct);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
            "application/vnd.api+json",
        ] {
            assert!(is_json(&parts(&[ct]).headers), "{ct}");
        }
        for ct in [
            "text/plain",
            "application/jsonx",
            "application/+json",
            "json",
            "text/json-seq",
        ] {
            assert!(!is_json(&parts(&[ct]).headers), "{ct}");
        }
        assert!(!is_json(&parts(&[]).headers));
        assert!(!is_json(
            &parts(&["application/json", "application/json"]).headers
        ));
    }

    #[test]
    fn json_bodies_fingerprint_by_their_canonical_form() {
        let json = parts(&["application/json"]);
        let text = parts(&["text/plain"]);
        let a = br#"{"amount": 500, "currency": "usd"}"#;
        let b = br#"{"currency":"usd","amount":500}"#;
        assert_eq!(of_request(&json, a), of_request(&json, b));
        assert_ne!(of_request(&text, a), of_request(&text, b), "byte-exact");
        assert_ne!(
            of_request(&json, a),
            of_request(&json, br#"{"amount": 501, "currency": "usd"}"#)
        );
        // Invalid JSON under a JSON type counts by its bytes.
        assert_ne!(of_request(&json, b"{oops"), of_request(&json, b"{oops "));
        assert_eq!(of_request(&json, b"{oops"), of_request(&text, b"{oops"));
    }
}
