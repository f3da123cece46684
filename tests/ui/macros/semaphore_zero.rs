use distlock::distributed_lock;

#[distributed_lock(key = "encoder", semaphore = 0)]
async fn encode(frame: u64) -> Result<u64, distlock::Error> {
    Ok(frame)
}

fn main() {
    let _ = encode(1);
}
