// `#[tokio::main]` expands first and leaves a plain `fn`; the lock wraps the
// `async` block that holds the original body.
use distlock::distributed_lock;

#[tokio::main]
#[distributed_lock(key = "main", locker = distlock::Locker::memory())]
async fn main() -> Result<(), distlock::Error> {
    assert_eq!(distlock::current().map(|c| c.key().to_owned()).as_deref(), Some("main"));
    Ok(())
}
