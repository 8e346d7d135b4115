//! Compile-time parsing of duration literals with the grammar of the `idem` command (and of
//! every tool built on `humantime`): `"500ms"`, `"30s"`, `"15m"`, `"24h"`, `"7d"`, `"1w"`,
//! `"1h30m"`, `"1h 30m"`, `"1.5h"`, `"2days"`. Integer seconds (`ttl = 3600`) are read by `args.rs`.

/// Parses `text` with [`humantime::parse_duration`], returning whole milliseconds (what the
/// runtime is given). A duration finer than a millisecond (`"1500us"`) is refused rather than
/// rounded, so that what is written is what runs.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let duration = humantime::parse_duration(text).map_err(|e| why(text, e))?;
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "`{text}` has a part finer than a millisecond, which idem does not keep: round it to whole milliseconds"
        ));
    }
    u64::try_from(duration.as_millis()).map_err(|_| "the duration is too large".to_string())
}

/// humantime's error, with its byte offsets shown as the text they point at.
fn why(text: &str, error: humantime::DurationError) -> String {
    let at = |offset: usize| text.get(offset..).unwrap_or(text);
    match error {
        humantime::DurationError::NumberExpected(offset) => {
            format!("expected a number at `{}`", at(offset))
        }
        humantime::DurationError::InvalidCharacter(offset) => {
            format!("unexpected character at `{}`", at(offset))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn parses_the_cli_grammar() {
        assert_eq!(parse_millis("24h"), Ok(86_400_000));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("1h30m"), Ok(5_400_000));
        assert_eq!(parse_millis("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_millis("7d"), Ok(604_800_000));
        // What the old hand-written grammar refused and the CLI accepts.
        assert_eq!(parse_millis("1w"), Ok(604_800_000));
        assert_eq!(parse_millis("2days"), Ok(172_800_000));
        assert_eq!(parse_millis(" 15min "), Ok(900_000));
    }

    #[test]
    fn rejects_nonsense_and_says_why() {
        assert!(parse_millis("").is_err());
        assert_eq!(
            parse_millis("10"),
            Err("time unit needed, for example 10sec or 10ms".into())
        );
        assert_eq!(
            parse_millis("ten seconds"),
            Err("expected a number at `ten seconds`".into())
        );
        assert_eq!(
            parse_millis("1h, 30m"),
            Err("unexpected character at `, 30m`".into())
        );
        assert!(parse_millis("5 fortnights")
            .unwrap_err()
            .contains("unknown time unit \"fortnights\""));
        assert!(parse_millis("99999999999999999999s").is_err());
        assert!(parse_millis("1500us")
            .unwrap_err()
            .contains("round it to whole milliseconds"));
        assert_eq!(parse_millis("2000us"), Ok(2));
        assert_eq!(parse_millis("1.5h"), Ok(5_400_000));
    }
}
