use std::sync::Arc;

use idempotency::{idempotent, MemoryStore};

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

pub struct Service {
    store: Arc<MemoryStore>,
    calls: u32,
}

impl Service {
    #[idempotent(key = id, store = self.store.clone())]
    pub async fn by_ref(&self, id: u64) -> Result<u64, AppError> {
        Ok(id + u64::from(self.calls))
    }

    #[idempotent(key = format!("m:{id}"), store = self.store.clone(), ttl = "1h", lease = "10s")]
    pub async fn by_mut(&mut self, id: u64) -> Result<u32, AppError> {
        self.calls += 1;
        Ok(self.calls)
    }

    // `skip(self)`, the `#[instrument(skip(self))]` habit: accepted (self is never fingerprinted).
    #[idempotent(key = id, store = &*self.store, on_conflict = "wait", skip(self))]
    pub async fn waits(&self, id: u64) -> Result<String, idempotency::Error> {
        Ok(id.to_string())
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut s = Service { store: Arc::new(MemoryStore::new()), calls: 0 };
    rt.block_on(async {
        assert_eq!(s.by_ref(1).await.unwrap(), 1);
        assert_eq!(s.by_mut(1).await.unwrap(), 1);
        assert_eq!(s.by_mut(1).await.unwrap(), 1);
        assert_eq!(s.waits(2).await.unwrap(), "2");
    });
}
