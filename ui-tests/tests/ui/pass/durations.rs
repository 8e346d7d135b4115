// Every duration form the `idem` command accepts is accepted by the attribute (one grammar:
// humantime's): weeks, days, spaced and compound groups, fractions, long unit names.
use std::sync::LazyLock;

use idempotency::{idempotent, MemoryStore};

static STORE: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, store = &*STORE, ttl = "1w", lease = "1.5s")]
async fn weekly(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = id, store = &*STORE, ttl = "1h 30m", wait = "2sec")]
async fn spaced(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = id, store = &*STORE, ttl = "2days", lease = "500ms")]
async fn long_names(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        assert_eq!(weekly(1).await.unwrap(), 1);
        assert_eq!(spaced(2).await.unwrap(), 2);
        assert_eq!(long_names(3).await.unwrap(), 3);
    });
}
