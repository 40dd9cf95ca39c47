//! The migration engine's errors.

use crate::wire::WireError;

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection or a frame on it (see [`WireError`]).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer sent an `Abort` frame.
    #[error("the {by} aborted: {reason}")]
    Aborted { by: &'static str, reason: String },
    /// A page the peer named is not guest RAM.
    #[error("page {0:#x} is not RAM")]
    NotRam(u64),
    /// Guest memory could not be read or registered.
    #[error("guest memory: {0}")]
    Memory(String),
    /// userfaultfd: registration, installation or fault delivery.
    #[error("{what}: {source}")]
    Pager {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The peer broke the protocol, or a step could not complete; the text
    /// says which.
    #[error("{0}")]
    Protocol(String),
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Protocol(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::Protocol(s.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Wire(WireError::Io(e))
    }
}

/// The VMM's layers above the engine report errors as text.
impl From<Error> for String {
    fn from(e: Error) -> Self {
        e.to_string()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
