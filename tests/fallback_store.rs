//! No silent process-local dedup: the first use of the fallback memory store (no store
//! installed, no `store = ...`) in a build with a durable store's feature logs one warning that
//! says what to do; later calls log nothing more.
#![cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]

use std::sync::{Arc, Mutex};

use idempotency::{idempotent, Error};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[idempotent(key = id)]
async fn unstored(id: u32) -> Result<u32, Error> {
    Ok(id)
}

#[tokio::test]
async fn the_fallback_memory_store_warns_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for id in 0..3 {
        unstored(id).await.expect("runs on the memory store");
    }
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no store installed"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{log}");
    assert!(
        warnings[0].contains("within this process only")
            && warnings[0].contains("idempotency::install"),
        "{}",
        warnings[0]
    );
}
