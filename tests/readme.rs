//! The README's "write your own context" example is the compiled example.

#[test]
fn readme_shows_the_compiled_own_context_example_verbatim() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/own_context.rs");
    assert!(
        readme.contains(example),
        "README.md must end with examples/own_context.rs, verbatim"
    );
    assert!(readme.contains("make run") && readme.contains("make test"));
}
