use distlock::distributed_lock;

#[distributed_lock(key = "invoice:{invoice_id}", on_busy = "queue")]
async fn settle(invoice_id: u64) -> Result<u64, distlock::Error> {
    Ok(invoice_id)
}

fn main() {
    let _ = settle(42);
}
