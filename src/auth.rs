//! Upstream authentication: `WWW-Authenticate` challenges and a token cache.
