//! `distlock-tower` on a real axum server: two replicas (each its own `Locker`,
//! as two processes would have) on one private Redis, driven by a real HTTP
//! client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use distlock::{Locker, OnBusy, Policy};
use distlock_tests::{FaultProxy, RedisServer};
use distlock_tower::{key, LockInfo, LockLayer};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// How long each handler "works" while it holds the lock.
const WORK: Duration = Duration::from_millis(20);
const REQUESTS: usize = 50;
const KEYS: usize = 5;

/// One request's stay in a handler.
#[derive(Debug, Clone)]
struct Interval {
    key: String,
    replica: &'static str,
    start: Instant,
    end: Instant,
    fencing_token: Option<u64>,
}

impl Interval {
    fn overlaps(&self, other: &Interval) -> bool {
        self.start < other.end && other.start < self.end
    }
}

#[derive(Debug, Default)]
struct Overlaps {
    same_key: usize,
    across_keys: usize,
}

/// Counts the pairs of intervals that overlap, on the same key and across keys.
fn count_overlaps(intervals: &[Interval]) -> Overlaps {
    let mut counts = Overlaps::default();
    for (i, a) in intervals.iter().enumerate() {
        for b in &intervals[i + 1..] {
            if a.overlaps(b) {
                if a.key == b.key {
                    counts.same_key += 1;
                } else {
                    counts.across_keys += 1;
                }
            }
        }
    }
    counts
}

#[derive(Clone)]
struct Replica {
    name: &'static str,
    log: Arc<Mutex<Vec<Interval>>>,
    started: Arc<Notify>,
}

/// The protected handler: records when it ran, under which lease.
async fn withdraw(
    State(replica): State<Replica>,
    Path(id): Path<String>,
    lease: Option<LockInfo>,
) -> String {
    let start = Instant::now();
    tokio::time::sleep(WORK).await;
    let end = Instant::now();
    let fencing_token = lease.as_ref().map(LockInfo::fencing_token);
    replica.log.lock().unwrap().push(Interval {
        key: id,
        replica: replica.name,
        start,
        end,
        fencing_token,
    });
    format!("withdrawn on {}\n", replica.name)
}

/// A handler that takes a minute, so that its lease can be lost under it.
async fn slow(State(replica): State<Replica>) -> &'static str {
    replica.started.notify_one();
    tokio::time::sleep(Duration::from_secs(60)).await;
    "finished (must not happen)\n"
}

/// `/{route}/{id}/...` locks `account:{id}`.
fn locked(
    locker: &Locker,
    policy: Policy,
) -> LockLayer<key::PathSegment, distlock_tower::http::AsResponse<distlock_tower::http::ErrorFn>> {
    LockLayer::new(locker.clone(), key::path_segment(1).prefix("account:"))
        .policy(policy)
        .http()
}

/// One replica's routes: the protected one, the same handler unprotected (the
/// control), and routes with other policies for the error statuses.
fn app(locker: &Locker, replica: Replica) -> Router {
    let wait = Policy::new().timeout(Duration::from_secs(30));
    Router::new()
        .merge(
            Router::new()
                .route("/accounts/{id}/withdraw", post(withdraw))
                .route_layer(locked(locker, wait)),
        )
        .route("/unlocked/{id}/withdraw", post(withdraw))
        .merge(
            Router::new()
                .route("/reject/{id}/withdraw", post(withdraw))
                .route_layer(locked(locker, Policy::new().on_busy(OnBusy::Reject))),
        )
        .merge(
            Router::new()
                .route("/impatient/{id}/withdraw", post(withdraw))
                .route_layer(locked(
                    locker,
                    Policy::new().timeout(Duration::from_millis(100)),
                )),
        )
        .merge(
            Router::new()
                .route("/slow/{id}", post(slow))
                .route_layer(locked(
                    locker,
                    Policy::new().expiry(Duration::from_millis(600)),
                )),
        )
        .with_state(replica)
}

/// A server on a free loopback port, stopped on drop.
struct Served {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(app: Router) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Served { addr, task }
}

async fn connect(url: &str) -> Locker {
    Locker::builder()
        .url(url)
        .connect_timeout(Duration::from_secs(2))
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

fn replica(name: &'static str, log: &Arc<Mutex<Vec<Interval>>>) -> Replica {
    Replica {
        name,
        log: Arc::clone(log),
        started: Arc::new(Notify::new()),
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn post_to(client: &HttpClient, addr: SocketAddr, path: &str) -> Answer {
    let request = Request::post(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("not within {limit:?}: {what}"))
}

/// Two replicas on one Redis, and a third locker to play another process.
struct Cluster {
    _redis: RedisServer,
    replicas: [Served; 2],
    log: Arc<Mutex<Vec<Interval>>>,
    states: [Replica; 2],
    other: Locker,
}

async fn cluster() -> Cluster {
    let redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = replica("a", &log);
    let b = replica("b", &log);
    let served_a = serve(app(&connect(&redis.url()).await, a.clone())).await;
    let served_b = serve(app(&connect(&redis.url()).await, b.clone())).await;
    let other = connect(&redis.url()).await;
    Cluster {
        _redis: redis,
        replicas: [served_a, served_b],
        log,
        states: [a, b],
        other,
    }
}

/// Fires `REQUESTS` concurrent requests over `KEYS` keys at both replicas and
/// returns what the handlers recorded.
async fn fire(cluster: &Cluster, route: &str) -> Vec<Interval> {
    cluster.log.lock().unwrap().clear();
    let client = client();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let client = client.clone();
            let addr = cluster.replicas[i % 2].addr;
            let path = format!("/{route}/{}/withdraw", i % KEYS);
            tokio::spawn(async move { post_to(&client, addr, &path).await })
        })
        .collect();
    for request in requests {
        let answer = within("a request", Duration::from_secs(60), request)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let log = cluster.log.lock().unwrap().clone();
    assert_eq!(log.len(), REQUESTS);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_requests_never_overlap_across_two_replicas() {
    let cluster = cluster().await;

    // The control: without the layer, the same handlers do overlap, so the
    // count below can see an overlap when there is one.
    let unlocked = count_overlaps(&fire(&cluster, "unlocked").await);
    println!(
        "axum, without the layer: {} same-key overlaps, {} cross-key overlaps",
        unlocked.same_key, unlocked.across_keys
    );
    assert!(unlocked.same_key > 0, "the control saw no overlap");

    let intervals = fire(&cluster, "accounts").await;
    let locked = count_overlaps(&intervals);
    println!(
        "axum, with the layer: {} same-key overlaps, {} cross-key overlaps ({REQUESTS} requests, {KEYS} keys, 2 replicas)",
        locked.same_key, locked.across_keys
    );
    assert_eq!(locked.same_key, 0, "same-key requests overlapped");
    assert!(
        locked.across_keys > 0,
        "different keys did not run in parallel"
    );

    for k in 0..KEYS {
        let mut runs: Vec<&Interval> = intervals
            .iter()
            .filter(|i| i.key == k.to_string())
            .collect();
        runs.sort_by_key(|i| i.start);
        assert_eq!(runs.len(), REQUESTS / KEYS);
        assert!(
            runs.iter().any(|r| r.replica == "a") && runs.iter().any(|r| r.replica == "b"),
            "key {k} was handled by one replica only"
        );
        let tokens: Vec<u64> = runs.iter().map(|r| r.fencing_token.unwrap()).collect();
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "fencing tokens of key {k} do not increase in handling order: {tokens:?}"
        );
    }
}

#[tokio::test]
async fn a_busy_key_with_reject_answers_409() {
    let cluster = cluster().await;
    let held = cluster.other.lock("account:1").acquire().await.unwrap();

    let answer = post_to(&client(), cluster.replicas[0].addr, "/reject/1/withdraw").await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(
        answer.body,
        "another request on the same resource is in progress\n"
    );
    assert!(cluster.log.lock().unwrap().is_empty(), "the handler ran");

    held.release().await.unwrap();
    let answer = post_to(&client(), cluster.replicas[0].addr, "/reject/1/withdraw").await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn a_wait_timeout_answers_503_with_retry_after() {
    let cluster = cluster().await;
    let _held = cluster.other.lock("account:1").acquire().await.unwrap();

    let answer = post_to(&client(), cluster.replicas[1].addr, "/impatient/1/withdraw").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers[http::header::RETRY_AFTER], "1");
    assert!(
        answer.body.starts_with("timed out waiting"),
        "{}",
        answer.body
    );
    assert!(cluster.log.lock().unwrap().is_empty(), "the handler ran");
}

#[tokio::test]
async fn a_lost_lease_cancels_the_handler_and_answers_503() {
    let cluster = cluster().await;
    let addr = cluster.replicas[0].addr;
    let request = tokio::spawn(async move { post_to(&client(), addr, "/slow/1").await });
    within(
        "the handler started",
        Duration::from_secs(10),
        cluster.states[0].started.notified(),
    )
    .await;

    // Another process deletes the key: the holder learns at its next renewal
    // (every 200 ms with a 600 ms expiry).
    assert!(cluster.other.force_unlock("account:1").await.unwrap());
    let answer = within("the answer", Duration::from_secs(10), request)
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.get(http::header::RETRY_AFTER).is_none());
    assert!(
        answer.body.contains("lost exclusive access"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn redis_down_answers_503_with_retry_after() {
    let mut redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let served = serve(app(&connect(&redis.url()).await, replica("a", &log))).await;
    redis.kill();

    let answer = within(
        "the answer",
        Duration::from_secs(20),
        post_to(&client(), served.addr, "/accounts/1/withdraw"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers[http::header::RETRY_AFTER], "1");
    assert_eq!(answer.body, "the lock service is unavailable\n");
    assert!(
        log.lock().unwrap().is_empty(),
        "the handler ran without the lock"
    );
}

/// Percent-encoding must not give one resource two keys: axum decodes `%34%32`
/// to `42` for the handler, so both requests withdraw from account 42 and must
/// run one at a time (they ran together when the key was the raw segment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_and_plain_ids_of_one_account_are_serialized() {
    let cluster = cluster().await;
    let client = client();
    for round in 0..5 {
        cluster.log.lock().unwrap().clear();
        let paths: [&'static str; 2] = ["/accounts/42/withdraw", "/accounts/%34%32/withdraw"];
        let requests: Vec<_> = paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| {
                let client = client.clone();
                // Both on one replica and across the two, by round.
                let addr = cluster.replicas[(i * round) % 2].addr;
                tokio::spawn(async move { post_to(&client, addr, path).await })
            })
            .collect();
        for request in requests {
            let answer = within("a request", Duration::from_secs(20), request)
                .await
                .unwrap();
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        }
        let log = cluster.log.lock().unwrap().clone();
        assert_eq!(log.len(), 2);
        assert!(log.iter().all(|i| i.key == "42"), "{log:?}");
        assert_eq!(
            count_overlaps(&log).same_key,
            0,
            "round {round}: /accounts/42 and /accounts/%34%32 ran at the same time"
        );
    }
}

/// With `hold_until_body_sent` on real Redis (where a release takes a round
/// trip), a request that went well must release its lock once, and its lease
/// must not be reported lost afterwards. The body used to start the release
/// with a no-op waker when it ended, and drop it part-way when the body was
/// dropped: `distlock` then released a second time, found the key gone, and
/// fired the lost signal of a lease released normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_until_body_sent_releases_once_without_a_false_lost_signal() {
    let redis = RedisServer::start().await;
    // A Redis a few milliseconds away, so that a release is still in flight
    // when the body ends and when it is dropped.
    let proxy = FaultProxy::start(redis.addr()).await;
    proxy.set_latency(Duration::from_millis(20));
    let locker = connect(&proxy.url()).await;
    let other = connect(&proxy.url()).await;
    let layer = LockLayer::new(locker.clone(), key::path_segment(1).prefix("held:"))
        .policy(Policy::new().timeout(Duration::from_secs(10)))
        .http()
        .hold_until_body_sent();
    let service = layer.layer(tower::service_fn(|request: Request<()>| async move {
        let lease = request.extensions().get::<LockInfo>().cloned().unwrap();
        let chunks = [format!("token {}", lease.fencing_token()), "\n".to_owned()];
        let body = axum::body::Body::from_stream(futures_util::stream::iter(
            chunks.map(Ok::<_, std::convert::Infallible>),
        ));
        let mut response = http::Response::new(body);
        response.extensions_mut().insert(lease);
        Ok::<_, std::convert::Infallible>(response)
    }));
    for round in 0..10 {
        let request = Request::post("/held/7").body(()).unwrap();
        let response = within(
            "the response",
            Duration::from_secs(10),
            service.clone().oneshot(request),
        )
        .await
        .unwrap();
        let lease = response.extensions().get::<LockInfo>().cloned().unwrap();
        let mut body = response.into_body();
        // Read the body to its end, as a server does; keep it a little longer,
        // as a server may (until the release has reached Redis), then drop it.
        let mut text = Vec::new();
        while let Some(frame) = within("a frame", Duration::from_secs(10), body.frame()).await {
            if let Ok(data) = frame.unwrap().into_data() {
                text.extend_from_slice(&data);
            }
        }
        assert!(String::from_utf8(text).unwrap().starts_with("token "));
        within(
            "the release reaches Redis",
            Duration::from_secs(10),
            async {
                let mut direct = redis.conn().await;
                loop {
                    let held: bool = redis::cmd("EXISTS")
                        .arg("distlock:{held:7}")
                        .query_async(&mut direct)
                        .await
                        .unwrap();
                    if !held {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            },
        )
        .await;
        // The release's answer is still on its way when the body is dropped.
        proxy.blackhole();
        drop(body);
        proxy.restore();
        // A second release would be sent at the drop and answered within a round
        // trip: an acquire and a release from another locker take two.
        let guard = within(
            "the key is free",
            Duration::from_secs(10),
            other.lock("held:7").acquire(),
        )
        .await
        .unwrap();
        guard.release().await.unwrap();
        assert!(
            !lease.is_lost(),
            "round {round}: a request that went well had its lease reported lost"
        );
    }
}
