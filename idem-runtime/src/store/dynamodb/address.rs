//! `dynamodb://TABLE?region=...&endpoint=...`: what a DynamoDB store URL says.

use std::borrow::Cow;

use url::Url;

use crate::error::{Error, Result};
use crate::store::redact_url;

/// A DynamoDB store URL, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DynamoDbUrl {
    /// The table the URL names, if any (`dynamodb://` alone names none).
    pub(crate) table: Option<String>,
    /// `region=...`: the AWS region, else the SDK's (`AWS_REGION`, the profile).
    pub(crate) region: Option<String>,
    /// `endpoint=...`: a URL to send requests to instead of AWS's (a local server).
    pub(crate) endpoint: Option<String>,
}

impl DynamoDbUrl {
    /// Reads `url`: [`Error::Config`] for another scheme, a path, user or port, an unknown or
    /// repeated parameter, or an endpoint that is not an `http(s)://` URL.
    pub(crate) fn parse(url: &str) -> Result<DynamoDbUrl> {
        let wrong =
            |what: &str| Error::config(format!("DynamoDB store URL `{}`: {what}", redact_url(url)));
        let parsed = Url::parse(url).map_err(|e| wrong(&e.to_string()))?;
        if parsed.scheme() != "dynamodb" {
            return Err(wrong("expected `dynamodb://TABLE?region=...&endpoint=...`"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() || parsed.port().is_some() {
            return Err(wrong(
                "credentials and ports do not belong in the URL: the AWS SDK finds credentials (environment, profile, role); a local server goes in `endpoint=`",
            ));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.fragment().is_some() {
            return Err(wrong("only a table name follows `dynamodb://`"));
        }
        let table = parsed
            .host_str()
            .filter(|t| !t.is_empty())
            // The `url` crate lowercases hosts; a table name is case-sensitive: take it as written.
            .map(|_| original_table(url));
        let (mut region, mut endpoint): (Option<Cow<'_, str>>, Option<Cow<'_, str>>) = (None, None);
        let mut unknown = Vec::new();
        for (key, value) in parsed.query_pairs() {
            let slot = match &*key {
                "region" => &mut region,
                "endpoint" => &mut endpoint,
                _ => {
                    unknown.push(format!("`{key}`"));
                    continue;
                }
            };
            if slot.is_some() {
                return Err(wrong(&format!("`{key}` is given twice")));
            }
            *slot = Some(value);
        }
        if !unknown.is_empty() {
            return Err(wrong(&format!(
                "unknown parameter {}: expected `region` and `endpoint`",
                unknown.join(", ")
            )));
        }
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(wrong(&format!(
                    "`endpoint={e}` is not an `http://` or `https://` URL"
                )));
            }
        }
        Ok(DynamoDbUrl {
            table,
            region: region.filter(|r| !r.is_empty()).map(Cow::into_owned),
            endpoint: endpoint.map(Cow::into_owned),
        })
    }
}

/// The table name as `url` writes it, between `dynamodb://` and the query.
fn original_table(url: &str) -> String {
    let rest = &url["dynamodb://".len()..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..end].to_owned()
}

/// Whether `table` is a valid DynamoDB table name: 3 to 255 of `a-z A-Z 0-9 _ - .`.
pub(crate) fn check_table(table: &str) -> Result<()> {
    let ok = (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid DynamoDB table name `{table}`: 3 to 255 characters of a-z, A-Z, 0-9, `_`, `-` and `.`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::{check_table, DynamoDbUrl};

    fn parse(url: &str) -> DynamoDbUrl {
        DynamoDbUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str) -> String {
        match DynamoDbUrl::parse(url) {
            Err(crate::Error::Config { reason }) => reason,
            other => panic!("{url} is refused: {other:?}"),
        }
    }

    #[test]
    fn urls_name_table_region_and_endpoint() {
        assert_eq!(
            parse("dynamodb://App_Idem.v2?region=eu-west-1&endpoint=http://127.0.0.1:8000"),
            DynamoDbUrl {
                table: Some("App_Idem.v2".into()),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://127.0.0.1:8000".into()),
            }
        );
        assert_eq!(
            parse("dynamodb://idem"),
            DynamoDbUrl {
                table: Some("idem".into()),
                region: None,
                endpoint: None
            }
        );
        assert_eq!(parse("dynamodb://").table, None);
        assert_eq!(
            parse("dynamodb://t1x/?region=us-east-1").region.as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            parse("dynamodb://tab?endpoint=https%3A%2F%2Flocalstack%3A4566")
                .endpoint
                .as_deref(),
            Some("https://localstack:4566")
        );
    }

    #[test]
    fn mistakes_are_refused_by_name() {
        assert!(refused("dynamodb://t?regoin=x").contains("`regoin`"));
        assert!(refused("dynamodb://t?region=a&region=b").contains("twice"));
        assert!(refused("dynamodb://t?endpoint=127.0.0.1:8000").contains("not an `http://`"));
        assert!(refused("dynamodb://t/extra").contains("only a table name"));
        assert!(refused("dynamodb://key:s3cret@t").contains("credentials"));
        assert!(!refused("dynamodb://key:s3cret@t").contains("s3cret"));
        assert!(refused("dynamodb://t:8000").contains("ports"));
    }

    #[test]
    fn table_names() {
        for ok in ["abc", "idem_records", "A-b.c_9", &"x".repeat(255)] {
            check_table(ok).unwrap();
        }
        for bad in ["", "ab", "a b", "tab/le", "t;x", &"x".repeat(256)] {
            assert!(check_table(bad).is_err(), "{bad}");
        }
    }
}
