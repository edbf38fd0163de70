//! [`AllowedOrigins`]: which web pages may open a WebSocket to this server.
//! The check reads the raw bytes of the handshake's `Origin` and `Host`
//! headers, and fails closed.
//!
//! Browsers send the page's origin in the `Origin` header of a WebSocket
//! handshake, and unlike `fetch`, WebSockets are not bound by the same-origin
//! policy: without a check, any site a user visits could open a WebSocket to
//! this server with the user's cookies (cross-site WebSocket hijacking).
//!
//! [`AllowedOrigins::check`] applies these rules, in order:
//!
//! 1. No `Origin` header: allowed. Only browsers send one; a client that is
//!    not a browser has no page to protect (and could send any `Origin` it
//!    liked).
//! 2. `ALLOWED_ORIGINS=*`: allowed, whatever the header says, even `null`
//!    (what sandboxed frames and `file:` pages send).
//! 3. An `Origin` that is not what a browser sends, `scheme://host[:port]`
//!    in visible ASCII with the scheme `http` or `https`: refused. That is
//!    `null`, any byte outside visible ASCII, a path (even a lone `/`), a
//!    query, userinfo (`user@`), an empty or out-of-range port. A header the
//!    check cannot read is never taken for an absent one.
//! 4. An origin listed in `ALLOWED_ORIGINS`: allowed when its scheme, host
//!    and port all match. `https://app.example.com` is
//!    `https://app.example.com:443`, and not `http://app.example.com`.
//! 5. The page's own origin: allowed when the `Origin` names the host and
//!    port of the request's `Host` header (see below for the scheme).
//! 6. Anything else: refused, also when the request has no `Host` header or
//!    one that is not `host[:port]`, since then nothing can be the same.
//!
//! # The page's own origin: schemes and ports
//!
//! The server often cannot see the scheme the page was loaded with: behind
//! a reverse proxy that terminates TLS, the page is `https://h` while the
//! request that reaches us is plain HTTP with `Host: h`. So the caller says
//! whether *this server* terminated TLS, and:
//!
//! - when it did not (`tls == false`), a page of either scheme on the same
//!   host is the page's own, and a `Host` without a port stands for the
//!   default port of the Origin's scheme: `http://h` matches `Host: h` and
//!   `Host: h:80`; `https://h` matches `Host: h` and `Host: h:443`; but
//!   `https://h` does not match `Host: h:80`, nor `http://h:8080`
//!   `Host: h:8081`. (A plain-HTTP page of the same host is trusted as the
//!   same site: whoever controls it controls the host.)
//! - when it did (`tls == true`), the scheme is known: only `https` pages are
//!   its own, and a `Host` without a port means 443.
//!
//! Hosts compare without regard to case, IPv6 literals by address
//! (`[::1]` is `[0:0::1]`).
//!
//! The parsing is done here rather than with `http::uri::Authority`, whose
//! `port()` takes a port it cannot read for no port at all: `h:99999` would
//! become `h` with the default port, which is failing open.

use std::fmt;
use std::net::Ipv6Addr;

use axum::http::HeaderValue;

/// Which origins may open a WebSocket (see the [module documentation](self)
/// for the rules).
///
/// `#[non_exhaustive]`, as the settings are: a match on it needs a `_` arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowedOrigins {
    /// Any origin (`ALLOWED_ORIGINS=*`).
    Any,
    /// The server's own origin (the `Origin` names the same host and port as
    /// the request's `Host` header), plus these, e.g.
    /// `https://app.example.com`. [`AllowedOrigins::parse`] writes them in
    /// one form (lowercase, no default port); an entry that is not an
    /// origin matches nothing.
    SameHostAnd(Vec<String>),
}

/// What [`AllowedOrigins::check`] decided, and why: the variant names the
/// rule that applied, for logs and metrics. `#[non_exhaustive]`: a new
/// rule may come; [`is_allowed`](OriginCheck::is_allowed) says what any of
/// them decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OriginCheck {
    /// Allowed: no `Origin` header, so not a browser.
    NoOrigin,
    /// Allowed: `ALLOWED_ORIGINS=*` lets every origin in.
    AnyOrigin,
    /// Allowed: the page's own origin (same host and port as `Host`).
    SameHost,
    /// Allowed: an origin listed in `ALLOWED_ORIGINS`.
    Listed,
    /// Refused: the `Origin` header is not an origin a browser would send
    /// (`null`, not visible ASCII, no scheme or another than http(s), a
    /// path, userinfo, a bad port).
    Malformed,
    /// Refused: another site's page.
    CrossOrigin,
}

impl OriginCheck {
    /// Whether the handshake may proceed.
    pub fn is_allowed(self) -> bool {
        matches!(
            self,
            OriginCheck::NoOrigin
                | OriginCheck::AnyOrigin
                | OriginCheck::SameHost
                | OriginCheck::Listed
        )
    }
}

impl AllowedOrigins {
    /// Reads `*`, or a comma-separated list of origins such as
    /// `https://app.example.com, http://localhost:3000` (the format of
    /// `ALLOWED_ORIGINS`). An entry that is not `scheme://host[:port]` with
    /// the scheme `http` or `https` is an error that names `ALLOWED_ORIGINS`.
    pub fn parse(value: &str) -> Result<AllowedOrigins, String> {
        if value.trim() == "*" {
            return Ok(AllowedOrigins::Any);
        }
        let mut origins = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let Some(origin) = Origin::parse(entry.as_bytes()) else {
                return Err(format!(
                    "ALLOWED_ORIGINS: {entry:?} is not an origin: write it as \
                     scheme://host[:port] with the scheme http or https and no path \
                     (not even a trailing /), e.g. https://app.example.com, or use *"
                ));
            };
            origins.push(origin.to_string());
        }
        Ok(AllowedOrigins::SameHostAnd(origins))
    }

    /// Whether a handshake with this `Origin` header, sent with this `Host`
    /// header, may proceed. `tls` says whether this server terminated TLS
    /// for the request itself (false behind a proxy that did). The headers'
    /// raw bytes are read: one that is not visible ASCII is refused, never
    /// taken for absent.
    pub fn check(
        &self,
        origin: Option<&HeaderValue>,
        host: Option<&HeaderValue>,
        tls: bool,
    ) -> OriginCheck {
        let Some(origin) = origin else {
            return OriginCheck::NoOrigin; // not a browser: no page to protect
        };
        let AllowedOrigins::SameHostAnd(listed) = self else {
            return OriginCheck::AnyOrigin;
        };
        let Some(origin) = Origin::parse(origin.as_bytes()) else {
            return OriginCheck::Malformed;
        };
        // Entries are parsed again (cheap, once per handshake) so that one
        // written by hand rather than by `parse` compares the same way.
        if listed
            .iter()
            .filter_map(|entry| Origin::parse(entry.as_bytes()))
            .any(|entry| entry == origin)
        {
            return OriginCheck::Listed;
        }
        if host.is_some_and(|host| origin.is_served_at(host.as_bytes(), tls)) {
            OriginCheck::SameHost
        } else {
            OriginCheck::CrossOrigin
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An origin as browsers serialize it: scheme, lowercase host (an IPv6
/// literal in brackets, in its canonical form), and the port, with the
/// scheme's default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
}

impl Origin {
    /// `scheme://host[:port]`, nothing more; `None` for anything else.
    fn parse(bytes: &[u8]) -> Option<Origin> {
        let text = visible_ascii(bytes)?;
        let (scheme, authority) = text.split_once("://")?;
        let scheme = if scheme.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else if scheme.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else {
            return None;
        };
        let (host, port) = host_and_port(authority)?;
        Some(Origin {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    /// Whether this is the origin of a page served by the request's `Host`
    /// (see the module documentation for the scheme and default ports).
    fn is_served_at(&self, host: &[u8], tls: bool) -> bool {
        if tls && self.scheme != Scheme::Https {
            return false;
        }
        let Some((name, port)) = visible_ascii(host).and_then(host_and_port) else {
            return false;
        };
        let default = if tls { 443 } else { self.scheme.default_port() };
        name == self.host && port.unwrap_or(default) == self.port
    }
}

impl fmt::Display for Origin {
    /// The serialized origin: `https://h`, `http://h:8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.host)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// The bytes as text if they are all visible ASCII (no spaces, no controls,
/// nothing above 0x7e).
fn visible_ascii(bytes: &[u8]) -> Option<&str> {
    if bytes.is_empty() || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Splits `host[:port]` (an origin's authority, or a `Host` header) into the
/// lowercase host and the port if one is written. `None` for anything else:
/// userinfo, a path, characters no host name has, a bad IPv6 literal, an
/// empty port or one that is not a number below 65536.
fn host_and_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let address: Ipv6Addr = literal.parse().ok()?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':')?),
        };
        (format!("[{address}]"), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let host_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if host.is_empty() || !host.bytes().all(host_byte) {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(digits) => {
            let number = digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit());
            // An empty port parses to an error too.
            Some(digits.parse::<u16>().ok().filter(|_| number)?)
        }
    };
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check for `origin` (raw bytes) sent with `host`, behind a proxy
    /// (the server sees no TLS).
    fn check(allowed: &AllowedOrigins, origin: &[u8], host: &str) -> OriginCheck {
        check_tls(allowed, origin, host, false)
    }

    fn check_tls(allowed: &AllowedOrigins, origin: &[u8], host: &str, tls: bool) -> OriginCheck {
        let origin = HeaderValue::from_bytes(origin).expect("a header value");
        let host = HeaderValue::from_str(host).expect("a header value");
        allowed.check(Some(&origin), Some(&host), tls)
    }

    fn own() -> AllowedOrigins {
        AllowedOrigins::SameHostAnd(Vec::new())
    }

    #[test]
    fn no_origin_is_not_a_browser_and_is_let_in() {
        let host = HeaderValue::from_static("h");
        assert_eq!(own().check(None, Some(&host), false), OriginCheck::NoOrigin);
        assert_eq!(own().check(None, None, true), OriginCheck::NoOrigin);
    }

    #[test]
    fn what_no_browser_sends_is_refused_not_ignored() {
        let refused: &[&[u8]] = &[
            b"null",
            b"http://\xff\xfe.example", // the bytes `to_str` gave up on, once let in
            "http://caf\u{e9}.example".as_bytes(),
            b"http://h\tx",
            b"http:// h",
            b"h",
            b"//h",
            b"ftp://h",
            b"ws://h",
            b"http://",
            b"http://h/",
            b"http://h/chat",
            b"http://h?x=1",
            b"http://h#x",
            b"http://user@h",
            b"http://user:pass@h",
            b"http://h:",
            b"http://h:99999",
            b"http://h:+80",
            b"http://h:80:80",
            b"http://[::1",
            b"http://[not:an:address]",
            b"http://[fe80::1%25eth0]",
            b"http://%68",
        ];
        for origin in refused {
            assert_eq!(
                check(&own(), origin, "h"),
                OriginCheck::Malformed,
                "{:?}",
                String::from_utf8_lossy(origin)
            );
        }
        // Even when the host it names, read leniently, would be ours.
        assert!(!check(&own(), b"http://h/", "h").is_allowed());
    }

    #[test]
    fn the_pages_own_origin_by_host_and_port() {
        let cases: &[(&str, &str, bool)] = &[
            ("http://h", "h", true),
            ("http://h", "h:80", true),
            ("http://h:80", "h", true),
            ("https://h", "h", true), // a proxy terminated TLS
            ("https://h", "h:443", true),
            ("https://h:443", "h", true),
            ("http://h", "h:443", false),
            ("https://h", "h:80", false),
            ("http://h:8080", "h:8080", true),
            ("https://h:8080", "h:8080", true),
            ("http://h:8080", "h:8081", false),
            ("http://h:8080", "h", false),
            ("http://h", "h:8080", false),
            ("http://other", "h", false),
            ("http://h.example", "h", false),
            ("http://h", "h.example", false),
        ];
        for (origin, host, allowed) in cases {
            let got = check(&own(), origin.as_bytes(), host);
            let want = if *allowed {
                OriginCheck::SameHost
            } else {
                OriginCheck::CrossOrigin
            };
            assert_eq!(got, want, "Origin: {origin} with Host: {host}");
        }
    }

    #[test]
    fn with_tls_here_the_scheme_is_known() {
        let own = own();
        assert_eq!(
            check_tls(&own, b"https://h", "h", true),
            OriginCheck::SameHost
        );
        assert_eq!(
            check_tls(&own, b"https://h", "h:443", true),
            OriginCheck::SameHost
        );
        assert_eq!(
            check_tls(&own, b"https://h:8443", "h:8443", true),
            OriginCheck::SameHost
        );
        assert_eq!(
            check_tls(&own, b"http://h", "h", true),
            OriginCheck::CrossOrigin
        );
        assert_eq!(
            check_tls(&own, b"http://h:443", "h", true),
            OriginCheck::CrossOrigin
        );
        assert_eq!(
            check_tls(&own, b"http://h:8443", "h:8443", true),
            OriginCheck::CrossOrigin
        );
    }

    #[test]
    fn hosts_compare_without_case_and_ipv6_by_address() {
        let own = own();
        assert_eq!(
            check(&own, b"HTTP://H.Example", "h.example",),
            OriginCheck::SameHost
        );
        assert_eq!(
            check(&own, b"http://h.example", "H.EXAMPLE:80"),
            OriginCheck::SameHost
        );
        assert_eq!(
            check(&own, b"http://[::1]:8080", "[::1]:8080"),
            OriginCheck::SameHost
        );
        assert_eq!(
            check(&own, b"http://[::1]", "[0:0::1]"),
            OriginCheck::SameHost
        );
        assert_eq!(
            check(&own, b"http://[::ABCD]", "[::abcd]:80"),
            OriginCheck::SameHost
        );
        assert_eq!(
            check(&own, b"http://[::1]:8080", "[::1]:8081"),
            OriginCheck::CrossOrigin
        );
        assert_eq!(
            check(&own, b"http://[::1]:8080", "[::2]:8080"),
            OriginCheck::CrossOrigin
        );
        assert_eq!(
            check(&own, b"http://127.0.0.1:8080", "127.0.0.1:8080"),
            OriginCheck::SameHost
        );
    }

    #[test]
    fn a_host_header_that_is_missing_or_unreadable_matches_nothing() {
        let origin = HeaderValue::from_static("http://h");
        assert_eq!(
            own().check(Some(&origin), None, false),
            OriginCheck::CrossOrigin
        );
        for host in [&b"h\xff"[..], b"user@h", b"h/x", b"h:", b"h:port", b""] {
            let host = HeaderValue::from_bytes(host).unwrap();
            assert_eq!(
                own().check(Some(&origin), Some(&host), false),
                OriginCheck::CrossOrigin,
                "Host: {host:?}"
            );
        }
    }

    #[test]
    fn a_listed_origin_must_match_scheme_host_and_port() {
        let allowed =
            AllowedOrigins::parse("HTTPS://App.Example.com:443, http://localhost:3000").unwrap();
        assert_eq!(
            allowed,
            AllowedOrigins::SameHostAnd(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ])
        );
        let host = "api.example.com";
        assert_eq!(
            check(&allowed, b"https://app.example.com", host),
            OriginCheck::Listed
        );
        assert_eq!(
            check(&allowed, b"https://APP.example.com:443", host),
            OriginCheck::Listed
        );
        assert_eq!(
            check(&allowed, b"http://localhost:3000", host),
            OriginCheck::Listed
        );
        for other in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil.app.example.com",
            "https://app.example.com.evil",
            "http://localhost",
            "https://localhost:3000",
        ] {
            assert_eq!(
                check(&allowed, other.as_bytes(), host),
                OriginCheck::CrossOrigin,
                "{other}"
            );
        }
        // The server's own origin is still allowed beside the listed ones.
        assert_eq!(
            check(&allowed, b"https://api.example.com", host),
            OriginCheck::SameHost
        );
        // An entry written by hand is read the same way; a bad one matches nothing.
        let by_hand = AllowedOrigins::SameHostAnd(vec!["HTTP://X:80".into(), "junk".into()]);
        assert_eq!(check(&by_hand, b"http://x", "h"), OriginCheck::Listed);
        assert_eq!(check(&by_hand, b"junk", "h"), OriginCheck::Malformed);
    }

    #[test]
    fn any_lets_everything_in() {
        assert_eq!(AllowedOrigins::parse(" * ").unwrap(), AllowedOrigins::Any);
        for origin in [&b"http://evil.example"[..], b"null", b"http://\xff"] {
            assert_eq!(
                check(&AllowedOrigins::Any, origin, "h"),
                OriginCheck::AnyOrigin
            );
        }
    }

    #[test]
    fn a_bad_entry_is_an_error_that_names_the_variable() {
        assert_eq!(
            AllowedOrigins::parse("").unwrap(),
            AllowedOrigins::SameHostAnd(vec![])
        );
        for value in [
            "example.com",
            "https://app.example.com/",
            "https://app.example.com/chat",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "https://app.example.com:99999",
            "*, https://app.example.com",
            "https://caf\u{e9}.example",
            "null",
        ] {
            let err = AllowedOrigins::parse(value).unwrap_err();
            assert!(err.starts_with("ALLOWED_ORIGINS: "), "{value}: {err}");
        }
    }

    #[test]
    fn only_the_allowing_outcomes_allow() {
        use OriginCheck::*;
        let allowed: Vec<bool> = [
            NoOrigin,
            AnyOrigin,
            SameHost,
            Listed,
            Malformed,
            CrossOrigin,
        ]
        .into_iter()
        .map(OriginCheck::is_allowed)
        .collect();
        assert_eq!(allowed, [true, true, true, true, false, false]);
    }
}
