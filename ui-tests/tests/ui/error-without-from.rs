use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[derive(Debug)]
pub struct PaymentError;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, PaymentError> {
    Ok(id)
}
fn main() {}
