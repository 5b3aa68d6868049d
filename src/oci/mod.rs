//! The OCI distribution vocabulary: validated names, digests and routes.
//! No I/O and no HTTP statuses live here.

mod digest;
mod name;
mod route;

pub use digest::*;
pub use name::*;
pub use route::*;

/// Keeps hostile input out of error messages and logs at a bounded size.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
