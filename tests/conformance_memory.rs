//! The conformance suite (idem-testkit) against `MemoryStore`.

idem_testkit::conformance!(idem_support::memory, native_expiry = false);
