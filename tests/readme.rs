//! The README's "Write your own context" is the compiled workspace member
//! `examples/own-context`: the README shows its `[dependencies]` and its
//! source verbatim, and that crate depends on nothing but herald and serde.

const README: &str = include_str!("../README.md");
const MANIFEST: &str = include_str!("../examples/own-context/Cargo.toml");
const SOURCE: &str = include_str!("../examples/own-context/src/main.rs");

/// The `[dependencies]` table of the manifest, header included, without the trailing blank lines.
fn dependencies_table(manifest: &str) -> &str {
    let start = manifest
        .find("[dependencies]")
        .expect("examples/own-context/Cargo.toml has a [dependencies] table");
    let rest = &manifest[start..];
    let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
    rest[..end].trim_end()
}

#[test]
fn readme_shows_the_own_context_source_verbatim() {
    assert!(
        README.contains(SOURCE),
        "README.md must show examples/own-context/src/main.rs verbatim"
    );
}

#[test]
fn readme_shows_the_own_context_dependencies_verbatim() {
    let table = dependencies_table(MANIFEST);
    assert!(
        README.contains(&format!("```toml\n{table}\n```")),
        "README.md must show the [dependencies] of examples/own-context/Cargo.toml verbatim:\n{table}"
    );
}

#[test]
fn the_own_context_depends_on_herald_and_serde_only() {
    let names: Vec<&str> = dependencies_table(MANIFEST)
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|line| line.split(['=', '.']).next().unwrap_or_default().trim())
        .collect();
    assert_eq!(names, ["herald", "serde"]);
    // No other way in for a dependency: one table, no dev, build or target ones.
    let tables: Vec<&str> = MANIFEST
        .lines()
        .filter(|line| line.starts_with('['))
        .collect();
    assert_eq!(tables, ["[package]", "[dependencies]"]);
}

#[test]
fn readme_names_the_two_commands() {
    assert!(README.contains("make run") && README.contains("make test"));
}
