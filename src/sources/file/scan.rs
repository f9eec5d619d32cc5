//! Finding the files a file source reads: its `paths` globs, less its `exclude` globs, each
//! regular file once (by device and inode, whatever the number of its names).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::position::FileId;

/// One file found by a scan.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub id: FileId,
}

/// The compiled patterns of one source.
#[derive(Debug)]
pub struct Patterns {
    paths: Vec<String>,
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl Patterns {
    /// The patterns were checked with the configuration; one that does not compile matches
    /// nothing.
    pub fn new(paths: &[String], exclude: &[String]) -> Patterns {
        let compile = |ps: &[String]| {
            ps.iter()
                .filter_map(|p| glob::Pattern::new(p).ok())
                .collect()
        };
        Patterns {
            paths: paths.to_vec(),
            include: compile(paths),
            exclude: compile(exclude),
        }
    }

    /// Whether `path` is one of this source's (matched by `paths`, not by `exclude`).
    pub fn covers(&self, path: &Path) -> bool {
        self.include.iter().any(|p| p.matches_path(path))
            && !self.exclude.iter().any(|p| p.matches_path(path))
    }

    /// Every regular file matched now, once each, sorted by path; and the errors met (a
    /// directory that cannot be read), for the logs.
    pub fn scan(&self) -> (Vec<Found>, Vec<String>) {
        let mut by_id: HashMap<FileId, PathBuf> = HashMap::new();
        let mut errors = Vec::new();
        for pattern in &self.paths {
            let Ok(entries) = glob::glob(pattern) else {
                continue;
            };
            for entry in entries {
                let path = match entry {
                    Ok(path) => path,
                    Err(e) => {
                        errors.push(e.to_string());
                        continue;
                    }
                };
                if self.exclude.iter().any(|p| p.matches_path(&path)) {
                    continue;
                }
                // Follows symbolic links: a link to a log file is a way to name it.
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => {
                        let id = FileId::of(&meta);
                        let kept = by_id.entry(id).or_insert_with(|| path.clone());
                        if path < *kept {
                            *kept = path;
                        }
                    }
                    Ok(_) => {}
                    // Gone between the listing and the look: the next scan sees it as it is.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                }
            }
        }
        let mut found: Vec<Found> = by_id
            .into_iter()
            .map(|(id, path)| Found { path, id })
            .collect();
        found.sort_by(|a, b| a.path.cmp(&b.path));
        (found, errors)
    }
}

/// A file `id` in `dir`, under any name: where a file rotated while the forwarder was stopped
/// is found again (`app.log` renamed `app.log.1`).
pub fn find_in_dir(dir: &Path, id: FileId) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            std::fs::symlink_metadata(path)
                .is_ok_and(|meta| meta.is_file() && FileId::of(&meta) == id)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_finds_each_file_once_and_leaves_out_excluded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.log"), b"a").unwrap();
        std::fs::write(d.join("b.log"), b"b").unwrap();
        std::fs::write(d.join("old.log.gz"), b"z").unwrap();
        std::fs::create_dir(d.join("sub.log")).unwrap();
        std::os::unix::fs::symlink(d.join("a.log"), d.join("z-link.log")).unwrap();
        let patterns = Patterns::new(
            &[
                format!("{}/*.log", d.display()),
                format!("{}/*.gz", d.display()),
            ],
            &[format!("{}/*.gz", d.display())],
        );
        let (found, errors) = patterns.scan();
        let names: Vec<_> = found
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.log", "b.log"], "the link is a.log again");
        assert!(errors.is_empty(), "{errors:?}");
        assert!(patterns.covers(&d.join("c.log")));
        assert!(!patterns.covers(&d.join("c.log.gz")));
        let id = found[1].id;
        std::fs::rename(d.join("b.log"), d.join("b.log.1")).unwrap();
        assert_eq!(find_in_dir(d, id), Some(d.join("b.log.1")));
    }
}
