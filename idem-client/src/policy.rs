//! [`RetryPolicy`]: which requests get a key, which outcomes are retried, and how long to wait.
//!
//! The one owner of every retry rule; the reqwest middleware ([`crate::IdempotencyMiddleware`])
//! and the tower layer ([`crate::IdempotencyClientLayer`]) only send attempts and report what
//! came back, through [`Retrier::after`].

use std::error::Error as StdError;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, StatusCode};

use crate::attempts::StopReason;

/// How the client retries a request that carries an `Idempotency-Key`.
///
/// | setting | default |
/// |---|---|
/// | [`methods`](Self::methods): the requests that get a key and are retried | POST, PATCH |
/// | [`max_attempts`](Self::max_attempts): attempts in all, the first included | 5 |
/// | [`max_elapsed`](Self::max_elapsed): no wait starts that would end later than this after the first attempt | 30 s |
/// | [`backoff`](Self::backoff): the first wait and the cap on any computed wait | 100 ms, 5 s |
/// | [`retry_statuses`](Self::retry_statuses): the statuses retried besides 409 | 408, 429, 502, 503, 504 |
/// | [`retry_conflict`](Self::retry_conflict): retry `409 Conflict` (the key is in flight) | yes |
/// | [`attempt_timeout`](Self::attempt_timeout): the limit on one attempt | none (the client's own) |
///
/// Connection errors and timeouts are always retried: the key makes it safe even when the server
/// did receive the request. The wait after attempt *n* is the server's `Retry-After` (seconds or
/// an HTTP date) when it sent one, and otherwise an exponential backoff with jitter: half of
/// `min(cap, first × 2ⁿ⁻¹)` plus a random part up to the other half.
///
/// A `422` answered as `application/problem+json` is never retried: it is how idem's
/// `IdempotencyLayer` and the IETF Idempotency-Key draft say that the key was already used for
/// another request ([`Error::KeyReused`](crate::Error::KeyReused)).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    methods: Vec<Method>,
    max_attempts: u32,
    max_elapsed: Duration,
    first_delay: Duration,
    max_delay: Duration,
    retry_statuses: Vec<StatusCode>,
    retry_conflict: bool,
    attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            retry_statuses: vec![
                StatusCode::REQUEST_TIMEOUT,
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            retry_conflict: true,
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// The methods whose requests get a key and are retried (default POST and PATCH). Requests
    /// with other methods pass through untouched: no key, no retry.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Attempts in all, the first included (default 5; at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The time budget from the start of the first attempt: a wait that would end after it is
    /// not started, and the last outcome is returned (default 30 s).
    pub fn max_elapsed(mut self, budget: Duration) -> Self {
        self.max_elapsed = budget;
        self
    }

    /// The exponential backoff: the wait after the first attempt is about `first`, doubling
    /// with each attempt up to `cap` (defaults 100 ms and 5 s). A `Retry-After` from the
    /// server is honoured instead, whatever its length, within [`max_elapsed`](Self::max_elapsed).
    pub fn backoff(mut self, first: Duration, cap: Duration) -> Self {
        self.first_delay = first;
        self.max_delay = cap.max(first);
        self
    }

    /// The response statuses that are retried, besides 409 (default 408, 429, 502, 503, 504).
    /// A 500 is not retried by default: from an idem server it means the outcome of the first
    /// run is unknown, and a retry gets the same 500.
    pub fn retry_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.retry_statuses = statuses.into_iter().collect();
        self
    }

    /// Whether a `409 Conflict` (the key's first request still runs) is waited out and retried
    /// (default yes).
    pub fn retry_conflict(mut self, retry: bool) -> Self {
        self.retry_conflict = retry;
        self
    }

    /// The limit on one attempt. With reqwest it applies to requests that set no timeout of
    /// their own (`RequestBuilder::timeout` wins; a client-wide `ClientBuilder::timeout` also
    /// applies); with the tower layer it bounds each call of the inner service.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// The limit on one attempt, if one was set.
    pub(crate) fn per_attempt(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// Whether requests with `method` get a key and are retried.
    pub fn applies_to(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// Starts the bookkeeping of one request's attempts.
    pub(crate) fn start(&self, replayable: bool) -> Retrier<'_> {
        Retrier {
            policy: self,
            started: Instant::now(),
            attempts: 0,
            replayable,
        }
    }

    /// The backoff wait after `attempt` (1-based): half of the exponential delay plus a random
    /// part up to the other half ("equal jitter").
    ///
    /// Written here, not taken from `retry-policies` or `backon`, because each would change it:
    /// `retry-policies`' bounded jitter draws from `[first / 2, delay]`, so the waits need not
    /// grow, and a few attempts can be spent in a fraction of the time a `409` needs (the first
    /// request still runs); `backon`'s jitter adds up to one more delay on top, past the cap; and
    /// neither knows `Retry-After`, the elapsed-time budget measured from the first attempt, or
    /// the reason the retries stopped ([`StopReason`]).
    fn backoff_after(&self, attempt: u32) -> Duration {
        let doubling = 2u32.saturating_pow(attempt.saturating_sub(1));
        let delay = self
            .first_delay
            .saturating_mul(doubling)
            .min(self.max_delay);
        let half = delay / 2;
        let jitter_nanos = rand::random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

/// What one attempt gave, as the retry rules see it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A response: its status, its `Retry-After`, whether its body is a problem document.
    Response {
        status: StatusCode,
        retry_after: Option<Duration>,
        problem: bool,
    },
    /// A connection error or a timeout: the request may or may not have reached the server.
    TransientError,
    /// Any other error (a bad URL, a TLS failure, a body that failed to produce its bytes).
    OtherError,
}

impl Outcome {
    /// The outcome of a response with `status` and `headers`.
    pub(crate) fn response(status: StatusCode, headers: &HeaderMap) -> Self {
        Outcome::Response {
            status,
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            problem: headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.trim()
                        .to_ascii_lowercase()
                        .starts_with("application/problem+json")
                }),
        }
    }

    /// The outcome of an error: transient if its source chain holds a connection error or a
    /// timeout (see [`is_transient`]).
    pub(crate) fn error(error: &(dyn StdError + 'static)) -> Self {
        if is_transient(error) {
            Outcome::TransientError
        } else {
            Outcome::OtherError
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Wait this long, then send the request again with the same key.
    Retry(Duration),
    /// The outcome is final: return it.
    Done,
    /// The outcome asked for a retry that is not made: return it, with this reason.
    Stop(StopReason),
    /// The server says the key was used for another request (422 problem document).
    KeyReused,
}

/// The attempts of one request: counts them and applies the policy to each outcome.
#[derive(Debug)]
pub(crate) struct Retrier<'a> {
    policy: &'a RetryPolicy,
    started: Instant,
    attempts: u32,
    replayable: bool,
}

impl Retrier<'_> {
    /// The attempts made so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records an attempt that gave `outcome` and says what to do next.
    pub(crate) fn after(&mut self, outcome: &Outcome) -> Step {
        self.attempts += 1;
        let retry_after = match *outcome {
            Outcome::Response {
                status,
                retry_after,
                problem,
            } => {
                if status == StatusCode::UNPROCESSABLE_ENTITY && problem {
                    return Step::KeyReused;
                }
                let retried = (status == StatusCode::CONFLICT && self.policy.retry_conflict)
                    || self.policy.retry_statuses.contains(&status);
                if !retried {
                    return Step::Done;
                }
                retry_after
            }
            Outcome::TransientError => None,
            Outcome::OtherError => return Step::Stop(StopReason::NotTransient),
        };
        if !self.replayable {
            return Step::Stop(StopReason::BodyNotReplayable);
        }
        if self.attempts >= self.policy.max_attempts {
            return Step::Stop(StopReason::AttemptsExhausted);
        }
        let wait = retry_after.unwrap_or_else(|| self.policy.backoff_after(self.attempts));
        if self.started.elapsed().saturating_add(wait) > self.policy.max_elapsed {
            return Step::Stop(StopReason::TimeBudgetExhausted);
        }
        Step::Retry(wait)
    }
}

/// Parses a `Retry-After` value: delay-seconds (`"2"`) or an HTTP date, which is turned into the
/// time from `now` (zero if it has passed). `None` if it is neither.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether an error means the request may not have been answered and can be sent again: its
/// source chain holds a timeout, a refused, reset or aborted connection, a connection closed
/// before the response was complete, or a hyper error saying so.
pub fn is_transient(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<crate::AttemptTimedOut>() || error.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        if let Some(error) = error.downcast_ref::<hyper::Error>() {
            if error.is_incomplete_message() || error.is_canceled() || error.is_timeout() {
                return true;
            }
        }
        if let Some(error) = error.downcast_ref::<io::Error>() {
            use io::ErrorKind::*;
            if matches!(
                error.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | TimedOut
                    | UnexpectedEof
            ) {
                return true;
            }
        }
        next = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: None,
            problem: false,
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let secs = HeaderValue::from_static("7");
        assert_eq!(parse_retry_after(&secs, now), Some(Duration::from_secs(7)));
        let later =
            HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(30))).unwrap();
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past =
            HeaderValue::from_str(&httpdate::fmt_http_date(now - Duration::from_secs(30))).unwrap();
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("soon"), now),
            None
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("-1"), now),
            None
        );
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let policy =
            RetryPolicy::new().backoff(Duration::from_millis(100), Duration::from_millis(400));
        for _ in 0..50 {
            let first = policy.backoff_after(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.backoff_after(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let capped = policy.backoff_after(30);
            assert!(capped >= Duration::from_millis(200) && capped <= Duration::from_millis(400));
        }
    }

    #[test]
    fn statuses_are_retried_as_configured() {
        let policy = RetryPolicy::new().max_attempts(10);
        for (code, retried) in [
            (409, true),
            (503, true),
            (429, true),
            (500, false),
            (201, false),
        ] {
            let step = policy.start(true).after(&status(code));
            assert_eq!(matches!(step, Step::Retry(_)), retried, "{code}");
        }
        let no_conflict = RetryPolicy::new().retry_conflict(false);
        assert_eq!(no_conflict.start(true).after(&status(409)), Step::Done);
        let with_500 = RetryPolicy::new().retry_statuses([StatusCode::INTERNAL_SERVER_ERROR]);
        assert!(matches!(
            with_500.start(true).after(&status(500)),
            Step::Retry(_)
        ));
        assert_eq!(with_500.start(true).after(&status(503)), Step::Done);
    }

    #[test]
    fn key_reuse_is_never_retried() {
        let problem = Outcome::Response {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            retry_after: None,
            problem: true,
        };
        assert_eq!(
            RetryPolicy::new().start(true).after(&problem),
            Step::KeyReused
        );
        assert_eq!(
            RetryPolicy::new().start(true).after(&status(422)),
            Step::Done
        );
    }

    #[test]
    fn problem_documents_are_recognised_by_content_type() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/Problem+JSON; charset=utf-8"),
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        match Outcome::response(StatusCode::UNPROCESSABLE_ENTITY, &headers) {
            Outcome::Response {
                problem,
                retry_after,
                ..
            } => {
                assert!(problem);
                assert_eq!(retry_after, Some(Duration::from_secs(2)));
            }
            other => panic!("{other:?}"),
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(matches!(
            Outcome::response(StatusCode::UNPROCESSABLE_ENTITY, &headers),
            Outcome::Response { problem: false, .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_and_caps_stop_the_retries() {
        let policy = RetryPolicy::new().max_attempts(3);
        let conflict = Outcome::Response {
            status: StatusCode::CONFLICT,
            retry_after: Some(Duration::from_secs(1)),
            problem: true,
        };
        let mut retrier = policy.start(true);
        assert_eq!(
            retrier.after(&conflict),
            Step::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            retrier.after(&conflict),
            Step::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            retrier.after(&conflict),
            Step::Stop(StopReason::AttemptsExhausted)
        );
        assert_eq!(retrier.attempts(), 3);

        let short = RetryPolicy::new().max_elapsed(Duration::from_millis(500));
        assert_eq!(
            short.start(true).after(&conflict),
            Step::Stop(StopReason::TimeBudgetExhausted)
        );
        assert_eq!(
            policy.start(false).after(&Outcome::TransientError),
            Step::Stop(StopReason::BodyNotReplayable)
        );
        assert_eq!(
            policy.start(true).after(&Outcome::OtherError),
            Step::Stop(StopReason::NotTransient)
        );
    }

    #[test]
    fn transient_errors_are_found_in_the_source_chain() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let reset = Wrapper(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(is_transient(&reset));
        let denied = Wrapper(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_transient(&denied));
        assert!(is_transient(&crate::AttemptTimedOut(Duration::from_secs(
            1
        ))));
    }
}
