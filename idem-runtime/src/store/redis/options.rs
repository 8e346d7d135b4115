//! The settings of a [`RedisStore`](super::RedisStore) beyond its URL.

use std::fmt;
use std::time::Duration;

use super::{DEFAULT_EVICTION_CHECK_INTERVAL, DEFAULT_PREFIX};
use url::form_urlencoded;

/// Settings of a [`RedisStore`](super::RedisStore) beyond its URL.
#[derive(Clone)]
pub struct RedisOptions {
    pub(super) prefix: String,
    pub(super) allow_eviction: bool,
    /// PEM certificates to trust instead of the system's, for `rediss://` URLs.
    pub(super) root_certificate: Option<Vec<u8>>,
    /// A PEM certificate chain and its PEM private key, for `rediss://` URLs.
    pub(super) client_certificate: Option<(Vec<u8>, Vec<u8>)>,
    /// `WAIT replicas timeout` after each claim, completion and saved step.
    pub(super) wait_for_replicas: Option<(u32, Duration)>,
    /// How often the eviction policy is checked again while the store runs.
    pub(super) eviction_check_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: DEFAULT_PREFIX.into(),
            allow_eviction: false,
            root_certificate: None,
            client_certificate: None,
            wait_for_replicas: None,
            eviction_check_interval: DEFAULT_EVICTION_CHECK_INTERVAL,
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.debug_struct("RedisOptions")
            .field("prefix", &self.prefix)
            .field("allow_eviction", &self.allow_eviction)
            .field("root_certificate", &self.root_certificate.is_some())
            .field("client_certificate", &self.client_certificate.is_some())
            .field("wait_for_replicas", &self.wait_for_replicas)
            .field("eviction_check_interval", &self.eviction_check_interval)
            .finish()
    }
}

impl RedisOptions {
    /// The defaults: prefix [`DEFAULT_PREFIX`], eviction refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep records under `prefix` (see the [module docs](super#data-layout)); stores with
    /// different prefixes never share records. It must be non-empty and free of `{` and `}`,
    /// which would change the keys' hash tag.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// After each claim, each completion and each saved step, wait (`WAIT replicas timeout`)
    /// until `replicas` replicas of the key's master have acknowledged the write, or `timeout`
    /// has passed. A claim that fewer replicas acknowledged is released and fails with
    /// [`Error::Store`] (the body does not run: a failover could lose the claim and let a
    /// second caller run it); a completion or a step that fewer acknowledged is kept and logged
    /// (the caller has its result, the step has run). Costs one round trip per claim, per
    /// completion and per step.
    ///
    /// `WAIT` does not make replication synchronous: a replica that acknowledged may still not
    /// be the one promoted, and a write acknowledged by none is still applied on the master.
    /// It narrows the window in which a failover loses a claim; see RELIABILITY.md for what
    /// it measured.
    ///
    /// [`Error::Store`]: crate::Error::Store
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_for_replicas = Some((replicas, timeout));
        self
    }

    /// Accept a Redis whose `maxmemory-policy` may evict keys (anything but `noeviction`). By
    /// default such a server is refused at connect: an evicted in-flight record lets a second
    /// caller run the body, an evicted result runs it again. Allow it only where records may
    /// be lost (a cache-like use), or where memory can never fill.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// How often the store checks Redis's `maxmemory-policy` again while it runs
    /// ([`DEFAULT_EVICTION_CHECK_INTERVAL`], 10 s, by default; `Duration::ZERO` checks before
    /// every claim). The connect-time check refuses a policy that may evict idem's records;
    /// this one notices a `CONFIG SET maxmemory-policy allkeys-lru` made afterwards. Once a
    /// check sees such a policy on any node, new claims fail with the same [`Error::Config`] as
    /// at connect (the body does not run), until a later check sees `noeviction` everywhere
    /// again; calls that hold a claim already finish.
    ///
    /// Cost: one `CONFIG GET maxmemory-policy` per interval per store (sent to every node of a
    /// cluster), by the one claim that finds the last check older than the interval; that
    /// claim waits one more round trip, the others do not wait. A server that refuses `CONFIG`
    /// (renamed or blocked, as on managed services that allow only `INFO`) is checked at connect
    /// only. Nothing is checked with [`allow_eviction(true)`](Self::allow_eviction) or on a
    /// connection given to [`RedisStore::from_manager`](super::RedisStore::from_manager).
    ///
    /// [`Error::Config`]: crate::Error::Config
    /// [`DEFAULT_EVICTION_CHECK_INTERVAL`]: super::DEFAULT_EVICTION_CHECK_INTERVAL
    pub fn eviction_check_interval(mut self, interval: Duration) -> Self {
        self.eviction_check_interval = interval;
        self
    }

    /// Trust the certificate authorities in `pem` (one or more PEM certificates) for a
    /// `rediss://` server, instead of the system's roots: for a server whose certificate a
    /// private CA signed. The server's certificate must still chain to one of them and name
    /// the host of the URL. Combined with a `?ca=/path/ca.pem` of the URL, both are trusted.
    /// Not used for a plain `redis://` URL (the URL decides whether the store uses TLS).
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Present `cert` (a PEM certificate chain) and `key` (its PEM private key: PKCS#8, PKCS#1
    /// or SEC1) to a `rediss://` server that authenticates clients by certificate
    /// (`tls-auth-clients yes`). The URL's `?cert=/path&key=/path` do the same from files; give
    /// one or the other.
    pub fn client_certificate(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }
}

/// `url` without the query parameter `name`, and its last value, if any. The value is decoded
/// as the `redis` crate decodes its own parameters of the same URL (`url`'s form decoding:
/// `%XX` escapes, and `+` for a space).
pub(super) fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    take(url, name)
}

/// `url` without the query parameter `name`, and whether it was `true`, `1`, `yes` or given
/// without a value.
pub(super) fn take_flag(url: &str, name: &str) -> (String, bool) {
    let (url, value) = take(url, name);
    let set = matches!(value.as_deref(), Some("" | "true" | "1" | "yes"));
    (url, set)
}

/// `url` without the query parameter `name` (every occurrence), and its last value. The query
/// is where the `url` crate reads it, from the first `?` before the fragment (`#`) on; its
/// pairs are read and written by `url`'s `form_urlencoded`. The query is split out of the text
/// rather than through [`url::Url`] because a cluster URL's `host:port,host:port` list is no
/// host that `url` accepts. A URL without `name` is returned as given.
fn take(url: &str, name: &str) -> (String, Option<String>) {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (url, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let mut kept = form_urlencoded::Serializer::new(String::new());
    let mut any_kept = false;
    for (key, v) in form_urlencoded::parse(query.as_bytes()) {
        if key == name {
            value = Some(v.into_owned());
        } else {
            kept.append_pair(&key, &v);
            any_kept = true;
        }
    }
    if value.is_none() {
        return (url.to_owned(), None);
    }
    let mut out = base.to_owned();
    if any_kept {
        out.push('?');
        out.push_str(&kept.finish());
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    (out, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_taken_out_of_the_url() {
        assert_eq!(
            take_flag("redis://a:1", "allow_eviction"),
            ("redis://a:1".into(), false)
        );
        assert_eq!(
            take_flag("redis://a:1/?allow_eviction=true", "allow_eviction"),
            ("redis://a:1/".into(), true)
        );
        assert_eq!(
            take_flag(
                "redis://a/?protocol=resp2&allow_eviction=1",
                "allow_eviction"
            ),
            ("redis://a/?protocol=resp2".into(), true)
        );
        assert_eq!(
            take_flag("redis://a/?allow_eviction=false&db=2", "allow_eviction"),
            ("redis://a/?db=2".into(), false)
        );
        assert_eq!(
            take_flag("redis://a/?allow_eviction", "allow_eviction"),
            ("redis://a/".into(), true)
        );
        assert_eq!(
            take_flag(
                "rediss+cluster://u:p@a:1,b:2/?allow_eviction=yes&protocol=resp2",
                "allow_eviction"
            ),
            ("rediss+cluster://u:p@a:1,b:2/?protocol=resp2".into(), true)
        );
    }

    #[test]
    fn parameters_are_taken_out_of_the_url() {
        assert_eq!(
            take_param("rediss://a:1", "ca"),
            ("rediss://a:1".into(), None)
        );
        assert_eq!(
            take_param("rediss://a:1/?ca=%2Ftmp%2Fca.pem", "ca"),
            ("rediss://a:1/".into(), Some("/tmp/ca.pem".into()))
        );
        assert_eq!(
            take_param("rediss://a/?protocol=resp2&ca=/x.pem&db=1", "ca"),
            (
                "rediss://a/?protocol=resp2&db=1".into(),
                Some("/x.pem".into())
            )
        );
        assert_eq!(
            take_param("rediss://a/?cat=1", "ca"),
            ("rediss://a/?cat=1".into(), None)
        );
        // Decoded as the redis crate decodes its own parameters; the last one counts.
        assert_eq!(
            take_param("rediss://a/?ca=%2Fmy%20certs%2Fa%2Bb.pem&ca=/c+d.pem", "ca"),
            ("rediss://a/".into(), Some("/c d.pem".into()))
        );
        assert_eq!(
            take_param("rediss://a/?ca=%2Fmy%20certs%2Fa%2Bb.pem", "ca").1,
            Some("/my certs/a+b.pem".into())
        );
        // The pairs kept mean what they meant; a fragment stays a fragment.
        assert_eq!(
            take_param("rediss://a/?pass=p%26w&ca=/x.pem#frag", "ca"),
            ("rediss://a/?pass=p%26w#frag".into(), Some("/x.pem".into()))
        );
        assert_eq!(
            take_param("rediss://a/#?ca=/x.pem", "ca"),
            ("rediss://a/#?ca=/x.pem".into(), None)
        );
        // A Unix socket URL and a cluster URL (whose host list `url` does not read).
        assert_eq!(
            take_param("redis+unix:///run/redis.sock?db=2&ca=x", "ca"),
            ("redis+unix:///run/redis.sock?db=2".into(), Some("x".into()))
        );
    }

    #[test]
    fn debug_shows_no_key() {
        let options = RedisOptions::new().client_certificate("CERT", "SECRET-KEY");
        let text = format!("{options:?}");
        assert!(!text.contains("SECRET-KEY"), "{text}");
        assert!(text.contains("client_certificate: true"), "{text}");
    }
}
