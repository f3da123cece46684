//! An axum handler annotated with `#[distributed_lock]`: requests for the same
//! account are handled one at a time, across every replica of the service;
//! requests for other accounts run in parallel.
//!
//! ```sh
//! cargo run --example axum_handler                     # serve, send a few requests, print, exit
//! cargo run --example axum_handler -- --serve          # keep serving on 127.0.0.1:3000
//! ```
//!
//! With `--serve`, try it from another terminal: the two requests for account 7
//! take turns (about 1 s apart), the one for account 8 does not wait.
//!
//! ```sh
//! curl -X POST localhost:3000/accounts/7/debit & \
//! curl -X POST localhost:3000/accounts/7/debit & \
//! curl -X POST localhost:3000/accounts/8/debit; wait
//! ```
//!
//! Redis at `$REDIS_URL` (default `redis://127.0.0.1:6379`); without one, an
//! in-memory locker.

use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use distlock::{distributed_lock, Locker};
use tokio::net::TcpListener;
use tokio::time::{sleep, Instant};

/// The handler's error: lock errors map to HTTP statuses.
#[derive(Debug)]
struct ApiError(distlock::Error);

impl From<distlock::Error> for ApiError {
    fn from(e: distlock::Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = if self.0.is_timeout() || self.0.is_busy() {
            // Another request for this account held the lock too long.
            StatusCode::CONFLICT
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, self.0.to_string()).into_response()
    }
}

/// Debits an account. No `locker = ...`: the handler uses the default locker
/// set in `main`. Waits up to 5 s for the account's lock.
#[distributed_lock(key = "account:{id}", timeout = "5s")]
async fn debit(Path(id): Path<u64>) -> Result<String, ApiError> {
    let started = Instant::now();
    let fence = distlock::current().map_or(0, |lease| lease.fencing_token());
    // Read the balance, call the payment provider, write the balance back...
    sleep(Duration::from_secs(1)).await;
    Ok(format!(
        "debited account {id} (fencing token {fence}, held {} ms)\n",
        started.elapsed().as_millis()
    ))
}

fn app() -> Router {
    Router::new().route("/accounts/{id}/debit", post(debit))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let locker = match Locker::builder()
        .url(&url)
        // Keys of this run's own: a lock left by an interrupted earlier run
        // (it expires by itself) delays nobody. Never force_unlock at
        // start-up instead: in a service, the "leftover" may be a live
        // replica's lock (the README says when force_unlock is right).
        .key_prefix(format!("axum-handler-{}:", std::process::id()))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
    {
        Ok(locker) => {
            println!("Connected to Redis at {url}.");
            locker
        }
        Err(e) => {
            println!("No Redis answered at {url} ({e}); using an in-memory locker.");
            Locker::memory()
        }
    };
    // Once, at start-up: `#[distributed_lock]` without `locker = ...` uses it.
    distlock::set_default(locker.clone());

    if std::env::args().any(|a| a == "--serve") {
        let listener = TcpListener::bind("127.0.0.1:3000").await?;
        println!("Serving on http://127.0.0.1:3000 (Ctrl-C to stop); see the curl lines at the top of this file.");
        axum::serve(listener, app()).await?;
        return Ok(());
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app()).await });
    println!(
        "Serving on http://{addr}; sending 3 requests for account 7 and 1 for account 8 at once.\n"
    );

    let client = reqwest::Client::new();
    let started = Instant::now();
    let requests = [7, 7, 7, 8].map(|account| {
        let (client, url) = (
            client.clone(),
            format!("http://{addr}/accounts/{account}/debit"),
        );
        async move {
            let response = client.post(url).send().await?;
            let status = response.status();
            let body = response.text().await?;
            Ok::<_, reqwest::Error>((started.elapsed(), status, body))
        }
    });
    let mut responses = futures_util::future::try_join_all(requests).await?;
    responses.sort_by_key(|(at, _, _)| *at);
    for (at, status, body) in responses {
        print!("+{:>4} ms  {status}  {body}", at.as_millis());
    }
    println!("\nAccount 7's requests finished about a second apart: one at a time. Account 8's did not wait.");

    server.abort();
    locker.close().await?;
    Ok(())
}
