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

/// `text` with comments, string literals and character literals blanked out (same length), so
/// that only code is left to search.
fn blank_non_code(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |e| i + e);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let from = i + 2 + hashes;
            let end = text[from..]
                .find(&close)
                .map_or(b.len(), |e| from + e + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, (j + 1).min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'); otherwise a lifetime.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|e| i + 2 + e + 1)
            } else {
                let c = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 1 + c + 1)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8: only ASCII replaced whole")
}

/// The code of a file: comments and literals blanked, and every `#[cfg(test)]` module cut out
/// (tests may reach up to build their fixtures), wherever it sits in the file.
fn code(text: &str) -> String {
    let mut code = blank_non_code(text);
    while let Some(at) = code.find("#[cfg(test)]") {
        let after = at + "#[cfg(test)]".len();
        let rest = code[after..].trim_start();
        if !rest.starts_with("mod ") {
            // Test-only items other than modules are checked like the rest.
            code.replace_range(at..after, &" ".repeat(after - at));
            continue;
        }
        let open = after + code[after..].find('{').expect("a test module has a body");
        let mut level = 0;
        let mut end = code.len();
        for (k, c) in code[open..].char_indices() {
            match c {
                '{' => level += 1,
                '}' => {
                    level -= 1;
                    if level == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(at..end, "");
    }
    code
}

/// The top-level folder named at the start of `rest` (a path after `crate::` or after the
/// `super::`s that reach the crate root), or in a `{a::x, b}` group there.
fn named_folders(rest: &str, out: &mut BTreeSet<String>) {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        let name = ident(rest);
        if floor(&name).is_some() {
            out.insert(name);
        }
        return;
    };
    let mut level = 1;
    let mut at_start = true;
    for (j, c) in group.char_indices() {
        match c {
            '{' => level += 1,
            '}' => {
                level -= 1;
                if level == 0 {
                    break;
                }
            }
            ',' if level == 1 => at_start = true,
            c if at_start && level == 1 && !c.is_whitespace() => {
                at_start = false;
                let name = ident(&group[j..]);
                if floor(&name).is_some() {
                    out.insert(name);
                }
            }
            _ => {}
        }
    }
}

/// The top-level folders a file's code imports: `crate::NAME`, `crate::{NAME::.., ..}`, and the
/// same after a chain of `super::` as long as the file's depth below `src/` (which reaches the
/// crate root).
fn imports(code: &str, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        named_folders(&code[i + "crate::".len()..], &mut out);
    }
    for (i, _) in code.match_indices("super::") {
        if code[..i].ends_with("super::") {
            continue;
        }
        let mut rest = &code[i..];
        let mut k = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
            k += 1;
        }
        if k == depth {
            named_folders(rest, &mut out);
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
                    // src/a/mod.rs is `a` (depth 1), src/a/b.rs and src/a/b/mod.rs are `a::b`.
                    let parts = p.strip_prefix(src).unwrap().components().count();
                    let depth = if p.ends_with("mod.rs") {
                        parts - 1
                    } else {
                        parts
                    };
                    for to in imports(&code(&text), depth) {
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
    // Every folder of src/ (but the binary's cli/) has a floor, and no file sits beside
    // lib.rs and main.rs.
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(
                name == "lib.rs" || name == "main.rs",
                "src/{name} sits outside the layers"
            );
        }
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
    let write = |path: &str, text: &str| std::fs::write(dir.path().join(path), text).unwrap();
    // Seen: a plain path, a group, a path after the test module, `super::` up to the root.
    write(
        "model/x.rs",
        "use crate::util::io;\n\
         // crate::report in a comment is not an import\n\
         const S: &str = \"crate::experiment in a string is not one\";\n\
         #[cfg(test)]\nmod tests {\n    use crate::experiment::Experiment;\n    fn f() { let _ = '}'; }\n}\n\
         use crate::{util::rng::Rng, train::TrainConfig};\n",
    );
    write("data/mod.rs", "use super::eval::x;\nuse super::*;\n");
    write(
        "attack/y.rs",
        "use crate::defence::Method;\nuse super::super::report::r;\n",
    );
    write("eval/z.rs", "use super::super::util::io;\n");
    let bad = violations(dir.path());
    assert_eq!(
        bad.iter()
            .map(|b| b.rsplit_once('/').unwrap().1.to_string())
            .collect::<Vec<_>>(),
        [
            "x.rs imports crate::train",
            "mod.rs imports crate::eval",
            "y.rs imports crate::defence",
            "y.rs imports crate::report",
        ],
        "{bad:?}"
    );
}
