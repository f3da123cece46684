//! Per-account serialization of a gRPC method across two replicas, with
//! `distlock_tower::LockLayer`; the server and its client in one example.
//!
//! `bank.Accounts/Withdraw` reads a balance, talks to a slow ledger, and writes
//! the balance back: two withdrawals from one account at once would overdraw
//! it. The layer locks each call on its `x-account-id` metadata, so withdrawals
//! from one account run one at a time across both replicas, and withdrawals from
//! different accounts run in parallel. A call that waits more than a second for
//! its account gets `UNAVAILABLE`.
//!
//! ```sh
//! cargo run --example tonic_service              # Redis at $REDIS_URL or 127.0.0.1:6379
//! cargo run --example tonic_service -- --serve   # keep serving on 127.0.0.1:50051
//! ```
//!
//! Without a reachable Redis it says so and uses the in-memory backend (both
//! replicas then share one in-process locker). By itself, it makes a few calls
//! with its own client and exits. With `--serve`, replica A listens on
//! 127.0.0.1:50051 and replica B on 127.0.0.1:50052 until Ctrl-C; with the
//! proto below saved as `bank.proto`:
//!
//! ```sh
//! grpcurl -plaintext -proto bank.proto -H 'x-account-id: alice' \
//!   -d '{"account": "alice", "amount": 30}' 127.0.0.1:50051 bank.Accounts/Withdraw
//! ```
//!
//! The service is written by hand below (what tonic-build generates from this
//! proto), so that the example builds without `protoc`:
//!
//! ```proto
//! syntax = "proto3";
//! package bank;
//!
//! service Accounts {
//!   rpc Withdraw(WithdrawRequest) returns (WithdrawReply); // locked per x-account-id
//! }
//! message WithdrawRequest { string account = 1; uint64 amount = 2; }
//! message WithdrawReply { uint64 balance = 1; uint64 fencing_token = 2; }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use distlock::{Locker, Policy};
use distlock_tower::{LockInfo, LockLayer};
use tokio::time::{sleep, Instant};
use tonic::body::Body;

use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const OPENING_BALANCE: u64 = 100;
const ACCOUNT_HEADER: &str = "x-account-id";

// ---- messages (tonic-build would generate these from the proto) ----

#[derive(Clone, PartialEq, prost::Message)]
struct WithdrawRequest {
    #[prost(string, tag = "1")]
    account: String,
    #[prost(uint64, tag = "2")]
    amount: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WithdrawReply {
    #[prost(uint64, tag = "1")]
    balance: u64,
    #[prost(uint64, tag = "2")]
    fencing_token: u64,
}

// ---- the service (your code) ----

/// The "database" both replicas share.
#[derive(Clone, Default)]
struct Bank {
    balances: Arc<Mutex<HashMap<String, u64>>>,
}

impl Bank {
    fn balance(&self, id: &str) -> u64 {
        let balances = self.balances.lock().unwrap_or_else(|e| e.into_inner());
        balances.get(id).copied().unwrap_or(OPENING_BALANCE)
    }

    fn set_balance(&self, id: &str, balance: u64) {
        let mut balances = self.balances.lock().unwrap_or_else(|e| e.into_inner());
        balances.insert(id.to_owned(), balance);
    }

    /// A read-modify-write with a slow step in between: safe only if no other
    /// withdrawal from the account runs meanwhile.
    async fn withdraw(
        &self,
        request: Request<WithdrawRequest>,
    ) -> Result<Response<WithdrawReply>, Status> {
        let lease = request
            .extensions()
            .get::<LockInfo>()
            .cloned()
            .ok_or_else(|| Status::invalid_argument("the x-account-id metadata is required"))?;
        let WithdrawRequest { account, amount } = request.into_inner();
        // The lock is on the metadata: make sure the message is about the same account.
        if lease.key() != format!("account:{account}") {
            return Err(Status::invalid_argument(
                "x-account-id differs from the account",
            ));
        }
        let balance = self.balance(&account);
        sleep(Duration::from_millis(50)).await; // the ledger is slow
        if balance < amount {
            return Err(Status::failed_precondition(format!(
                "insufficient funds: {account} has {balance}"
            )));
        }
        self.set_balance(&account, balance - amount);
        Ok(Response::new(WithdrawReply {
            balance: balance - amount,
            fencing_token: lease.fencing_token(),
        }))
    }
}

/// Locks `Withdraw` calls on "account:{x-account-id}"; other calls pass.
fn per_account(request: &http::Request<Body>) -> Option<String> {
    if request.uri().path() != "/bank.Accounts/Withdraw" {
        return None;
    }
    let account = request.headers().get(ACCOUNT_HEADER)?.to_str().ok()?;
    Some(format!("account:{account}"))
}

/// One replica: its own locker, the shared bank.
async fn serve(locker: &Locker, bank: Bank, port: u16) -> Result<SocketAddr, BoxError> {
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let addr = incoming.local_addr()?;
    let lock = LockLayer::new(
        locker.clone(),
        per_account as fn(&http::Request<Body>) -> Option<String>,
    )
    .policy(Policy::new().timeout(Duration::from_secs(1)))
    .grpc();
    let router = Server::builder()
        .layer(lock)
        .add_service(AccountsServer { bank });
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            eprintln!("server on {addr} stopped: {e}");
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let keep_serving = std::env::args().any(|a| a == "--serve");
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (a, b) = match replicas(&url).await {
        Ok(pair) => {
            println!("Connected to Redis at {url}: replicas A and B each have their own Locker.");
            pair
        }
        Err(e) => {
            println!("No Redis answered at {url}: {e}.");
            println!("Using the in-memory backend (one process, so both replicas share it).");
            let memory = Locker::memory();
            (memory.clone(), memory)
        }
    };
    let bank = Bank::default();
    let (port_a, port_b) = if keep_serving { (50051, 50052) } else { (0, 0) };
    let addr_a = serve(&a, bank.clone(), port_a).await?;
    let addr_b = serve(&b, bank.clone(), port_b).await?;
    println!("Replica A on {addr_a}, replica B on {addr_b}.\n");

    if keep_serving {
        println!("Serving until Ctrl-C; see the top of examples/tonic_service.rs for grpcurl.");
        tokio::signal::ctrl_c().await?;
    } else {
        demo(&a, addr_a, addr_b).await?;
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}

async fn demo(locker: &Locker, addr_a: SocketAddr, addr_b: SocketAddr) -> Result<(), BoxError> {
    let replicas = [channel(addr_a).await?, channel(addr_b).await?];

    println!("1. Four withdrawals of 30 from alice (balance 100) at once, over both replicas");
    println!("   (answers in the order sent; the fencing tokens show the order handled):");
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let channel = replicas[i % 2].clone();
            tokio::spawn(async move { withdraw(channel, "alice", 30).await })
        })
        .collect();
    let bob = withdraw(replicas[1].clone(), "bob", 10).await;
    let bob_done = started.elapsed();
    for call in calls {
        match call.await? {
            Ok(reply) => println!(
                "   OK: balance {} (fencing token {})",
                reply.balance, reply.fencing_token
            ),
            Err(status) => println!("   {:?}: {}", status.code(), status.message()),
        }
    }
    println!(
        "   ({:.0} ms for alice's four, one at a time; bob's ran alongside and answered after {:.0} ms: {})",
        started.elapsed().as_secs_f64() * 1e3,
        bob_done.as_secs_f64() * 1e3,
        if bob.is_ok() { "OK" } else { "failed" }
    );

    println!("\n2. Another process holds carol's account (say, an audit); a withdrawal waits 1 s:");
    let audit = locker.lock("account:carol").acquire().await?;
    match withdraw(replicas[0].clone(), "carol", 10).await {
        Ok(_) => println!("   OK?! (the audit should have kept it waiting)"),
        Err(status) => println!("   {:?}: {}", status.code(), status.message()),
    }
    audit.release().await?;
    match withdraw(replicas[0].clone(), "carol", 10).await {
        Ok(reply) => println!("   after the audit: OK, balance {}", reply.balance),
        Err(status) => println!(
            "   after the audit: {:?}: {}",
            status.code(),
            status.message()
        ),
    }

    println!("\nDone. Run with `-- --serve` to call it with grpcurl.");
    Ok(())
}

async fn channel(addr: SocketAddr) -> Result<Channel, BoxError> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// Two Lockers, as two replicas would have, or the connection error within ~3 s.
async fn replicas(url: &str) -> Result<(Locker, Locker), distlock::Error> {
    let connect = || {
        Locker::builder()
            .url(url)
            // Keys of this run's own: a lock left by an interrupted earlier run
            // (it expires by itself) delays nobody. Never force_unlock at
            // start-up instead: in a service, the "leftover" may be a live
            // replica's lock (the README says when force_unlock is right).
            .key_prefix(format!("tonic-service-{}:", std::process::id()))
            .connect_timeout(Duration::from_secs(2))
            .build()
    };
    Ok((connect().await?, connect().await?))
}

// ---- server and client plumbing (tonic-build would generate this) ----

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Clone)]
struct AccountsServer {
    bank: Bank,
}

impl NamedService for AccountsServer {
    const NAME: &'static str = "bank.Accounts";
}

impl tower_service::Service<http::Request<Body>> for AccountsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let bank = self.bank.clone();
        match request.uri().path() {
            "/bank.Accounts/Withdraw" => Box::pin(async move {
                let method = Withdraw(bank);
                Ok(Grpc::new(ProstCodec::default())
                    .unary(method, request)
                    .await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

struct Withdraw(Bank);

impl UnaryService<WithdrawRequest> for Withdraw {
    type Response = WithdrawReply;
    type Future = BoxFuture<Result<Response<WithdrawReply>, Status>>;

    fn call(&mut self, request: Request<WithdrawRequest>) -> Self::Future {
        let bank = self.0.clone();
        Box::pin(async move { bank.withdraw(request).await })
    }
}

/// The client call: `AccountsClient::new(channel).withdraw(request)` in
/// generated code, with the account in the metadata for the layer.
async fn withdraw(channel: Channel, account: &str, amount: u64) -> Result<WithdrawReply, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = Request::new(WithdrawRequest {
        account: account.to_owned(),
        amount,
    });
    let value = account
        .parse()
        .map_err(|_| Status::invalid_argument("the account is not valid metadata"))?;
    request.metadata_mut().insert(ACCOUNT_HEADER, value);
    let path = http::uri::PathAndQuery::from_static("/bank.Accounts/Withdraw");
    let reply = grpc.unary(request, path, ProstCodec::default()).await?;
    Ok(reply.into_inner())
}
