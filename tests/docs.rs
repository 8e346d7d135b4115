//! The argument tables of the README and of the crate docs list exactly the attribute's
//! arguments, in the order of the attribute's own docs (`idem-macros/src/lib.rs`), which is the
//! order of the parser's table as its "expected one of" error lists it (the error
//! `ui-tests/tests/ui/unknown-argument.stderr` holds, and `ui-tests/tests/ui.rs` checks): three tables, one list.

/// The argument names in the first column of the markdown table under `header`, each line
/// stripped of `prefix` (`//! ` for crate docs).
fn arguments(text: &str, prefix: &str) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_prefix(prefix).unwrap_or(l))
        .collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("| argument | meaning | default |"))
        .expect("an argument table")
        + 2;
    let mut names: Vec<String> = Vec::new();
    for row in lines[start..].iter().take_while(|l| l.starts_with('|')) {
        let cell = row
            .trim_start_matches('|')
            .split(" | ")
            .next()
            .unwrap_or("");
        for span in cell.split('`').skip(1).step_by(2) {
            let name: String = span
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let after = span[name.len()..].trim_start();
            let new = names.last() != Some(&name);
            if !name.is_empty() && new && (after.starts_with('=') || after.starts_with('(')) {
                names.push(name);
            }
        }
    }
    names
}

/// The argument names the parser knows, in its table's order: the list of its "expected one of"
/// error.
fn parser_arguments() -> Vec<String> {
    let error = include_str!("../ui-tests/tests/ui/unknown-argument.stderr");
    let list = error
        .lines()
        .find_map(|l| l.split_once("expected one of ").map(|(_, list)| list))
        .expect("an \"expected one of\" list");
    list.split(", ")
        .map(|name| name.trim_matches('`').to_string())
        .collect()
}

#[test]
fn readme_and_crate_docs_list_every_argument() {
    let attribute = arguments(include_str!("../idem-macros/src/lib.rs"), "/// ");
    assert!(attribute.len() >= 17, "{attribute:?}");
    assert_eq!(attribute, parser_arguments(), "idem-macros/src/lib.rs");
    assert_eq!(
        arguments(include_str!("../README.md"), ""),
        attribute,
        "README.md"
    );
    assert_eq!(
        arguments(include_str!("../src/lib.rs"), "//! "),
        attribute,
        "src/lib.rs"
    );
}
