//! Compile-time checks of `#[idempotent]`: one mistake per file in `tests/ui/`, each with the
//! exact error (`.stderr`) a user sees; forms that must compile in `tests/ui/pass/`.
//!
//! The `.stderr` files are recorded with every feature on (the README's test command, CI's).
//! A few messages list the types that implement a trait, or print a path, and so change with
//! the features (`FEATURE_DEPENDENT`): they are checked only with every feature on, so that a
//! contributor's plain `cargo test` stays green and still checks the rest.

/// The cases whose message depends on the enabled features.
const FEATURE_DEPENDENT: &[&str] = &[
    "tests/ui/key-not-into-key.rs",
    "tests/ui/on-replay-wrong-type.rs",
    "tests/ui/store-not-a-store.rs",
];

/// Whether this build has the features the `.stderr` files were recorded with.
const ALL_FEATURES: bool = cfg!(all(
    feature = "sqlite",
    feature = "redis",
    feature = "postgres",
    feature = "dynamodb",
    feature = "http",
    feature = "axum",
    feature = "uuid",
    feature = "metrics",
    feature = "client"
));

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    let mut cases: Vec<_> = std::fs::read_dir("tests/ui")
        .expect("tests/ui")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "{cases:?}");
    for case in &cases {
        let dependent = FEATURE_DEPENDENT.iter().any(|d| case.ends_with(d));
        if ALL_FEATURES || !dependent {
            t.compile_fail(case);
        }
    }
    if !ALL_FEATURES {
        eprintln!(
            "SKIPPED: {} UI cases whose messages depend on the features (run with --all-features): {FEATURE_DEPENDENT:?}",
            FEATURE_DEPENDENT.len()
        );
    }
    t.pass("tests/ui/pass/*.rs");
    // The HTTP layer's constructor that is gone says what to write instead.
    #[cfg(feature = "http")]
    t.compile_fail("tests/ui/http/*.rs");
}
