//! Connection URLs: parsed the way redis-rs parses them (with the `url`
//! crate), refused where redis-rs would silently drop a credential, and shown
//! with every place a secret can hide removed.
//!
//! redis-rs reads secrets from two places (`redis::IntoConnectionInfo` for
//! `url::Url`): the userinfo of `redis://`, `rediss://`, `valkey://` and
//! `valkeys://` URLs (percent-decoded), and the `pass` query parameter of
//! `unix://`, `redis+unix://` and `valkey+unix://` URLs. Users also write
//! passwords where redis-rs does not look (`?password=`, userinfo on a socket
//! URL), and unencoded `/`, `?` or `#` in a password end the authority early,
//! which pushes the rest of the password into the path, query or fragment.

use std::fmt::Write as _;

use redis::{ConnectionInfo, IntoConnectionInfo};
use url::Url;

use crate::error::{Error, Result};

/// What stands in for anything that may be secret.
const HIDDEN: &str = "<redacted>";

/// The TCP schemes redis-rs accepts (`redis::parse_redis_url`).
const TCP: [&str; 4] = ["redis", "rediss", "valkey", "valkeys"];
/// The unix socket schemes redis-rs accepts.
const UNIX: [&str; 3] = ["unix", "redis+unix", "valkey+unix"];

/// Parses a URL as redis-rs does, without ever echoing a secret in an error.
///
/// Refuses, beyond what redis-rs refuses, what it would silently ignore and
/// so connect without a credential the user gave: a password in the query of
/// a TCP URL or as `?password=` on a socket URL, credentials before the `@`
/// of a socket URL, and an `@` after the host (an unencoded `/`, `?` or `#`
/// in a password).
pub(crate) fn parse(raw: &str) -> Result<ConnectionInfo> {
    let bad = |why: &str| Error::config(format!("malformed redis URL `{}`: {why}", redact(raw)));
    if !raw.contains("://") {
        return Err(bad("expected redis://host:port"));
    }
    let url = Url::parse(raw).map_err(|e| bad(&format!("{e}{}", hint(raw))))?;
    let scheme = url.scheme();
    let unix = UNIX.contains(&scheme);
    if !unix && !TCP.contains(&scheme) {
        return Err(Error::config(format!(
            "unsupported URL scheme `{scheme}` in `{}`: use redis://, rediss:// or unix://",
            redact(raw)
        )));
    }
    if !unix && split_password(&url) {
        return Err(bad(
            "it has an `@` after the host: `/`, `?`, `#` and `@` in a password must be percent-encoded",
        ));
    }
    if unix && (!url.username().is_empty() || url.password().is_some()) {
        return Err(bad(
            "a unix socket URL takes its credentials as `?user=...&pass=...`, not before an `@`",
        ));
    }
    for (key, _) in url.query_pairs() {
        let misplaced = match (&*key, unix) {
            ("password", true) => "the password of a unix socket URL goes in `?pass=`",
            ("username", true) => "the user of a unix socket URL goes in `?user=`",
            ("pass" | "password" | "user" | "username", false) => {
                "credentials go before the host: `redis://user:password@host`"
            }
            ("db", false) => "the database goes in the path: `redis://host:6379/3`",
            // redis-rs ignores other parameters; so do we.
            _ => continue,
        };
        return Err(bad(misplaced));
    }
    let tls = matches!(scheme, "rediss" | "valkeys");
    if url.fragment().is_some_and(|f| !tls || f != "insecure") {
        return Err(bad(
            "only rediss:// URLs take a fragment, and only `#insecure`",
        ));
    }
    if tls && cfg!(not(feature = "tls")) {
        return Err(bad(
            "TLS support is not compiled in (enable the `tls` feature)",
        ));
    }
    url.into_connection_info()
        .map_err(|e| bad(&redis_reason(&e)))
}

/// A hint for a URL the `url` crate could not parse.
fn hint(raw: &str) -> &'static str {
    if raw.contains('@') {
        " (`/`, `?`, `#` and `@` in a password must be percent-encoded)"
    } else {
        ""
    }
}

/// What redis-rs found wrong with a URL, without the detail it may append
/// (the offending value, which may be part of a password).
fn redis_reason(e: &redis::RedisError) -> String {
    // A configuration error displays as "description - Kind: detail".
    let text = e.to_string();
    let reason = match text.split_once(" - ") {
        Some((description, _)) => description,
        None => "redis-rs could not use it",
    };
    let mut chars = reason.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

/// True if an `@` (the end of a userinfo) is found after the host: an
/// unencoded `/`, `?` or `#` in the password cut the authority short.
fn split_password(url: &Url) -> bool {
    let tail = [
        url.path(),
        url.query().unwrap_or(""),
        url.fragment().unwrap_or(""),
    ];
    tail.iter()
        .any(|part| part.contains('@') || part.to_ascii_lowercase().contains("%40"))
}

/// The scheme of a URL that could not be parsed, if it looks like one.
fn scheme_of(raw: &str) -> Option<String> {
    let (scheme, _) = raw.split_once("://")?;
    let mut chars = scheme.chars();
    let looks_like_one = scheme.len() <= 16
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    looks_like_one.then(|| scheme.to_ascii_lowercase())
}

/// The URL for messages and `Debug`: the scheme, user name, host, port,
/// database and socket path, and nothing that may be (part of) a password.
///
/// Conservative: the password and every query value other than `db` and
/// `protocol` are replaced; a URL that does not parse, has an unknown scheme,
/// or has an `@` after its host (a password with an unencoded `/`, `?` or `#`
/// in it) shows only its scheme.
pub(crate) fn redact(raw: &str) -> String {
    let opaque = || match scheme_of(raw) {
        Some(scheme) => format!("{scheme}://{HIDDEN}"),
        None => HIDDEN.to_owned(),
    };
    let Ok(url) = Url::parse(raw) else {
        return opaque();
    };
    let unix = UNIX.contains(&url.scheme());
    if !unix && !TCP.contains(&url.scheme()) || split_password(&url) {
        return opaque();
    }
    let mut out = format!("{}://", url.scheme());
    match (url.username(), url.password()) {
        ("", None) => {}
        // A user name alone is odd: it may be a password written without its `:`.
        (_, None) => {
            let _ = write!(out, "{HIDDEN}@");
        }
        (user, Some(_)) => {
            let _ = write!(out, "{user}:{HIDDEN}@");
        }
    }
    out.push_str(url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        let _ = write!(out, ":{port}");
    }
    let path = url.path();
    if unix || path.trim_matches('/').bytes().all(|b| b.is_ascii_digit()) {
        out.push_str(path);
    } else {
        let _ = write!(out, "/{HIDDEN}");
    }
    if url.query().is_some() {
        let pairs: Vec<String> = url
            .query_pairs()
            .map(|(key, value)| {
                let shown = match &*key {
                    "db" => value.bytes().all(|b| b.is_ascii_digit()),
                    "protocol" => matches!(&*value, "2" | "3" | "resp2" | "resp3"),
                    _ => false,
                };
                let key = match &*key {
                    k @ ("db" | "protocol" | "user" | "pass" | "password") => k,
                    _ => HIDDEN,
                };
                if shown {
                    format!("{key}={value}")
                } else {
                    format!("{key}={HIDDEN}")
                }
            })
            .collect();
        let _ = write!(out, "?{}", pairs.join("&"));
    }
    match url.fragment() {
        None => {}
        Some("insecure") => out.push_str("#insecure"),
        Some(_) => {
            let _ = write!(out, "#{HIDDEN}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            (
                "redis://user:hunter2@host:1/0",
                "redis://user:<redacted>@host:1/0",
            ),
            ("redis://:hunter2@host", "redis://:<redacted>@host"),
            ("redis://host:1", "redis://host:1"),
            ("rediss://h:1/#insecure", "rediss://h:1/#insecure"),
            (
                "unix:///tmp/redis.sock?db=2&pass=hunter2",
                "unix:///tmp/redis.sock?db=2&pass=<redacted>",
            ),
            (
                "redis+unix:///tmp/r.sock?password=hunter2&user=u",
                "redis+unix:///tmp/r.sock?password=<redacted>&user=<redacted>",
            ),
            ("redis://hunter2@host", "redis://<redacted>@host"),
            ("redis://h/0?protocol=resp3", "redis://h/0?protocol=resp3"),
            // `/`, `?`, `#` in an unencoded password.
            ("redis://app:Zm9v/YmFy@host/0", "redis://<redacted>"),
            ("redis://app:12/hunter2@host/0", "redis://<redacted>"),
            ("redis://app:12?hunter2@host/0", "redis://<redacted>"),
            ("redis://app:12#hunter2@host/0", "redis://<redacted>"),
            (
                "unix:///s?pass=12#hunter2",
                "unix:///s?pass=<redacted>#<redacted>",
            ),
            ("redis://h/hunter2", "redis://h/<redacted>"),
            ("hunter2", "<redacted>"),
            ("http://u:hunter2@h", "http://<redacted>"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[test]
    fn malformed_urls_are_config_errors_without_the_password() {
        for url in [
            "not a url",
            "http://h:1",
            "redis://:hunter2@h:notaport",
            "redis://app:Zm9v/hunter2@host/0",
            "redis://app:12/hunter2@host/0",
            "redis://h:1?password=hunter2",
            "unix:///tmp/s?password=hunter2",
            "unix://:hunter2@localhost/tmp/s",
            "unix:///tmp/s?pass=hunter2&protocol=hunter2",
            "redis://h:1/0?protocol=hunter2",
            "redis://h:1/hunter2",
            "redis://h:1/#hunter2",
        ] {
            let e = parse(url).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{url}: {e:?}");
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn what_redis_rs_reads_still_parses() {
        for url in [
            "redis://u:p%2Fw@h:1/2",
            "redis://h",
            "valkey://h:1/0?protocol=resp3",
            "unix:///tmp/s?db=1&user=u&pass=p",
            "redis+unix:///tmp/s",
            "valkey+unix:///tmp/s?pass=p%23w",
        ] {
            parse(url).unwrap();
        }
        let info = parse("redis://u:p%2Fw%40x@h:1/2").unwrap();
        assert_eq!(info.redis_settings().password(), Some("p/w@x"));
        let info = parse("unix:///tmp/s?pass=p%26w").unwrap();
        assert_eq!(info.redis_settings().password(), Some("p&w"));
    }
}
