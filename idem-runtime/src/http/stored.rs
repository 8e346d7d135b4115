//! The kept form of a response: what goes into a record's payload and comes back on replay.
//!
//! The payload is serde_json, like every record's, so it stays readable in a store's console:
//!
//! ```json
//! {"status":201,"headers":[["content-type",{"text":"application/json"}]],"body":{"text":"{\"id\":\"pay_1\"}"}}
//! ```
//!
//! Bytes that are UTF-8 are stored as a JSON string; others as base64 (serde_json would write
//! raw bytes as an array of numbers, up to four times their size).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{response, HeaderMap, Response, StatusCode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::IDEMPOTENT_REPLAYED;
use crate::error::Error;

/// A response as kept in a record: the status, the headers to replay, and the body.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    status: u16,
    headers: Vec<(String, StoredBytes)>,
    body: StoredBytes,
    /// The complete head of the response when this request just produced it (never stored):
    /// the first response goes out with all its headers, replays with the kept ones.
    #[serde(skip)]
    fresh_head: Option<response::Parts>,
}

/// A copy for replay (of a decoded response, which has no fresh head: the copy has none).
impl Clone for StoredResponse {
    fn clone(&self) -> Self {
        StoredResponse {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            fresh_head: None,
        }
    }
}

impl StoredResponse {
    /// Captures a response the inner service gave: its status, the headers named in `keep`
    /// (every value, in order), and its body.
    pub(crate) fn capture(head: response::Parts, body: Bytes, keep: &[HeaderName]) -> Self {
        let headers = keep
            .iter()
            .flat_map(|name| {
                head.headers.get_all(name).iter().map(move |v| {
                    (
                        name.as_str().to_owned(),
                        StoredBytes(Bytes::copy_from_slice(v.as_bytes())),
                    )
                })
            })
            .collect();
        StoredResponse {
            status: head.status.as_u16(),
            headers,
            body: StoredBytes(body),
            fresh_head: Some(head),
        }
    }

    /// The size the response counts for in a scope's limit: its body and its kept headers
    /// (names and values).
    pub(crate) fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.0.len())
            .sum();
        (self.body.0.len() + headers) as u64
    }

    /// Whether this response was just produced (rather than decoded from a record).
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh_head.is_some()
    }

    /// The response to send: the fresh one as it was, or the replay with the kept headers and
    /// `Idempotent-Replayed: true`. A record that does not make a valid response is
    /// [`Error::Corrupt`].
    pub(crate) fn into_response(self) -> Result<Response<Bytes>, Error> {
        if let Some(head) = self.fresh_head {
            return Ok(Response::from_parts(head, self.body.0));
        }
        let status = StatusCode::from_u16(self.status).map_err(|_| {
            Error::corrupt(format!(
                "stored HTTP status {} is not a status code",
                self.status
            ))
        })?;
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 1);
        for (name, value) in self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::corrupt(format!("stored header name {name:?} is not valid")))?;
            let value = HeaderValue::from_maybe_shared(value.0).map_err(|_| {
                Error::corrupt(format!("stored value of header {name} is not valid"))
            })?;
            headers.append(name, value);
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        let mut response = Response::new(self.body.0);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// Bytes stored compactly: `{"text": "..."}` when UTF-8, else `{"base64": "..."}`.
#[derive(Clone)]
pub(crate) struct StoredBytes(pub(crate) Bytes);

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum BytesRef<'a> {
    Text(&'a str),
    Base64(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum BytesOwned {
    Text(String),
    Base64(String),
}

impl Serialize for StoredBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => BytesRef::Text(text),
            Err(_) => BytesRef::Base64(BASE64.encode(&self.0)),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StoredBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(StoredBytes(match BytesOwned::deserialize(deserializer)? {
            BytesOwned::Text(text) => Bytes::from(text),
            BytesOwned::Base64(b64) => Bytes::from(
                BASE64
                    .decode(b64.as_bytes())
                    .map_err(serde::de::Error::custom)?,
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};

    fn sample() -> StoredResponse {
        let response = Response::builder()
            .status(201)
            .header(CONTENT_TYPE, "application/json")
            .header(LOCATION, "/payments/1")
            .header("link", "<a>")
            .header("link", "<b>")
            .header(SET_COOKIE, "session=secret")
            .body(())
            .unwrap();
        let (head, ()) = response.into_parts();
        StoredResponse::capture(
            head,
            Bytes::from_static(b"{\"id\":1}"),
            &[CONTENT_TYPE, "link".parse().unwrap()],
        )
    }

    #[test]
    fn fresh_response_keeps_every_header_and_is_not_marked() {
        let res = sample().into_response().unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()[SET_COOKIE], "session=secret");
        assert!(res.headers().get(IDEMPOTENT_REPLAYED).is_none());
    }

    #[test]
    fn replay_has_kept_headers_only_in_order_and_is_marked() {
        let json = serde_json::to_vec(&sample()).unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"status":201,"headers":[["content-type",{"text":"application/json"}],["link",{"text":"<a>"}],["link",{"text":"<b>"}]],"body":{"text":"{\"id\":1}"}}"#
        );
        let stored: StoredResponse = serde_json::from_slice(&json).unwrap();
        assert!(!stored.is_fresh());
        let res = stored.into_response().unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        let links: Vec<_> = res.headers().get_all("link").iter().collect();
        assert_eq!(links, ["<a>", "<b>"]);
        assert!(res.headers().get(SET_COOKIE).is_none());
        assert!(res.headers().get(LOCATION).is_none());
        assert_eq!(res.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(res.body(), &Bytes::from_static(b"{\"id\":1}"));
    }

    /// The layer stores responses without decoding each back (`Call::check_decodes`): every
    /// response must decode from its JSON into the same status, headers and body.
    #[test]
    fn every_response_decodes_back_from_its_json() {
        let bodies: Vec<Vec<u8>> = vec![
            vec![],
            b"plain".to_vec(),
            "quotes \" and \\ and \n, \u{1F600} \u{2028}"
                .as_bytes()
                .to_vec(),
            (0..=255).collect(),
            vec![0xff, 0xfe, b'a'],
            vec![0; 3],
        ];
        for (i, body) in bodies.into_iter().enumerate() {
            let stored = StoredResponse {
                status: [100, 200, 201, 404, 599, 999][i],
                headers: vec![
                    (
                        "content-type".into(),
                        StoredBytes(Bytes::from_static(b"a/b")),
                    ),
                    ("x-bin".into(), StoredBytes(Bytes::from(vec![0x80, 0x81]))),
                    ("x-empty".into(), StoredBytes(Bytes::new())),
                ],
                body: StoredBytes(Bytes::from(body.clone())),
                fresh_head: None,
            };
            let json = serde_json::to_vec(&stored).unwrap();
            let back: StoredResponse = serde_json::from_slice(&json).unwrap();
            assert_eq!(back.status, stored.status);
            assert_eq!(back.body.0, body);
            let pairs = |r: &StoredResponse| -> Vec<(String, Bytes)> {
                r.headers
                    .iter()
                    .map(|(n, v)| (n.clone(), v.0.clone()))
                    .collect()
            };
            assert_eq!(pairs(&back), pairs(&stored));
        }
    }

    #[test]
    fn binary_bodies_round_trip_as_base64() {
        let body: Vec<u8> = (0..=255).collect();
        let stored = StoredBytes(Bytes::from(body.clone()));
        let json = serde_json::to_string(&stored).unwrap();
        assert!(json.starts_with(r#"{"base64":"AAECAw"#), "{json}");
        assert!(
            json.len() < body.len() * 3 / 2,
            "compact: {} bytes",
            json.len()
        );
        let back: StoredBytes = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, body);
    }

    #[test]
    fn invalid_records_are_corrupt_not_panics() {
        for json in [
            r#"{"status":1000,"headers":[],"body":{"text":""}}"#,
            r#"{"status":200,"headers":[["bad name",{"text":"x"}]],"body":{"text":""}}"#,
            r#"{"status":200,"headers":[["x",{"text":"a\nb"}]],"body":{"text":""}}"#,
        ] {
            let stored: StoredResponse = serde_json::from_str(json).unwrap();
            assert!(
                matches!(stored.into_response(), Err(Error::Corrupt { .. })),
                "{json}"
            );
        }
        assert!(serde_json::from_str::<StoredResponse>(
            r#"{"status":200,"headers":[],"body":{"base64":"!!"}}"#
        )
        .is_err());
    }
}
