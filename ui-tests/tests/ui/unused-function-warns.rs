// An `#[idempotent]` function nobody calls gets the `dead_code` warning a plain function gets
// (denied here, so that it shows as an error).
#![deny(dead_code)]

use idempotency::idempotent;

#[idempotent(key = id)]
async fn never_called(id: u64) -> Result<u64, idempotency::Error> {
    Ok(id)
}

fn main() {}
