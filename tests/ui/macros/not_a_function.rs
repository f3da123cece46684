use distlock::distributed_lock;

#[distributed_lock(key = "invoice")]
struct Invoice {
    id: u64,
}

fn main() {
    let _ = Invoice { id: 1 };
}
