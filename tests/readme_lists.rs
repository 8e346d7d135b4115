//! The README is a promise: its lists are kept equal to the code. The first snippet is
//! `examples/readme.rs` (which `.ci/run` runs against Redis); the error list is `Error`'s
//! variants; the conformance-case count is the testkit's; the feature list is the facade's
//! `[features]`; the crate lists are the workspace's members, published or not.

use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");

/// The backticked words of the paragraph (up to a blank line) that starts with `start`.
fn backticked_after(start: &str) -> Vec<String> {
    let from = README
        .find(start)
        .unwrap_or_else(|| panic!("README: `{start}`"));
    let para = &README[from..];
    let para = &para[..para.find("\n\n").unwrap_or(para.len())];
    para.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_first_snippet_is_the_readme_example() {
    let example = include_str!("../examples/readme.rs");
    // The example starts with two comment lines saying what it is; the README shows the rest.
    let body: String = example.lines().skip(2).collect::<Vec<_>>().join("\n");
    let start = README.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let end = start + README[start..].find("\n```").expect("its end");
    assert_eq!(
        &README[start..end],
        body.trim_end(),
        "README's first snippet vs examples/readme.rs"
    );
}

#[test]
fn the_error_list_is_the_enum() {
    let source = include_str!("../idem-runtime/src/error.rs");
    let body = &source[source.find("pub enum Error {").expect("the enum")..];
    let body = &body[..body.find("\n}\n").expect("its end")];
    let variants: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|l| {
            l.chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect()
        })
        .collect();
    let listed: BTreeSet<String> = backticked_after("Errors are one enum")
        .into_iter()
        .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric()))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
        .collect();
    assert!(variants.len() >= 13, "{variants:?}");
    assert_eq!(
        listed, variants,
        "README's error list vs idem-runtime/src/error.rs"
    );
}

#[test]
fn the_conformance_case_count_is_the_testkits() {
    let at = README
        .find("One `#[tokio::test]` per case (")
        .expect("the sentence");
    let count: usize = README[at..]
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert_eq!(count, idem_testkit::CASES.len());
}

#[test]
fn the_feature_list_is_the_manifests() {
    let manifest = include_str!("../Cargo.toml");
    let section = &manifest[manifest.find("\n[features]\n").expect("[features]")..];
    let section = &section["\n[features]\n".len()..];
    let section = &section[..section.find("\n[").unwrap_or(section.len())];
    let features: BTreeSet<String> = section
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .map(|l| l.split(" = ").next().unwrap().trim().to_owned())
        .filter(|f| f != "default")
        .collect();
    let listed: BTreeSet<String> = backticked_after("Cargo features:")
        .into_iter()
        .filter(|w| features.contains(w) || w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .filter(|w| !["default-features = false"].contains(&w.as_str()))
        .collect();
    assert_eq!(listed, features, "README's features vs Cargo.toml");
}

#[test]
fn the_crate_lists_are_the_workspaces() {
    let manifest = include_str!("../Cargo.toml");
    let members = &manifest[manifest.find("members = [").expect("members")..];
    let members = &members[..members.find(']').unwrap()];
    let mut published = BTreeSet::from(["idempotency".to_owned()]);
    let mut unpublished = BTreeSet::new();
    for dir in members.split('"').skip(1).step_by(2) {
        let path = format!("{}/{dir}/Cargo.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect(&path);
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|n| n.trim_end_matches('"').to_owned())
            .expect("a name");
        if text.contains("publish = false") {
            // The README names an example crate, or a tool, by its folder.
            unpublished.insert(
                if dir.starts_with("examples/") || dir.starts_with("tools/") {
                    dir.to_owned()
                } else {
                    name
                },
            );
        } else {
            published.insert(name);
        }
    }
    let sentence = backticked_after("The crates:");
    let split = sentence
        .iter()
        .position(|w| w == "idem-support" || w == "examples/redb-store")
        .expect("the unpublished part");
    let named = |words: &[String]| -> BTreeSet<String> {
        words
            .iter()
            .filter(|w| {
                w.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-' || c == '/')
            })
            .filter(|w| {
                w.as_str() == "idempotency"
                    || w.starts_with("idem-")
                    || w.starts_with("examples/")
                    || w.starts_with("tools/")
            })
            .cloned()
            .collect()
    };
    assert_eq!(named(&sentence[..split]), published, "published crates");
    assert_eq!(named(&sentence[split..]), unpublished, "unpublished crates");
}

#[test]
fn the_client_feature_alone_builds_no_server_runtime() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "idempotency",
            "--no-default-features",
            "--features",
            "client",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("idem-client"), "{tree}");
    for server in [
        "idem-runtime",
        "idem-macros",
        "tokio-postgres",
        "redis ",
        "rusqlite",
    ] {
        assert!(
            !tree.contains(server),
            "`client` alone pulls in {server}:\n{tree}"
        );
    }
}
