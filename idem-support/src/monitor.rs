//! Counting the commands a store sends to Redis, from the server's `MONITOR` feed: markers sent
//! on another connection split the feed into windows, and the store's own connection is told
//! apart from other clients (tests in parallel, other processes) by the key prefix its commands
//! name.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use idem_runtime::store::redis::redis::{self, aio::MultiplexedConnection};

/// One command of the feed: the client that sent it (`lua` for a script's) and its arguments.
#[derive(Clone, Debug)]
pub struct Command {
    /// The sending client's address, or `lua`.
    pub client: String,
    /// The command's name and arguments, unquoted.
    pub args: Vec<Vec<u8>>,
}

impl Command {
    /// Whether the command is `name` (any case).
    pub fn is(&self, name: &str) -> bool {
        self.args
            .first()
            .is_some_and(|a| a.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Whether a script ran it.
    pub fn from_lua(&self) -> bool {
        self.client == "lua"
    }

    /// The arguments as text, for messages.
    pub fn text(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

/// A `MONITOR` feed of the server and the markers that split it.
pub struct Monitor {
    feed: Pin<Box<dyn Stream<Item = String> + Send>>,
    admin: MultiplexedConnection,
    marker: String,
    marks: usize,
}

impl Monitor {
    /// Starts reading the feed of the server at `url`; markers go through `admin`.
    pub async fn start(url: &str, admin: MultiplexedConnection) -> Result<Monitor, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let feed = client
            .get_async_monitor()
            .await
            .map_err(|e| e.to_string())?
            .into_on_message::<String>();
        Ok(Monitor {
            feed: Box::pin(feed),
            admin,
            marker: format!("idem-mark-{:016x}", rand::random::<u64>()),
            marks: 0,
        })
    }

    /// Sends the next marker. The commands between two markers are one window.
    pub async fn mark(&mut self) -> Result<(), String> {
        redis::cmd("ECHO")
            .arg(format!("{}-{}", self.marker, self.marks))
            .query_async::<String>(&mut self.admin)
            .await
            .map_err(|e| e.to_string())?;
        self.marks += 1;
        Ok(())
    }

    /// Reads the feed up to the last marker (within `limit`): the commands of each window, one
    /// fewer windows than markers.
    pub async fn windows(mut self, limit: Duration) -> Result<Vec<Vec<Command>>, String> {
        let (marker, last) = (self.marker.clone(), self.marks.saturating_sub(1));
        let mut windows: Vec<Vec<Command>> = Vec::new();
        let read = async {
            while let Some(line) = self.feed.next().await {
                if let Some(n) = (0..=last).find(|n| line.contains(&format!("{marker}-{n}\""))) {
                    if n == last {
                        return true;
                    }
                    windows.push(Vec::new());
                    continue;
                }
                if let (Some(window), Some(seen)) = (windows.last_mut(), parse(&line)) {
                    window.push(seen);
                }
            }
            false
        };
        match tokio::time::timeout(limit, read).await {
            Ok(true) if windows.len() == last => Ok(windows),
            _ => Err("the MONITOR feed did not reach the last marker".into()),
        }
    }
}

/// The commands the store's connection sent in each window: that of the client (not a script)
/// whose commands name `prefix`.
pub fn sent_by_store(windows: &[Vec<Command>], prefix: &str) -> Result<Vec<Vec<Command>>, String> {
    let ours = windows
        .iter()
        .flatten()
        .find(|c| !c.from_lua() && c.args.iter().any(|a| a.starts_with(prefix.as_bytes())))
        .map(|c| c.client.clone())
        .ok_or("the store's commands do not show in the MONITOR feed")?;
    Ok(windows
        .iter()
        .map(|w| w.iter().filter(|c| c.client == ours).cloned().collect())
        .collect())
}

/// How many commands scripts ran in `window`.
pub fn lua_commands(window: &[Command]) -> usize {
    window.iter().filter(|c| c.from_lua()).count()
}

/// One line of the feed, `<time> [<db> <client>] "arg" "arg" ...`, into the client and the
/// arguments, unquoted as Redis quotes them (`\"`, `\\`, `\n`, `\r`, `\t`, `\a`, `\b`, `\xHH`).
fn parse(line: &str) -> Option<Command> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
    let b = &line.as_bytes()[close + 1..];
    let mut args = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' && i + 1 < b.len() {
                let hex = |at: usize| {
                    std::str::from_utf8(b.get(at..at + 2)?)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                };
                match b[i + 1] {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => match hex(i + 2) {
                        Some(byte) => {
                            arg.push(byte);
                            i += 2;
                        }
                        None => arg.push(b'x'),
                    },
                    other => arg.push(other),
                }
                i += 2;
            } else {
                arg.push(b[i]);
                i += 1;
            }
        }
        i += 1;
        args.push(arg);
    }
    Some(Command { client, args })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn lines_are_unquoted() {
        let c =
            parse(r#"1700000000.123456 [0 127.0.0.1:5000] "EVALSHA" "a\"b\\c\x01\n" "2""#).unwrap();
        assert_eq!(c.client, "127.0.0.1:5000");
        assert_eq!(
            c.args,
            vec![
                b"EVALSHA".to_vec(),
                b"a\"b\\c\x01\n".to_vec(),
                b"2".to_vec()
            ]
        );
        assert!(c.is("evalsha") && !c.from_lua());
        let lua = parse(r#"1700000000.1 [0 lua] "HGET" "k""#).unwrap();
        assert!(lua.from_lua());
    }
}
