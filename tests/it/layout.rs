//! The library's layering (docs/ARCHITECTURE.md): each folder of `src/` imports only from the
//! folders below it. Read from the sources: every `crate::FOLDER` path outside comments and test
//! modules is an import of that folder.

use std::collections::BTreeSet;
use std::path::Path;

/// The folders, bottom first (`defence` and `attack` share a floor: neither imports the other).
const LAYERS: &[&[&str]] = &[
    &["util"],
    &["model"],
    &["data"],
    &["train"],
    &["eval"],
    &["defence", "attack"],
    &["analysis"],
    &["experiment"],
    &["report"],
    &["dev"],
];

fn floor(folder: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&folder))
}

/// The code of a file without comments and without its `#[cfg(test)]` module (tests may reach
/// up to build their fixtures).
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level folders a text imports (`crate::NAME` with NAME a folder of `src/`).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if floor(&name).is_some() {
            out.insert(name);
        }
    }
    out
}

/// Every `(folder, imported folder, file)` that goes up or sideways.
fn violations(src: &Path) -> Vec<String> {
    let mut bad = vec![];
    for layer in LAYERS {
        for folder in *layer {
            let mut stack = vec![src.join(folder)];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                        continue;
                    }
                    if p.extension().is_none_or(|x| x != "rs") {
                        continue;
                    }
                    let text = std::fs::read_to_string(&p).unwrap();
                    for to in imports(&code(&text)) {
                        if to != *folder && floor(&to) >= floor(folder) {
                            bad.push(format!("{} imports crate::{to}", p.display()));
                        }
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn each_folder_imports_only_from_the_folders_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // Every folder of src/ (but the binary's cli/) has a floor.
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                name == "cli" || floor(&name).is_some(),
                "src/{name}/ has no floor in LAYERS"
            );
        }
    }
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_layering_check_sees_an_upward_import() {
    let dir = tempfile::tempdir().unwrap();
    for f in LAYERS.iter().flat_map(|l| l.iter()) {
        std::fs::create_dir_all(dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("model/x.rs"),
        "use crate::util::io;\n// crate::report in a comment is not an import\nuse crate::train::TrainConfig;\n\
         #[cfg(test)]\nmod tests {\n    use crate::experiment::Experiment;\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("attack/y.rs"),
        "use crate::defence::Method;\n",
    )
    .unwrap();
    let bad = violations(dir.path());
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0].ends_with("model/x.rs imports crate::train"),
        "{bad:?}"
    );
    assert!(
        bad[1].ends_with("attack/y.rs imports crate::defence"),
        "{bad:?}"
    );
}
