use distlock::distributed_lock;

#[distributed_lock(key = "job:nightly", on_busy = "skip", timeout = "5s")]
async fn nightly() -> Result<(), distlock::Error> {
    Ok(())
}

fn main() {
    let _ = nightly();
}
