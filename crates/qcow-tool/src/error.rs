//! The tool's error: a message saying what the tool was doing, and the library error (or I/O error) that stopped
//! it. `main` prints the whole chain on one line.

use std::fmt;

/// What went wrong, with the error that caused it, if any.
#[derive(Debug)]
pub struct Error {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of every command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with no underlying cause, such as a bad argument.
    pub fn msg(message: impl Into<String>) -> Self {
        Error { message: message.into(), source: None }
    }

    /// An error saying what the tool was doing, caused by `source`.
    pub fn wrap(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error { message: message.into(), source: Some(Box::new(source)) }
    }

    /// Whether the error is, somewhere in its chain, a broken pipe: the reader of our output went away.
    pub fn is_broken_pipe(&self) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return true;
            }
            next = e.source();
        }
        false
    }

    /// The message and every cause under it, joined by ": ", on one line.
    pub fn chain(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            let text = e.to_string().replace('\n', " ");
            // A transparent wrapper repeats its cause's message; say it once.
            if parts.last() != Some(&text) && !text.is_empty() {
                parts.push(text);
            }
            next = e.source();
        }
        parts.join(": ")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Adds what the tool was doing to an error.
pub trait Context<T> {
    /// Wraps the error with the message `f` returns.
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error { message: f().into(), source: Some(Box::new(e)) })
    }
}
