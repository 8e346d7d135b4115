//! Why a command failed, and the exit code it ends with.

use std::fmt;
use std::process::ExitCode;

use idem_runtime::Error;

/// The exit codes of `idem` (also listed in `idem --help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 1: there is no record under the key (`get`, `forget`).
    NoRecord = 1,
    /// 2: bad usage, a bad store URL, a store that cannot be reached or opened, or a missing
    /// SQLite file or table, which `idem` never creates (clap's own usage errors exit 2 too).
    Usage = 2,
    /// 3: the store failed during the command, or a record could not be read.
    Store = 3,
    /// 4: refused: `forget` of an in-flight record without `--force`.
    Refused = 4,
}

/// A failed command: its exit code and the one-line message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// How the process exits.
    pub exit: Exit,
    /// What went wrong and, where it helps, what to do.
    pub message: String,
}

impl Failure {
    /// A failure with `exit` and `message`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }

    /// An error of the store during a command: a configuration error (a store that cannot
    /// do what the command needs) is [`Exit::Usage`], anything else [`Exit::Store`].
    pub fn during(what: &str, error: Error) -> Self {
        let exit = match error {
            Error::Config { .. } => Exit::Usage,
            _ => Exit::Store,
        };
        Failure::new(exit, format!("{what}: {error}"))
    }

    /// The process's exit code.
    pub fn code(&self) -> ExitCode {
        ExitCode::from(self.exit as u8)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the commands return.
pub type Outcome<T> = std::result::Result<T, Failure>;
