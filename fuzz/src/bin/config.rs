//! Fuzz target: `stowage::fuzzing::config`.
stowage_fuzz::target!(stowage::fuzzing::config);
