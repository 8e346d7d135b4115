use idempotency::{idempotent, MemoryStore, Store};
use serde::{de::DeserializeOwned, Serialize};

#[idempotent(key = key, store = store, skip(store))]
async fn echo<S, T>(store: &S, key: &str, value: T) -> Result<T, idempotency::Error>
where
    S: Store + Clone + 'static,
    T: Serialize + DeserializeOwned + Send,
{
    Ok(value)
}

/// `anyhow`-style aliases with one parameter work too: any `Result<T, E>` with `E: From<idempotency::Error>`.
type Result2<T> = std::result::Result<T, idempotency::Error>;

#[idempotent(store = store, skip(store))]
async fn aliased(store: &(impl Store + Clone + 'static), n: u32) -> Result2<Vec<u32>> {
    Ok(vec![n; 3])
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = MemoryStore::new();
    rt.block_on(async {
        assert_eq!(echo(&store, "a", 5u8).await.unwrap(), 5);
        assert_eq!(echo(&store, "b", "x".to_string()).await.unwrap(), "x");
        assert_eq!(aliased(&store, 2).await.unwrap(), vec![2, 2, 2]);
    });
}
