//! The tutorial's steps and their chapters: discovery, name resolution, and
//! the `list` and `step` tasks.
//!
//! A step is a directory `steps/NN-name/` holding the package
//! `step-NN-name`; its chapter is `docs/src/chNN-*.md`, titled by its first
//! `# ` heading. Everything here is derived from those names so that adding a
//! step needs no change to xtask.

use std::path::{Path, PathBuf};

use crate::{Args, Error, Result, Workspace, fail};

/// One `steps/NN-name/` directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The number as written in the directory name, e.g. `"01"`.
    pub id: String,
    /// The number as a value, used for ordering and for `cargo xtask step 1`.
    pub number: u32,
    /// The part after the number, e.g. `"system-chat"`.
    pub name: String,
    pub dir: PathBuf,
}

impl Step {
    /// `01-system-chat`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.id, self.name)
    }

    /// `step-01-system-chat`, the package (and binary) name.
    pub fn package(&self) -> String {
        format!("step-{}", self.dir_name())
    }
}

/// Splits `01-system-chat` into (`01`, `system-chat`).
fn parse_dir_name(dir_name: &str) -> Option<(&str, &str)> {
    let (id, name) = dir_name.split_once('-')?;
    let numeric = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    (numeric && !name.is_empty()).then_some((id, name))
}

/// All steps under `<root>/steps`, in order. Directories that don't look like
/// `NN-name` are ignored (there is nothing else there today, but a stray
/// `README.md` or editor directory should not break every task).
pub fn discover(root: &Path) -> Result<Vec<Step>> {
    let steps_dir = root.join("steps");
    let entries = std::fs::read_dir(&steps_dir)
        .map_err(|e| fail(format!("cannot read {}: {e}", steps_dir.display())))?;
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(format!("cannot read {}: {e}", steps_dir.display())))?;
        if !entry.path().is_dir() {
            continue;
        }
        let file_name = entry.file_name();
        let Some((id, name)) = file_name.to_str().and_then(parse_dir_name) else {
            continue;
        };
        let Ok(number) = id.parse() else { continue };
        steps.push(Step {
            id: id.to_string(),
            number,
            name: name.to_string(),
            dir: entry.path(),
        });
    }
    steps.sort_by(|a, b| (a.number, &a.name).cmp(&(b.number, &b.name)));
    // Two steps with one number would make `step 1` and "the previous step"
    // ambiguous, so refuse rather than guess.
    for pair in steps.windows(2) {
        if pair[0].number == pair[1].number {
            return Err(fail(format!(
                "steps/{} and steps/{} have the same number",
                pair[0].dir_name(),
                pair[1].dir_name()
            )));
        }
    }
    if steps.is_empty() {
        return Err(fail(format!(
            "no steps found in {} (expected directories like 00-skeleton)",
            steps_dir.display()
        )));
    }
    Ok(steps)
}

/// Finds the step the user meant by `1`, `01`, `01-system-chat`,
/// `system-chat` or `step-01-system-chat`.
pub fn resolve<'a>(steps: &'a [Step], query: &str) -> Result<&'a Step, String> {
    let query = query.trim_end_matches('/');
    // Allow `steps/01-system-chat` too, which shell completion produces.
    let query = query.strip_prefix("steps/").unwrap_or(query);
    let by_number = |s: &&Step| {
        !query.is_empty()
            && query.bytes().all(|b| b.is_ascii_digit())
            && query.parse() == Ok(s.number)
    };
    let by_name = |s: &&Step| query == s.name || query == s.dir_name() || query == s.package();
    steps
        .iter()
        .find(|s| by_number(s) || by_name(s))
        .ok_or_else(|| {
            let valid: Vec<String> = steps.iter().map(Step::dir_name).collect();
            format!(
                "unknown step '{query}'; valid steps are: {}",
                valid.join(", ")
            )
        })
}

/// Like [`resolve`] but as a task error (a wrong step name is a usage error).
pub fn resolve_arg<'a>(steps: &'a [Step], query: &str) -> Result<&'a Step> {
    resolve(steps, query).map_err(Error::Usage)
}

/// The chapter file `docs/src/chNN-*.md` of a step, if it has been written.
pub fn chapter_path(root: &Path, step: &Step) -> Option<PathBuf> {
    let prefix = format!("ch{}-", step.id);
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("docs/src"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".md")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The chapter title: the first line starting with `# `.
pub fn title_of(markdown: &str) -> Option<String> {
    markdown
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
}

/// A step's chapter as shown to the user: (title, path), with placeholders
/// when the chapter does not exist yet or has no heading.
pub fn chapter_info(ws: &Workspace, step: &Step) -> (String, Option<String>) {
    let Some(path) = chapter_path(&ws.root, step) else {
        return ("(no chapter yet)".into(), None);
    };
    let title = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| title_of(&t))
        .unwrap_or_else(|| "(untitled chapter)".into());
    (title, Some(ws.display(&path)))
}

/// `cargo xtask list`
pub fn run_list(ws: &Workspace, args: Args) -> Result<()> {
    args.positionals(0, 0)?;
    let steps = discover(&ws.root)?;
    let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for step in &steps {
        let (title, _) = chapter_info(ws, step);
        println!("{}  {:<width$}  {title}", step.id, step.name);
    }
    Ok(())
}

/// `cargo xtask step NN [--port P]`
pub fn run_step(ws: &Workspace, mut args: Args) -> Result<()> {
    let port: Option<u16> = args.value("--port")?;
    let query = args.positionals(1, 1)?.remove(0);
    let steps = discover(&ws.root)?;
    let step = resolve_arg(&steps, &query)?;

    match chapter_info(ws, step) {
        (title, Some(path)) => println!("Step {} · {title} — read {path}", step.id),
        (title, None) => println!("Step {} · {} {title}", step.id, step.name),
    }

    let mut cmd = ws.cargo();
    // Not `--quiet`: a first build compiles about a hundred crates, and
    // cargo's progress is what tells the reader it is working, not hung.
    cmd.args(["run", "--package", &step.package()]);
    // The app reads HOST/PORT itself (default 127.0.0.1:8080) and prints the
    // URL it listens on, so we only pass the port through.
    if let Some(port) = port {
        cmd.env("PORT", port.to_string());
    }
    let status = cmd
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    crate::propagate(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn step(id: &str, name: &str) -> Step {
        Step {
            id: id.into(),
            number: id.parse().unwrap(),
            name: name.into(),
            dir: PathBuf::from(format!("steps/{id}-{name}")),
        }
    }

    fn sample() -> Vec<Step> {
        vec![step("00", "skeleton"), step("01", "system-chat")]
    }

    #[test]
    fn resolves_every_spelling() {
        let steps = sample();
        for q in [
            "1",
            "01",
            "001",
            "01-system-chat",
            "system-chat",
            "step-01-system-chat",
            "steps/01-system-chat/",
        ] {
            assert_eq!(resolve(&steps, q).unwrap().name, "system-chat", "{q}");
        }
        assert_eq!(resolve(&steps, "0").unwrap().name, "skeleton");
    }

    #[test]
    fn unknown_step_lists_valid_ones() {
        let steps = sample();
        for q in ["7", "", "chat", "01-system", "-1"] {
            let err = resolve(&steps, q).unwrap_err();
            assert!(err.contains("00-skeleton, 01-system-chat"), "{err}");
        }
    }

    #[test]
    fn parses_dir_names() {
        assert_eq!(
            parse_dir_name("01-system-chat"),
            Some(("01", "system-chat"))
        );
        assert_eq!(parse_dir_name("README"), None);
        assert_eq!(parse_dir_name("x1-foo"), None);
        assert_eq!(parse_dir_name("01-"), None);
    }

    #[test]
    fn discovers_steps_in_order() {
        let tmp = TempDir::new("discover");
        tmp.write("steps/10-later/Cargo.toml", "");
        tmp.write("steps/02-room-chat/Cargo.toml", "");
        tmp.write("steps/00-skeleton/Cargo.toml", "");
        tmp.write("steps/notes/x", "");
        tmp.write("steps/README.md", "");
        let steps = discover(tmp.path()).unwrap();
        let names: Vec<String> = steps.iter().map(Step::dir_name).collect();
        assert_eq!(names, ["00-skeleton", "02-room-chat", "10-later"]);
        assert_eq!(steps[1].package(), "step-02-room-chat");
    }

    #[test]
    fn duplicate_numbers_are_an_error() {
        let tmp = TempDir::new("dup");
        tmp.write("steps/01-a/Cargo.toml", "");
        tmp.write("steps/01-b/Cargo.toml", "");
        assert!(discover(tmp.path()).is_err());
    }

    #[test]
    fn finds_chapter_and_title() {
        let tmp = TempDir::new("chapter");
        tmp.write(
            "docs/src/ch01-system-messages.md",
            "<!-- intro -->\n#not a heading\n# System messages  \n\n## Sub\n",
        );
        let ws = Workspace {
            root: tmp.path().to_path_buf(),
        };
        let s1 = step("01", "system-chat");
        assert_eq!(
            chapter_info(&ws, &s1),
            (
                "System messages".to_string(),
                Some("docs/src/ch01-system-messages.md".to_string())
            )
        );
        // ch10 must not be mistaken for ch1x's chapter, nor vice versa.
        let s10 = step("10", "later");
        assert_eq!(chapter_info(&ws, &s10), ("(no chapter yet)".into(), None));
        assert_eq!(title_of("no heading"), None);
    }
}
