//! Comparing two step directories: the `diff` task, and the list of changed
//! files that `check` requires each chapter to mention.
//!
//! Anchor comments (`// ANCHOR: name`, `<!-- ANCHOR_END: name -->`, ...) exist
//! only so the book can include parts of a file. They are removed from both
//! sides before comparing, so adding or moving an anchor is never reported as
//! a change of the code.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use similar::TextDiff;

use crate::steps::{self, Step};
use crate::{Args, Error, Result, Workspace, fail, slash_path};

/// Lines of context around each change, as in `diff -u` and git.
const CONTEXT: usize = 3;

/// True for a line that is only an mdBook anchor comment, e.g.
/// `// ANCHOR: serve`, `<!-- ANCHOR_END: page -->`, `# ANCHOR: deps`.
///
/// The marker must come right after a comment opener at the start of the
/// line: a string literal such as `"ANCHOR: x"` or code with a trailing
/// comment is real content, and dropping it would hide a change.
pub fn is_anchor_line(line: &str) -> bool {
    let trimmed = line.trim_start();
    // Comment openers of the languages in the repo: //, ///, //!, /*, #,
    // <!--, --, ; and {# (templates). Taking any run of these characters
    // keeps the rule independent of the language.
    let rest = trimmed.trim_start_matches(['/', '*', '!', '#', '<', '-', ';', '{', '%']);
    if rest.len() == trimmed.len() {
        return false;
    }
    let rest = rest.trim_start();
    rest.starts_with("ANCHOR:") || rest.starts_with("ANCHOR_END:")
}

/// `text` without its anchor lines (line endings of the other lines kept).
pub fn strip_anchors(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !is_anchor_line(l))
        .collect()
}

/// A file's content as compared: text without anchors, or raw bytes for
/// files that are not UTF-8 (images and the like).
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Binary(Vec<u8>),
}

fn load(path: &Path, renames: &[(String, String)]) -> Result<Content> {
    let bytes =
        std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => {
            let mut text = strip_anchors(&text);
            for (from, to) in renames {
                text = text.replace(from.as_str(), to);
            }
            Content::Text(text)
        }
        Err(e) => Content::Binary(e.into_bytes()),
    })
}

/// What to rename in `old`'s files before comparing them with `new`'s: each
/// step's package and crate carry the step's own name (`step-00-skeleton`,
/// `step_00_skeleton`), files that name their own path do so through the
/// step's directory (`steps/00-skeleton`, as in a snapshot's `source:`
/// header), and a message that says how to run the step names its number
/// (`cargo xtask step 03 --redis`). None of those changing is part of any
/// lesson.
pub fn step_renames(old: &Step, new: &Step) -> Vec<(String, String)> {
    let (old_package, new_package) = (old.package(), new.package());
    vec![
        (old_package.replace('-', "_"), new_package.replace('-', "_")),
        (old_package, new_package),
        (
            format!("steps/{}", old.dir_name()),
            format!("steps/{}", new.dir_name()),
        ),
        (
            format!("cargo xtask step {}", old.id),
            format!("cargo xtask step {}", new.id),
        ),
    ]
}

/// Paths that are not part of a step's source: build output and insta's
/// pending snapshots (both are also git-ignored).
fn skipped(rel: &str, is_dir: bool) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    (is_dir && name == "target") || name.ends_with(".snap.new") || name.ends_with(".pending-snap")
}

/// Every file under `dir`, recursively, keyed by its `/`-separated path
/// relative to `dir`, in sorted order.
pub fn list_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| fail(format!("cannot read {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| fail(format!("cannot read {}: {e}", dir.display())))?;
            let path = entry.path();
            let rel = slash_path(path.strip_prefix(base).unwrap_or(&path));
            let is_dir = path.is_dir();
            if skipped(&rel, is_dir) {
                continue;
            }
            if is_dir {
                walk(base, &path, out)?;
            } else {
                out.insert(rel, path);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Added,
    Removed,
    Modified,
}

/// One file that differs between two step directories.
#[derive(Debug)]
pub struct Change {
    /// Path relative to the step directory, with `/`.
    pub path: String,
    pub kind: Kind,
    pub old: Option<Content>,
    pub new: Option<Content>,
}

/// The files that differ from `old` to `new`, sorted by path. `old = None`
/// stands for an empty directory (how step 00 is treated by `check`).
///
/// `renames` are applied to `old`'s text first (see [`step_renames`]).
pub fn changed_files(
    old: Option<&Path>,
    new: &Path,
    renames: &[(String, String)],
) -> Result<Vec<Change>> {
    let old_files = match old {
        Some(dir) => list_files(dir)?,
        None => BTreeMap::new(),
    };
    let new_files = list_files(new)?;
    let all: BTreeSet<&String> = old_files.keys().chain(new_files.keys()).collect();
    let mut changes = Vec::new();
    for path in all {
        let old = old_files.get(path).map(|p| load(p, renames)).transpose()?;
        let new = new_files.get(path).map(|p| load(p, &[])).transpose()?;
        let kind = match (&old, &new) {
            (None, Some(_)) => Kind::Added,
            (Some(_), None) => Kind::Removed,
            (Some(a), Some(b)) if a != b => Kind::Modified,
            _ => continue,
        };
        changes.push(Change {
            path: path.clone(),
            kind,
            old,
            new,
        });
    }
    Ok(changes)
}

/// ANSI colours, or nothing when writing to a pipe or when NO_COLOR is set.
struct Palette {
    on: bool,
}

impl Palette {
    fn paint(&self, code: &str, line: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{line}\x1b[0m")
        } else {
            line.to_string()
        }
    }
}

/// The unified diff of one change. `old_label`/`new_label` are the step
/// directory names, so headers read `--- 00-skeleton/src/main.rs`.
fn render(change: &Change, old_label: &str, new_label: &str, color: bool) -> String {
    let p = Palette { on: color };
    let old_name = match change.kind {
        Kind::Added => "/dev/null".to_string(),
        _ => format!("{old_label}/{}", change.path),
    };
    let new_name = match change.kind {
        Kind::Removed => "/dev/null".to_string(),
        _ => format!("{new_label}/{}", change.path),
    };
    let mut out = String::new();
    let empty = Content::Text(String::new());
    let old = change.old.as_ref().unwrap_or(&empty);
    let new = change.new.as_ref().unwrap_or(&empty);
    let (Content::Text(old), Content::Text(new)) = (old, new) else {
        out.push_str(&format!("Binary files {old_name} and {new_name} differ\n"));
        return out;
    };
    out.push_str(&p.paint("1", &format!("--- {old_name}")));
    out.push('\n');
    out.push_str(&p.paint("1", &format!("+++ {new_name}")));
    out.push('\n');
    let diff = TextDiff::from_lines(old.as_str(), new.as_str());
    for hunk in diff.unified_diff().context_radius(CONTEXT).iter_hunks() {
        // Colour line by line from the rendered hunk: simpler than
        // re-implementing the "\ No newline at end of file" handling.
        for line in hunk.to_string().lines() {
            let painted = if line.starts_with("@@") {
                p.paint("36", line)
            } else if line.starts_with('+') {
                p.paint("32", line)
            } else if line.starts_with('-') {
                p.paint("31", line)
            } else {
                line.to_string()
            };
            out.push_str(&painted);
            out.push('\n');
        }
    }
    out
}

/// `3 files changed: 1 added, 2 modified`.
pub fn summary(changes: &[Change]) -> String {
    let count = |k| changes.iter().filter(|c| c.kind == k).count();
    let parts: Vec<String> = [
        (count(Kind::Added), "added"),
        (count(Kind::Removed), "removed"),
        (count(Kind::Modified), "modified"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    match changes.len() {
        0 => "no files changed".to_string(),
        1 => format!("1 file changed: {}", parts.join(", ")),
        n => format!("{n} files changed: {}", parts.join(", ")),
    }
}

/// The step before `step`, or an error for the first one.
pub fn previous<'a>(steps: &'a [Step], step: &Step) -> Result<&'a Step> {
    let i = steps.iter().position(|s| s == step).unwrap_or(0);
    if i == 0 {
        return Err(Error::Usage(format!(
            "step {} is the first step, there is nothing before it to diff against",
            step.id
        )));
    }
    Ok(&steps[i - 1])
}

/// `cargo xtask diff [A] B`
pub fn run(ws: &Workspace, args: Args) -> Result<()> {
    let names = args.positionals(1, 2)?;
    let steps = steps::discover(&ws.root)?;
    let (a, b) = match names.as_slice() {
        [b] => {
            let b = steps::resolve_arg(&steps, b)?;
            (previous(&steps, b)?, b)
        }
        [a, b] => (
            steps::resolve_arg(&steps, a)?,
            steps::resolve_arg(&steps, b)?,
        ),
        _ => unreachable!("positionals(1, 2)"),
    };
    let changes = changed_files(Some(&a.dir), &b.dir, &step_renames(a, b))?;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = changes
        .iter()
        .try_for_each(|c| out.write_all(render(c, &a.dir_name(), &b.dir_name(), color).as_bytes()))
        .and_then(|()| writeln!(out, "{}", summary(&changes)))
        .and_then(|()| out.flush());
    match written {
        // `cargo xtask diff 1 | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(fail(format!("cannot write to stdout: {e}"))),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn recognises_anchor_comments() {
        for line in [
            "// ANCHOR: serve",
            "    // ANCHOR_END: serve\n",
            "<!-- ANCHOR: page -->",
            "# ANCHOR: deps",
            "/* ANCHOR: x */",
            "//! ANCHOR: docs",
            "-- ANCHOR: sql",
            "\t#ANCHOR:tight",
        ] {
            assert!(is_anchor_line(line), "{line:?}");
        }
        for line in [
            "let s = \"ANCHOR: x\";",
            "foo(); // ANCHOR: trailing",
            "ANCHOR: bare text",
            "// an ANCHOR: in prose",
            "// ANCHOR without colon",
            "fn main() {}",
        ] {
            assert!(!is_anchor_line(line), "{line:?}");
        }
    }

    #[test]
    fn strips_anchor_lines_only() {
        let text = "a\n// ANCHOR: x\nb\n    // ANCHOR_END: x\nc";
        assert_eq!(strip_anchors(text), "a\nb\nc");
        assert_eq!(strip_anchors("no anchors\r\n"), "no anchors\r\n");
    }

    #[test]
    fn finds_added_removed_and_modified_files() {
        let a = TempDir::new("diff-a");
        let b = TempDir::new("diff-b");
        a.write("Cargo.toml", "[package]\n");
        b.write("Cargo.toml", "[package]\n");
        // Only an anchor was added: not a change.
        a.write("src/main.rs", "fn main() {}\n");
        b.write(
            "src/main.rs",
            "// ANCHOR: main\nfn main() {}\n// ANCHOR_END: main\n",
        );
        a.write("src/old.rs", "old\n");
        b.write("src/lib.rs", "one\ntwo\n");
        a.write("tests/t.rs", "x\n");
        b.write("tests/t.rs", "y\n");
        // Only the step's own crate name differs: not a change.
        a.write("tests/page.rs", "use step_00_a::app;\n");
        b.write("tests/page.rs", "use step_01_b::app;\n");
        // Never looked at.
        b.write("target/debug/junk", "junk");
        b.write("tests/snapshots/s.snap.new", "pending");
        b.write("tests/snapshots/s.pending-snap", "pending");

        let renames = [("step_00_a".to_owned(), "step_01_b".to_owned())];
        let changes = changed_files(Some(a.path()), b.path(), &renames).unwrap();
        let got: Vec<(&str, Kind)> = changes.iter().map(|c| (c.path.as_str(), c.kind)).collect();
        assert_eq!(
            got,
            [
                ("src/lib.rs", Kind::Added),
                ("src/old.rs", Kind::Removed),
                ("tests/t.rs", Kind::Modified),
            ]
        );
        assert_eq!(
            summary(&changes),
            "3 files changed: 1 added, 1 removed, 1 modified"
        );

        let from_nothing = changed_files(None, a.path(), &[]).unwrap();
        assert!(from_nothing.iter().all(|c| c.kind == Kind::Added));
        assert_eq!(from_nothing.len(), 5);
    }

    #[test]
    fn a_copied_file_naming_its_own_step_is_unchanged() {
        let root = TempDir::new("renames");
        let step = |id: &str, name: &str| Step {
            id: id.into(),
            number: id.parse().unwrap(),
            name: name.into(),
            dir: root.path().join(format!("steps/{id}-{name}")),
        };
        let (old, new) = (step("00", "skeleton"), step("01", "system-chat"));
        // A snapshot header names the step's directory, a test its crate,
        // Cargo.toml its package, a message its run command: all are the
        // step's own name.
        let copy = |dir: &str| {
            format!(
                "source: steps/{dir}/tests/page.rs\nuse step_{}::app;\nname = \"step-{dir}\"\n\
                 // `cargo xtask step {} --redis` starts one\n",
                dir.replace('-', "_"),
                &dir[..2]
            )
        };
        root.write("steps/00-skeleton/tests/x.snap", &copy("00-skeleton"));
        root.write("steps/01-system-chat/tests/x.snap", &copy("01-system-chat"));
        let changes = changed_files(Some(&old.dir), &new.dir, &step_renames(&old, &new)).unwrap();
        assert_eq!(summary(&changes), "no files changed");
    }

    #[test]
    fn renders_readable_headers() {
        let added = Change {
            path: "src/lib.rs".into(),
            kind: Kind::Added,
            old: None,
            new: Some(Content::Text("one\n".into())),
        };
        assert_eq!(
            render(&added, "00-skeleton", "01-system-chat", false),
            "--- /dev/null\n+++ 01-system-chat/src/lib.rs\n@@ -0,0 +1 @@\n+one\n"
        );
        let modified = Change {
            path: "src/main.rs".into(),
            kind: Kind::Modified,
            old: Some(Content::Text("a\nb\n".into())),
            new: Some(Content::Text("a\nc\n".into())),
        };
        let text = render(&modified, "00-skeleton", "01-system-chat", true);
        assert!(text.contains("--- 00-skeleton/src/main.rs"));
        assert!(text.contains("\x1b[31m-b\x1b[0m"));
        assert!(text.contains("\x1b[32m+c\x1b[0m"));
        assert!(text.contains("\x1b[36m@@"));
    }

    #[test]
    fn summary_wording() {
        assert_eq!(summary(&[]), "no files changed");
        let one = Change {
            path: "x".into(),
            kind: Kind::Modified,
            old: None,
            new: None,
        };
        assert_eq!(summary(&[one]), "1 file changed: 1 modified");
    }
}
