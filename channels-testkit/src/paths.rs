//! Where the workspace and the scratch directory are, found when a test
//! runs rather than compiled in, so that a test binary built in one place
//! works from another checkout, another target directory, or by hand.

use std::path::{Path, PathBuf};

/// The variable that names the workspace root outright: for a test binary
/// run from outside the checkout, where walking up finds nothing.
pub const ROOT_VAR: &str = "CHANNELS_TESTKIT_ROOT";

/// The workspace root: [`ROOT_VAR`] when set, otherwise the first
/// directory, from the current one up, whose `Cargo.toml` has a
/// `[workspace]` table. Cargo runs each test in its package's directory,
/// and every package of the workspace is below the root.
///
/// Panics (failing the test) when there is none: the scripts the harnesses
/// run are files of the checkout, and there is no checkout to find them in.
pub fn workspace_root() -> PathBuf {
    if let Some(root) = env_path(ROOT_VAR) {
        return root;
    }
    let here = std::env::current_dir().expect("read the current directory");
    find_root(&here).unwrap_or_else(|| {
        panic!(
            "no Cargo.toml with [workspace] in {} or above it; run the test through cargo \
             from the checkout, or set {ROOT_VAR} to the checkout",
            here.display()
        )
    })
}

/// The first of `start` and its ancestors that is a workspace root.
pub fn find_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| is_workspace_root(dir))
        .map(Path::to_path_buf)
}

fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|manifest| {
        manifest
            .lines()
            .any(|line| line.trim_start().starts_with("[workspace]"))
    })
}

/// A directory for what is worth keeping between runs (the Python
/// virtualenv), inside the target directory so that `cargo clean` removes
/// it. In order:
///
/// 1. `CARGO_TARGET_TMPDIR`, when it is in the environment (cargo's
///    directory for integration tests' data; cargo only compiles it into
///    them, so it is here when a runner or a person exports it);
/// 2. `tmp/` in `CARGO_TARGET_DIR`, when set (a relative one is taken
///    relative to the workspace root, where cargo is usually run);
/// 3. `tmp/` in the target directory the running test binary lives in
///    (`<target>/<profile>/deps/<test>`);
/// 4. `<root>/target/tmp`.
pub fn scratch_dir() -> PathBuf {
    if let Some(dir) = env_path("CARGO_TARGET_TMPDIR") {
        return dir;
    }
    if let Some(dir) = env_path("CARGO_TARGET_DIR") {
        let dir = if dir.is_relative() {
            workspace_root().join(dir)
        } else {
            dir
        };
        return dir.join("tmp");
    }
    if let Some(target) = running_target_dir() {
        return target.join("tmp");
    }
    workspace_root().join("target/tmp")
}

/// The target directory of the running test binary, if it lives in one.
fn running_target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.ancestors().find(|dir| dir.ends_with("deps"))?;
    Some(deps.parent()?.parent()?.to_path_buf())
}

/// The path in the variable `name`, if it is set and not empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_found_from_below_it() {
        // Cargo runs unit tests in the package's directory.
        let here = std::env::current_dir().unwrap();
        let root = find_root(&here).expect("the workspace root");
        assert_eq!(
            root,
            here.parent().unwrap(),
            "channels-testkit/ is one below"
        );
        assert_eq!(find_root(&root.join("channels-testkit/src")), Some(root));
    }

    #[test]
    fn a_package_manifest_is_not_a_root() {
        let here = std::env::current_dir().unwrap();
        assert!(!is_workspace_root(&here));
    }
}
