//! A ConfigMap volume as the kubelet lays it out on a node.
//!
//! The kubelet's atomic writer keeps each version of the ConfigMap in a
//! timestamped directory and points the visible names at it through one
//! symlink, `..data`:
//!
//! ```text
//! /etc/retryctl/
//!   ..2026_01_01_00_00_00.000000001/   gateway.toml, policy.toml
//!   ..data -> ..2026_01_01_00_00_00.000000001
//!   gateway.toml -> ..data/gateway.toml
//!   policy.toml -> ..data/policy.toml
//! ```
//!
//! An update writes the new version's directory, creates `..data_tmp`
//! pointing at it, renames `..data_tmp` over `..data` (the one atomic
//! step), and removes the old directory. The visible names never change,
//! so a watch on `policy.toml` itself sees nothing; a subPath mount is a
//! bind mount of the file resolved at container start and sees no update
//! at all.

use std::os::unix::fs::symlink;
use std::path::Path;

/// A temporary directory laid out like a ConfigMap volume. Removed when
/// dropped.
pub(crate) struct ConfigMapVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ConfigMapVolume {
    /// A volume holding `files` (name, content) as the first version.
    pub(crate) fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut volume = ConfigMapVolume { dir, generation: 0 };
        let first = volume.write_version(files);
        symlink(&first, volume.path().join("..data")).expect("..data symlink");
        for (name, _) in files {
            symlink(format!("..data/{name}"), volume.path().join(name)).expect("file symlink");
        }
        volume
    }

    /// The mount point: where the visible names are.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the content the way the kubelet does: a new version
    /// directory, `..data_tmp` renamed over `..data`, the old directory
    /// removed. `files` must name the same files as before.
    pub(crate) fn update(&mut self, files: &[(&str, &str)]) {
        let old = std::fs::read_link(self.path().join("..data")).expect("read ..data");
        let new = self.write_version(files);
        let tmp = self.path().join("..data_tmp");
        symlink(&new, &tmp).expect("..data_tmp symlink");
        std::fs::rename(&tmp, self.path().join("..data")).expect("rename ..data_tmp over ..data");
        std::fs::remove_dir_all(self.path().join(old)).expect("remove the old version");
    }

    /// Writes `files` into a new timestamped directory; returns its name.
    fn write_version(&mut self, files: &[(&str, &str)]) -> String {
        self.generation += 1;
        let name = format!("..2026_01_01_00_00_00.{:09}", self.generation);
        let dir = self.path().join(&name);
        std::fs::create_dir(&dir).expect("version directory");
        for (file, content) in files {
            std::fs::write(dir.join(file), content).expect("write a ConfigMap key");
        }
        name
    }
}
