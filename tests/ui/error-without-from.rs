use idem::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idem::Error> for AppError {
    fn from(_: idem::Error) -> Self {
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
