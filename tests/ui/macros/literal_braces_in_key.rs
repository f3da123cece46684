use distlock::distributed_lock;

// `{{` is a literal brace in the template, but distlock keys cannot hold braces
// (they delimit the Redis Cluster hash tag): refused now rather than at every call.
#[distributed_lock(key = "{{invoice}}:{invoice_id}")]
async fn settle(invoice_id: u64) -> Result<u64, distlock::Error> {
    Ok(invoice_id)
}

fn main() {
    let _ = settle(42);
}
