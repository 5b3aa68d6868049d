//! `WWW-Authenticate` challenges: parsing header values (RFC 9110
//! section 11.6.1) and picking the one to answer.
//!
//! Registries following the Docker token specification answer an
//! unauthenticated request with `401` and a challenge such as
//!
//! ```text
//! WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"
//! ```
//!
//! Hand-written: the `http` crate has no challenge parser, and the crates
//! that have one either parse only a single challenge per header value or
//! pull in a client stack of their own.

use http::{HeaderMap, header};

use super::error::UpstreamError;

/// One authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Bearer`: fetch a token from `realm` and present it.
    Bearer(BearerChallenge),
    /// `Basic`: present username and password.
    Basic {
        /// The protection space named by the server, if any.
        realm: Option<String>,
    },
    /// Any other scheme (`Negotiate`, `Digest`, …), which stowage does not
    /// speak. Holds the scheme name in lower case.
    Other(String),
}

/// The parameters of a `Bearer` challenge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BearerChallenge {
    /// URL of the token endpoint.
    pub(crate) realm: String,
    /// The `service` parameter to pass to the token endpoint, if given.
    pub(crate) service: Option<String>,
    /// The `scope` the server asked for, if given
    /// (`repository:library/alpine:pull`).
    pub(crate) scope: Option<String>,
}

/// Why a `WWW-Authenticate` header value could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChallengeError {
    /// The header value holds no challenge at all.
    #[error("empty challenge")]
    Empty,
    /// Something other than a token where a scheme or parameter name belongs.
    #[error("expected a token at byte {0}")]
    ExpectedToken(usize),
    /// A parameter name not followed by `=`.
    #[error("expected '=' after parameter {0:?}")]
    ExpectedEquals(String),
    /// A quoted string that never ends.
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    /// Text after a parameter value that is neither `,` nor the end.
    #[error("unexpected character at byte {0}")]
    Unexpected(usize),
    /// A `Bearer` challenge without `realm`.
    #[error("bearer challenge has no realm")]
    MissingRealm,
}

/// Characters allowed in an HTTP `token` (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A small cursor over the header value.
struct Lexer<'a> {
    /// The whole header value.
    s: &'a [u8],
    /// Index of the next unread byte.
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t') {
            self.pos += 1;
        }
    }

    /// Skips whitespace and commas (empty list elements are allowed).
    fn skip_ws_commas(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b',') {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.pos < self.s.len() && is_tchar(self.s[self.pos]) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        std::str::from_utf8(&self.s[start..self.pos]).ok()
    }

    /// Reads a quoted string (opening quote already current), handling
    /// backslash escapes.
    fn quoted(&mut self) -> Result<String, ChallengeError> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => match self.peek() {
                    Some(escaped) => {
                        out.push(escaped);
                        self.pos += 1;
                    }
                    None => return Err(ChallengeError::UnterminatedQuote),
                },
                other => out.push(other),
            }
        }
        Err(ChallengeError::UnterminatedQuote)
    }

    /// Looks ahead: is the next element `name =` (a parameter), rather than
    /// the scheme of a new challenge? Does not move the cursor.
    fn next_is_param(&self) -> bool {
        let mut probe = Lexer {
            s: self.s,
            pos: self.pos,
        };
        if probe.token().is_none() {
            return false;
        }
        probe.skip_ws();
        probe.peek() == Some(b'=')
    }

    /// Consumes a `token68` (`abc+/==`) if one follows, up to (not
    /// including) the next comma or the end. Leaves the cursor alone and
    /// returns false otherwise.
    fn token68(&mut self) -> bool {
        let mut probe = Lexer {
            s: self.s,
            pos: self.pos,
        };
        let start = probe.pos;
        while probe
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        {
            probe.pos += 1;
        }
        if probe.pos == start {
            return false;
        }
        while probe.peek() == Some(b'=') {
            probe.pos += 1;
        }
        probe.skip_ws();
        if probe.at_end() || probe.peek() == Some(b',') {
            self.pos = probe.pos;
            true
        } else {
            false
        }
    }
}

/// Parses one `WWW-Authenticate` header value into its challenges.
///
/// Scheme and parameter names are case-insensitive; parameter values may be
/// tokens or quoted strings (which may contain commas and escaped quotes).
/// Several challenges may share one header value
/// (`Basic realm="a", Bearer realm="b"`). A `Bearer` challenge must carry a
/// `realm`.
pub(crate) fn parse_challenges(value: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut lx = Lexer {
        s: value.as_bytes(),
        pos: 0,
    };
    let mut out = Vec::new();
    lx.skip_ws_commas();
    while !lx.at_end() {
        let scheme = lx
            .token()
            .ok_or(ChallengeError::ExpectedToken(lx.pos))?
            .to_ascii_lowercase();
        lx.skip_ws();
        // token68 form (`Negotiate abc==`), recognised only as the first
        // element after the scheme.
        let params = if lx.token68() {
            Vec::new()
        } else {
            lx.params()?
        };
        out.push(challenge(scheme, &params)?);
        lx.skip_ws_commas();
    }
    if out.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(out)
}

/// The challenge of `scheme` with `params`.
fn challenge(scheme: String, params: &[(String, String)]) -> Result<Challenge, ChallengeError> {
    let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    Ok(match scheme.as_str() {
        "bearer" => Challenge::Bearer(BearerChallenge {
            realm: param("realm")
                .filter(|r| !r.is_empty())
                .ok_or(ChallengeError::MissingRealm)?,
            service: param("service"),
            scope: param("scope"),
        }),
        "basic" => Challenge::Basic {
            realm: param("realm"),
        },
        _ => Challenge::Other(scheme),
    })
}

impl Lexer<'_> {
    /// The `name=value` parameters of one challenge, up to the scheme of
    /// the next one (or the end); names in lower case.
    fn params(&mut self) -> Result<Vec<(String, String)>, ChallengeError> {
        let mut params = Vec::new();
        loop {
            self.skip_ws_commas();
            if self.at_end() || !self.next_is_param() {
                return Ok(params);
            }
            let name = self
                .token()
                .ok_or(ChallengeError::ExpectedToken(self.pos))?
                .to_ascii_lowercase();
            self.skip_ws();
            if self.peek() != Some(b'=') {
                return Err(ChallengeError::ExpectedEquals(name));
            }
            self.pos += 1;
            self.skip_ws();
            let val = if self.peek() == Some(b'"') {
                self.quoted()?
            } else {
                self.token()
                    .ok_or(ChallengeError::ExpectedToken(self.pos))?
                    .to_string()
            };
            params.push((name, val));
            self.skip_ws();
            if !self.at_end() && self.peek() != Some(b',') {
                return Err(ChallengeError::Unexpected(self.pos));
            }
        }
    }
}

/// The challenge to answer from a 401's `WWW-Authenticate` headers: the first
/// Bearer, else the first Basic. `None` when there is no header or only
/// schemes stowage does not speak; an error when nothing usable parsed and
/// some header was malformed.
pub(super) fn pick(headers: &HeaderMap) -> Option<Result<Challenge, UpstreamError>> {
    let mut basic = None;
    let mut error = None;
    for value in headers.get_all(header::WWW_AUTHENTICATE) {
        let parsed = value
            .to_str()
            .map_err(|_| "WWW-Authenticate is not ASCII".to_string())
            .and_then(|v| {
                parse_challenges(v).map_err(|e| format!("bad WWW-Authenticate {v:?}: {e}"))
            });
        match parsed {
            Ok(challenges) => {
                for c in challenges {
                    match c {
                        Challenge::Bearer(_) => return Some(Ok(c)),
                        Challenge::Basic { .. } if basic.is_none() => basic = Some(c),
                        _ => {}
                    }
                }
            }
            Err(e) => error = Some(e),
        }
    }
    match (basic, error) {
        (Some(b), _) => Some(Ok(b)),
        (None, Some(e)) => Some(Err(UpstreamError::Protocol(e))),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer(BearerChallenge {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
        })
    }

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![bearer(
                "https://auth.docker.io/token",
                Some("registry.docker.io"),
                Some("repository:library/alpine:pull")
            )]
        );
    }

    #[test]
    fn quoted_values_may_hold_commas_and_escapes() {
        let c = parse_challenges(
            r#"Bearer realm="https://a/token",scope="repository:a/b:pull,push",service="x\"y""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![bearer(
                "https://a/token",
                Some("x\"y"),
                Some("repository:a/b:pull,push")
            )]
        );
    }

    #[test]
    fn unquoted_values_whitespace_and_case() {
        let c = parse_challenges("bEaReR  Realm = tok , SERVICE=reg ,scope=\"s\"").unwrap();
        assert_eq!(c, vec![bearer("tok", Some("reg"), Some("s"))]);
        let c = parse_challenges("BASIC realm=\"Registry Realm\"").unwrap();
        assert_eq!(
            c,
            vec![Challenge::Basic {
                realm: Some("Registry Realm".into())
            }]
        );
        assert_eq!(
            parse_challenges("Basic").unwrap(),
            vec![Challenge::Basic { realm: None }]
        );
    }

    #[test]
    fn scope_and_service_are_optional() {
        let c = parse_challenges(r#"Bearer realm="https://a/token""#).unwrap();
        assert_eq!(c, vec![bearer("https://a/token", None, None)]);
    }

    #[test]
    fn several_challenges_in_one_value() {
        let c = parse_challenges(
            r#"Basic realm="a, b", Bearer realm="https://t",service=s, Negotiate abc==, Digest realm=x"#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![
                Challenge::Basic {
                    realm: Some("a, b".into())
                },
                bearer("https://t", Some("s"), None),
                Challenge::Other("negotiate".into()),
                Challenge::Other("digest".into()),
            ]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse_challenges(""), Err(ChallengeError::Empty));
        assert_eq!(parse_challenges("  , "), Err(ChallengeError::Empty));
        assert_eq!(
            parse_challenges(r#"Bearer service="x""#),
            Err(ChallengeError::MissingRealm)
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="""#),
            Err(ChallengeError::MissingRealm)
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="https://x"#),
            Err(ChallengeError::UnterminatedQuote)
        );
        assert!(matches!(
            parse_challenges(r#"Bearer realm="a" junk"#),
            Err(ChallengeError::Unexpected(_))
        ));
        assert!(matches!(
            parse_challenges(r#"Bearer realm=x, scope="#),
            Err(ChallengeError::ExpectedToken(_))
        ));
        assert_eq!(
            parse_challenges("Bearer realm="),
            Err(ChallengeError::MissingRealm)
        );
        assert!(matches!(
            parse_challenges(r#""quoted" realm=x"#),
            Err(ChallengeError::ExpectedToken(0))
        ));
    }

    #[test]
    fn challenge_selection() {
        let mut h = HeaderMap::new();
        assert!(pick(&h).is_none());
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate"),
        );
        assert!(pick(&h).is_none());
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer x"),
        );
        assert!(matches!(pick(&h), Some(Err(UpstreamError::Protocol(_)))));
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=r"),
        );
        assert!(matches!(pick(&h), Some(Ok(Challenge::Basic { .. }))));
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"https://t\""),
        );
        assert!(matches!(pick(&h), Some(Ok(Challenge::Bearer(_)))));
    }
}
