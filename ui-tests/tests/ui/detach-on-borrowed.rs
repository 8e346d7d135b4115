use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[idempotent(key = order, detach = true)]
async fn charge(order: &str) -> Result<u64, AppError> {
    Ok(order.len() as u64)
}
fn main() {}
