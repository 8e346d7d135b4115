use idempotency::idempotent;

// A URL is not a store: open it once (`idempotency::connect`) and pass the store.
#[idempotent(key = id, store = "redis://127.0.0.1:6379")]
async fn charge(id: u64) -> Result<u64, idempotency::Error> {
    Ok(id)
}

fn main() {}
