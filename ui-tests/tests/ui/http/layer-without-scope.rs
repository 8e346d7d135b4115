use idempotency::http::IdempotencyLayer;
use idempotency::MemoryStore;

fn main() {
    let _layer = IdempotencyLayer::new(MemoryStore::new());
}
