use distlock::distributed_lock;

#[distributed_lock(key = "shard:{self.shard}")]
async fn rebalance() -> Result<(), distlock::Error> {
    Ok(())
}

fn main() {
    let _ = rebalance();
}
