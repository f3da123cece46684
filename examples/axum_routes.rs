//! Per-account serialization of an axum route across two replicas, with
//! `distlock_tower::LockLayer`.
//!
//! `POST /accounts/{id}/withdraw` reads a balance, talks to a slow ledger, and
//! writes the balance back: two withdrawals from one account at once would both
//! see the old balance and overdraw it. The layer runs them one at a time per
//! account, across both replicas, while withdrawals from different accounts run
//! in parallel. Each balance write carries the lease's fencing token
//! (`LockInfo::fencing_token`), and the bank refuses a token older than the
//! last one it saw (409), so a request whose lease was lost mid-way cannot
//! overwrite a newer balance. `POST /accounts/{id}/statement` refuses (409) a second statement
//! of an account while one is being made.
//!
//! ```sh
//! cargo run --example axum_routes              # Redis at $REDIS_URL or 127.0.0.1:6379
//! cargo run --example axum_routes -- --serve   # keep serving on ports 3000 and 3001
//! ```
//!
//! Without a reachable Redis it says so and uses the in-memory backend (both
//! replicas then share one in-process locker). By itself, it makes a few
//! requests and exits. With `--serve`, replica A listens on 127.0.0.1:3000
//! and replica B on 127.0.0.1:3001 until Ctrl-C:
//!
//! ```sh
//! curl localhost:3000/accounts/alice                     # balance: 100
//! curl -X POST localhost:3000/accounts/alice/withdraw -d 30 &
//! curl -X POST localhost:3001/accounts/alice/withdraw -d 30 &
//! curl -X POST localhost:3000/accounts/alice/withdraw -d 30 &
//! curl -X POST localhost:3001/accounts/alice/withdraw -d 30; wait
//! # three succeed, one is refused: insufficient funds (never a negative balance)
//! curl -X POST localhost:3000/accounts/bob/statement & curl -i -X POST localhost:3001/accounts/bob/statement
//! # HTTP/1.1 409 Conflict: another request on the same resource is in progress
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use distlock::fence::FencingToken;
use distlock::{Locker, OnBusy, Policy};
use distlock_tower::{key, LockInfo, LockLayer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::{sleep, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every account starts with.
const OPENING_BALANCE: u64 = 100;

/// The "database" both replicas share. Like a real store in correctness mode,
/// it keeps the highest fencing token each account was written with and
/// refuses a write with an older one (see `distlock::fence` for Redis and
/// PostgreSQL stores that do this).
#[derive(Clone, Default)]
struct Bank {
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

#[derive(Clone, Copy)]
struct Account {
    balance: u64,
    /// The highest fencing token a write to the account carried.
    fence: u64,
}

impl Bank {
    fn balance(&self, id: &str) -> u64 {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts.get(id).map_or(OPENING_BALANCE, |a| a.balance)
    }

    /// Writes the balance if `token` is not older than the account's last
    /// write's: a request whose lease was lost while it waited on the ledger
    /// (and that another replica has since overtaken) is refused here.
    fn set_balance(
        &self,
        id: &str,
        balance: u64,
        token: FencingToken,
    ) -> Result<(), distlock::Error> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let account = accounts.entry(id.to_owned()).or_insert(Account {
            balance: OPENING_BALANCE,
            fence: 0,
        });
        if token.get() < account.fence {
            return Err(distlock::Error::stale(id, token.get(), Some(account.fence)));
        }
        *account = Account {
            balance,
            fence: token.get(),
        };
        Ok(())
    }
}

/// A read-modify-write with a slow step in between: safe only if no other
/// withdrawal from the account runs meanwhile.
async fn withdraw(
    State(bank): State<Bank>,
    Path(id): Path<String>,
    lease: LockInfo,
    amount: String,
) -> (StatusCode, String) {
    let Ok(amount) = amount.trim().parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be an amount\n".into(),
        );
    };
    let balance = bank.balance(&id);
    sleep(Duration::from_millis(50)).await; // the ledger is slow
    if balance < amount {
        let msg = format!("insufficient funds: {id} has {balance}\n");
        return (StatusCode::UNPROCESSABLE_ENTITY, msg);
    }
    // The write carries the lease's fencing token: if this request's lease was
    // lost during the slow step and another replica has written since, the
    // bank refuses it instead of overwriting the newer balance.
    if let Err(e) = bank.set_balance(
        &id,
        balance - amount,
        FencingToken::from(lease.fencing_token()),
    ) {
        return (StatusCode::CONFLICT, format!("{e}\n"));
    }
    let msg = format!(
        "withdrew {amount} from {id}: balance {} (fencing token {})\n",
        balance - amount,
        lease.fencing_token()
    );
    (StatusCode::OK, msg)
}

async fn statement(Path(id): Path<String>) -> String {
    sleep(Duration::from_millis(500)).await; // rendering takes a while
    format!("statement of {id}\n")
}

async fn balance(State(bank): State<Bank>, Path(id): Path<String>) -> String {
    format!("balance: {}\n", bank.balance(&id))
}

/// One replica: its own locker, the shared bank.
fn app(locker: &Locker, bank: Bank) -> Router {
    // `/accounts/{id}/...` locks "account:{id}": segment 1 of the path.
    let per_account = || key::path_segment(1).prefix("account:");
    let withdrawals = LockLayer::new(locker.clone(), per_account())
        .policy(Policy::new().timeout(Duration::from_secs(5)))
        .http();
    let statements = LockLayer::new(locker.clone(), per_account())
        .policy(Policy::new().on_busy(OnBusy::Reject))
        .http();
    Router::new()
        .merge(
            Router::new()
                .route("/accounts/{id}/withdraw", post(withdraw))
                .route_layer(withdrawals),
        )
        .merge(
            Router::new()
                .route("/accounts/{id}/statement", post(statement))
                .route_layer(statements),
        )
        .route("/accounts/{id}", get(balance))
        .with_state(bank)
}

async fn serve(app: Router, port: u16) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
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
    let (port_a, port_b) = if keep_serving { (3000, 3001) } else { (0, 0) };
    let addr_a = serve(app(&a, bank.clone()), port_a).await?;
    let addr_b = serve(app(&b, bank.clone()), port_b).await?;
    println!("Replica A on http://{addr_a}, replica B on http://{addr_b}.\n");

    if keep_serving {
        println!("Serving until Ctrl-C; see the top of examples/axum_routes.rs for curl commands.");
        tokio::signal::ctrl_c().await?;
    } else {
        demo(addr_a, addr_b).await?;
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}

async fn demo(addr_a: SocketAddr, addr_b: SocketAddr) -> Result<(), BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    println!("1. Four withdrawals of 30 from alice (balance 100) at once, over both replicas");
    println!("   (answers in the order sent; the fencing tokens show the order handled):");
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..4 {
        let addr = if i % 2 == 0 { addr_a } else { addr_b };
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            send(&client, addr, "/accounts/alice/withdraw", "30").await
        }));
    }
    // Meanwhile, bob is not held up by alice.
    let bob = send(&client, addr_b, "/accounts/bob/withdraw", "10").await?;
    let bob_done = started.elapsed();
    for call in calls {
        let (status, body) = call.await??;
        print!("   {status}: {body}");
    }
    println!(
        "   ({:.0} ms for alice's four, one at a time; bob's ran alongside and answered after {:.0} ms: {})",
        started.elapsed().as_secs_f64() * 1e3,
        bob_done.as_secs_f64() * 1e3,
        bob.0
    );

    println!("\n2. Two statements of bob at once: the second is refused while the first runs.");
    let first = tokio::spawn({
        let client = client.clone();
        async move { send(&client, addr_a, "/accounts/bob/statement", "").await }
    });
    sleep(Duration::from_millis(100)).await; // let the first one take the lock
    let (status, body) = send(&client, addr_b, "/accounts/bob/statement", "").await?;
    print!("   second: {status}: {body}");
    let (status, body) = first.await??;
    print!("   first:  {status}: {body}");

    println!("\nDone. Run with `-- --serve` to try it with curl.");
    Ok(())
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    body: &'static str,
) -> Result<(StatusCode, String), BoxError> {
    let request = axum::http::Request::post(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let response = client.request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
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
            .key_prefix(format!("axum-routes-{}:", std::process::id()))
            .connect_timeout(Duration::from_secs(2))
            .build()
    };
    Ok((connect().await?, connect().await?))
}
