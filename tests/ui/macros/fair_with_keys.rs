use distlock::distributed_lock;

#[distributed_lock(keys = ["account:{from}", "account:{to}"], fair = true)]
async fn transfer(from: u64, to: u64) -> Result<(), distlock::Error> {
    let _ = (from, to);
    Ok(())
}

fn main() {
    let _ = transfer(1, 2);
}
