//! Two replicas contend for one lock (being written).
fn main() {}
