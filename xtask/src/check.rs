//! The `check` task: keeps the book and the code in step.
//!
//! 1. The whole workspace builds (all targets, so tests and examples too).
//! 2. Every `{{#include ...}}` / `{{#rustdoc_include ...}}` in `docs/src`
//!    points at an existing file, and at an existing anchor when one is
//!    named. Line ranges are refused: they silently go stale when the code
//!    above them changes, named anchors don't.
//! 3. Every file that changes from one step to the next is named in the next
//!    step's chapter, so a reader following the book never meets a change the
//!    text did not mention. Step 00 is compared with an empty directory.
//! 4. Every code block that includes a file is introduced by a line naming
//!    that file ("In `src/room_chat.rs`:"), as the Rust Book's style guide
//!    asks: a reader typing along must know where the code goes, and a
//!    heading about another file a few paragraphs up is not enough.
//! 5. Snapshots are reviewed, asserted by a test, and say which test wrote
//!    them (see [`crate::snapshots`]).
//! 6. Every picture a page shows (`![what](img/step-01.png)`) exists: the
//!    browser tests take them (`cargo xtask screenshots`), and a renamed
//!    or forgotten one would be a broken image in the book.
//!
//! All problems are collected and reported together, one per line.

use std::path::{Path, PathBuf};

use crate::diff::{self, Kind};
use crate::snapshots;
use crate::steps::{self, Step};
use crate::{Args, Result, Workspace, fail, normalize, read_text};

/// What an include asks for after the path.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// `{{#include file}}` (or `file:`): the whole file.
    Whole,
    /// `{{#include file:name}}`.
    Anchor(String),
    /// `{{#include file:10:20}}`, `file:10`, `file::20`...
    Lines,
}

/// One include directive found in a markdown file.
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    /// 1-based line of the directive.
    pub line: usize,
    /// The directive as written, for messages.
    pub directive: String,
    /// The path as written, relative to the markdown file's directory.
    pub path: String,
    pub selector: Selector,
}

/// Finds the include directives in `markdown`, following mdBook's syntax:
/// `{{ #include path[:anchor-or-range] }}`, with `\{{#include ...}}` being an
/// escaped, literal directive that mdBook leaves alone.
pub fn parse_includes(markdown: &str) -> Vec<Include> {
    let mut found = Vec::new();
    for (index, line) in markdown.lines().enumerate() {
        let mut pos = 0;
        while let Some(offset) = line[pos..].find("{{") {
            let start = pos + offset;
            let Some(len) = line[start..].find("}}") else {
                break;
            };
            let directive = &line[start..start + len + 2];
            pos = start + len + 2;
            if line[..start].ends_with('\\') {
                continue;
            }
            let inner = directive[2..directive.len() - 2].trim_start();
            let Some(inner) = inner.strip_prefix('#') else {
                continue;
            };
            let kind_len = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let (kind, args) = inner.split_at(kind_len);
            if kind != "include" && kind != "rustdoc_include" {
                continue;
            }
            // mdBook takes the first whitespace-separated word as the file
            // argument, and splits it at the first `:`.
            let arg = args.split_whitespace().next().unwrap_or("");
            let (path, selector) = match arg.split_once(':') {
                None => (arg, Selector::Whole),
                Some((path, rest)) => (path, parse_selector(rest)),
            };
            found.push(Include {
                line: index + 1,
                directive: directive.to_string(),
                path: path.to_string(),
                selector,
            });
        }
    }
    found
}

/// What follows `path:` — mirrors mdBook: a number (or an empty start
/// followed by more) is a line range, anything else names an anchor.
fn parse_selector(rest: &str) -> Selector {
    let first = rest.split(':').next().unwrap_or("");
    if first.is_empty() {
        if rest.is_empty() {
            Selector::Whole
        } else {
            Selector::Lines
        }
    } else if first.parse::<usize>().is_ok() {
        Selector::Lines
    } else {
        Selector::Anchor(first.to_string())
    }
}

/// The anchor name after `marker` on `line`, as mdBook reads it
/// (`ANCHOR:\s*[\w-]+`), anywhere on the line.
fn marker_name<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line[line.find(marker)? + marker.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Why the anchor `name` cannot be included from `text`, if it can't.
/// The end must come after the start: otherwise mdBook includes everything
/// to the end of the file.
pub fn anchor_problem(text: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let is = |l: &&str, marker| marker_name(l, marker) == Some(name);
    let start = lines.iter().position(|l| is(l, "ANCHOR:"));
    let end_exists = lines.iter().any(|l| is(l, "ANCHOR_END:"));
    match start {
        None if end_exists => Some(format!("ANCHOR_END: {name} has no matching ANCHOR: {name}")),
        None => Some(format!("no anchor '{name}'")),
        Some(s) if !lines[s..].iter().any(|l| is(l, "ANCHOR_END:")) => Some(format!(
            "anchor '{name}' has no ANCHOR_END: {name} after it"
        )),
        Some(_) => None,
    }
}

/// Checks that `include`, found in a markdown file of directory `md_dir`,
/// can be resolved; the error is the part of the message after the directive.
pub fn check_include(ws: &Workspace, md_dir: &Path, include: &Include) -> Result<(), String> {
    if include.path.is_empty() {
        return Err("no file given".into());
    }
    if include.selector == Selector::Lines {
        return Err("use a named anchor, not line numbers".into());
    }
    let target = normalize(&md_dir.join(&include.path));
    let shown = ws.display(&target);
    if !target.is_file() {
        return Err(format!("file not found: {shown}"));
    }
    if let Selector::Anchor(name) = &include.selector {
        let text =
            std::fs::read_to_string(&target).map_err(|e| format!("cannot read {shown}: {e}"))?;
        if let Some(problem) = anchor_problem(&text, name) {
            return Err(format!("{problem} in {shown}"));
        }
    }
    Ok(())
}

/// Characters that can continue a file or directory name. Used to make sure a
/// mention is the whole path, not a piece of a longer one.
fn name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-' || c == '.'
}

/// Whether `needle` occurs in `text` with nothing name-like right before it
/// and with `end_ok` accepting what follows it.
fn mentions(text: &str, needle: &str, end_ok: impl Fn(&str) -> bool) -> bool {
    text.match_indices(needle).any(|(i, _)| {
        let before_ok = !text[..i].chars().next_back().is_some_and(name_char);
        before_ok && end_ok(&text[i + needle.len()..])
    })
}

/// Whether what follows a file name ends it: punctuation such as a
/// sentence's final `.` or an include's `:anchor`, but not a longer name
/// (`lib.rs.bak`).
fn file_end(after: &str) -> bool {
    let mut chars = after.chars();
    match chars.next() {
        None => true,
        Some('.') => !chars.next().is_some_and(char::is_alphanumeric),
        Some(c) => !(name_char(c) || c == '/'),
    }
}

/// Whether a chapter names `path` (relative to the step directory, with `/`):
/// either the path itself, or one of its directories written with a trailing
/// `/` (`tests/snapshots/` covers every snapshot).
///
/// A directory only counts when it is mentioned on its own: `src/` inside
/// `src/main.rs` names `src/main.rs`, not every file of `src/`. Otherwise any
/// chapter that shows one source file would cover all of them.
pub fn names_file(chapter: &str, path: &str) -> bool {
    let dir_end = |after: &str| !after.chars().next().is_some_and(name_char);
    if mentions(chapter, path, file_end) {
        return true;
    }
    path.match_indices('/')
        .any(|(i, _)| mentions(chapter, &path[..=i], dir_end))
}

/// How many lines, at most, of the paragraph before a code block count as
/// its caption: enough for a sentence that wraps, not so many that a file
/// named far above would do.
const CAPTION_LINES: usize = 3;

/// Whether `line` opens or closes a fenced code block.
fn is_fence(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("```") || line.starts_with("~~~")
}

/// For each line of `markdown`, the index of the opening fence of the code
/// block it is in, if it is inside one.
fn enclosing_fences(lines: &[&str]) -> Vec<Option<usize>> {
    let mut open = None;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if is_fence(line) {
                open = match open {
                    None => Some(i),
                    Some(_) => None,
                };
                None
            } else {
                open
            }
        })
        .collect()
}

/// The caption of the code block opening at `fence`: the last lines (at most
/// [`CAPTION_LINES`]) of the paragraph just before it, which may be a heading.
/// Nothing is taken from an earlier code block.
pub fn caption(lines: &[&str], fence: usize) -> String {
    let mut end = fence;
    while end > 0 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    let mut start = end;
    while start > 0
        && end - start < CAPTION_LINES
        && !lines[start - 1].trim().is_empty()
        && !is_fence(lines[start - 1])
    {
        start -= 1;
    }
    lines[start..end].join("\n")
}

/// The names by which a caption may point at the included `path`: its file
/// name, and for an insta snapshot (`page__page_and_assets.snap`) also the
/// snapshot's name, which is its test's name.
fn caption_names(path: &str) -> Vec<&str> {
    let file = path.rsplit('/').next().unwrap_or(path);
    let mut names = vec![file];
    if let Some((_, snapshot)) = file.strip_suffix(".snap").and_then(|s| s.split_once("__")) {
        names.push(snapshot);
    }
    names
}

/// Rule 4 for one markdown text: each include inside a code block, and
/// whether its caption names the included file. Includes outside code blocks
/// pull in prose and need no caption.
pub fn listing_captions(markdown: &str) -> Vec<(Include, bool)> {
    let lines: Vec<&str> = markdown.lines().collect();
    let fences = enclosing_fences(&lines);
    parse_includes(markdown)
        .into_iter()
        .filter_map(|include| {
            let fence = fences.get(include.line - 1).copied().flatten()?;
            let text = caption(&lines, fence);
            let named = caption_names(&include.path)
                .iter()
                .any(|name| !name.is_empty() && mentions(&text, name, file_end));
            Some((include, named))
        })
        .collect()
}

/// One image link found in a markdown file.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    /// 1-based line of the link.
    pub line: usize,
    /// The path as written, relative to the markdown file's directory.
    pub path: String,
}

/// The image links (`![alt](path)`, `![alt](path "title")`) of `markdown`,
/// outside code blocks and inline code; links to other sites (`https:`,
/// `data:` ...) are not files of the book and are left out.
pub fn parse_pictures(markdown: &str) -> Vec<Picture> {
    let lines: Vec<&str> = markdown.lines().collect();
    let fences = enclosing_fences(&lines);
    let mut found = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        if is_fence(line) || fences[index].is_some() {
            continue;
        }
        // Inline code is every other piece between backticks.
        let prose = line.split('`').step_by(2);
        for piece in prose {
            let mut rest = piece;
            while let Some(start) = rest.find("![") {
                rest = &rest[start + 2..];
                let Some(close) = rest.find("](") else {
                    break;
                };
                let target = &rest[close + 2..];
                let Some(end) = target.find(')') else {
                    break;
                };
                let inside = &target[..end];
                // `<a path with spaces>`, or a path up to an optional title.
                let path = match inside.strip_prefix('<') {
                    Some(bracketed) => bracketed.split('>').next().unwrap_or(""),
                    None => inside.split_whitespace().next().unwrap_or(""),
                };
                rest = &target[end..];
                if path.contains(':') {
                    continue;
                }
                found.push(Picture {
                    line: index + 1,
                    path: path.to_string(),
                });
            }
        }
    }
    found
}

/// Rule 6: every picture the book shows exists. Returns how many do.
fn check_pictures(ws: &Workspace, problems: &mut Vec<String>) -> Result<usize> {
    let mut found = 0;
    for md in markdown_files(&ws.root.join("docs/src")) {
        let md_dir = md.parent().unwrap_or(&ws.root);
        for picture in parse_pictures(&read_text(&md)?) {
            let target = normalize(&md_dir.join(&picture.path));
            if !picture.path.is_empty() && target.is_file() {
                found += 1;
                continue;
            }
            problems.push(format!(
                "{}:{}: picture not found: {} (`cargo xtask screenshots` takes the pages' pictures)",
                ws.display(&md),
                picture.line,
                ws.display(&target),
            ));
        }
    }
    Ok(found)
}

/// Every `.md` file under `dir`, sorted.
fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Rule 2: the includes of every markdown file. Returns how many resolved.
fn check_includes(ws: &Workspace, problems: &mut Vec<String>) -> Result<usize> {
    let mut resolved = 0;
    for md in markdown_files(&ws.root.join("docs/src")) {
        let text = read_text(&md)?;
        let md_dir = md.parent().unwrap_or(&ws.root);
        for include in parse_includes(&text) {
            match check_include(ws, md_dir, &include) {
                Ok(()) => resolved += 1,
                Err(why) => problems.push(format!(
                    "{}:{}: {}: {why}",
                    ws.display(&md),
                    include.line,
                    include.directive
                )),
            }
        }
    }
    Ok(resolved)
}

/// Rule 4: every included listing is introduced by its file's name.
/// Returns how many captions named their file.
fn check_captions(ws: &Workspace, problems: &mut Vec<String>) -> Result<usize> {
    let mut captioned = 0;
    for md in markdown_files(&ws.root.join("docs/src")) {
        let md_dir = md.parent().unwrap_or(&ws.root);
        for (include, named) in listing_captions(&read_text(&md)?) {
            if named {
                captioned += 1;
                continue;
            }
            let shown = ws.display(&md_dir.join(&include.path));
            problems.push(format!(
                "{}:{}: the code block including {shown} does not say which file it shows: \
                 name it in the line just before the block, e.g. \"In `{}`:\"",
                ws.display(&md),
                include.line,
                in_step(&shown),
            ));
        }
    }
    Ok(captioned)
}

/// `path` as a reader of a step's chapter knows it: relative to its step's
/// directory (`src/room_chat.rs`), or as it is when outside the steps.
fn in_step(path: &str) -> &str {
    path.strip_prefix("steps/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(path, |(_, in_step)| in_step)
}

/// Rule 3: each step's chapter names the files changed since the previous
/// step. Returns how many changed files were named.
fn check_chapters(ws: &Workspace, steps: &[Step], problems: &mut Vec<String>) -> Result<usize> {
    let mut named = 0;
    for (i, step) in steps.iter().enumerate() {
        let prev = i.checked_sub(1).map(|j| &steps[j]);
        let renames = prev.map_or_else(Vec::new, |p| diff::step_renames(p, step));
        let changes = diff::changed_files(prev.map(|p| p.dir.as_path()), &step.dir, &renames)?;
        if changes.is_empty() {
            continue;
        }
        let Some(chapter) = steps::chapter_path(&ws.root, step) else {
            problems.push(format!(
                "steps/{}: no chapter docs/src/ch{}-*.md to explain its {} changed file(s)",
                step.dir_name(),
                step.id,
                changes.len()
            ));
            continue;
        };
        // A chapter split into sub-chapters names its files on any page.
        let mut text = read_text(&chapter)?;
        for page in steps::sub_chapter_paths(&ws.root, step) {
            text.push_str(&read_text(&page)?);
        }
        for change in &changes {
            if names_file(&text, &change.path) {
                named += 1;
                continue;
            }
            let why = match (prev, change.kind) {
                (None, _) => format!("a file of step {}", step.id),
                (Some(p), Kind::Added) => format!("added since step {}", p.id),
                (Some(p), Kind::Removed) => format!("removed since step {}", p.id),
                (Some(p), Kind::Modified) => format!("differs from step {}", p.id),
            };
            problems.push(format!(
                "{}: does not name {} ({why})",
                ws.display(&chapter),
                change.path
            ));
        }
    }
    Ok(named)
}

/// `cargo xtask check [--no-build]`
pub fn run(ws: &Workspace, mut args: Args) -> Result<()> {
    let no_build = args.flag("--no-build");
    args.positionals(0, 0)?;
    let steps = steps::discover(&ws.root)?;
    let mut problems = Vec::new();

    if !no_build {
        // Cargo prints its own errors; we only record that it failed and go
        // on, so the book problems are reported in the same run.
        let status = ws
            .cargo()
            .args(["build", "--workspace", "--all-targets"])
            .status()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        if !status.success() {
            problems.push(format!(
                "cargo build --workspace --all-targets failed ({status})"
            ));
        }
    }
    let resolved = check_includes(ws, &mut problems)?;
    let named = check_chapters(ws, &steps, &mut problems)?;
    let captioned = check_captions(ws, &mut problems)?;
    let snapshots = snapshots::check(ws, &mut problems)?;
    let pictures = check_pictures(ws, &mut problems)?;

    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        return Err(fail(format!(
            "check found {} problem{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        )));
    }
    let built = if no_build {
        format!("{} steps (build skipped)", steps.len())
    } else {
        format!("{} steps built", steps.len())
    };
    println!(
        "check: {built}, {resolved} includes resolved, {named} changed files named in their \
         chapters, {captioned} listings captioned, {snapshots} snapshots asserted by their tests, \
         {pictures} pictures found"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn one(markdown: &str) -> Include {
        let mut all = parse_includes(markdown);
        assert_eq!(all.len(), 1, "{markdown}: {all:?}");
        all.remove(0)
    }

    #[test]
    fn parses_include_forms() {
        let inc = one("```rust\n{{#include ../../steps/01-x/src/main.rs:serve}}\n```");
        assert_eq!(inc.line, 2);
        assert_eq!(inc.path, "../../steps/01-x/src/main.rs");
        assert_eq!(inc.selector, Selector::Anchor("serve".into()));
        assert_eq!(
            inc.directive,
            "{{#include ../../steps/01-x/src/main.rs:serve}}"
        );

        assert_eq!(one("{{#include a.rs}}").selector, Selector::Whole);
        assert_eq!(one("{{#include a.rs:}}").selector, Selector::Whole);
        assert_eq!(one("{{ #include  a.rs }}").path, "a.rs");
        let rd = one("{{#rustdoc_include a.rs:main}}");
        assert_eq!(rd.selector, Selector::Anchor("main".into()));
        for lines in ["a.rs:10:20", "a.rs:10", "a.rs:10:", "a.rs::20"] {
            assert_eq!(
                one(&format!("{{{{#include {lines}}}}}")).selector,
                Selector::Lines,
                "{lines}"
            );
        }
    }

    #[test]
    fn ignores_escapes_and_other_directives() {
        assert!(parse_includes(r"\{{#include a.rs}}").is_empty());
        assert!(parse_includes("{{#title Hello}} {{#playground a.rs}} {{ not }}").is_empty());
        let two = parse_includes("{{#include a.rs}} and {{#include b.rs:x}}");
        assert_eq!(two.len(), 2);
        assert_eq!(two[1].path, "b.rs");
    }

    #[test]
    fn anchor_problems() {
        let text = "// ANCHOR: a\nx\n// ANCHOR_END: a\n# ANCHOR: b\n<!-- ANCHOR_END: c -->\n";
        assert_eq!(anchor_problem(text, "a"), None);
        assert!(anchor_problem(text, "b").unwrap().contains("no ANCHOR_END"));
        assert!(
            anchor_problem(text, "c")
                .unwrap()
                .contains("no matching ANCHOR")
        );
        assert_eq!(anchor_problem(text, "d").unwrap(), "no anchor 'd'");
        // A prefix of a longer anchor name is not that anchor.
        assert_eq!(
            anchor_problem("// ANCHOR: ab\n// ANCHOR_END: ab\n", "a").unwrap(),
            "no anchor 'a'"
        );
        // End before start.
        assert!(anchor_problem("// ANCHOR_END: e\n// ANCHOR: e\n", "e").is_some());
    }

    #[test]
    fn resolves_includes_relative_to_the_chapter() {
        let tmp = TempDir::new("includes");
        let ws = Workspace {
            root: tmp.path().to_path_buf(),
        };
        tmp.write(
            "steps/01-x/src/main.rs",
            "fn a() {}\n// ANCHOR: serve\nserve();\n// ANCHOR_END: serve\n",
        );
        let md_dir = tmp.path().join("docs/src");
        let check = |directive: &str| check_include(&ws, &md_dir, &one(directive));

        assert_eq!(check("{{#include ../../steps/01-x/src/main.rs}}"), Ok(()));
        assert_eq!(
            check("{{#include ../../steps/01-x/src/main.rs:serve}}"),
            Ok(())
        );
        assert_eq!(
            check("{{#include ../../steps/01-x/src/main.rs:nope}}"),
            Err("no anchor 'nope' in steps/01-x/src/main.rs".into())
        );
        assert_eq!(
            check("{{#include ../../steps/01-x/src/lib.rs}}"),
            Err("file not found: steps/01-x/src/lib.rs".into())
        );
        assert_eq!(
            check("{{#include ../../steps/01-x/src/main.rs:2:3}}"),
            Err("use a named anchor, not line numbers".into())
        );
    }

    #[test]
    fn chapter_names_files_or_their_directories() {
        let chapter = "We add `src/system_chat.rs` and edit Cargo.toml.\n\
                       The snapshots live in `tests/snapshots/`.\n\
                       {{#include ../../steps/01-x/src/main.rs:serve}}\n\
                       See also src/lib.rs.\n";
        assert!(names_file(chapter, "src/system_chat.rs"));
        assert!(names_file(chapter, "Cargo.toml"));
        assert!(names_file(chapter, "tests/snapshots/a__b.snap"));
        assert!(names_file(chapter, "src/main.rs"), "named by the include");
        assert!(names_file(chapter, "src/lib.rs"), "sentence-final dot");
        // `src/` appears only as part of longer paths: it names no directory.
        assert!(!names_file(chapter, "src/other.rs"));
        assert!(!names_file(chapter, "tests/system_chat.rs"));
        // Pieces of longer names don't count.
        assert!(!names_file("see xsrc/main.rs", "src/main.rs"));
        assert!(!names_file("see src/main.rs.bak", "src/main.rs"));
        assert!(!names_file("see src/main.rsx", "src/main.rs"));
        assert!(!names_file("Cargo.tomlish", "Cargo.toml"));
        // A directory mention covers nested files too.
        assert!(names_file(
            "everything in tests/ changed",
            "tests/snapshots/x.snap"
        ));
    }

    /// The paths of the includes whose caption does not name them.
    fn uncaptioned(markdown: &str) -> Vec<String> {
        listing_captions(markdown)
            .into_iter()
            .filter(|(_, named)| !named)
            .map(|(include, _)| include.path)
            .collect()
    }

    #[test]
    fn a_listing_is_introduced_by_its_file_name() {
        let named = [
            "In `src/room_chat.rs`:\n\n```rust\n{{#include ../../steps/02-x/src/room_chat.rs:new}}\n```\n",
            // The file name alone, in the last lines of a wrapped paragraph.
            "A long sentence that explains\nwhat `room_chat.rs` does and wraps\nover three lines:\n\
             ```rust\n{{#include ../../steps/02-x/src/room_chat.rs}}\n```\n",
            // A heading right above the block is a caption too.
            "## The binary: `src/main.rs`\n\n```rust\n{{#include ../../steps/00-x/src/main.rs:main}}\n```\n",
            // A snapshot is named by its file or by its test.
            "The test `two_in_a_room`:\n\n```text\n\
             {{#include ../../steps/02-x/tests/snapshots/room_chat__two_in_a_room.snap}}\n```\n",
            "From `room_chat__two_in_a_room.snap`:\n```text\n\
             {{#include ../../steps/02-x/tests/snapshots/room_chat__two_in_a_room.snap}}\n```\n",
            // Not in a code block: an included piece of prose.
            "Some text.\n\n{{#include ../shared.md}}\n",
        ];
        for markdown in named {
            assert!(uncaptioned(markdown).is_empty(), "{markdown}");
        }
    }

    #[test]
    fn a_listing_under_another_files_name_fails() {
        let unnamed = [
            // The heading names another file (the review's ch02 example).
            "## Configuring the layers: `src/layers.rs`\n\nA consumer names the alias:\n\n\
             ```rust\n{{#include ../../steps/02-x/src/room_chat.rs:layer}}\n```\n",
            // Named, but four lines up: too far to be a caption.
            "In `room_chat.rs`\none\ntwo\nthree:\n```rust\n{{#include ../room_chat.rs}}\n```\n",
            // Named only in the paragraph before the nearest one.
            "In `room_chat.rs`:\n\nSomething else:\n\n```rust\n{{#include ../room_chat.rs}}\n```\n",
            // Named only inside the previous code block.
            "```text\nroom_chat.rs\n```\n```rust\n{{#include ../room_chat.rs}}\n```\n",
            // A longer name is not the file's name.
            "In `old_room_chat.rs`:\n```rust\n{{#include ../room_chat.rs}}\n```\n",
            // A snapshot's module alone does not say which snapshot.
            "In `room_chat.rs`:\n```text\n{{#include s/room_chat__two.snap}}\n```\n",
        ];
        for markdown in unnamed {
            assert_eq!(uncaptioned(markdown).len(), 1, "{markdown}");
        }
        // Each include of a block must be named, in a block that is not the first.
        let two = "```rust\nfn x() {}\n```\n\nIn `a.rs`:\n```rust\n{{#include a.rs}}\n{{#include b.rs}}\n```\n";
        assert_eq!(uncaptioned(two), ["b.rs"]);
    }

    #[test]
    fn suggests_the_path_within_the_step() {
        assert_eq!(in_step("steps/02-x/src/room_chat.rs"), "src/room_chat.rs");
        assert_eq!(
            in_step("axum-channels/src/runner.rs"),
            "axum-channels/src/runner.rs"
        );
    }

    #[test]
    fn finds_the_pictures_a_page_shows() {
        let markdown = "Open the page:\n\n![The page of step 01](img/step-01.png)\n\
                        Two: ![a](a.png) and ![b](<b c.png> \"title\").\n\
                        ```md\n![in a code block](no.png)\n```\n\
                        Not `![inline code](no.png)`, not ![remote](https://x.org/y.png).\n\
                        A [link](page.md) is no picture.\n";
        let found: Vec<(usize, String)> = parse_pictures(markdown)
            .into_iter()
            .map(|p| (p.line, p.path))
            .collect();
        assert_eq!(
            found,
            [
                (3, "img/step-01.png".to_string()),
                (4, "a.png".to_string()),
                (4, "b c.png".to_string()),
            ]
        );
    }

    #[test]
    fn a_missing_picture_is_a_problem() {
        let tmp = TempDir::new("pictures");
        let ws = Workspace {
            root: tmp.path().to_path_buf(),
        };
        tmp.write("docs/src/img/step-01.png", "png");
        tmp.write(
            "docs/src/ch01-x.md",
            "![there](img/step-01.png)\n\n![gone](img/step-02.png)\n",
        );
        let mut problems = Vec::new();
        assert_eq!(check_pictures(&ws, &mut problems).unwrap(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("docs/src/ch01-x.md:3: picture not found: docs/src/img/step-02.png"),
            "{problems:?}"
        );
    }

    #[test]
    fn finds_markdown_recursively() {
        let tmp = TempDir::new("md");
        tmp.write("b.md", "");
        tmp.write("sub/a.md", "");
        tmp.write("c.txt", "");
        let found: Vec<String> = markdown_files(tmp.path())
            .iter()
            .map(|p| crate::slash_path(p.strip_prefix(tmp.path()).unwrap()))
            .collect();
        assert_eq!(found, ["b.md", "sub/a.md"]);
    }
}
