//! Fuzz target: `stowage::fuzzing::range`.
stowage_fuzz::target!(stowage::fuzzing::range);
