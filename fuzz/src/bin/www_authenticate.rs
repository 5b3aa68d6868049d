//! Fuzz target: `stowage::fuzzing::www_authenticate`.
stowage_fuzz::target!(stowage::fuzzing::www_authenticate);
