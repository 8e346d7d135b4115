//! The compile-time checks of `#[idempotent]` live in `tests/ui.rs` and `tests/ui/`.
//!
//! This library is empty on purpose: trybuild builds its cases against the crate under test
//! with that crate's enabled features, and only a crate with a library target passes them on.
//! Through it, the cases see `idempotency` with the features this crate was tested with.
