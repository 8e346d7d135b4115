use idempotency::{idempotent, ReplayInfo};

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

/// A hook for `String` results, given to a function that returns `u64`.
fn mark(receipt: String, _: &ReplayInfo) -> String {
    receipt + " (replayed)"
}

#[idempotent(key = id, on_replay = mark)]
async fn charge(id: u64) -> Result<u64, AppError> {
    Ok(id)
}
fn main() {}
