//! The dependency rule of `src/` (stated in `src/lib.rs` and
//! ARCHITECTURE.md): every top-level module has a rank, and a module may
//! use only modules of a lower rank. This test reads every file under
//! `src/`, finds its `crate::X` references (`use crate::X…`,
//! `use crate::{X, …}`, `crate::X::…` in code; `stowage::X` in `main.rs`)
//! and fails on any edge that does not point down, and therefore on any
//! cycle. A new top-level module must be given a rank here. It also checks
//! that ARCHITECTURE.md's code map names every source file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules by rank: each may use only modules of lower ranks.
const RANKS: &[(&str, u32)] = &[
    // Leaves: the OCI vocabulary, the metric label vocabulary, the body
    // type, the stop signal.
    ("oci", 0),
    ("metrics", 0),
    ("body", 0),
    ("shutdown", 0),
    // Errors shared by every subsystem.
    ("error", 1),
    // Subsystems that know nothing of each other: upstream client, front
    // door, logging.
    ("upstream", 2),
    ("front", 2),
    ("logging", 2),
    // The cluster: peers, rendezvous owners, peer requests; the shared
    // store.
    ("cluster", 2),
    ("bucket", 2),
    // The cache uses upstreams and the cluster's owners (fills), and the
    // front door's zero-copy regions for its response bodies.
    ("cache", 3),
    // The HTTP edge, and the admin listener.
    ("http", 4),
    ("admin", 4),
    // The configuration aggregates every subsystem's section; the test
    // hooks reach into the cache.
    ("config", 5),
    ("test_hooks", 5),
    ("fuzzing", 6),
    ("server", 6),
    ("cli", 7),
    ("main", 8),
];

fn rank(module: &str) -> Option<u32> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for
/// `lib.rs`, which only declares them).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib").then_some(name)
}

/// Code without comments (doc links may name any module).
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The top-level modules `text` refers to through `prefix` (`crate::` or
/// `stowage::`), including every item of a `prefix{a::b, c}` group.
fn references(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its top-level commas.
            let mut depth = 0;
            let mut item_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident_at(group[item_start..i].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident_at(group[item_start..i].trim_start()));
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// Every edge of `src/` that does not point to a lower rank, as text.
fn violations() -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(from) = rank(&module) else {
            bad.push(format!("{}: module `{module}` has no rank", file.display()));
            continue;
        };
        let text = code(&std::fs::read_to_string(file).unwrap());
        let mut used = references(&text, "crate::");
        if module == "main" {
            used.extend(references(&text, "stowage::"));
        }
        for target in used.into_iter().filter(|t| *t != module) {
            match rank(&target) {
                Some(to) if to < from => {}
                Some(to) => bad.push(format!(
                    "{}: `{module}` (rank {from}) uses `{target}` (rank {to})",
                    file.display()
                )),
                None => bad.push(format!(
                    "{}: `{module}` uses `{target}`, which has no rank",
                    file.display()
                )),
            }
        }
    }
    bad
}

#[test]
fn dependencies_point_down() {
    let bad = violations();
    assert!(
        bad.is_empty(),
        "dependencies against the declared order:\n{}",
        bad.join("\n")
    );
}

/// ARCHITECTURE.md's code map stays true: it names every source file.
#[test]
fn code_map_names_every_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let missing: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name: {missing:?}"
    );
}

#[test]
fn references_are_found() {
    let text = "use crate::{cache::{a, b}, oci::X, self};\nlet x = crate::metrics::M;\n\
                use stowage::cli;\nfn f() { my_crate::nope(); }";
    let found = references(text, "crate::");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["cache", "metrics", "oci"]
    );
    assert_eq!(
        references(text, "stowage::")
            .into_iter()
            .collect::<Vec<_>>(),
        ["cli"]
    );
    assert_eq!(code("// crate::http\nuse crate::oci;"), "use crate::oci;");
}
