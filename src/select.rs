//! What of the directory a backup holds: the exclude patterns and `--one-file-system`.
//!
//! Patterns use the gitignore syntax, matched against paths relative to the directory
//! (the `ignore` crate's gitignore matcher, the one ripgrep uses), without `!`: a path is
//! left out when any pattern matches it or one of its parents. One matcher answers for the
//! sizing walk, the archive's list, rsync's filter and verify, so they cannot disagree about
//! what is in the backup; patterns are data handed to that matcher, never to a shell or to
//! tar's or rsync's own pattern dialects.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SelectError {
    #[error("the exclude file {path} cannot be read: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line} of the exclude file {path} is not UTF-8 (patterns are text; match such names with ? or *)")]
    FileNotUtf8 { path: PathBuf, line: usize },
    #[error("the pattern {0} is not UTF-8 (patterns are text; match such names with ? or *)")]
    NotUtf8(String),
    #[error("{0}")]
    Bad(String),
}

/// Where a pattern came from, for its error messages.
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    Argument,
    File(&'a Path, usize),
}

impl Origin<'_> {
    fn name(&self, pattern: &str) -> String {
        match self {
            Origin::Argument => format!("--exclude {pattern:?}"),
            Origin::File(path, line) => format!(
                "the pattern {pattern:?} (line {line} of {})",
                path.display()
            ),
        }
    }
}

/// The patterns and options that decide what a backup holds.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The patterns in effect (trailing spaces trimmed as gitignore does), sorted and
    /// without repeats: the set the backup's tags record.
    patterns: Vec<String>,
    matcher: Option<Arc<Gitignore>>,
    /// Do not descend into filesystems other than the directory's own.
    pub one_file_system: bool,
}

impl Selection {
    /// The selection of `--exclude` patterns, `--exclude-from` files and
    /// `--one-file-system`; a pattern that is empty, not UTF-8, unparsable, uses `!`, or
    /// would leave out the directory itself or everything in it is refused.
    pub fn new(
        excludes: &[OsString],
        files: &[PathBuf],
        one_file_system: bool,
    ) -> Result<Selection, SelectError> {
        let mut patterns = Vec::new();
        for raw in excludes {
            let text = raw
                .to_str()
                .ok_or_else(|| SelectError::NotUtf8(format!("{raw:?}")))?;
            match effective(text) {
                Some(p) if p.starts_with('#') => {
                    return Err(SelectError::Bad(format!(
                        "--exclude {text:?} would be a comment in gitignore syntax; write \\# to match a name that starts with #"
                    )))
                }
                Some(p) => patterns.push(check(p, Origin::Argument)?),
                None => {
                    return Err(SelectError::Bad(format!(
                        "--exclude {text:?} is an empty pattern, which matches nothing"
                    )))
                }
            }
        }
        for path in files {
            patterns.extend(read_file(path)?);
        }
        patterns.sort();
        patterns.dedup();
        let matcher = match patterns.is_empty() {
            true => None,
            false => Some(Arc::new(build(&patterns).map_err(SelectError::Bad)?)),
        };
        Ok(Selection {
            patterns,
            matcher,
            one_file_system,
        })
    }

    /// Whether the entry at `rel` (relative to the directory, no leading `./`) is left out.
    /// Its parents are not asked: a walk does not descend into a directory it leaves out.
    pub fn excludes(&self, rel: &Path, is_dir: bool) -> bool {
        self.matcher
            .as_ref()
            .is_some_and(|m| m.matched(rel, is_dir).is_ignore())
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The SHA-256 of the pattern set (each pattern followed by a NUL byte, in sorted
    /// order), or None without patterns: what verify compares with the backup's tag.
    pub fn sha256(&self) -> Option<String> {
        (!self.patterns.is_empty()).then(|| {
            let mut h = Sha256::new();
            for p in &self.patterns {
                h.update(p.as_bytes());
                h.update([0]);
            }
            hex::encode(h.finalize())
        })
    }

    /// The patterns as a JSON array of strings, for a tag (None when that does not fit in
    /// `max` characters).
    pub fn patterns_json(&self, max: usize) -> Option<String> {
        let json = serde_json::to_string(&self.patterns).ok()?;
        (json.chars().count() <= max).then_some(json)
    }
}

/// The pattern a gitignore line holds once its trailing spaces (unless escaped) are
/// trimmed, as the matcher reads it; None for a blank line.
fn effective(line: &str) -> Option<&str> {
    let line = if line.ends_with("\\ ") {
        line
    } else {
        line.trim_end()
    };
    (!line.is_empty()).then_some(line)
}

/// Names that no real exclude matches all of: a pattern that does leaves out every entry.
const PROBES: &[&[u8]] = &[b"a", b"Z9", b"-", b"\xff", b".hidden"];

/// Checks one pattern on its own and returns it.
fn check(pattern: &str, origin: Origin) -> Result<String, SelectError> {
    let name = || origin.name(pattern);
    if pattern.contains('\0') {
        return Err(SelectError::Bad(format!(
            "{} holds a NUL byte, which no name can",
            name()
        )));
    }
    if pattern.starts_with('!') {
        return Err(SelectError::Bad(format!(
            "{} re-includes with !, which is not supported (a path is left out when any pattern matches it); write \\! to match a name that starts with !",
            name()
        )));
    }
    let itself = pattern
        .split('/')
        .all(|part| part.is_empty() || part == ".");
    if itself {
        return Err(SelectError::Bad(format!(
            "{} names the directory itself; patterns are relative to it",
            name()
        )));
    }
    let alone = build(&[pattern.to_string()])
        .map_err(|e| SelectError::Bad(format!("{} is not a valid pattern: {e}", name())))?;
    let everything = PROBES.iter().all(|p| {
        alone
            .matched(Path::new(OsStr::from_bytes(p)), false)
            .is_ignore()
    });
    if everything {
        return Err(SelectError::Bad(format!(
            "{} matches every entry of the directory, which would leave nothing to back up",
            name()
        )));
    }
    Ok(pattern.to_string())
}

fn build(patterns: &[String]) -> Result<Gitignore, String> {
    let mut builder = GitignoreBuilder::new("");
    for p in patterns {
        builder
            .add_line(None, p)
            .map_err(|e| glob_error(&e.to_string()))?;
    }
    builder.build().map_err(|e| glob_error(&e.to_string()))
}

fn glob_error(text: &str) -> String {
    text.trim().trim_end_matches('.').to_string()
}

/// The patterns of an exclude file: gitignore's format (one a line; blank lines and lines
/// starting with `#` skipped; a UTF-8 byte-order mark and CR before LF ignored).
fn read_file(path: &Path) -> Result<Vec<String>, SelectError> {
    let bytes = std::fs::read(path).map_err(|source| SelectError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let raw = if i == 0 {
            raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw)
        } else {
            raw
        };
        let line = std::str::from_utf8(raw).map_err(|_| SelectError::FileNotUtf8 {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        match effective(line) {
            Some(p) if !p.starts_with('#') => out.push(check(p, Origin::File(path, i + 1))?),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(patterns: &[&str]) -> Selection {
        let args: Vec<OsString> = patterns.iter().map(OsString::from).collect();
        Selection::new(&args, &[], false).unwrap()
    }

    fn refused(pattern: &str) -> String {
        Selection::new(&[OsString::from(pattern)], &[], false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn gitignore_rules_relative_to_the_directory() {
        let s = sel(&["*.log", "/top", "cache/", "a/b", "deep/**/x", "sp\\ "]);
        let x = |p: &str, dir: bool| s.excludes(Path::new(p), dir);
        // No slash: any depth. Leading or middle slash: from the directory's root.
        assert!(x("x.log", false) && x("d/e/x.log", false));
        assert!(x("top", false) && !x("d/top", false));
        assert!(x("a/b", false) && !x("z/a/b", false));
        // A trailing slash: directories only.
        assert!(x("cache", true) && x("d/cache", true) && !x("cache", false));
        assert!(x("deep/x", false) && x("deep/1/2/x", false) && !x("deep", true));
        // * does not cross /.
        assert!(!sel(&["/d/*"]).excludes(Path::new("d/e/f"), false));
        // An escaped trailing space stays part of the pattern.
        assert!(x("sp ", false) && !x("sp", false));
    }

    #[test]
    fn hostile_names_are_matched_as_bytes() {
        let s = sel(&[
            "new\nline",
            "-dash",
            "back\\\\slash",
            "not-utf8-??-name",
            "$(x)",
        ]);
        let x = |p: &[u8]| s.excludes(Path::new(OsStr::from_bytes(p)), false);
        assert!(x(b"new\nline") && x(b"-dash") && x(b"back\\slash") && x(b"$(x)"));
        // ? is one byte, so a name that is not UTF-8 can be matched.
        assert!(x(b"not-utf8-\xff\xfe-name"));
        assert!(!x(b"backslash") && !x(b"newline"));
    }

    #[test]
    fn bad_patterns_are_refused_in_one_sentence() {
        assert!(refused("").contains("empty pattern"));
        assert!(refused("   ").contains("empty pattern"));
        assert!(refused("#x").contains("comment"));
        assert!(refused("!keep").contains("not supported"));
        for itself in ["/", ".", "./", "/./"] {
            assert!(refused(itself).contains("directory itself"), "{itself}");
        }
        for all in ["*", "**", "/*", "**/*", "?*"] {
            assert!(refused(all).contains("every entry"), "{all}");
        }
        assert!(
            refused("a{b").contains("not a valid pattern"),
            "{}",
            refused("a{b")
        );
        // As in git, an unclosed class is literal.
        assert!(sel(&["a["]).excludes(Path::new("a["), false));
        use std::os::unix::ffi::OsStringExt;
        let e = Selection::new(&[OsString::from_vec(b"\xff".to_vec())], &[], false).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        // Escaped, these are ordinary names.
        assert!(sel(&["\\#x", "\\!keep", "*/"]).patterns().len() == 3);
    }

    #[test]
    fn the_set_is_sorted_and_hashed_independently_of_order() {
        let a = sel(&["b", "a", "a "]);
        let b = sel(&["a", "b"]);
        assert_eq!(a.patterns(), ["a", "b"]);
        assert_eq!(a.sha256(), b.sha256());
        assert_ne!(a.sha256(), sel(&["a"]).sha256());
        assert_eq!(Selection::default().sha256(), None);
        assert_eq!(a.patterns_json(256).as_deref(), Some(r#"["a","b"]"#));
        assert_eq!(a.patterns_json(5), None);
    }

    #[test]
    fn exclude_files_skip_comments_and_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ex");
        std::fs::write(&f, "\u{feff}# comment\n\n*.o\r\nbuild/  \n\\#lit\n").unwrap();
        let s = Selection::new(&[], std::slice::from_ref(&f), true).unwrap();
        assert_eq!(s.patterns(), ["*.o", "\\#lit", "build/"]);
        assert!(s.one_file_system);
        assert!(s.excludes(Path::new("#lit"), false));
        std::fs::write(&f, "ok\n*\n").unwrap();
        let e = Selection::new(&[], std::slice::from_ref(&f), false).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        std::fs::write(&f, b"ok\n\xff\n").unwrap();
        let e = Selection::new(&[], std::slice::from_ref(&f), false).unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("UTF-8"),
            "{e}"
        );
        let e = Selection::new(&[], &[d.path().join("missing")], false).unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
