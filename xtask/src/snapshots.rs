//! Snapshot hygiene, checked by `cargo xtask check`.
//!
//! insta keeps a test's expected output in `tests/snapshots/<module>__<name>.snap`,
//! next to the test file `tests/<module>.rs` that asserts it. Three things
//! can go wrong without any test failing, so this module looks for them:
//!
//! 1. **A pending snapshot.** insta writes `*.snap.new` (and
//!    `*.pending-snap` for inline snapshots) when a run disagrees with the
//!    stored snapshot. They are git-ignored, so `git status` never shows them
//!    and a reviewer never sees them: any such file fails the check.
//! 2. **An orphan.** A test renamed or deleted leaves its `.snap` behind, and
//!    insta never complains. Every snapshot must be asserted by name
//!    (`assert_snapshot!("<name>", ...)`) in its module's test file.
//! 3. **A header that names another file.** A snapshot's `source:` header
//!    says which test wrote it; the book tells readers so. A step copied from
//!    the one before keeps the old step's path unless it is re-accepted.
//!
//! Snapshots must have explicit names for rule 2 to see them; the tutorial
//! names each one after its test function anyway, so that `cargo insta
//! review` and the file name both point at the test.

use std::path::{Path, PathBuf};

use crate::{Result, Workspace, fail, read_text};

/// What the message says to do about a pending snapshot.
const REVIEW: &str = "review with cargo insta review, then commit or delete";

/// Directories never searched: build output and git's own files. They can be
/// large and nothing in them is a source snapshot.
fn skipped_dir(name: &str) -> bool {
    name == "target" || name == ".git"
}

/// Snapshot-related files found in the repository.
#[derive(Debug, Default)]
pub struct Found {
    /// `*.snap` files.
    pub snapshots: Vec<PathBuf>,
    /// `*.snap.new` and `*.pending-snap` files.
    pub pending: Vec<PathBuf>,
}

/// Walks `root` for snapshot files, skipping `target/` and `.git/` at any
/// depth. Both lists are sorted, so messages come in a stable order.
pub fn find(root: &Path) -> Result<Found> {
    let mut found = Found::default();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| fail(format!("cannot read {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| fail(format!("cannot read {}: {e}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !skipped_dir(&name) {
                    dirs.push(path);
                }
            } else if name.ends_with(".snap.new") || name.ends_with(".pending-snap") {
                found.pending.push(path);
            } else if name.ends_with(".snap") {
                found.snapshots.push(path);
            }
        }
    }
    found.snapshots.sort();
    found.pending.sort();
    Ok(found)
}

/// The names given to insta's assertion macros in a test file: the string
/// literal right after `assert_snapshot!(`, `assert_debug_snapshot!(` or any
/// other `assert_…snapshot!(`, in the order they appear. `//` comment lines
/// don't count: a commented-out assertion asserts nothing.
pub fn asserted_names(source: &str) -> Vec<String> {
    // One long line, so that a call rustfmt spread over several lines
    // (`assert_snapshot!(\n    "name",`) reads like any other.
    let code = source
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut names = Vec::new();
    for (i, m) in code.match_indices("snapshot!(") {
        let ident_start = code[..i]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        if !code[ident_start..i].starts_with("assert_") {
            continue;
        }
        let rest = code[i + m.len()..].trim_start();
        if let Some(literal) = rest.strip_prefix('"')
            && let Some(end) = literal.find('"')
        {
            names.push(literal[..end].to_string());
        }
    }
    names
}

/// The value of the `source:` line in a snapshot's header (the block between
/// the first two `---` lines), without YAML quotes.
pub fn source_header(snapshot: &str) -> Option<String> {
    let mut lines = snapshot.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    lines
        .take_while(|l| l.trim_end() != "---")
        .find_map(|l| l.strip_prefix("source:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
}

/// The test file that must assert `snapshot`, and the snapshot's name, or
/// why that cannot be worked out from its path.
pub fn owner(snapshot: &Path) -> Result<(PathBuf, String), String> {
    let dir = snapshot.parent().filter(|d| d.ends_with("tests/snapshots"));
    let Some(tests) = dir.and_then(Path::parent) else {
        let why = "a snapshot outside tests/snapshots/, which no test file can be matched \
                   to (keep snapshot tests in tests/)";
        return Err(why.into());
    };
    let file_name = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file_name.strip_suffix(".snap").unwrap_or(&file_name);
    match stem.split_once("__") {
        Some((module, name)) if !module.is_empty() && !name.is_empty() => {
            Ok((tests.join(format!("{module}.rs")), name.to_string()))
        }
        _ => {
            let why = "not named <module>__<name>.snap, so no test file can be matched to it \
                       (give the snapshot a name in its assert_snapshot!)";
            Err(why.into())
        }
    }
}

/// The problems with one `.snap` file; `ws` is used for the paths the
/// header must name.
pub fn check_snapshot(ws: &Workspace, snapshot: &Path) -> Result<Vec<String>> {
    let shown = ws.display(snapshot);
    let (test_file, name) = match owner(snapshot) {
        Ok(found) => found,
        Err(why) => return Ok(vec![format!("{shown}: {why}")]),
    };
    let test_shown = ws.display(&test_file);
    let mut problems = Vec::new();
    if !test_file.is_file() {
        // Its header can only name a file that is gone: one message is enough.
        return Ok(vec![format!(
            "{shown}: orphan snapshot: there is no {test_shown} to assert it; \
             delete it if its test is gone"
        )]);
    }
    if !asserted_names(&read_text(&test_file)?).contains(&name) {
        problems.push(format!(
            "{shown}: orphan snapshot: {test_shown} has no assert_snapshot!(\"{name}\", ...); \
             delete it if its test is gone, or rename it to the test's snapshot name"
        ));
    }
    match source_header(&read_text(snapshot)?) {
        Some(source) if source == test_shown => {}
        Some(source) => problems.push(format!(
            "{shown}: its source: header names {source}, not {test_shown} \
             (re-accept it with INSTA_UPDATE=force, or fix the line)"
        )),
        None => problems.push(format!(
            "{shown}: no source: line in its --- header (re-accept it with INSTA_UPDATE=force)"
        )),
    }
    Ok(problems)
}

/// The check's entry point: every problem with the repository's snapshots,
/// and how many snapshots were looked at.
pub fn check(ws: &Workspace, problems: &mut Vec<String>) -> Result<usize> {
    let found = find(&ws.root)?;
    for pending in &found.pending {
        problems.push(format!(
            "{}: unreviewed snapshot: {REVIEW}",
            ws.display(pending)
        ));
    }
    for snapshot in &found.snapshots {
        problems.extend(check_snapshot(ws, snapshot)?);
    }
    Ok(found.snapshots.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const TEST_FILE: &str = r#"
use insta::assert_snapshot;

#[tokio::test]
async fn welcome() {
    assert_snapshot!("welcome", echo(&[]).await);
}

#[tokio::test]
async fn a_long_name() {
    insta::assert_snapshot!(
        "a_long_name",
        transcript
    );
    assert_debug_snapshot!("debugged", 1);
    // assert_snapshot!("commented_out", transcript);
    mysnapshot!("not_insta", 1);
}
"#;

    fn snap(source: &str) -> String {
        format!("---\nsource: {source}\nexpression: transcript\n---\nconnect /ws/system\n")
    }

    fn workspace(tmp: &TempDir) -> Workspace {
        Workspace {
            root: tmp.path().to_path_buf(),
        }
    }

    #[test]
    fn reads_the_names_tests_assert() {
        assert_eq!(
            asserted_names(TEST_FILE),
            ["welcome", "a_long_name", "debugged"]
        );
        assert!(asserted_names("assert_snapshot!(transcript);").is_empty());
    }

    #[test]
    fn reads_the_source_header() {
        assert_eq!(
            source_header(&snap("steps/01-x/tests/page.rs")).as_deref(),
            Some("steps/01-x/tests/page.rs")
        );
        assert_eq!(
            source_header("---\nsource: \"a b.rs\"\n---\n").as_deref(),
            Some("a b.rs")
        );
        // A `source:` below the header is content, not metadata.
        assert_eq!(source_header("---\nexpression: x\n---\nsource: y\n"), None);
        assert_eq!(source_header("no header"), None);
    }

    #[test]
    fn pending_snapshots_fail_wherever_they_are() {
        let tmp = TempDir::new("pending");
        tmp.write("steps/01-x/tests/snapshots/page__a.snap.new", "");
        tmp.write("axum-channels/src/.lib.rs.pending-snap", "");
        tmp.write("target/debug/x.snap.new", "");
        tmp.write("steps/01-x/target/y.pending-snap", "");
        let mut problems = Vec::new();
        assert_eq!(check(&workspace(&tmp), &mut problems).unwrap(), 0);
        assert_eq!(
            problems,
            [
                "axum-channels/src/.lib.rs.pending-snap: unreviewed snapshot: \
                 review with cargo insta review, then commit or delete",
                "steps/01-x/tests/snapshots/page__a.snap.new: unreviewed snapshot: \
                 review with cargo insta review, then commit or delete",
            ]
        );
    }

    #[test]
    fn asserted_snapshots_with_their_own_source_pass() {
        let tmp = TempDir::new("good");
        tmp.write("steps/01-x/tests/system_chat.rs", TEST_FILE);
        for name in ["welcome", "a_long_name", "debugged"] {
            tmp.write(
                &format!("steps/01-x/tests/snapshots/system_chat__{name}.snap"),
                &snap("steps/01-x/tests/system_chat.rs"),
            );
        }
        let mut problems = Vec::new();
        assert_eq!(check(&workspace(&tmp), &mut problems).unwrap(), 3);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn orphans_fail() {
        let tmp = TempDir::new("orphans");
        tmp.write("steps/01-x/tests/system_chat.rs", TEST_FILE);
        let header = snap("steps/01-x/tests/system_chat.rs");
        // Asserted only in a comment, by another crate's macro, or not at all.
        for name in ["commented_out", "not_insta", "renamed"] {
            tmp.write(
                &format!("steps/01-x/tests/snapshots/system_chat__{name}.snap"),
                &header,
            );
        }
        // Its test file is gone.
        tmp.write(
            "steps/01-x/tests/snapshots/gone__welcome.snap",
            &snap("steps/01-x/tests/gone.rs"),
        );
        // Not named `<module>__<name>`, or not under tests/snapshots/.
        tmp.write("steps/01-x/tests/snapshots/nameless.snap", &header);
        tmp.write("steps/01-x/src/snapshots/x__welcome.snap", &header);

        let mut problems = Vec::new();
        check(&workspace(&tmp), &mut problems).unwrap();
        let about = |file: &str| {
            problems
                .iter()
                .filter(|p| p.starts_with(&format!("steps/01-x/{file}:")))
                .count()
        };
        for file in [
            "tests/snapshots/system_chat__commented_out.snap",
            "tests/snapshots/system_chat__not_insta.snap",
            "tests/snapshots/system_chat__renamed.snap",
            "tests/snapshots/gone__welcome.snap",
            "tests/snapshots/nameless.snap",
            "src/snapshots/x__welcome.snap",
        ] {
            assert_eq!(about(file), 1, "{file}: {problems:#?}");
        }
        let says = |text: &str| problems.iter().any(|p| p.contains(text));
        let renamed = r#"tests/system_chat.rs has no assert_snapshot!("renamed", ...)"#;
        assert!(says(renamed), "{problems:#?}");
        assert!(
            says("there is no steps/01-x/tests/gone.rs"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_header_naming_another_step_fails() {
        let tmp = TempDir::new("header");
        tmp.write("steps/01-x/tests/system_chat.rs", TEST_FILE);
        tmp.write(
            "steps/01-x/tests/snapshots/system_chat__welcome.snap",
            &snap("steps/00-x/tests/system_chat.rs"),
        );
        tmp.write(
            "steps/01-x/tests/snapshots/system_chat__debugged.snap",
            "no header\n",
        );
        let mut problems = Vec::new();
        check(&workspace(&tmp), &mut problems).unwrap();
        assert_eq!(
            problems,
            [
                "steps/01-x/tests/snapshots/system_chat__debugged.snap: no source: line \
                 in its --- header (re-accept it with INSTA_UPDATE=force)",
                "steps/01-x/tests/snapshots/system_chat__welcome.snap: its source: header \
                 names steps/00-x/tests/system_chat.rs, not steps/01-x/tests/system_chat.rs \
                 (re-accept it with INSTA_UPDATE=force, or fix the line)",
            ]
        );
    }
}
