//! `Range: bytes=...` requests on blobs (RFC 9110 section 14), single ranges only.

/// A single byte range as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// `bytes=a-b`, both inclusive.
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a `Range` header. Returns `None` for anything that is not one
/// well-formed byte range; per RFC 9110 such a header is ignored and the
/// whole blob is served.
pub(crate) fn parse(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim(), b.trim()) {
        ("", n) => num(n).map(ByteRange::Suffix),
        (a, "") => num(a).map(ByteRange::From),
        (a, b) => {
            let (a, b) = (num(a)?, num(b)?);
            (a <= b).then_some(ByteRange::FromTo(a, b))
        }
    }
}

impl ByteRange {
    /// The half-open span `[start, end)` this range selects from a blob of
    /// `size` bytes, or `None` when it is unsatisfiable (416).
    pub(crate) fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::FromTo(a, b) if a < size => Some((a, b.saturating_add(1).min(size))),
            ByteRange::From(a) if a < size => Some((a, size)),
            ByteRange::Suffix(n) if n > 0 && size > 0 => Some((size - n.min(size), size)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("bytes=0-9"), Some(ByteRange::FromTo(0, 9)));
        assert_eq!(parse("bytes=10-"), Some(ByteRange::From(10)));
        assert_eq!(parse("bytes=-5"), Some(ByteRange::Suffix(5)));
        assert_eq!(parse("bytes=9-0"), None);
        assert_eq!(parse("bytes=0-1,3-4"), None);
        assert_eq!(parse("items=0-1"), None);
        assert_eq!(parse("bytes=a-b"), None);
        assert_eq!(parse("bytes=-"), None);
        assert_eq!(parse("bytes=+1-2"), None);
    }

    #[test]
    fn resolves() {
        assert_eq!(ByteRange::FromTo(0, 9).resolve(100), Some((0, 10)));
        assert_eq!(ByteRange::FromTo(90, 200).resolve(100), Some((90, 100)));
        assert_eq!(ByteRange::From(99).resolve(100), Some((99, 100)));
        assert_eq!(ByteRange::From(100).resolve(100), None);
        assert_eq!(ByteRange::Suffix(5).resolve(100), Some((95, 100)));
        assert_eq!(ByteRange::Suffix(500).resolve(100), Some((0, 100)));
        assert_eq!(ByteRange::Suffix(0).resolve(100), None);
        assert_eq!(ByteRange::FromTo(0, 0).resolve(0), None);
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the header and size, a satisfiable range resolves to a
        /// non-empty span inside the blob.
        #[test]
        fn resolve_stays_within_bounds(a in any::<u64>(), b in any::<u64>(), size in any::<u64>(), kind in 0..3u8) {
            let header = match kind {
                0 => format!("bytes={a}-{b}"),
                1 => format!("bytes={a}-"),
                _ => format!("bytes=-{b}"),
            };
            if let Some(r) = parse(&header)
                && let Some((start, end)) = r.resolve(size)
            {
                prop_assert!(start < end && end <= size, "{} on {}: {}..{}", header, size, start, end);
            }
        }

        /// `bytes=a-b` with a <= b parses to exactly that range.
        #[test]
        fn from_to_parses(a in any::<u64>(), len in any::<u64>()) {
            let b = a.saturating_add(len);
            prop_assert_eq!(parse(&format!("bytes={a}-{b}")), Some(ByteRange::FromTo(a, b)));
        }
    }
}
