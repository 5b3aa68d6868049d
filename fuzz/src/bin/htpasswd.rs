//! Fuzz target: `stowage::fuzzing::htpasswd`.
stowage_fuzz::target!(stowage::fuzzing::htpasswd);
