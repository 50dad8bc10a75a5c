//! Real git repositories for tests: a directory of files committed on `main`, reached by a
//! `file://` URL as a caller's remote would be.

use std::{path::Path, process::Command};

/// Runs `git` in `dir` with no user or system configuration, failing the test on error.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes `files` (path, content) into `dir`, commits them on `main` and returns the
/// repository's `file://` URL.
pub fn repository(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "test"]);
    format!("file://{}", dir.display())
}
