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
    ClientUnidentified,
    BodyUnreadable,
    BodyTooLarge,
    InProgress,
    ClaimLost,
    KeyReused,
    ScopeFull,
    RecordUnreadable,
    OutcomeUnknown,
    Internal,
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
            ClientUnidentified => (
                StatusCode::UNAUTHORIZED,
                "client-unidentified",
                "Client not identified",
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
                "A request with this idempotency key is in progress",
            ),
            ClaimLost => (
                StatusCode::CONFLICT,
                "claim-lost",
                "Request superseded by a retry",
            ),
            KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency key reused for a different request",
            ),
            ScopeFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-kept-responses",
                "Too many kept responses for this client",
            ),
            RecordUnreadable => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "record-unreadable",
                "Stored response could not be read",
            ),
            OutcomeUnknown => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome-unknown",
                "Outcome of an earlier request with this idempotency key is unknown",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "idempotency-failed",
                "Idempotency processing failed",
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

    /// The problem document, with `detail`, and `Retry-After: 1` for the refusals a retry may
    /// get past (in progress, claim lost, store unavailable, scope full).
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
            Problem::InProgress
                | Problem::ClaimLost
                | Problem::StoreUnavailable
                | Problem::ScopeFull
        ) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The refusal for an error of the runtime, with a detail that says what to do: the one
    /// mapping from [`Error`] to a response, used by the layer and (feature `axum`) by
    /// `Error`'s `IntoResponse`. The detail names the key as `subject` does; it says nothing
    /// of the store's backend, the record, or its storage key.
    pub(crate) fn from_error(error: &Error, subject: Subject) -> (Problem, String) {
        let (key, request, different) = match subject {
            Subject::Header => (
                "Idempotency-Key",
                "request",
                "a request with a different method, path or body",
            ),
            Subject::Call => ("idempotency key", "call", "a call with different arguments"),
        };
        match error {
            Error::InFlight { .. } | Error::WaitTimeout { .. } => (
                Problem::InProgress,
                format!("Another {request} with this {key} is being processed. Retry after it completes to receive its response."),
            ),
            Error::LeaseLost { .. } => (
                Problem::ClaimLost,
                format!("This {request} ran longer than its lease and another {request} with the same {key} took over. Retry to receive the response of that {request}."),
            ),
            Error::KeyReuse { .. } => (
                Problem::KeyReused,
                format!("This {key} was already used for {different}. Use a new key for a new {request}."),
            ),
            Error::InvalidKey { reason } => (Problem::KeyInvalid, format!("Invalid {key}: {reason}.")),
            Error::OutcomeUnknown { .. } => (
                Problem::OutcomeUnknown,
                format!("An earlier {request} with this {key} started processing but did not finish with a response that could be kept, so its effect is unknown. It is not processed again with this key: check whether it took effect before sending the operation again under a new key."),
            ),
            Error::Corrupt { .. } | Error::TypeMismatch { .. } => (
                Problem::RecordUnreadable,
                format!("The stored response for this {key} could not be read."),
            ),
            // Do not leak backend details to clients.
            Error::Store { .. } | Error::StoreFull { .. } => (
                Problem::StoreUnavailable,
                format!("The idempotency store could not be reached; the {request} was not processed. Retry later."),
            ),
            // A configuration mistake, a value that cannot be encoded, anything newer: the
            // server's fault, and nothing a retry changes.
            _ => (
                Problem::Internal,
                format!("The server failed to process the idempotency of this {request}."),
            ),
        }
    }
}

/// How an error's detail names the key: the layer's `Idempotency-Key` header, or the key of an
/// `#[idempotent]` call a handler made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    Header,
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    Call,
}

/// With feature `axum`, an axum handler that calls an `#[idempotent]` function can use `?` on
/// its [`Error`]: the error becomes the problem document the layer would send for it (see the
/// [module documentation](super#axum-handlers-calling-idempotent-functions)). The storage key
/// is not in the body (it is a hash of the scope and the key, of use to an operator, not to a
/// client): it is in the `tracing` event logged for the error.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum_core::response::IntoResponse for Error {
    fn into_response(self) -> axum_core::response::Response {
        let (problem, detail) = Problem::from_error(&self, Subject::Call);
        let status = problem.status().as_u16();
        let key = self.storage_key().map(|k| k.as_str());
        if problem.status().is_server_error() {
            tracing::error!(target: "idem", storage_key = key, status, error = %self, "idempotent call failed");
        } else {
            tracing::debug!(target: "idem", storage_key = key, status, error = %self, "idempotent call refused");
        }
        problem.response(&detail).map(axum_core::body::Body::from)
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
        let (p, detail) = Problem::from_error(
            &Error::store("redis", "connection to redis://:hunter2@db failed"),
            Subject::Header,
        );
        assert_eq!(p, Problem::StoreUnavailable);
        assert!(!detail.contains("hunter2"));
        assert_eq!(p.status(), 503);
    }

    #[test]
    fn every_error_has_one_status_and_retry_after_where_a_retry_helps() {
        let key = crate::key::StorageKey::derive("scope", "k").unwrap();
        let cases: Vec<(Error, u16, bool)> = vec![
            (
                Error::InFlight {
                    key: Some(key.clone()),
                },
                409,
                true,
            ),
            (
                Error::WaitTimeout {
                    waited: std::time::Duration::from_secs(5),
                    key: None,
                },
                409,
                true,
            ),
            (Error::lease_lost(&key), 409, true),
            (
                Error::KeyReuse {
                    key: Some(key.clone()),
                },
                422,
                false,
            ),
            (
                Error::InvalidKey {
                    reason: "the key is empty".into(),
                },
                400,
                false,
            ),
            (Error::store("postgres", "down"), 503, true),
            (
                Error::StoreFull {
                    backend: "redis",
                    source: "OOM".into(),
                },
                503,
                true,
            ),
            (Error::corrupt("truncated").with_key(&key), 500, false),
            (
                Error::OutcomeUnknown {
                    reason: "the body panicked".into(),
                    key: Some(key.clone()),
                },
                500,
                false,
            ),
            (Error::config("lease too short"), 500, false),
        ];
        for (error, status, retry) in cases {
            for subject in [Subject::Header, Subject::Call] {
                let (problem, detail) = Problem::from_error(&error, subject);
                let response = problem.response(&detail);
                assert_eq!(response.status(), status, "{error:?}");
                assert_eq!(
                    response.headers().contains_key(RETRY_AFTER),
                    retry,
                    "{error:?}"
                );
                assert!(!detail.contains(key.as_str()), "no storage key in {detail}");
                assert_eq!(
                    detail.contains("Idempotency-Key"),
                    subject == Subject::Header
                        && !matches!(
                            error,
                            Error::Store { .. } | Error::StoreFull { .. } | Error::Config { .. }
                        ),
                    "{subject:?}: {detail}"
                );
            }
        }
    }
}
