//! The command line's subcommands: `warm` and the operator commands on a
//! cache directory.

pub mod ops;
pub mod warm;
