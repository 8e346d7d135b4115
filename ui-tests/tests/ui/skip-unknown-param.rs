use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, skip(db))]
async fn charge(id: u64, conn: &str) -> Result<u64, AppError> {
    let _ = conn;
    Ok(id)
}
fn main() {}
