//! The tree's shape, as ARCHITECTURE.md states it: no file under proxy/src
//! or xtask/src over 400 lines and no function over 60 (test modules
//! aside), and no module below the agent importing `agent` or `cli`.
//! Functions still over the limit are listed by name; the list must shrink,
//! never silently grow or go stale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 400;
const MAX_FN_LINES: usize = 60;

/// Functions over the limit today (path under the repository, name).
const KNOWN_LONG: &[(&str, &str)] = &[];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every .rs file under `dir`, test-only files left out.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs")
            && !name.ends_with("_tests.rs")
            && name != "tests.rs"
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The file's lines before its test module.
fn code_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod "))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// (name, lines) of every function with a body: from its `fn` line to the
/// closing brace at the same indent.
fn functions(lines: &[String]) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let after_vis = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub(super) "))
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        let mut rest = after_vis;
        for q in ["const ", "async ", "unsafe ", "extern \"C\" "] {
            rest = rest.strip_prefix(q).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue;
        }
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let indent = line.len() - trimmed.len();
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i + 1..].iter().position(|l| l.starts_with(&close)) {
            out.push((name, end + 2));
        }
    }
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .to_string()
}

#[test]
fn files_and_functions_stay_small() {
    let mut problems = Vec::new();
    let mut long = Vec::new();
    for dir in ["proxy/src", "xtask/src"] {
        for path in sources(&root().join(dir)) {
            let lines = code_lines(&path);
            let file = relative(&path);
            if lines.len() > MAX_FILE_LINES {
                problems.push(format!("{file}: {} lines", lines.len()));
            }
            for (name, n) in functions(&lines) {
                if n > MAX_FN_LINES {
                    long.push((file.clone(), name, n));
                }
            }
        }
    }
    for (file, name, n) in &long {
        if !KNOWN_LONG.contains(&(file.as_str(), name.as_str())) {
            problems.push(format!("{file}: fn {name} has {n} lines"));
        }
    }
    for (file, name) in KNOWN_LONG {
        if !long.iter().any(|(f, n, _)| f == file && n == name) {
            problems.push(format!(
                "{file}: fn {name} is listed in KNOWN_LONG but no longer over {MAX_FN_LINES} lines: take it off"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn nothing_below_the_agent_imports_agent_or_cli() {
    let src = root().join("proxy/src");
    let mut problems = Vec::new();
    for path in sources(&src) {
        let file = relative(&path);
        let above = ["proxy/src/agent/", "proxy/src/cli/", "proxy/src/commands/"]
            .iter()
            .any(|p| file.starts_with(p))
            || file == "proxy/src/main.rs";
        if above {
            continue;
        }
        for (i, line) in code_lines(&path).iter().enumerate() {
            if line.contains("crate::agent") || line.contains("crate::cli") {
                problems.push(format!("{file}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: a function's length and a test module's cut.
#[test]
fn the_checker_measures_functions() {
    let text = "fn a() {\n    x();\n}\n\npub(super) async fn b(\n    y: u8,\n) {\n}\n#[cfg(test)]\nmod tests {\n    fn c() {}\n}\n";
    let path = std::env::temp_dir().join(format!("ferry-layout-{}.rs", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let lines = code_lines(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(lines.len(), 8);
    assert_eq!(
        functions(&lines),
        vec![("a".to_string(), 3), ("b".to_string(), 4)]
    );
}
