//! The public API of the workspace's published library crates, one item a line, checked in as
//! `public-api/<crate>.txt` so that every change to the public surface shows in review.
//!
//! For each published member with a library target it builds rustdoc JSON on the stable
//! toolchain (`RUSTC_BOOTSTRAP=1 cargo rustdoc -p <crate> --all-features --lib -- -Z
//! unstable-options --output-format json`, into `target/public-api` so the main build cache stays
//! valid), reads it with the `public-api` crate (every public item with its path, kind and
//! signature, and the traits each public type implements; blanket impls are left out, as they
//! come from other crates), and either writes the listings (`--write`) or compares them with the
//! checked-in ones and fails with a unified diff (`--check`, what `.ci/run` runs).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use cargo_metadata::{MetadataCommand, TargetKind};
use clap::{ArgGroup, Parser};
use serde::Deserialize;

/// The folder, under the workspace root, of the checked-in listings.
const SNAPSHOT_DIR: &str = "public-api";

/// The first line of every listing.
const HEADER: &str = "# The public API of this crate (all features), one item a line. Generated: \
                      after a change, run `cargo run -p public-api-snapshot -- --write` and commit.";

#[derive(Parser)]
#[command(about = "List the public API of the published crates, or check it against public-api/")]
#[command(group(ArgGroup::new("mode").required(true).args(["write", "check"])))]
struct Args {
    /// Write `public-api/<crate>.txt` for the current tree (and remove listings of crates that
    /// are gone).
    #[arg(long)]
    write: bool,
    /// Compare with the checked-in listings; exit 1 with a diff when they differ.
    #[arg(long)]
    check: bool,
    /// The workspace to list (default: the one this tool belongs to).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// A published library crate of the workspace.
struct Published {
    /// The package's name, also the listing's file name.
    package: String,
    /// The library target's name as rustdoc names its JSON file (`-` becomes `_`).
    lib: String,
}

/// The start of a rustdoc JSON file: only the format version is read here.
#[derive(Deserialize)]
struct FormatVersion {
    format_version: u32,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("public-api-snapshot: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Lists every published crate and writes or checks its listing; `Ok(false)` when a check found
/// differences (already printed).
fn run(args: Args) -> Result<bool> {
    let root = match args.root {
        Some(root) => root,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    let root = root
        .canonicalize()
        .with_context(|| format!("workspace root {}", root.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let metadata = MetadataCommand::new()
        .cargo_path(&cargo)
        .manifest_path(root.join("Cargo.toml"))
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let target_dir = metadata
        .target_directory
        .join("public-api")
        .into_std_path_buf();
    let crates = published(&metadata);
    let snapshots = root.join(SNAPSHOT_DIR);

    let mut same = true;
    for krate in &crates {
        let listing = listing(&cargo, &root, &target_dir, krate)?;
        let path = snapshots.join(format!("{}.txt", krate.package));
        if args.write {
            std::fs::create_dir_all(&snapshots)?;
            std::fs::write(&path, &listing).with_context(|| format!("{}", path.display()))?;
            println!("wrote {}", shown(&root, &path));
        } else {
            let checked_in = std::fs::read_to_string(&path).ok();
            if let Some(diff) = compare(&krate.package, checked_in.as_deref(), &listing) {
                print!("{diff}");
                same = false;
            }
        }
    }
    // A listing whose crate is no longer published (or no longer exists) is stale.
    for stale in stale_listings(&snapshots, &crates)? {
        if args.write {
            std::fs::remove_file(&stale)?;
            println!("removed {}", shown(&root, &stale));
        } else {
            println!(
                "{}: no published library crate has this listing",
                shown(&root, &stale)
            );
            same = false;
        }
    }
    if !same {
        println!(
            "The public API differs from public-api/*.txt: if the change is meant, run \
             `cargo run -p public-api-snapshot -- --write` and commit public-api/."
        );
    }
    Ok(same)
}

/// A path as shown to the user: relative to the workspace root.
fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The workspace members that are published (no `publish = false`) and have a library target
/// (a binary-only crate such as idem-cli has no Rust API), by name.
fn published(metadata: &cargo_metadata::Metadata) -> Vec<Published> {
    let mut crates: Vec<Published> = metadata
        .workspace_packages()
        .into_iter()
        .filter(|p| {
            p.publish
                .as_ref()
                .is_none_or(|registries| !registries.is_empty())
        })
        .filter_map(|p| {
            let lib = p.targets.iter().find(|t| {
                t.is_kind(TargetKind::Lib)
                    || t.is_kind(TargetKind::ProcMacro)
                    || t.is_kind(TargetKind::RLib)
            })?;
            Some(Published {
                package: p.name.to_string(),
                lib: lib.name.replace('-', "_"),
            })
        })
        .collect();
    crates.sort_by(|a, b| a.package.cmp(&b.package));
    crates
}

/// Builds the crate's rustdoc JSON and renders its public items, sorted, one a line.
fn listing(
    cargo: &std::ffi::OsStr,
    root: &Path,
    target_dir: &Path,
    krate: &Published,
) -> Result<String> {
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "rustdoc",
            "--quiet",
            "--lib",
            "--all-features",
            "-p",
            &krate.package,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--", "-Z", "unstable-options", "--output-format", "json"])
        // rustdoc's JSON output is unstable: the stable toolchain writes it when told it may.
        .env("RUSTC_BOOTSTRAP", "1")
        // The caller's rustdoc flags (a `--cfg docsrs`) would make the listing depend on the shell.
        .env_remove("RUSTDOCFLAGS")
        .env_remove("CARGO_ENCODED_RUSTDOCFLAGS")
        .output()
        .context("running cargo rustdoc")?;
    if !out.status.success() {
        bail!(
            "cargo rustdoc -p {} failed:\n{}",
            krate.package,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json = target_dir.join("doc").join(format!("{}.json", krate.lib));
    let text = std::fs::read_to_string(&json).with_context(|| format!("{}", json.display()))?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    deserializer.disable_recursion_limit();
    let found = FormatVersion::deserialize(&mut deserializer)
        .with_context(|| format!("{}: no format_version", json.display()))?
        .format_version;
    if found != rustdoc_types::FORMAT_VERSION {
        bail!(
            "{}: this toolchain's rustdoc writes JSON format {found}, the `public-api` crate \
             this tool uses reads format {}: move tools/public-api/Cargo.toml's `public-api` to \
             the release that reads {found} (its `rustdoc-types` dependency names the format)",
            json.display(),
            rustdoc_types::FORMAT_VERSION
        );
    }
    let api = public_api::Builder::from_rustdoc_json(&json)
        .omit_blanket_impls(true)
        .build()
        .with_context(|| format!("reading {}", json.display()))?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    deserializer.disable_recursion_limit();
    let krate = rustdoc_types::Crate::deserialize(&mut deserializer)
        .with_context(|| format!("reading {}", json.display()))?;
    let mut lines: Vec<(&public_api::PublicItem, String)> = api
        .items()
        .map(|item| match reexported(&krate, item.id()) {
            Some(origin) => (item, format!("{item} ({origin})")),
            None => (item, item.to_string()),
        })
        .collect();
    // public-api's order (an item, then its members), and the whole line where that order ties
    // (a function and a module of one name: rustdoc's index is a hash map, its order varies).
    lines.sort_by(|(a, a_line), (b, b_line)| a.grouping_cmp(b).then_with(|| a_line.cmp(b_line)));
    let mut listing = String::from(HEADER);
    listing.push('\n');
    for (_, line) in lines {
        listing.push_str(&line);
        listing.push('\n');
    }
    Ok(listing)
}

/// For a re-export (`pub use`), the kind and the crate of what it re-exports, as in
/// `struct from idem_runtime`: the facade's listing says what each of its names is and which
/// listing has its API.
fn reexported(krate: &rustdoc_types::Crate, id: rustdoc_types::Id) -> Option<String> {
    let rustdoc_types::ItemEnum::Use(import) = &krate.index.get(&id)?.inner else {
        return None;
    };
    let target = krate.paths.get(&import.id?)?;
    let kind = serde_json::to_value(target.kind).ok()?;
    // The crate, not the defining module: moving an item between private modules is no change.
    Some(format!("{} from {}", kind.as_str()?, target.path.first()?))
}

/// `None` when the checked-in listing equals the current one, else what to show: a unified diff
/// (`-` checked in, `+` now), or that the listing is missing.
fn compare(package: &str, checked_in: Option<&str>, now: &str) -> Option<String> {
    let Some(checked_in) = checked_in else {
        return Some(format!(
            "{SNAPSHOT_DIR}/{package}.txt is missing ({} items now)\n",
            now.lines().count().saturating_sub(1)
        ));
    };
    if checked_in == now {
        return None;
    }
    let diff = similar::TextDiff::from_lines(checked_in, now);
    Some(
        diff.unified_diff()
            .context_radius(2)
            .header(
                &format!("{SNAPSHOT_DIR}/{package}.txt (checked in)"),
                &format!("{package} (this tree)"),
            )
            .to_string(),
    )
}

/// The `*.txt` files of the snapshot folder that belong to no published library crate.
fn stale_listings(snapshots: &Path, crates: &[Published]) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(snapshots) else {
        return Ok(Vec::new());
    };
    let mut stale = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_listing = path.extension().is_some_and(|e| e == "txt");
        let known = path
            .file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|stem| crates.iter().any(|c| c.package == stem));
        if is_listing && !known {
            stale.push(path);
        }
    }
    stale.sort();
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_equal_listing_passes_and_a_changed_one_shows_its_lines() {
        let old = "# header\npub fn a::f()\npub struct a::S\n";
        assert_eq!(compare("a", Some(old), old), None);

        let new = "# header\npub fn a::f(u32)\npub struct a::S\n";
        let diff = compare("a", Some(old), new).expect("a difference");
        assert!(diff.contains("\n-pub fn a::f()\n"), "{diff}");
        assert!(diff.contains("\n+pub fn a::f(u32)\n"), "{diff}");
        assert!(diff.contains("public-api/a.txt (checked in)"), "{diff}");
    }

    #[test]
    fn a_missing_listing_fails() {
        let diff = compare("b", None, "# header\npub fn b::f()\n").expect("a difference");
        assert!(
            diff.contains("public-api/b.txt is missing (1 items now)"),
            "{diff}"
        );
    }

    #[test]
    fn only_published_library_crates_are_listed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let metadata = MetadataCommand::new()
            .manifest_path(root.join("Cargo.toml"))
            .no_deps()
            .exec()
            .expect("cargo metadata");
        let names: Vec<String> = published(&metadata)
            .into_iter()
            .map(|c| c.package)
            .collect();
        assert!(names.contains(&"idempotency".to_owned()), "{names:?}");
        assert!(names.contains(&"idem-macros".to_owned()), "{names:?}");
        // Not published, or no library.
        for left_out in [
            "idem-support",
            "idem-store-redb",
            "public-api-snapshot",
            "idem-cli",
        ] {
            assert!(!names.iter().any(|n| n == left_out), "{names:?}");
        }
    }
}
