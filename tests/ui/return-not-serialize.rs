use idem::idempotent;

#[derive(Debug)]
pub struct AppError;
impl From<idem::Error> for AppError {
    fn from(_: idem::Error) -> Self {
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
