//! The conformance suite (idem-testkit) against `SqliteStore`, each test with a database file
//! of its own.
#![cfg(feature = "sqlite")]

idem_testkit::conformance!(idem_support::sqlite, native_expiry = false);
