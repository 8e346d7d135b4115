use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

pub struct Receipt {
    pub id: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, AppError> {
    Ok(Receipt { id })
}
fn main() {}
