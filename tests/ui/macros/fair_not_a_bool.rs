use distlock::distributed_lock;

#[distributed_lock(key = "account:{id}", fair = "yes")]
async fn withdraw(id: u64) -> Result<(), distlock::Error> {
    let _ = id;
    Ok(())
}

fn main() {
    let _ = withdraw(1);
}
