use distlock::distributed_lock;

#[distributed_lock(timeout = "5s")]
async fn settle(invoice_id: u64) -> Result<u64, distlock::Error> {
    Ok(invoice_id)
}

fn main() {
    // The function is still emitted: no "cannot find function" error below.
    let _ = settle(42);
}
