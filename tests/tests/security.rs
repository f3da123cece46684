//! ACL users restricted to the lock prefix, TLS with a certificate made for the
//! test, and passwords kept out of `Debug`, errors and logs. On private
//! `redis-server` processes started by the harness (with ACLs, with TLS).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use distlock::{Error, Locker, Policy};
use distlock_tests::{report, RedisServer};

/// The ACL line the README documents: the lock prefix's keys and channels, and
/// only the commands distlock sends (scripts run with the user's permissions).
const ACL: &str = "on >lock-secret resetkeys ~distlock:* resetchannels &distlock:* -@all \
    +ping +info +evalsha +eval +script|load +subscribe +unsubscribe \
    +publish +set +get +incr +del +exists +pexpire +pttl +type +time +zadd +zrem +zscore \
    +zrange +zcard +zremrangebyscore";

async fn acl_server() -> RedisServer {
    let mut args = vec!["--user".to_owned(), "locks".to_owned()];
    args.extend(ACL.split_whitespace().map(str::to_owned));
    // The default user may not do anything, so only the ACL user can work.
    args.extend(["--user", "default", "off"].map(str::to_owned));
    RedisServer::builder().args(args).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_the_prefix_can_use_every_primitive() {
    let server = acl_server().await;
    let url = format!("redis://locks:lock-secret@127.0.0.1:{}", server.port());
    let a = Locker::connect(&url).await.unwrap();
    let b = Locker::builder()
        .url(&url)
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let g = a.lock("k").acquire().await.unwrap();
    // A waiter is woken by the release message: SUBSCRIBE and PUBLISH work.
    let waiter =
        tokio::spawn(async move { b.lock("k").acquire_timeout(Duration::from_secs(2)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    g.release().await.unwrap();
    let _acquired = waiter.await.unwrap().unwrap();
    let sem = a.semaphore("s", 2);
    let p = sem.acquire().await.unwrap();
    assert_eq!(sem.current_count().await.unwrap(), 1);
    drop(p);
    let rw = a.rw_lock("rw");
    drop(rw.read().await.unwrap());
    rw.writer().run(&Policy::new(), async {}).await.unwrap();
    assert!(a.force_unlock("k").await.is_ok());
}

#[tokio::test]
async fn an_acl_user_outside_its_prefix_is_refused_with_an_auth_error() {
    let server = acl_server().await;
    let url = format!("redis://locks:lock-secret@127.0.0.1:{}", server.port());
    let other = Locker::builder()
        .url(&url)
        .key_prefix("billing:")
        .build()
        .await
        .unwrap();
    let err = other.lock("k").try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");

    let wrong_user = format!("redis://nobody:lock-secret@127.0.0.1:{}", server.port());
    let err = Locker::connect(&wrong_user).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(!report(&err).contains("lock-secret"), "{err}");
}

/// A throwaway CA and a server certificate for 127.0.0.1 it signed.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=distlock test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::File::create(dir.join("san.ext"))
        .unwrap()
        .write_all(b"subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_work_over_tls_with_a_private_ca_and_fail_without_trusting_it() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let server = RedisServer::builder()
        .args([
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            path("server.crt"),
            "--tls-key-file".to_owned(),
            path("server.key"),
            "--tls-ca-cert-file".to_owned(),
            path("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ])
        .start()
        .await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let a = Locker::builder()
        .url(&url)
        .tls_root_cert(ca.clone())
        .build()
        .await
        .unwrap();
    let b = Locker::builder()
        .url(&url)
        .tls_root_cert(ca)
        .build()
        .await
        .unwrap();
    let g = a.lock("tls").acquire().await.unwrap();
    assert!(b.lock("tls").try_acquire().await.unwrap().is_none());
    let waiter =
        tokio::spawn(async move { b.lock("tls").acquire_timeout(Duration::from_secs(3)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    g.release().await.unwrap();
    let _acquired = waiter.await.unwrap().unwrap();
    assert!(
        server.exists("distlock:{tls}:fence").await,
        "the plain port sees what TLS wrote"
    );

    // Without trusting the private CA, the certificate is refused.
    let err = Locker::builder()
        .url(&url)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap_err();
    assert!(
        err.is_unavailable() || matches!(err, Error::Config { .. }),
        "{err}"
    );
}

/// A `tracing` writer that keeps everything written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Every event of this test binary, at `TRACE`, from every thread. (A
    /// per-thread subscriber misses events: tracing caches each call site's
    /// interest across threads, and other tests run without one.)
    fn start() -> &'static Captured {
        static LOGS: LazyLock<Captured> = LazyLock::new(|| {
            let logs = Captured::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        });
        &LOGS
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_debug_errors_or_logs() {
    let logs = Captured::start();

    let server = RedisServer::builder()
        .password("hunter2-secret")
        .start()
        .await;
    let good = format!("redis://:hunter2-secret@127.0.0.1:{}", server.port());
    let builder = Locker::builder().url(&good).password("hunter2-secret");
    assert!(!format!("{builder:?}").contains("hunter2"));
    let locker = builder.build().await.unwrap();
    assert!(!format!("{locker:?}").contains("hunter2"));
    let g = locker.lock("k").acquire().await.unwrap();
    g.release().await.unwrap();

    let bad = format!("redis://:hunter2-wrong@127.0.0.1:{}", server.port());
    let err = Locker::connect(&bad).await.unwrap_err();
    assert!(
        !format!("{} {err:?}", report(&err)).contains("hunter2"),
        "{err:?}"
    );
    let err = Locker::connect("redis://:hunter2-secret@127.0.0.1:notaport")
        .await
        .unwrap_err();
    assert!(
        !format!("{} {err:?}", report(&err)).contains("hunter2"),
        "{err:?}"
    );

    let text = logs.text();
    assert!(
        text.contains("lock acquired"),
        "no logs were captured: {text}"
    );
    assert!(
        !text.contains("hunter2"),
        "a password reached the logs: {text}"
    );
}

/// Percent-encodes every byte but unreserved characters (RFC 3986).
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

/// Issue 11, hole 10: a password with a `/` in it (unencoded, the authority
/// ends early and the old redaction missed its `@`), and a password in the
/// query of a unix socket URL (`?pass=`, where redis-rs reads it, or
/// `?password=`), were shown as is by `Debug` and in error messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_a_slash_or_in_a_socket_url_query_never_leaks() {
    let logs = Captured::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock").display().to_string();
    let server = RedisServer::builder()
        .password("right-pw")
        .args(["--unixsocket", sock.as_str(), "--unixsocketperm", "700"])
        .start()
        .await;
    let port = server.port();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // (URL, the secret's distinctive parts)
    let cases = [
        (
            format!("redis://app:Zm9v/YmFy@127.0.0.1:{port}/0"),
            ["Zm9v", "YmFy"],
        ),
        (
            format!("redis://app:Zm9v/YmFy@127.0.0.1:{closed}/0"),
            ["Zm9v", "YmFy"],
        ),
        (
            format!("redis://:12/YmFy@127.0.0.1:{port}"),
            ["12/", "YmFy"],
        ),
        (
            format!("redis://app:{}@127.0.0.1:{port}/0", encode("Zm9v/YmFy")),
            ["Zm9v", "YmFy"],
        ),
        (format!("unix://{sock}?pass=c2Vj/cmV0"), ["c2Vj", "cmV0"]),
        (
            format!("redis+unix://{sock}?db=0&pass=c2Vj%2FcmV0"),
            ["c2Vj", "cmV0"],
        ),
        (
            format!("valkey+unix://{sock}?pass=c2Vj#cmV0"),
            ["c2Vj", "cmV0"],
        ),
        (
            format!("unix://{sock}?password=c2VjcmV0"),
            ["c2VjcmV0", "c2VjcmV0"],
        ),
        (
            format!("unix://{sock}.gone?pass=c2VjcmV0"),
            ["c2VjcmV0", "c2VjcmV0"],
        ),
        (
            format!("redis://127.0.0.1:{port}?password=c2VjcmV0"),
            ["c2VjcmV0", "c2VjcmV0"],
        ),
    ];
    let leaks = |text: &str, secrets: &[&str]| secrets.iter().any(|s| text.contains(s));
    for (url, secrets) in &cases {
        let quick = || {
            Locker::builder()
                .connect_timeout(Duration::from_secs(1))
                .op_timeout(Duration::from_secs(1))
        };
        let single = quick().url(url);
        let redlock = quick().redlock([url.clone(), format!("redis://127.0.0.1:{closed}")]);
        let cluster = quick().cluster([url.clone()]);
        let sentinel = quick().sentinel([url.clone()], "m");
        let config: distlock::Config =
            serde_json::from_value(serde_json::json!({ "url": url, "servers": [url] })).unwrap();
        for shown in [
            format!("{single:?}"),
            format!("{redlock:?}"),
            format!("{cluster:?}"),
            format!("{sentinel:?}"),
            format!("{config:?}"),
        ] {
            assert!(!leaks(&shown, secrets), "{url}: {shown}");
        }
        for built in [single.build().await, redlock.build().await] {
            let err = built.expect_err(url);
            assert!(
                matches!(
                    err,
                    Error::Config { .. }
                        | Error::Auth { .. }
                        | Error::Unavailable { .. }
                        | Error::Quorum { .. }
                ),
                "{url}: {err:?}"
            );
            let shown = format!("{err} {err:?}");
            assert!(!leaks(&shown, secrets), "{url}: {shown}");
        }
    }
    // The right password in `?pass=` reaches the server through the socket.
    let locker = Locker::connect(&format!("unix://{sock}?pass=right-pw"))
        .await
        .unwrap();
    assert!(!format!("{locker:?}").contains("right-pw"), "{locker:?}");
    locker
        .lock("k")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    locker.close().await.unwrap();

    let text = logs.text();
    assert!(
        text.contains("lock acquired"),
        "no logs were captured: {text}"
    );
    for (url, secrets) in &cases {
        assert!(!leaks(&text, secrets), "{url} reached the logs: {text}");
    }
    assert!(
        !text.contains("right-pw"),
        "a password reached the logs: {text}"
    );
}
