//! Store URLs in errors and logs: [`redact`] hides the credentials they may carry.

/// Query and connection-string parameters whose value is a secret.
const SECRET_PARAMS: &[&str] = &["password", "pass", "sslpassword"];

/// `url` with its credentials replaced by `***`: the user and password of a
/// `scheme://user:password@host...` URL (also of a cluster URL with several hosts), and the
/// value of a `password` (`pass`, `sslpassword`) query parameter or `password=...` pair of a
/// PostgreSQL connection string. For putting a store URL in an error or a log line.
///
/// ```text
/// redis://app:s3cret@cache:6379/0         -> redis://***@cache:6379/0
/// postgres://db/app?password=s3cret       -> postgres://db/app?password=***
/// host=db user=app password='s 3cret'     -> host=db user=app password=***
/// ```
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // Credentials end at the last `@` before the end of the authority (the first `/`,
            // `?` or `#` after the first `@`): a password may hold any of these characters
            // when it was not percent-encoded, and hiding too much is better than too little.
            let (credentials, rest) = match rest.find('@') {
                Some(first) => {
                    let end = rest[first..]
                        .find(['/', '?', '#'])
                        .map_or(rest.len(), |i| first + i);
                    let at = rest[..end].rfind('@').unwrap_or(first);
                    (true, &rest[at + 1..])
                }
                None => (false, rest),
            };
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (hosts, tail) = rest.split_at(end);
            let hidden = if credentials { "***@" } else { "" };
            format!("{scheme}://{hidden}{hosts}{}", redact_query(tail))
        }
        None if url.contains('=') => redact_key_values(url),
        None => url.to_owned(),
    }
}

/// The path, query and fragment of a URL with secret query parameters hidden.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{path}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// A `key=value key='quoted value'` connection string with secret values hidden.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim_end();
        let key_name = key.rsplit(char::is_whitespace).next().unwrap_or(key);
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        let leading = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..leading]);
        rest = &rest[leading..];
        let value_len = value_len(rest);
        if is_secret(key_name) {
            out.push_str("***");
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
    out.push_str(rest);
    out
}

/// The length of the value at the start of `s`: up to the closing quote of a quoted value
/// (`\'` and `\\` escaped), else up to the next whitespace.
fn value_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    if s.starts_with('\'') {
        chars.next();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' => return i + 1,
                _ => {}
            }
        }
        s.len()
    } else {
        s.find(char::is_whitespace).unwrap_or(s.len())
    }
}

/// `s` with `%XX` escapes decoded (a `+` stays a `+`, as tokio-postgres reads it); a `%` that
/// starts no escape is kept as it is.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a query or connection-string parameter named `key` holds a secret (`password`,
/// `pass`, `sslpassword`): the values [`redact`] hides.
pub fn is_secret(key: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_are_hidden() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://app:s3cret@cache:6379/0",
                "redis://***@cache:6379/0",
            ),
            ("rediss://:s3cret@cache", "rediss://***@cache"),
            ("redis://default@cache", "redis://***@cache"),
            (
                "rediss+cluster://u:p%40ss@a:1,b:2/?ca=/x.pem",
                "rediss+cluster://***@a:1,b:2/?ca=/x.pem",
            ),
            ("redis://u:p@ss@host:1", "redis://***@host:1"),
            ("redis://u:pa/ss?#@host:1/2", "redis://***@host:1/2"),
            (
                "postgres://app:s3cret@db:5432/app?sslmode=require",
                "postgres://***@db:5432/app?sslmode=require",
            ),
            (
                "postgres://db/app?user=app&password=s3cret&sslmode=verify-full#x",
                "postgres://db/app?user=app&password=***&sslmode=verify-full#x",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "host=db user=app password=s3cret dbname=app",
                "host=db user=app password=*** dbname=app",
            ),
            (
                "host=db password = 'it\\'s secret' sslmode=require",
                "host=db password = *** sslmode=require",
            ),
            ("memory", "memory"),
            ("sqlite:/tmp/x.db", "sqlite:/tmp/x.db"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[cfg(any(feature = "redis", feature = "postgres"))]
    #[test]
    fn escapes_are_decoded() {
        use super::percent_decode;
        assert_eq!(percent_decode("%2Ftmp%2Fmy%20ca.pem"), "/tmp/my ca.pem");
        assert_eq!(percent_decode("a+b%zz%4"), "a+b%zz%4");
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn nothing_secret_survives() {
        for url in [
            "redis://u:s3cret@h",
            "postgres://u:s3cret@h/db?password=s3cret",
            "password='s3cret' host=h",
            "mysql://root:s3cret@h",
        ] {
            assert!(!redact(url).contains("s3cret"), "{url}");
        }
    }
}
