//! Content digests: the algorithms stowage verifies and incremental hashing.
//!
//! A [`Digest`] can only be built by [`Digest::parse`] or by hashing, so code
//! that builds file paths from one never sees `..`, `/` or anything but
//! lowercase hex.

use std::fmt;

use super::{ParseError, truncate};

/// A digest algorithm stowage can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Algorithm {
    /// SHA-256, 64 hex characters.
    Sha256,
    /// SHA-512, 128 hex characters.
    Sha512,
}

impl Algorithm {
    /// The name used in digest strings and store directories.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest such as `sha256:e3b0…`: a known algorithm and lowercase
/// hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex`, accepting only sha256 and sha512 in canonical
    /// lowercase form.
    pub(crate) fn parse(s: &str) -> Result<Digest, ParseError> {
        let bad = || ParseError::digest(format!("invalid digest {:?}", truncate(s)));
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(ParseError::digest(format!(
                    "unsupported digest algorithm {:?}",
                    truncate(alg)
                )));
            }
        };
        if hex.len() != algorithm.hex_len()
            || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The digest of `data` under `algorithm`.
    pub(crate) fn of(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part: safe to use as a file name.
    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// Incremental hashing for either algorithm.
pub(crate) enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher.
    pub(crate) fn new(algorithm: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub(crate) fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub(crate) fn finish(self) -> Digest {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests() {
        let d = Digest::parse(&format!("sha256:{H}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{H}"));
        assert_eq!(Digest::of(Algorithm::Sha256, b""), d);
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", H.to_uppercase())).is_err());
        assert!(Digest::parse(&format!("md5:{H}")).is_err());
        assert!(Digest::parse(&format!("sha512:{H}")).is_err());
        assert!(Digest::parse(&format!("sha512:{H}{H}")).is_ok());
        assert!(Digest::parse(H).is_err());
        assert!(Digest::parse(&format!("sha256:../{}", &H[3..])).is_err());
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Canonical digests print back to themselves; anything else that
        /// parses does too (parse accepts canonical text only).
        #[test]
        fn digest_display_parse_round_trip(hex in "[0-9a-f]{64}", long in "[0-9a-f]{128}", junk in ".{0,80}") {
            for text in [format!("sha256:{hex}"), format!("sha512:{long}")] {
                let d = Digest::parse(&text).unwrap();
                prop_assert_eq!(d.to_string(), text);
            }
            if let Ok(d) = Digest::parse(&junk) {
                prop_assert_eq!(d.to_string(), junk);
            }
        }
    }
}
