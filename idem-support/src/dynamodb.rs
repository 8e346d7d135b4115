//! DynamoDB for the tests: a local server (moto's, in CI) at `IDEM_DYNAMODB_URL`, and a fresh
//! table per test, created by the store itself.

use std::sync::Arc;

use idem_runtime::store::dynamodb::DynamoDbOptions;
use idem_runtime::{DynamoDbStore, Error, Store};

use crate::unavailable;

/// `IDEM_DYNAMODB_URL`, or the loopback default (moto's server on port 8000).
pub fn url() -> String {
    std::env::var("IDEM_DYNAMODB_URL").unwrap_or_else(|_| {
        "dynamodb://idem_test?region=us-east-1&endpoint=http://127.0.0.1:8000".to_owned()
    })
}

/// [`url`] naming the table `table` instead of its own.
pub fn url_for(table: &str) -> String {
    let url = url();
    let query = url.split_once('?').map_or("", |(_, q)| q);
    format!("dynamodb://{table}?{query}")
}

/// A new table name `idem_test_<label>_<random>`.
pub fn fresh_table(label: &str) -> String {
    format!("idem_test_{label}_{:016x}", rand::random::<u64>())
}

/// A store on a new table `idem_test_<label>_<random>`, created by connecting, or `None` after
/// [`unavailable`] when the server cannot be reached. Other errors panic.
pub async fn store(label: &str) -> Option<DynamoDbStore> {
    let table = fresh_table(label);
    match DynamoDbStore::connect_with(&url_for(&table), &DynamoDbOptions::new()).await {
        Ok(store) => Some(store),
        Err(e @ Error::Store { .. }) => {
            unavailable("DynamoDB", format!("{e} ({})", url()));
            None
        }
        Err(e) => panic!("connect to DynamoDB at {}: {e}", url()),
    }
}

/// [`store`], shared.
pub async fn fresh(label: &str) -> Option<Arc<dyn Store>> {
    Some(Arc::new(store(label).await?))
}
