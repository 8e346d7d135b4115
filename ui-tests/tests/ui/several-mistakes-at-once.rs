use idempotency::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idempotency::Error> for AppError {
    fn from(_: idempotency::Error) -> Self {
        AppError
    }
}

#[idempotent(key = id, ttl = "soon", on_conflict = "maybe", colour = "blue")]
fn charge(id: u64) -> Result<u64, AppError> {
    Ok(id)
}
fn main() {}
