//! The layer's own error responses: RFC 9457 `application/problem+json` documents.
//!
//! They describe only the request at hand: never the other request that used the key, its
//! body, or its response.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::error::Error;

/// Where the problem types are documented: the `http` module of this crate on docs.rs (the anchors
/// are in its "Error responses" table).
const TYPE_BASE: &str = "https://docs.rs/idempotency/latest/idempotency/http/index.html";

/// The members of a problem document, in the order RFC 9457 lists them.
#[derive(serde::Serialize)]
struct Document<'a> {
    r#type: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// One kind of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    KeyMissing,
    KeyInvalid,
    BodyUnreadable,
    BodyTooLarge,
    InProgress,
    ClaimLost,
    KeyReused,
    RecordUnreadable,
    OutcomeUnknown,
    StoreUnavailable,
}

impl Problem {
    fn parts(self) -> (StatusCode, &'static str, &'static str) {
        use Problem::*;
        match self {
            KeyMissing => (
                StatusCode::BAD_REQUEST,
                "key-missing",
                "Idempotency-Key header missing",
            ),
            KeyInvalid => (
                StatusCode::BAD_REQUEST,
                "key-invalid",
                "Invalid Idempotency-Key header",
            ),
            BodyUnreadable => (
                StatusCode::BAD_REQUEST,
                "body-unreadable",
                "Request body could not be read",
            ),
            BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            ),
            InProgress => (
                StatusCode::CONFLICT,
                "request-in-progress",
                "A request with this Idempotency-Key is in progress",
            ),
            ClaimLost => (
                StatusCode::CONFLICT,
                "claim-lost",
                "Request superseded by a retry",
            ),
            KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency-Key reused for a different request",
            ),
            RecordUnreadable => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "record-unreadable",
                "Stored response could not be read",
            ),
            OutcomeUnknown => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome-unknown",
                "Outcome of an earlier request with this Idempotency-Key is unknown",
            ),
            StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable",
            ),
        }
    }

    /// The status code this problem is sent with.
    pub(crate) fn status(self) -> StatusCode {
        self.parts().0
    }

    /// The problem document, with `detail`.
    pub(crate) fn response(self, detail: &str) -> Response<Bytes> {
        let (status, slug, title) = self.parts();
        let document = Document {
            r#type: &format!("{TYPE_BASE}#{slug}"),
            title,
            status: status.as_u16(),
            detail,
        };
        let body =
            serde_json::to_vec(&document).expect("a struct of strings and a number serializes");
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(
            self,
            Problem::InProgress | Problem::ClaimLost | Problem::StoreUnavailable
        ) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The refusal for an error of the runtime, with a detail that says what to do.
    pub(crate) fn from_error(error: &Error) -> (Problem, String) {
        match error {
            Error::InFlight { .. } | Error::WaitTimeout { .. } => (
                Problem::InProgress,
                "Another request with this Idempotency-Key is being processed. Retry after it completes to receive its response.".into(),
            ),
            Error::LeaseLost { .. } => (
                Problem::ClaimLost,
                "This request ran longer than its lease and another request with the same Idempotency-Key took over. Retry to receive the response of that request.".into(),
            ),
            Error::KeyReuse { .. } => (
                Problem::KeyReused,
                "This Idempotency-Key was already used for a request with a different method, path or body. Use a new key for a new request.".into(),
            ),
            Error::InvalidKey { reason } => (Problem::KeyInvalid, format!("Invalid Idempotency-Key: {reason}.")),
            Error::OutcomeUnknown { .. } => (
                Problem::OutcomeUnknown,
                "An earlier request with this Idempotency-Key started processing but did not finish with a response that could be kept, so its effect is unknown. It is not processed again with this key: check whether it took effect before sending the operation again under a new key.".into(),
            ),
            Error::Corrupt { .. } | Error::TypeMismatch { .. } | Error::Encode(_) | Error::TooLarge { .. } => (
                Problem::RecordUnreadable,
                "The stored response for this Idempotency-Key could not be read.".into(),
            ),
            // Store errors and anything newer: do not leak backend details to clients.
            _ => (
                Problem::StoreUnavailable,
                "The idempotency store could not be reached; the request was not processed. Retry later.".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_have_type_title_status_detail() {
        let res = Problem::KeyReused.response("detail here");
        assert_eq!(res.status(), 422);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let doc: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(doc["type"], format!("{TYPE_BASE}#key-reused"));
        assert_eq!(doc["status"], 422);
        assert_eq!(doc["detail"], "detail here");
        assert!(std::str::from_utf8(res.body())
            .unwrap()
            .starts_with(r#"{"type":"https://"#));
        assert!(doc["title"].as_str().unwrap().contains("reused"));
        assert!(res.headers().get(RETRY_AFTER).is_none());
        assert_eq!(Problem::InProgress.response("").headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn store_errors_do_not_leak_backend_details() {
        let (p, detail) = Problem::from_error(&Error::store(
            "redis",
            "connection to redis://:hunter2@db failed",
        ));
        assert_eq!(p, Problem::StoreUnavailable);
        assert!(!detail.contains("hunter2"));
        assert_eq!(p.status(), 503);
    }
}
