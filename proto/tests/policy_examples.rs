//! The examples of `docs/policy.md` are tests: every ```toml block must parse without
//! errors or warnings, and its `[[test]]` cases must pass (under the mesh default
//! deny, or allow when the block says `# mesh default: allow`).

use mesh_proto::policy::{self, DefaultAction};

const DOC: &str = include_str!("../../docs/policy.md");

/// `(line of the opening fence, block text)` for each ```toml block.
fn toml_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```toml" => current = Some((i + 1, String::new())),
            None => {}
            Some(_) if line.trim() == "```" => out.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(
        current.is_none(),
        "docs/policy.md: unterminated ```toml block"
    );
    out
}

#[test]
fn every_documented_example_parses_and_its_tests_pass() {
    let blocks = toml_blocks(DOC);
    assert!(
        blocks.len() >= 8,
        "expected the documented examples, found {}",
        blocks.len()
    );
    let mut cases = 0;
    for (line, text) in &blocks {
        let name = format!("docs/policy.md:{line}");
        cases += run_block(&name, text);
    }
    assert!(
        cases >= 30,
        "expected the documented test cases, found {cases}"
    );
}

/// Runs one block as a policy file; returns its number of test cases.
fn run_block(name: &str, text: &str) -> usize {
    let default = if text.contains("# mesh default: allow") {
        DefaultAction::Allow
    } else {
        DefaultAction::Deny
    };
    let loaded = policy::load(name, text, default).unwrap_or_else(|e| panic!("{e}"));
    let warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    assert!(warnings.is_empty(), "{name}: {warnings:#?}");
    for r in &loaded.results {
        assert!(
            r.passed,
            "{name}: test {:?} (block line {}): {}",
            r.name,
            r.line,
            r.failure.as_deref().unwrap_or("")
        );
    }
    loaded.results.len()
}

#[test]
fn readme_policy_examples_pass() {
    // The README shows policies next to other TOML (meshd.toml); every block with a
    // `[[policy]]` is a policy file and is held to the same standard.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let Ok(readme) = std::fs::read_to_string(path) else {
        return; // no README in this checkout; docs/policy.md is always checked
    };
    for (line, text) in toml_blocks(&readme) {
        if text.contains("[[policy]]") {
            run_block(&format!("README.md:{line}"), &text);
        }
    }
}

#[test]
fn documented_error_lines_are_what_the_parser_says() {
    // The "Validation" section quotes errors; keep them true.
    let base = "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\n";
    let cidr = format!("{base}\n\nfrom = [{{ addresses = [\"10.0.0.0/33\"] }}]\n");
    let e = policy::parse("policy.toml", &cidr).unwrap_err().to_string();
    assert!(DOC.contains(&e), "{e}");
    let e = policy::parse("policy.toml", "").unwrap_err().to_string();
    assert!(DOC.contains(&e), "{e}");
    let e = policy::parse(
        "policy.toml",
        "[[policy]]\nname = \"a\"\naction = \"permit\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(DOC.contains(&e), "{e}");
}
