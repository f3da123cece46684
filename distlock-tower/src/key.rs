//! Which lock a request takes: the [`MakeKey`] trait and ready-made extractors.
//!
//! A key extractor looks at a request and returns the name of the lock to hold
//! while the request is handled, or `None` to let the request through without
//! locking. Requests that get the same key run one at a time, across every
//! process that shares the Redis; requests with different keys run in parallel.
//!
//! Any `Fn(&Request) -> Option<String>` is a key extractor; [`many`] makes
//! one that holds several keys at once (both accounts of a transfer). For HTTP requests
//! (feature `http`) this module also has:
//!
//! | extractor | key |
//! |---|---|
//! | [`header(name)`](header) | the value of a request header |
//! | [`path_segment(i)`](path_segment) | the `i`th segment of the URI path, percent-decoded as axum decodes it (`/accounts/42/withdraw`: 0 is `accounts`, 1 is `42`) |
//! | [`path(f)`](path) | any function of the URI path (raw: decode what you key on with [`percent_decode`]) |
//!
//! Each can put a [`prefix`](Header::prefix) in front of the key, so that two
//! routes, or two applications sharing one Redis, do not share locks by accident.
//!
//! Keys must be valid `distlock` keys: 1 to 1024 bytes, without `{`, `}` or
//! control characters. A request whose key is invalid is refused with
//! [`distlock::Error::InvalidKey`] (400 Bad Request with [`LockLayer::http`]).
//!
//! [`LockLayer::http`]: crate::LockLayer::http
//!
//! # A request without a key is not locked
//!
//! `None` means "no lock needed". With [`header`], a client that leaves the
//! header out is therefore not serialized with anyone: take the key from
//! something the client cannot leave out (the path the route matched), or reject
//! requests without the header before they reach the layer.

/// Computes the lock key of a request; `None` lets the request through unlocked.
///
/// Implemented for every `Fn(&Request) -> Option<String>`, and by the extractors of
/// this module. Annotate the closure's argument, since the layer is generic over
/// the request type:
///
/// ```
/// use distlock_tower::LockLayer;
///
/// struct Job {
///     tenant: Option<String>,
/// }
///
/// let locker = distlock::Locker::memory();
/// let layer = LockLayer::new(locker, |job: &Job| {
///     job.tenant.as_ref().map(|t| format!("tenant:{t}"))
/// });
/// # let _ = layer;
/// ```
pub trait MakeKey<Request> {
    /// The key for `request`, or `None` to skip locking.
    fn make_key(&self, request: &Request) -> Option<String>;

    /// Every key `request` must hold at once (a transfer holds both
    /// accounts), or `None` to skip locking: what the layer calls. By default
    /// the one key of [`make_key`](MakeKey::make_key); [`many`] returns
    /// several. With several, the layer takes them all or none
    /// ([`distlock::Locker::lock_many`]); an empty list is refused as a
    /// configuration error, never let through unlocked.
    fn make_keys(&self, request: &Request) -> Option<Vec<String>> {
        self.make_key(request).map(|key| vec![key])
    }
}

/// Keys each request by several keys at once, all held while it is handled:
/// `f` returns them (in any order), or `None` to let the request through
/// unlocked. See [`Many`].
///
/// ```
/// use distlock_tower::{key, LockLayer};
///
/// struct Transfer {
///     from: u64,
///     to: u64,
/// }
///
/// let locker = distlock::Locker::memory();
/// let layer = LockLayer::new(
///     locker,
///     key::many(|t: &Transfer| Some(vec![format!("account:{}", t.from), format!("account:{}", t.to)])),
/// );
/// # let _ = layer;
/// ```
pub fn many<F>(f: F) -> Many<F> {
    Many { f }
}

/// A key extractor that returns several keys; made by [`many`].
#[derive(Clone)]
pub struct Many<F> {
    f: F,
}

impl<F> std::fmt::Debug for Many<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Many").finish_non_exhaustive()
    }
}

impl<F, Request> MakeKey<Request> for Many<F>
where
    F: Fn(&Request) -> Option<Vec<String>>,
{
    /// The first of the keys in sorted order (the layer calls
    /// [`make_keys`](MakeKey::make_keys), which returns them all).
    fn make_key(&self, request: &Request) -> Option<String> {
        self.make_keys(request)?.into_iter().min()
    }

    fn make_keys(&self, request: &Request) -> Option<Vec<String>> {
        (self.f)(request)
    }
}

impl<F, Request> MakeKey<Request> for F
where
    F: Fn(&Request) -> Option<String>,
{
    fn make_key(&self, request: &Request) -> Option<String> {
        self(request)
    }
}

#[cfg(feature = "http")]
pub use self::http::{header, path, path_segment, percent_decode, Header, Path, PathSegment};

#[cfg(feature = "http")]
mod http {
    use std::borrow::Cow;
    use std::fmt;

    use ::http::header::HeaderName;
    use ::http::Request;

    use super::MakeKey;

    /// Keys requests by the value of the header `name`; see [`Header`].
    ///
    /// A request without the header is not locked. A value that is not UTF-8 is
    /// converted lossily (so two such values may share a key: they are then
    /// serialized together, never less).
    ///
    /// ```
    /// use distlock_tower::{key, LockLayer};
    /// use http::HeaderName;
    ///
    /// const ACCOUNT: HeaderName = HeaderName::from_static("x-account-id");
    ///
    /// let locker = distlock::Locker::memory();
    /// let layer = LockLayer::new(locker, key::header(ACCOUNT).prefix("account:"));
    /// # let _ = layer;
    /// ```
    pub fn header(name: HeaderName) -> Header {
        Header {
            name,
            prefix: String::new(),
        }
    }

    /// Keys requests by the `index`th segment of the URI path, counted from 0
    /// after the leading `/`; see [`PathSegment`].
    ///
    /// For `/accounts/42/withdraw`, segment 0 is `accounts` and segment 1 is `42`.
    /// A path without that segment, or with an empty one, is not locked.
    ///
    /// The key is the segment *percent-decoded*, as axum's `Path` extractor
    /// gives it to the handler: `/accounts/42` and `/accounts/%34%32` both lock
    /// `42`, so that no spelling of one resource escapes its lock. Decoding
    /// follows [`percent_decode`]: an invalid escape (`%zz`) stays as it is,
    /// and bytes that are not UTF-8 after decoding are replaced by U+FFFD (axum
    /// refuses such a segment with 400 before the handler runs; any other
    /// handler gets a key shared by more spellings, so it is serialized with
    /// more requests, never fewer). The request is locked either way.
    ///
    /// If the handler canonicalizes further (parses `042` as the number 42,
    /// ignores case), two spellings it treats as one resource still get two
    /// keys: use [`path`] with the same canonicalization instead.
    ///
    /// With axum, apply the layer with `route_layer` on the routes it is meant
    /// for, so that only requests that matched them are locked.
    ///
    /// ```
    /// use distlock_tower::{key, LockLayer};
    ///
    /// let locker = distlock::Locker::memory();
    /// // /accounts/{id}/withdraw → "account:{id}"
    /// let layer = LockLayer::new(locker, key::path_segment(1).prefix("account:"));
    /// # let _ = layer;
    /// ```
    pub fn path_segment(index: usize) -> PathSegment {
        PathSegment {
            index,
            prefix: String::new(),
        }
    }

    /// Keys requests by a function of the URI path (without the query); see
    /// [`Path`].
    ///
    /// The function sees the path as it is in the URI, still percent-encoded.
    /// Key on what the handler sees: decode the part you key on with
    /// [`percent_decode`] (as axum's `Path` extractor does), and apply the
    /// handler's own canonicalization (a parsed number, a lower-cased name), or
    /// two spellings of one resource get two locks.
    ///
    /// ```
    /// use distlock_tower::{key, LockLayer};
    ///
    /// let locker = distlock::Locker::memory();
    /// let layer = LockLayer::new(
    ///     locker,
    ///     key::path(|path: &str| {
    ///         let id = path.strip_prefix("/orders/")?.split('/').next()?;
    ///         Some(format!("order:{id}"))
    ///     }),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn path<F>(f: F) -> Path<F>
    where
        F: Fn(&str) -> Option<String>,
    {
        Path { f }
    }

    /// Percent-decodes `s` as axum's `Path` extractor does: `%XX` with two hex
    /// digits becomes that byte, anything else (including an invalid escape
    /// such as `%zz` or a lone `%`) stays as it is, and `+` is not a space.
    /// Bytes that are not UTF-8 after decoding are replaced by U+FFFD.
    ///
    /// ```
    /// use distlock_tower::key::percent_decode;
    ///
    /// assert_eq!(percent_decode("%34%32"), "42");
    /// assert_eq!(percent_decode("a%2Fb"), "a/b");
    /// assert_eq!(percent_decode("100%zz"), "100%zz");
    /// ```
    pub fn percent_decode(s: &str) -> Cow<'_, str> {
        if !s.contains('%') {
            return Cow::Borrowed(s);
        }
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(b'%'), Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)),
                _ => None,
            };
            match escaped {
                Some((hi, lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        match String::from_utf8(out) {
            Ok(decoded) => Cow::Owned(decoded),
            Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }

    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }

    /// The key extractor made by [`header`].
    #[derive(Debug, Clone)]
    #[must_use]
    pub struct Header {
        name: HeaderName,
        prefix: String,
    }

    impl Header {
        /// Puts `prefix` in front of every key (`"account:"` makes `account:42`).
        pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
            self.prefix = prefix.into();
            self
        }
    }

    impl<B> MakeKey<Request<B>> for Header {
        fn make_key(&self, request: &Request<B>) -> Option<String> {
            // Header values are not decoded by anyone: the handler sees these
            // same bytes.
            let value = request.headers().get(&self.name)?;
            let value = String::from_utf8_lossy(value.as_bytes());
            Some(format!("{}{value}", self.prefix))
        }
    }

    /// The key extractor made by [`path_segment`].
    #[derive(Debug, Clone)]
    #[must_use]
    pub struct PathSegment {
        index: usize,
        prefix: String,
    }

    impl PathSegment {
        /// Puts `prefix` in front of every key (`"account:"` makes `account:42`).
        pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
            self.prefix = prefix.into();
            self
        }
    }

    impl<B> MakeKey<Request<B>> for PathSegment {
        fn make_key(&self, request: &Request<B>) -> Option<String> {
            let path = request.uri().path();
            let segment = path
                .strip_prefix('/')
                .unwrap_or(path)
                .split('/')
                .nth(self.index)
                .filter(|s| !s.is_empty())?;
            Some(format!("{}{}", self.prefix, percent_decode(segment)))
        }
    }

    /// The key extractor made by [`path`].
    #[derive(Clone)]
    #[must_use]
    pub struct Path<F> {
        f: F,
    }

    impl<F> fmt::Debug for Path<F> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Path")
                .field("f", &std::any::type_name::<F>())
                .finish()
        }
    }

    impl<F, B> MakeKey<Request<B>> for Path<F>
    where
        F: Fn(&str) -> Option<String>,
    {
        fn make_key(&self, request: &Request<B>) -> Option<String> {
            (self.f)(request.uri().path())
        }
    }
}

#[cfg(test)]
#[cfg(feature = "http")]
mod tests {
    use ::http::{HeaderName, HeaderValue, Request};

    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn closures_are_key_extractors() {
        let by_len = |s: &String| (!s.is_empty()).then(|| format!("len:{}", s.len()));
        assert_eq!(by_len.make_key(&"abc".to_owned()).as_deref(), Some("len:3"));
        assert_eq!(by_len.make_key(&String::new()), None);
    }

    #[test]
    fn header_keys_by_value_with_prefix() {
        let key = header(HeaderName::from_static("x-account-id")).prefix("account:");
        let mut req = get("/");
        assert_eq!(key.make_key(&req), None, "no header: no lock");
        req.headers_mut()
            .insert("x-account-id", HeaderValue::from_static("42"));
        assert_eq!(key.make_key(&req).as_deref(), Some("account:42"));
    }

    #[test]
    fn header_with_opaque_bytes_still_locks() {
        let key = header(HeaderName::from_static("x-id"));
        let mut req = get("/");
        req.headers_mut()
            .insert("x-id", HeaderValue::from_bytes(b"a\xffb").unwrap());
        assert_eq!(key.make_key(&req).as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn path_segment_counts_from_zero_after_the_slash() {
        let key = path_segment(1).prefix("account:");
        assert_eq!(
            key.make_key(&get("/accounts/42/withdraw?amount=3"))
                .as_deref(),
            Some("account:42")
        );
        assert_eq!(key.make_key(&get("/accounts")), None);
        assert_eq!(key.make_key(&get("/accounts//withdraw")), None);
        assert_eq!(
            path_segment(0).make_key(&get("/accounts")).as_deref(),
            Some("accounts")
        );
    }

    #[test]
    fn path_segment_keys_on_the_decoded_segment_as_axum_sees_it() {
        let key = path_segment(1).prefix("account:");
        let plain = key.make_key(&get("/accounts/42/withdraw"));
        assert_eq!(plain.as_deref(), Some("account:42"));
        assert_eq!(key.make_key(&get("/accounts/%34%32/withdraw")), plain);
        assert_eq!(key.make_key(&get("/accounts/4%32/withdraw")), plain);
        assert_eq!(
            key.make_key(&get("/accounts/a%2Fb/x")).as_deref(),
            Some("account:a/b")
        );
        // Invalid escapes stay; non-UTF-8 is still locked, on a shared key.
        assert_eq!(
            key.make_key(&get("/accounts/%zz/x")).as_deref(),
            Some("account:%zz")
        );
        assert_eq!(
            key.make_key(&get("/accounts/%ff/x")).as_deref(),
            Some("account:\u{fffd}")
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41%"), "A%");
        assert_eq!(percent_decode("a+b"), "a+b");
    }

    #[test]
    fn path_function_sees_the_path_without_query() {
        let key = path(|p: &str| Some(p.to_owned()));
        assert_eq!(key.make_key(&get("/a/b?c=d")).as_deref(), Some("/a/b"));
    }
}
