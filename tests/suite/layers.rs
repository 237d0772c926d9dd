//! The house's layers, read from the code's own imports (as import-linter or ArchUnit do): a
//! module may name only modules on lower floors (docs/architecture.md, "Layers"), and only the
//! compute layer names cudarc (NCCL too: `comm/nccl.rs` reaches it through the seam
//! `device::cuda::nccl`, so that the emulated device can serve it).

use super::common::repo;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The floors, bottom up; a module may import only from lower floors (and from itself). Modules
/// on one floor never import each other.
const FLOORS: &[&[&str]] = &[
    &["error"],
    &["rng", "log", "owner"],
    &["catalog"],
    &["config"],
    &["linalg"],
    &["device"],
    &["stats", "model"],
    &["source", "comm"],
    &["leader"],
    &["adapter"],
    &["engine"],
    &["cli"],
    &["main"],
];

/// Where cudarc may be named (outside comments).
const CUDARC_ALLOWED: &[&str] = &["src/device/"];

fn floor(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
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

/// The top module a file under `src/` belongs to (`src/device/cuda/gram.rs` → `device`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without its comments (line comments and doc comments; the tree has no
/// block comments), so that prose naming a module is not an import.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal (a URL) is rare; keep the line up to it either way.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top modules a piece of code names through `crate::` (and `$crate::` in macros),
/// including every item of a grouped `use crate::{a, b::c}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `mycrate::`, not a path of this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for item in split_top_level(&group[..end]) {
                out.insert(ident(item.trim()));
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The index of the `}` closing a group whose `{` was just consumed.
fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `crate::Error` and `crate::Result` are re-exports of `error` at the crate root.
fn resolve(name: &str) -> &str {
    match name {
        "Error" | "Result" => "error",
        other => other,
    }
}

#[test]
fn every_import_runs_down_the_layers() {
    let root = repo();
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" {
            continue; // the crate root declares the modules
        }
        let Some(here) = floor(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is on no floor of FLOORS",
                file.display()
            ));
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for named in named_modules(&code) {
            let named = resolve(&named);
            if named == module {
                continue;
            }
            match floor(named) {
                Some(there) if there < here => {}
                Some(there) => wrong.push(format!(
                    "{}: `{module}` (floor {here}) imports `{named}` (floor {there})",
                    file.strip_prefix(&root).unwrap().display()
                )),
                None => wrong.push(format!(
                    "{}: imports `crate::{named}`, which is on no floor",
                    file.strip_prefix(&root).unwrap().display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not run down the layers (docs/architecture.md):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn only_the_compute_layer_names_cudarc() {
    let root = repo();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("python/src"), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if CUDARC_ALLOWED.iter().any(|a| rel.starts_with(a)) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        if code.contains("cudarc") {
            wrong.push(rel);
        }
    }
    assert!(
        wrong.is_empty(),
        "cudarc named outside src/device/: {wrong:?}"
    );
}

#[test]
fn the_scanner_reads_grouped_and_macro_paths() {
    let code = "use crate::{device::cuda::{Cuda, DeviceSums}, stats, Error};\n\
                let x = $crate::log::say; use mycrate::engine;";
    let got: Vec<String> = named_modules(code).into_iter().collect();
    assert_eq!(got, ["Error", "device", "log", "stats"]);
    assert_eq!(
        code_of("use crate::engine; // crate::cli"),
        "use crate::engine; "
    );
}
