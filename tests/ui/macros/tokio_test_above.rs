use distlock::distributed_lock;

// `#[tokio::test]` expands first and turns the function into a plain `fn`; the
// message says to write `#[distributed_lock]` first.
#[tokio::test]
#[distributed_lock(key = "job", locker = distlock::Locker::memory())]
async fn job() -> Result<(), distlock::Error> {
    Ok(())
}

fn main() {}
