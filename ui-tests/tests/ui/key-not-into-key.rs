use idempotency::idempotent;

pub struct OrderId(pub u64);

#[idempotent(key = OrderId(id))]
async fn charge(id: u64) -> Result<u64, idempotency::Error> {
    Ok(id)
}

fn main() {}
