//! The entries a backup holds, one by one and in order: what tar is fed (names, taken
//! literally, archived without recursion) and what verify holds against an archive's
//! members. One thread, depth first, each directory before its entries, the entries of a
//! directory in byte order of their names (so that the same tree makes the same archive).
//! It stays ahead of tar, which reads each file it is given.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{Decision, Rules};

/// What a listing found besides its entries.
#[derive(Debug, Default)]
pub struct Listed {
    pub entries: u64,
    /// Directories that could not be read (relative, with why): their contents are missing.
    pub unreadable: Vec<(PathBuf, std::io::Error)>,
}

/// Calls `emit(rel, is_dir)` for every entry the rules take in, the root first (as the
/// empty path). `emit` returns whether to go into a directory; an error from it (the reader
/// went away) ends the listing. A directory removed meanwhile is skipped without a word,
/// as tar skips a file removed before it is read.
pub fn list(
    rules: &Rules,
    mut emit: impl FnMut(&Path, bool) -> std::io::Result<bool>,
) -> std::io::Result<Listed> {
    let mut listed = Listed::default();
    listed.entries += 1;
    if !emit(Path::new(""), true)? {
        return Ok(listed);
    }
    let first = children(rules, Path::new(""), &mut listed);
    let mut stack: Vec<(PathBuf, std::vec::IntoIter<(OsString, bool)>)> =
        vec![(PathBuf::new(), first.into_iter())];
    while let Some((dir, entries)) = stack.last_mut() {
        let Some((name, is_dir)) = entries.next() else {
            stack.pop();
            continue;
        };
        let rel = dir.join(&name);
        let decision = rules.decide(&rules.root().join(&rel), is_dir);
        if decision == Decision::Out {
            continue;
        }
        listed.entries += 1;
        let go_in = emit(&rel, is_dir)?;
        if is_dir && go_in && decision == Decision::In {
            let below = children(rules, &rel, &mut listed);
            stack.push((rel, below.into_iter()));
        }
    }
    Ok(listed)
}

/// The entries of the directory `rel`, by name, each with whether it is a directory (not
/// following symlinks).
fn children(rules: &Rules, rel: &Path, listed: &mut Listed) -> Vec<(OsString, bool)> {
    let reader = match std::fs::read_dir(rules.root().join(rel)) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            listed.unreadable.push((rel.to_path_buf(), e));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for entry in reader {
        match entry {
            Ok(e) => {
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                out.push((e.file_name(), is_dir));
            }
            Err(e) => {
                listed.unreadable.push((rel.to_path_buf(), e));
                break;
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::Selection;
    use std::fs;

    #[test]
    fn lists_in_order_what_the_rules_take_in() {
        let d = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(d.path()).unwrap();
        fs::create_dir_all(root.join("b/skip")).unwrap();
        fs::write(root.join("b/skip/x"), b"").unwrap();
        fs::write(root.join("b/z"), b"").unwrap();
        fs::write(root.join("a.o"), b"").unwrap();
        fs::write(root.join("c"), b"").unwrap();
        fs::create_dir(root.join("-d")).unwrap();
        let selection = Selection::new(&["*.o".into(), "skip/".into()], &[], false).unwrap();
        let rules = Rules::new(&root, &selection);
        let mut seen = Vec::new();
        let listed = list(&rules, |rel, is_dir| {
            seen.push((rel.to_string_lossy().into_owned(), is_dir));
            Ok(true)
        })
        .unwrap();
        let expect = [
            ("", true),
            ("-d", true),
            ("b", true),
            ("b/z", false),
            ("c", false),
        ];
        let expect: Vec<(String, bool)> = expect.iter().map(|(p, d)| (p.to_string(), *d)).collect();
        assert_eq!(seen, expect);
        assert_eq!(listed.entries, 5);
        assert!(listed.unreadable.is_empty());
    }
}
