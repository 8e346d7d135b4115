//! Compile-time checks of `#[idempotent]`: one mistake per file in `tests/ui/`, each with the
//! exact error (`.stderr`) a user sees; forms that must compile in `tests/ui/pass/`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
    // The HTTP layer's constructor that is gone says what to write instead.
    #[cfg(feature = "http")]
    t.compile_fail("tests/ui/http/*.rs");
}
