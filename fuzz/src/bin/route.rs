//! Fuzz target: `stowage::fuzzing::route`.
stowage_fuzz::target!(stowage::fuzzing::route);
