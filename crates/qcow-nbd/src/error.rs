//! Why a connection ended early.

use std::io;

/// What ends a connection: the socket failed, or the client broke the protocol (which ends only its own
/// connection).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to the client's socket failed (including the client going away).
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The client sent something the protocol does not allow, so the connection is dropped.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Result of connection handling.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A protocol violation described by `what`.
    pub fn protocol(what: impl Into<String>) -> Self {
        Error::Protocol(what.into())
    }

    /// Whether this is just the client closing its end, which is not worth more than a debug line.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ))
    }
}
