use distlock::distributed_lock;

struct InvoiceId(u64);

#[distributed_lock(key = "invoice:{id}")]
async fn settle(id: InvoiceId) -> Result<u64, distlock::Error> {
    Ok(id.0)
}

fn main() {
    let _ = settle(InvoiceId(42));
}
