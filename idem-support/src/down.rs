//! A store that is down: every claim fails with [`Error::Store`] carrying a message of the
//! test's choosing (say, one that holds a secret the response must not show).

use std::time::Duration;

use async_trait::async_trait;
use idem_runtime::{Claim, Error, FencingToken, Fingerprint, StorageKey, Store, StoredRecord};

/// A store whose backend (`"down"`) refuses every claim with `message`; nothing is ever
/// claimed, so the other steps are never reached.
pub struct DownStore {
    /// The backend's error text.
    pub message: &'static str,
}

#[async_trait]
impl Store for DownStore {
    fn backend(&self) -> &'static str {
        "down"
    }
    async fn claim(
        &self,
        _: &StorageKey,
        _: Option<&Fingerprint>,
        _: Duration,
    ) -> Result<Claim, Error> {
        Err(Error::store("down", self.message))
    }
    async fn complete(
        &self,
        _: &StorageKey,
        _: FencingToken,
        _: &[u8],
        _: Duration,
    ) -> Result<(), Error> {
        unreachable!("nothing is claimed")
    }
    async fn release(&self, _: &StorageKey, _: FencingToken) -> Result<(), Error> {
        unreachable!("nothing is claimed")
    }
    async fn renew(&self, _: &StorageKey, _: FencingToken, _: Duration) -> Result<(), Error> {
        unreachable!("nothing is claimed")
    }
    async fn get(&self, _: &StorageKey) -> Result<Option<StoredRecord>, Error> {
        Ok(None)
    }
    async fn purge_expired(&self) -> Result<u64, Error> {
        Ok(0)
    }
}
