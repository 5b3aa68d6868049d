//! The OCI distribution vocabulary: validated names, digests and routes.
//! No I/O and no HTTP statuses live here.

mod name;

pub use name::*;
