//! Golden files for the operator's integration tests: compare, or rewrite with `UPDATE_GOLDEN=1`.

use std::path::{Path, PathBuf};

/// `operator/tests/`.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Asserts that `actual` equals the golden file `tests/golden/<dir>/<name>`; with
/// `UPDATE_GOLDEN` set, writes it instead.
pub fn assert_golden(dir: &str, name: &str, actual: &str) {
    let path = tests_dir().join("golden").join(dir).join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        expected, actual,
        "{name} differs from the golden file; if the change is intended, rerun with UPDATE_GOLDEN=1"
    );
}
