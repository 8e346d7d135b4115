use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

pub struct Db;

#[idempotent(key = id)]
async fn charge(db: &Db, id: u64) -> Result<u64, AppError> {
    let _ = db;
    Ok(id)
}
fn main() {}
