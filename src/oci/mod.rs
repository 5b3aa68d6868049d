//! The OCI distribution vocabulary: validated names, digests, routes,
//! manifest media types and header names. No I/O and no HTTP statuses live
//! here.

mod digest;
pub(crate) mod headers;
pub(crate) mod manifest;
mod name;
mod route;

pub(crate) use digest::*;
pub(crate) use name::*;
pub(crate) use route::*;

/// What was invalid in a name, tag, digest or request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// A repository name.
    Name,
    /// A tag.
    Tag,
    /// A digest (malformed, or an algorithm stowage cannot verify).
    Digest,
    /// A request path that is not part of the registry pull API.
    Path,
}

/// Why a name, tag, digest or request path was refused. The message quotes
/// the offending input (truncated) and is safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ParseError {
    /// What was invalid.
    pub(crate) invalid: Invalid,
    /// What is wrong with it.
    pub(crate) message: String,
}

impl ParseError {
    fn new(invalid: Invalid, message: impl Into<String>) -> ParseError {
        ParseError {
            invalid,
            message: message.into(),
        }
    }

    fn name(message: impl Into<String>) -> ParseError {
        ParseError::new(Invalid::Name, message)
    }

    fn tag(message: impl Into<String>) -> ParseError {
        ParseError::new(Invalid::Tag, message)
    }

    fn digest(message: impl Into<String>) -> ParseError {
        ParseError::new(Invalid::Digest, message)
    }

    fn path(message: impl Into<String>) -> ParseError {
        ParseError::new(Invalid::Path, message)
    }
}

/// Keeps hostile input out of error messages and logs at a bounded size.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
