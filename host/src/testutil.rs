//! Helpers shared by the host crate's tests.

use std::path::PathBuf;

/// A fresh empty directory under the system temp dir, removed on drop: its path, and
/// the `tempfile` guard that owns it.
pub(crate) struct TempDir(pub(crate) PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    /// A new directory whose name starts with `tag` (to tell them apart when a test
    /// fails); `tempfile` makes it unique.
    pub(crate) fn new(tag: &str) -> TempDir {
        let guard = tempfile::Builder::new()
            .prefix(&format!("inferd-host-{tag}-"))
            .tempdir()
            .expect("create a temp dir");
        TempDir(guard.path().to_path_buf(), guard)
    }

    /// A path inside the directory.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
