//! Fuzz target: `stowage::fuzzing::refs_of_manifest`.
stowage_fuzz::target!(stowage::fuzzing::refs_of_manifest);
