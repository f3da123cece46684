use distlock::distributed_lock;

#[derive(Debug)]
struct Receipt;

#[distributed_lock(key = "invoice:{invoice_id}", on_busy = "skip")]
async fn settle(invoice_id: u64) -> Result<Receipt, distlock::Error> {
    let _ = invoice_id;
    Ok(Receipt)
}

fn main() {
    let _ = settle(42);
}
