use distlock::distributed_lock;

#[derive(Debug)]
struct AppError;

#[distributed_lock(key = "invoice:{invoice_id}")]
async fn settle(invoice_id: u64) -> Result<u64, AppError> {
    Ok(invoice_id)
}

fn main() {
    let _ = settle(42);
}
