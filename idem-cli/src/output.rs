//! How things are printed: aligned tables for people, durations and timestamps in both forms
//! (short human units; milliseconds and RFC 3339 for `--json`).

use std::fmt;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// Rows of cells printed in aligned columns, two spaces apart, with an optional header row.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table whose first row is `header`.
    pub fn with_header(header: &[&str]) -> Self {
        let mut table = Table::default();
        table.row(header.iter().map(|h| h.to_string()).collect());
        table
    }

    /// A table with no header (a list of `name  value` lines, say).
    pub fn new() -> Self {
        Table::default()
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    /// Appends a `name  value` row.
    pub fn pair(&mut self, name: &str, value: impl fmt::Display) -> &mut Self {
        self.row(vec![name.to_owned(), value.to_string()])
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c] - cell.chars().count();
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A duration for people: whole seconds from a second up (`1h 2m 3s`), milliseconds below.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// A duration in whole milliseconds, for `--json`.
pub fn millis(d: Duration) -> Value {
    Value::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A time as RFC 3339 in UTC to the millisecond (`2026-03-21T10:11:12.345Z`).
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// How the end of a lease or ttl relates to now: `in 29s` or `expired 3s ago`.
pub fn until(expires_in: Result<Duration, Duration>) -> String {
    match expires_in {
        Ok(left) => format!("in {}", human(left)),
        Err(passed) => format!("expired {} ago", human(passed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let mut table = Table::with_header(&["KEY", "TOKEN", "AGE"]);
        table.row(vec!["abc".into(), "7".into(), "1s".into()]);
        table.row(vec!["a".into(), "12345".into(), "2m".into()]);
        assert_eq!(
            table.to_string(),
            "KEY  TOKEN  AGE\nabc  7      1s\na    12345  2m\n"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(61_500)), "1m 1s");
        assert_eq!(until(Ok(Duration::from_secs(3))), "in 3s");
        assert_eq!(until(Err(Duration::from_secs(3))), "expired 3s ago");
        assert_eq!(millis(Duration::from_millis(1500)), Value::from(1500u64));
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)),
            "1970-01-01T00:00:01.500Z"
        );
    }
}
