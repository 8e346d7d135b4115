//! Section 3: the Redis and PostgreSQL stores (features `redis`, `postgres`).

use super::Report;

/// Section 3 needs the `redis` and `postgres` features and the servers.
pub async fn section_stores(r: &mut Report) {
    r.section("3. Redis and PostgreSQL stores");
    r.row("(pending: measured once the durable stores land)", String::new());
}
