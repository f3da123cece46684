//! Property tests (proptest) of everything that parses or validates input:
//! lock keys, key prefixes and owner tags, durations (expiry, renewal
//! cadence, drift), connection URLs, detached leases and `Config` through
//! serde, and keys that `#[distributed_lock]` templates format at run time.
//! (The template parser's own properties are unit tests in
//! `distlock-macros/src/template.rs`: it is private to the proc-macro crate.)
//!
//! Each property states the rule the README documents, independently of the
//! implementation, and checks the public API against it on generated input:
//! no panic, the right error variant, and round trips that give back what
//! went in. Most run on the in-memory store; those that need a server share
//! one private `redis-server`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use distlock::{
    distributed_lock, Config as LockerConfig, Error, Lease, Locker, MemoryStore, MAX_KEY_LEN,
};
use distlock_tests::RedisServer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// The documented key rule: 1 to 1024 bytes, no `{`, `}` or control character.
fn key_is_valid(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_LEN
        && !k.contains(['{', '}'])
        && !k.chars().any(char::is_control)
}

/// Keys that hit the interesting classes often: short, braces, controls,
/// multi-byte characters, around the length limit.
fn keys() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,40}",
        2 => "[a-z:{}\\x00-\\x1f\\x7f\u{85}é🔒 ]{0,20}",
        1 => (1000usize..1030).prop_map(|n| "k".repeat(n)),
        1 => (500usize..520).prop_map(|n| "é".repeat(n)),
        1 => any::<String>(),
    ]
}

/// The result of one `try_acquire` on a fresh in-memory locker.
fn try_memory(key: &str) -> Result<bool, Error> {
    RT.block_on(async {
        let locker = Locker::memory();
        match locker.lock(key).try_acquire().await? {
            Some(g) => {
                g.release().await?;
                Ok(true)
            }
            None => Ok(false),
        }
    })
}

proptest! {
    #![proptest_config(Config::with_cases(256))]

    #[test]
    fn keys_are_accepted_exactly_when_the_documented_rule_says(key in keys()) {
        match try_memory(&key) {
            Ok(acquired) => {
                prop_assert!(key_is_valid(&key), "accepted {key:?}");
                prop_assert!(acquired);
            }
            Err(Error::InvalidKey { key: shown, .. }) => {
                prop_assert!(!key_is_valid(&key), "rejected {key:?}");
                // Long keys are shortened in messages.
                prop_assert!(shown.len() <= 64 + 32, "{} bytes shown", shown.len());
            }
            Err(e) => prop_assert!(false, "{key:?}: unexpected {e:?}"),
        }
    }

    #[test]
    fn a_valid_key_round_trips_through_the_store_and_a_serialized_lease(
        key in keys().prop_filter("valid keys", |k| key_is_valid(k)),
        expiry_ms in 100u64..=86_400_000,
    ) {
        RT.block_on(async {
            let store = MemoryStore::new();
            let locker = Locker::builder().memory_store(store.clone()).build().await.unwrap();
            let expiry = Duration::from_millis(expiry_ms);
            let guard = locker.lock(key.as_str()).expiry(expiry).acquire().await.unwrap();
            prop_assert!(store.contains(&key));
            prop_assert_eq!(guard.key(), key.as_str());
            let lease = guard.detach();
            let json = serde_json::to_string(&lease).unwrap();
            let back: Lease = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &lease);
            prop_assert_eq!(back.key(), key.as_str());
            prop_assert_eq!(back.expiry(), expiry);
            prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
            locker.release_lease(&back).await.unwrap();
            prop_assert!(!store.contains(&key));
            Ok(())
        })?;
    }

    #[test]
    fn expiry_is_accepted_exactly_between_100ms_and_24h(
        expiry in prop_oneof![
            (0u64..200_000).prop_map(Duration::from_micros),
            (0u64..100_000_000).prop_map(Duration::from_millis),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ],
    ) {
        let valid = expiry >= Duration::from_millis(100) && expiry <= Duration::from_secs(86_400);
        let result = RT.block_on(async {
            let locker = Locker::memory();
            locker.lock("k").expiry(expiry).try_acquire().await.map(|g| g.is_some())
        });
        match result {
            Ok(acquired) => prop_assert!(valid && acquired, "{expiry:?} accepted"),
            Err(Error::Config { .. }) => prop_assert!(!valid, "{expiry:?} rejected"),
            Err(e) => prop_assert!(false, "{expiry:?}: unexpected {e:?}"),
        }
    }

    #[test]
    fn the_renewal_cadence_must_be_positive_and_shorter_than_expiry_less_drift(
        expiry_ms in 100u64..20_000,
        renew_ms in 0u64..25_000,
        factor in prop_oneof![
            0.0f64..0.6, 0.0f64..0.002, Just(0.0), Just(0.001), Just(f64::NAN),
            Just(f64::INFINITY), Just(-0.1),
        ],
        floor_us in prop_oneof![0u64..5_000_000, 0u64..2_000, Just(0), Just(1_000)],
    ) {
        let expiry = Duration::from_millis(expiry_ms);
        let renew = Duration::from_millis(renew_ms);
        let floor = Duration::from_micros(floor_us);
        // README: drift = expiry * factor + floor, factor in [0.001, 0.5), floor
        // at least 1ms, drift below half the expiry; renew_every below
        // expiry - drift and above zero.
        let factor_ok = (0.001..0.5).contains(&factor) && floor >= Duration::from_millis(1);
        let valid = factor_ok && {
            let drift = expiry.mul_f64(factor) + floor;
            drift < expiry / 2 && !renew.is_zero() && renew < expiry - drift
        };
        let result = RT.block_on(
            Locker::builder()
                .memory()
                .expiry(expiry)
                .renew_every(renew)
                .drift(factor, floor)
                .build(),
        );
        match result {
            Ok(_) => prop_assert!(valid, "accepted"),
            Err(Error::Config { .. }) => prop_assert!(!valid, "rejected"),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn key_prefixes_and_owner_tags_are_checked(
        prefix in "[a-z:{}\\x00-\\x1f]{0,10}|[a-z]{250,260}",
        tag in "[a-z:\\x00-\\x1f]{0,10}|[a-z]{60,70}",
    ) {
        let prefix_ok = prefix.len() <= 256
            && !prefix.contains(['{', '}'])
            && !prefix.chars().any(char::is_control);
        let tag_ok = tag.len() <= 64 && !tag.chars().any(char::is_control);
        let result = RT.block_on(
            Locker::builder()
                .memory()
                .key_prefix(prefix.as_str())
                .owner_tag(tag.as_str())
                .build(),
        );
        match result {
            Ok(l) => {
                prop_assert!(prefix_ok && tag_ok);
                prop_assert_eq!(l.key_prefix(), prefix.as_str());
            }
            Err(Error::Config { .. }) => prop_assert!(!(prefix_ok && tag_ok)),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn serialized_leases_never_panic_on_arbitrary_json(
        json in prop_oneof![
            any::<String>(),
            ("\\PC{0,12}", "[a-z]{0,12}", any::<i64>(), "[0-9a-z ]{0,12}").prop_map(|(k, kind, f, e)| {
                format!(r#"{{"key":{k:?},"kind":{kind:?},"token":"t","fencing_token":{f},"expiry":{e:?}}}"#)
            }),
        ],
    ) {
        // Either an error or a lease that serializes back to a readable lease.
        if let Ok(lease) = serde_json::from_str::<Lease>(&json) {
            let again = serde_json::to_string(&lease).unwrap();
            prop_assert_eq!(serde_json::from_str::<Lease>(&again).unwrap(), lease);
        }
    }
}

/// The key a template formats, seen from inside the body.
#[distributed_lock(key = "user:{id}:{n}", locker = locker)]
async fn key_inside(locker: &Locker, id: &str, n: u32) -> Result<String, Error> {
    let _ = (id, n);
    Ok(distlock::current()
        .map(|c| c.key().to_owned())
        .unwrap_or_default())
}

proptest! {
    #![proptest_config(Config::with_cases(128))]

    #[test]
    fn a_macro_key_is_the_formatted_template_or_an_invalid_key_error(id in keys(), n in any::<u32>()) {
        let expected = format!("user:{id}:{n}");
        let result = RT.block_on(async {
            let locker = Locker::memory();
            key_inside(&locker, &id, n).await
        });
        match result {
            Ok(key) => {
                prop_assert!(key_is_valid(&expected));
                prop_assert_eq!(key, expected);
            }
            Err(Error::InvalidKey { .. }) => prop_assert!(!key_is_valid(&expected)),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn config_durations_round_trip_and_validate_like_the_builder(
        expiry in (0u64..100_000_000).prop_map(Duration::from_millis),
        renew in prop::option::of((1u64..50_000_000).prop_map(Duration::from_micros)),
        pool_size in 0usize..2000,
    ) {
        let mut json = serde_json::json!({
            "memory": true,
            "expiry": humantime::format_duration(expiry).to_string(),
            "pool_size": pool_size,
        });
        if let Some(r) = renew {
            json["renew_every"] = humantime::format_duration(r).to_string().into();
        }
        let config: LockerConfig = serde_json::from_value(json).unwrap();
        prop_assert_eq!(config.expiry, Some(expiry));
        prop_assert_eq!(config.renew_every, renew);
        let valid_expiry = expiry >= Duration::from_millis(100) && expiry <= Duration::from_secs(86_400);
        let validity = expiry.saturating_sub(expiry.mul_f64(0.01) + Duration::from_millis(2));
        let cadence = renew.unwrap_or(expiry / 3);
        let valid = valid_expiry
            && !cadence.is_zero()
            && cadence < validity
            // The pool holds at least the `connections` kept checked out (2
            // by default).
            && (2..=1024).contains(&pool_size);
        match RT.block_on(config.into_builder().build()) {
            Ok(_) => prop_assert!(valid, "accepted"),
            Err(Error::Config { .. }) => prop_assert!(!valid, "rejected"),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn arbitrary_config_values_deserialize_or_fail_without_panicking(
        field in prop_oneof![
            Just("expiry"), Just("renew_every"), Just("max_hold"), Just("op_timeout"),
            Just("connect_timeout"), Just("key_prefix"), Just("owner_tag"), Just("pool_size"),
            Just("connections"), Just("bogus"),
        ],
        value in prop_oneof![
            "\\PC{0,16}".prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ],
    ) {
        let mut json = serde_json::json!({ "memory": true });
        json[field] = value;
        if let Ok(config) = serde_json::from_value::<LockerConfig>(json) {
            // Whatever deserialized builds a locker or fails validation.
            match RT.block_on(config.into_builder().build()) {
                Ok(_) | Err(Error::Config { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A pool on the test server: with it, `build()` only parses the URL (for the
/// pub/sub client, which connects lazily) and never connects to what it names.
fn local_pool(server: &RedisServer) -> deadpool_redis::Pool {
    deadpool_redis::Config::from_url(server.url())
        .builder()
        .unwrap()
        .max_size(2)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .unwrap()
}

#[test]
fn arbitrary_urls_parse_or_fail_with_a_config_error_without_leaking_passwords() {
    let server = RT.block_on(RedisServer::start());
    let pool = local_pool(&server);
    let urls = prop_oneof![
        any::<String>(),
        // Structured: a scheme, credentials with a recognisable password, a
        // loopback or bogus host part, a port and a path, each possibly broken.
        (
            prop_oneof![
                Just("redis"),
                Just("rediss"),
                Just("unix"),
                Just("http"),
                Just("redis+sentinel"),
                Just("")
            ],
            "[a-z]{0,6}",
            "[A-Za-z0-9]{6}",
            prop_oneof![
                Just("127.0.0.1"),
                Just("[::1]"),
                Just("localhost"),
                Just("")
            ],
            prop_oneof![
                (0u32..70_000).prop_map(|p| p.to_string()),
                "[a-z]{1,4}".prop_map(String::from)
            ],
            "(/[0-9a-z]{0,3})?",
        )
            .prop_map(|(scheme, user, pw, host, port, path)| {
                format!("{scheme}://{user}:SECRET{pw}@{host}:{port}{path}")
            }),
    ];
    let mut runner = TestRunner::new(Config::with_cases(256));
    runner
        .run(&urls, |url| {
            let result = RT.block_on(async {
                let built = Locker::builder()
                    .pool(pool.clone())
                    .url(url.as_str())
                    .build()
                    .await;
                if let Ok(l) = &built {
                    l.close().await.unwrap();
                }
                built.map(drop)
            });
            match result {
                Ok(()) => {}
                Err(Error::Config { message, .. }) => {
                    if let Some(at) = url.find("SECRET") {
                        let secret = &url[at..at + 12];
                        prop_assert!(!message.contains(secret), "{message}");
                    }
                }
                Err(e) => prop_assert!(false, "{url:?}: unexpected {e:?}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_password_and_database_in_a_url_reach_the_server() {
    let server = RT.block_on(RedisServer::start());
    let mut runner = TestRunner::new(Config::with_cases(48));
    let cases = ("\\PC{1,24}", 0i64..16, "[a-z0-9:]{1,16}");
    runner
        .run(&cases, |(password, db, key)| {
            RT.block_on(async {
                let mut admin = server.conn().await;
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("requirepass")
                    .arg(&password)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                let url = format!(
                    "redis://:{}@127.0.0.1:{}/{db}",
                    encode(&password),
                    server.port()
                );
                let by_url = Locker::connect(&url).await;
                let by_setter = Locker::builder()
                    .url(format!("redis://127.0.0.1:{}", server.port()))
                    .password(password.as_str())
                    .db(db)
                    .build()
                    .await;
                // Back to no password before asserting, so the next case (and
                // the harness) can connect.
                let _: () = redis::cmd("AUTH")
                    .arg(&password)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                for locker in [by_url, by_setter] {
                    let locker = locker.unwrap();
                    let g = locker
                        .lock(key.as_str())
                        .try_acquire()
                        .await
                        .unwrap()
                        .unwrap();
                    let exists: i64 = redis::pipe()
                        .cmd("SELECT")
                        .arg(db)
                        .ignore()
                        .cmd("EXISTS")
                        .arg(format!("distlock:{{{key}}}"))
                        .query_async::<(i64,)>(&mut admin)
                        .await
                        .unwrap()
                        .0;
                    prop_assert_eq!(exists, 1, "the lock is not in db {}", db);
                    let _: () = redis::cmd("SELECT")
                        .arg(0)
                        .query_async(&mut admin)
                        .await
                        .unwrap();
                    g.release().await.unwrap();
                    locker.close().await.unwrap();
                }
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("requirepass")
                    .arg("")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                Ok(())
            })
        })
        .unwrap();
}

/// The events, at `TRACE`, of the calling thread and of the workers of the
/// returned runtime, for as long as the guard lives. Only those: the other
/// tests of this binary log random keys of their own, which can hold a
/// marker's characters by chance (a key with `\u{1cf13}` once matched the
/// marker part `cf13` when every thread's events were captured).
fn captured_logs() -> (
    Arc<Mutex<Vec<u8>>>,
    tokio::runtime::Runtime,
    tracing::dispatcher::DefaultGuard,
) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(Arc::clone(&logs));
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || sink.clone())
            .finish(),
    );
    let workers = dispatch.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        // Each worker keeps the capture as its default for its whole life.
        .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&workers)))
        .build()
        .unwrap();
    let guard = tracing::dispatcher::set_default(&dispatch);
    (logs, rt, guard)
}

/// A password for the redaction property, and the parts of it that must
/// never be shown: six-character markers (`Ab12cD`) among runs of what
/// breaks URLs (`/`, `@`, `:`, `?`, `#`, `%`, `&`, `=`, `+`, spaces, unicode,
/// percent-escapes that decode). The middle four characters of each marker
/// are what is looked for: a `%` before a marker may eat its first
/// character when decoded.
fn passwords() -> impl Strategy<Value = (String, Vec<String>)> {
    let noise = prop::collection::vec(
        prop_oneof![
            4 => "[/@:?#%&=+ ;,\\[\\]]",
            1 => "[éß🔒]",
            1 => "\\PC",
            1 => "%[0-9A-Fa-f]{2}",
        ],
        0..4,
    )
    .prop_map(|parts| parts.concat());
    let marker = "[A-Z][a-z]{2}[0-9]{2}[A-Z]";
    (noise.clone(), marker, noise.clone(), marker, noise).prop_map(|(a, m1, b, m2, c)| {
        let parts = vec![m1[1..5].to_owned(), m2[1..5].to_owned()];
        (format!("{a}{m1}{b}{m2}{c}"), parts)
    })
}

/// How a password is written into a URL: as is, every byte but unreserved
/// ones percent-encoded, or only what ends a userinfo or a query value.
fn written(password: &str, how: u8) -> String {
    match how {
        0 => password.to_owned(),
        1 => encode(password),
        _ => password
            .chars()
            .map(|c| match c {
                '%' | '/' | '?' | '#' | '@' | '&' | '+' => encode(&c.to_string()),
                c => c.to_string(),
            })
            .collect(),
    }
}

/// Issue 11, hole 10: wherever a URL holds a password (the userinfo of a TCP
/// URL, `?pass=` or `?password=` of a socket URL, the query of a TCP URL, a
/// socket URL's userinfo), written raw, encoded or half-encoded, it never
/// shows in `Debug` of a builder or `Config`, in an error from a server that
/// cannot be reached or refuses the password, nor in the logs.
#[test]
fn a_password_anywhere_in_a_url_never_shows_in_debug_errors_or_logs() {
    let (logs, rt, _capture) = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock").display().to_string();
    let server = rt.block_on(
        RedisServer::builder()
            .password("the-right-one")
            .args(["--unixsocket", sock.as_str(), "--unixsocketperm", "700"])
            .start(),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = server.port();
    let gone = format!("{sock}.gone");
    let tcp = (
        prop_oneof![
            Just("redis"),
            Just("rediss"),
            Just("valkey"),
            Just("valkeys")
        ],
        "[a-z]{0,5}",
        prop_oneof![Just("127.0.0.1"), Just("localhost")],
        any::<bool>(),
        prop_oneof![Just(String::new()), Just("/".to_owned()), "/[0-9]{1,2}"],
        prop_oneof![
            Just(String::new()),
            Just("?protocol=resp2".to_owned()),
            "\\?[a-z]{1,6}=[a-z0-9]{0,4}",
        ],
    );
    let unix = (
        prop_oneof![Just("unix"), Just("redis+unix"), Just("valkey+unix")],
        any::<bool>(),
        prop_oneof![Just("pass"), Just("password")],
        prop::option::of("[a-z]{1,5}"),
        prop::option::of(0u8..16),
        any::<bool>(),
    );
    // URL templates: `<PW>` stands for the password as written.
    let forms = prop_oneof![
        3 => tcp.prop_map(move |(scheme, user, host, reachable, db, query)| {
            // TLS only to the closed port: a handshake with a plain server
            // would wait for the connect timeout.
            let port = if reachable && !scheme.ends_with('s') { port } else { closed };
            format!("{scheme}://{user}:<PW>@{host}:{port}{db}{query}")
        }),
        2 => unix.prop_map({
            let (sock, gone) = (sock.clone(), gone.clone());
            move |(scheme, reachable, key, user, db, pass_first)| {
                let path = if reachable { &sock } else { &gone };
                let mut params = Vec::new();
                params.extend(user.iter().map(|u| format!("user={u}")));
                params.extend(db.iter().map(|d| format!("db={d}")));
                let pass = format!("{key}=<PW>");
                if pass_first {
                    params.insert(0, pass);
                } else {
                    params.push(pass);
                }
                format!("{scheme}://{path}?{}", params.join("&"))
            }
        }),
        1 => prop_oneof![Just("pass"), Just("password")]
            .prop_map(move |key| format!("redis://127.0.0.1:{port}/0?{key}=<PW>")),
        1 => Just(format!("unix://:<PW>@localhost{sock}")),
    ];
    let cases = (passwords(), 0u8..3, forms);
    #[derive(Default)]
    struct Seen {
        config: AtomicUsize,
        auth: AtomicUsize,
        unavailable: AtomicUsize,
    }
    let seen = Seen::default();
    let mut runner = TestRunner::new(Config::with_cases(192));
    runner
        .run(&cases, |((password, parts), how, form)| {
            let url = form.replacen("<PW>", &written(&password, how), 1);
            let leaks = |text: &str| {
                text.contains(&password) || parts.iter().any(|p| text.contains(p.as_str()))
            };
            let quick = || {
                Locker::builder()
                    .connect_timeout(Duration::from_millis(500))
                    .op_timeout(Duration::from_millis(500))
            };
            let single = quick().url(url.as_str());
            let redlock = quick().redlock([url.clone(), format!("redis://127.0.0.1:{closed}")]);
            let cluster = quick().cluster([url.as_str()]);
            let sentinel = quick().sentinel([url.as_str()], "m");
            let config: LockerConfig = serde_json::from_value(serde_json::json!({
                "url": url, "servers": [url], "cluster": [url],
                "sentinel": { "urls": [url], "master": "m" },
            }))
            .unwrap();
            for shown in [
                format!("{single:?}"),
                format!("{redlock:?}"),
                format!("{cluster:?}"),
                format!("{sentinel:?}"),
                format!("{config:?}"),
            ] {
                prop_assert!(!leaks(&shown), "{url:?} shown as {shown}");
            }
            for builder in [single, redlock] {
                let err = match rt.block_on(builder.build()) {
                    Ok(locker) => {
                        rt.block_on(locker.close()).unwrap();
                        return Err(TestCaseError::fail(format!(
                            "{url:?}: built with a wrong password"
                        )));
                    }
                    Err(e) => e,
                };
                let seen = match err {
                    Error::Config { .. } => &seen.config,
                    Error::Auth { .. } => &seen.auth,
                    _ => &seen.unavailable,
                };
                seen.fetch_add(1, Ordering::Relaxed);
                prop_assert!(
                    matches!(
                        err,
                        Error::Config { .. }
                            | Error::Auth { .. }
                            | Error::Unavailable { .. }
                            | Error::Quorum { .. }
                    ),
                    "{url:?}: {err:?}"
                );
                let shown = format!("{err} {err:?}");
                prop_assert!(!leaks(&shown), "{url:?}: {shown}");
            }
            let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
            prop_assert!(!leaks(&text), "{url:?} reached the logs: {text}");
            Ok(())
        })
        .unwrap();
    // Each kind of failure was exercised: refused URLs, refused passwords,
    // unreachable servers.
    for (kind, n) in [
        ("config", &seen.config),
        ("auth", &seen.auth),
        ("unavailable", &seen.unavailable),
    ] {
        assert!(n.load(Ordering::Relaxed) > 0, "no {kind} error was seen");
    }
    // The capture worked: the locks' own events are in it.
    assert!(
        !logs.lock().unwrap().is_empty(),
        "no event of this test was captured"
    );
}
