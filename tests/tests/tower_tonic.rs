//! `distlock-tower` on a real tonic server: a gRPC service behind the layer,
//! two replicas (each its own `Locker`) on one private Redis, and a real tonic
//! client.
//!
//! The service is written by hand with prost derives (what tonic-build would
//! generate, without a `protoc` at build time):
//!
//! ```proto
//! service Accounts {
//!   rpc Withdraw(WithdrawRequest) returns (WithdrawReply); // locked per x-account-id
//!   rpc Slow(WithdrawRequest) returns (WithdrawReply);     // locked; takes a minute
//!   rpc Free(WithdrawRequest) returns (WithdrawReply);     // Withdraw, not locked (the control)
//! }
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use distlock::{Locker, OnBusy, Policy};
use distlock_tests::RedisServer;
use distlock_tower::{LockInfo, LockLayer};
use http::uri::PathAndQuery;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

const WORK: Duration = Duration::from_millis(20);
const REQUESTS: usize = 50;
const KEYS: usize = 5;
const WITHDRAW: &str = "/bank.Accounts/Withdraw";
const SLOW: &str = "/bank.Accounts/Slow";
const FREE: &str = "/bank.Accounts/Free";

#[derive(Clone, PartialEq, prost::Message)]
struct WithdrawRequest {
    #[prost(string, tag = "1")]
    account: String,
    #[prost(uint64, tag = "2")]
    amount: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WithdrawReply {
    #[prost(string, tag = "1")]
    replica: String,
    #[prost(uint64, tag = "2")]
    fencing_token: u64,
}

/// One call's stay in the handler.
#[derive(Debug, Clone)]
struct Interval {
    key: String,
    replica: &'static str,
    start: Instant,
    end: Instant,
    fencing_token: Option<u64>,
}

#[derive(Clone)]
struct Replica {
    name: &'static str,
    log: Arc<Mutex<Vec<Interval>>>,
    started: Arc<Notify>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The `Accounts` service, as tonic-build would generate it.
#[derive(Clone)]
struct AccountsServer {
    replica: Replica,
}

impl NamedService for AccountsServer {
    const NAME: &'static str = "bank.Accounts";
}

impl tower::Service<http::Request<Body>> for AccountsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = Method {
            replica: self.replica.clone(),
            path: match request.uri().path() {
                WITHDRAW => WITHDRAW,
                SLOW => SLOW,
                _ => FREE,
            },
        };
        match request.uri().path() {
            WITHDRAW | SLOW | FREE => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(method, request).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The handlers of `Withdraw`, `Slow` and `Free`.
struct Method {
    replica: Replica,
    path: &'static str,
}

impl UnaryService<WithdrawRequest> for Method {
    type Response = WithdrawReply;
    type Future = BoxFuture<Result<tonic::Response<WithdrawReply>, Status>>;

    fn call(&mut self, request: tonic::Request<WithdrawRequest>) -> Self::Future {
        let replica = self.replica.clone();
        let path = self.path;
        Box::pin(async move {
            let lease = request.extensions().get::<LockInfo>().cloned();
            if lease.is_none() && path != FREE {
                return Err(Status::internal("called without a lease"));
            }
            if path == SLOW {
                replica.started.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            let start = Instant::now();
            tokio::time::sleep(WORK).await;
            let end = Instant::now();
            replica.log.lock().unwrap().push(Interval {
                key: request.into_inner().account,
                replica: replica.name,
                start,
                end,
                fencing_token: lease.as_ref().map(LockInfo::fencing_token),
            });
            Ok(tonic::Response::new(WithdrawReply {
                replica: replica.name.to_owned(),
                fencing_token: lease.as_ref().map_or(0, LockInfo::fencing_token),
            }))
        })
    }
}

/// Locks `Withdraw` and `Slow` calls on their `x-account-id` metadata.
fn per_account(request: &http::Request<Body>) -> Option<String> {
    if !matches!(request.uri().path(), WITHDRAW | SLOW) {
        return None;
    }
    let account = request.headers().get("x-account-id")?.to_str().ok()?;
    Some(format!("account:{account}"))
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

async fn serve(locker: &Locker, policy: Policy, replica: Replica) -> Served {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let layer = LockLayer::new(
        locker.clone(),
        per_account as fn(&http::Request<Body>) -> Option<String>,
    )
    .policy(policy)
    .grpc();
    let router = Server::builder()
        .layer(layer)
        .add_service(AccountsServer { replica });
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
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

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls `method` for `account`, as a generated client would.
async fn call(
    channel: Channel,
    method: &'static str,
    account: &str,
) -> Result<WithdrawReply, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let mut request = tonic::Request::new(WithdrawRequest {
        account: account.to_owned(),
        amount: 10,
    });
    request
        .metadata_mut()
        .insert("x-account-id", account.parse().unwrap());
    let path = PathAndQuery::from_static(method);
    let reply = grpc.unary(request, path, ProstCodec::default()).await?;
    Ok(reply.into_inner())
}

async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("not within {limit:?}: {what}"))
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
            if a.start < b.end && b.start < a.end {
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

/// Makes `REQUESTS` concurrent calls of `method` over `KEYS` accounts, spread
/// over both replicas, and returns what the handlers recorded.
async fn fire(
    channels: &[Channel; 2],
    log: &Mutex<Vec<Interval>>,
    method: &'static str,
) -> Vec<Interval> {
    log.lock().unwrap().clear();
    let calls: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let channel = channels[i % 2].clone();
            tokio::spawn(async move { call(channel, method, &(i % KEYS).to_string()).await })
        })
        .collect();
    for c in calls {
        within("a call", Duration::from_secs(60), c)
            .await
            .unwrap()
            .unwrap();
    }
    let intervals = log.lock().unwrap().clone();
    assert_eq!(intervals.len(), REQUESTS);
    intervals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_calls_never_overlap_across_two_replicas() {
    let redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let wait = Policy::new().timeout(Duration::from_secs(30));
    let a = serve(
        &connect(&redis.url()).await,
        wait.clone(),
        replica("a", &log),
    )
    .await;
    let b = serve(&connect(&redis.url()).await, wait, replica("b", &log)).await;
    let channels = [channel(a.addr).await, channel(b.addr).await];

    // The control: without the lock, the same handler does overlap, so the count
    // below can see an overlap when there is one.
    let unlocked = count_overlaps(&fire(&channels, &log, FREE).await);
    println!(
        "tonic, without the layer: {} same-key overlaps, {} cross-key overlaps",
        unlocked.same_key, unlocked.across_keys
    );
    assert!(unlocked.same_key > 0, "the control saw no overlap");

    let intervals = fire(&channels, &log, WITHDRAW).await;
    let locked = count_overlaps(&intervals);
    println!(
        "tonic, with the layer: {} same-key overlaps, {} cross-key overlaps ({REQUESTS} calls, {KEYS} keys, 2 replicas)",
        locked.same_key, locked.across_keys
    );
    assert_eq!(locked.same_key, 0, "same-key calls overlapped");
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
async fn a_busy_key_with_reject_is_aborted() {
    let redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let reject = Policy::new().on_busy(OnBusy::Reject);
    let served = serve(&connect(&redis.url()).await, reject, replica("a", &log)).await;
    let other = connect(&redis.url()).await;
    let held = other.lock("account:1").acquire().await.unwrap();

    let status = call(channel(served.addr).await, WITHDRAW, "1")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.message(),
        "another request on the same resource is in progress"
    );
    assert!(log.lock().unwrap().is_empty(), "the handler ran");

    held.release().await.unwrap();
    call(channel(served.addr).await, WITHDRAW, "1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wait_timeout_is_unavailable() {
    let redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let impatient = Policy::new().timeout(Duration::from_millis(100));
    let served = serve(&connect(&redis.url()).await, impatient, replica("a", &log)).await;
    let other = connect(&redis.url()).await;
    let _held = other.lock("account:1").acquire().await.unwrap();

    let status = call(channel(served.addr).await, WITHDRAW, "1")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("timed out waiting"),
        "{status:?}"
    );
    // Other keys are not held up.
    call(channel(served.addr).await, WITHDRAW, "2")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lost_lease_cancels_the_call_as_aborted() {
    let redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let short = Policy::new().expiry(Duration::from_millis(600));
    let a = replica("a", &log);
    let started = Arc::clone(&a.started);
    let served = serve(&connect(&redis.url()).await, short, a).await;
    let other = connect(&redis.url()).await;

    let ch = channel(served.addr).await;
    let pending = tokio::spawn(async move { call(ch, SLOW, "1").await });
    within(
        "the handler started",
        Duration::from_secs(10),
        started.notified(),
    )
    .await;
    assert!(other.force_unlock("account:1").await.unwrap());

    let status = within("the answer", Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("lost exclusive access"),
        "{status:?}"
    );
    assert!(
        log.lock().unwrap().is_empty(),
        "the cancelled handler went on"
    );
}

#[tokio::test]
async fn redis_down_is_unavailable() {
    let mut redis = RedisServer::start().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let served = serve(
        &connect(&redis.url()).await,
        Policy::new(),
        replica("a", &log),
    )
    .await;
    redis.kill();

    let status = within(
        "the answer",
        Duration::from_secs(20),
        call(channel(served.addr).await, WITHDRAW, "1"),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the lock service is unavailable");
}
