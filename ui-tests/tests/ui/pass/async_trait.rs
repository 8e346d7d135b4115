use std::sync::Arc;

use async_trait::async_trait;
use idempotency::{idempotent, MemoryStore, ReplayInfo, Store};

#[async_trait]
pub trait Payments {
    async fn charge(&self, order: u64, amount: u64) -> Result<String, idempotency::Error>;
    async fn refund(&mut self, order: u64) -> Result<u64, idempotency::Error>;
}

/// A replay hook (only inference knows the result type under `#[async_trait]`).
fn replayed(refunds: u64, _: &ReplayInfo) -> u64 {
    refunds + 100
}

pub struct Gateway {
    store: Arc<dyn Store>,
    refunds: u64,
}

#[async_trait]
impl Payments for Gateway {
    #[idempotent(key = format!("charge:{order}"), store = self.store.clone(), ttl = "24h")]
    async fn charge(&self, order: u64, amount: u64) -> Result<String, idempotency::Error> {
        Ok(format!("{order}:{amount}"))
    }

    #[idempotent(key = order, store = self.store.clone(), on_replay = replayed)]
    async fn refund(&mut self, order: u64) -> Result<u64, idempotency::Error> {
        self.refunds += 1;
        Ok(self.refunds)
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = Gateway { store: Arc::new(MemoryStore::new()), refunds: 0 };
    rt.block_on(async {
        assert_eq!(g.charge(1, 5).await.unwrap(), "1:5");
        assert_eq!(g.refund(1).await.unwrap(), 1);
        assert_eq!(g.refund(1).await.unwrap(), 101, "replayed through the hook");
        let dynamic: &mut dyn Payments = &mut g;
        assert_eq!(dynamic.refund(2).await.unwrap(), 2);
    });
}
