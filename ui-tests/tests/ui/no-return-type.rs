use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id)]
async fn charge(id: u64) {
    let _ = id;
}
fn main() {}
