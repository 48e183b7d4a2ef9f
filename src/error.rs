//! The library's one error type: what `start`, `Server::reload` and `cli::parse` can fail with, each kind
//! distinct so that a caller (the binary: exit code 2 or 1) can tell a bad configuration from a host problem.

use std::fmt;
use std::io;

use crate::config::ConfigError;

#[derive(Debug)]
pub enum Error {
    /// The command line is wrong (an unknown flag, a missing value).
    Usage(String),
    /// The configuration is invalid: the message names the file and field, the variable or the flag.
    Config(ConfigError),
    /// A valid configuration that cannot be put to use (a key that is not a valid header value).
    Unusable(String),
    /// The host refused: a listener could not be bound, a thread or socket could not be made.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Unusable(m) => f.write_str(m),
            Error::Config(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::Config(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}
