//! The tar archive made here, the one format of both the `dd` method (streamed to a helper)
//! and `--direct` (cut into snapshot blocks): GNU tar, pax format, 1 MiB records, fed the
//! walk's names literally; its exact length measured ahead; its messages read for members
//! that may be torn and files that could not be archived.

use std::io::Write;
use std::process::Stdio;

use tokio::process::Command;

use crate::helper::ssh::describe_failure;
use crate::method::{MethodError, Source};

/// The local tar archiving `source` to `file`, and the walk that names what it archives.
/// The one way this crate makes its archive (the dd method, and sizing it).
pub struct Archive {
    pub tar: Command,
    pub feed: Feed,
}

/// The names tar archives: a walk of the directory with the source's rules (see
/// [`crate::walk::list`]), written to tar's stdin, each `./PATH` (the root `.`) ended by a
/// NUL byte. tar takes them literally (`--verbatim-files-from`: a name that starts with `-`
/// is a name) and archives each without recursion, so a directory's excluded entries are
/// never added back; the walk alone decides what is in the archive.
pub struct Feed {
    rules: crate::walk::Rules,
    to_tar: std::io::PipeWriter,
}

impl Feed {
    /// Runs the walk on a thread of its own (a hung mount must not hold the runtime); what
    /// it found arrives when it is done. It stops early when tar goes away.
    pub fn start(self) -> tokio::sync::oneshot::Receiver<std::io::Result<Listed>> {
        let (done, listed) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("ec2-backup-list".into())
            .spawn(move || {
                let _ = done.send(self.run());
            });
        // Without its thread, the receiver reports the feed as gone.
        drop(spawned);
        listed
    }

    fn run(self) -> std::io::Result<Listed> {
        use std::os::unix::ffi::OsStrExt;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, self.to_tar);
        let listed = crate::walk::list::list(&self.rules, |rel, _| {
            match rel.as_os_str().is_empty() {
                true => out.write_all(b".")?,
                false => {
                    out.write_all(b"./")?;
                    out.write_all(rel.as_os_str().as_bytes())?;
                }
            }
            out.write_all(b"\0")?;
            Ok(true)
        })?;
        out.flush()?;
        Ok(listed)
    }
}

pub use crate::walk::list::Listed;

/// The local tar command for `source`, writing the archive to stdout, and its feed.
pub fn tar_command(source: &Source) -> Result<Archive, MethodError> {
    tar_to(source, "--file=-")
}

/// tar's messages are read by [`torn_member`]: in the C locale, names quoted with escapes
/// (a newline in a name cannot start a line of its own).
fn tar_to(source: &Source, file: &str) -> Result<Archive, MethodError> {
    let (from_feed, to_tar) = std::io::pipe().map_err(|e| MethodError::Spawn {
        program: "tar",
        source: e,
    })?;
    crate::method::widen_pipe(&to_tar);
    let mut cmd = Command::new("tar");
    cmd.env("LC_ALL", "C")
        .arg("--create")
        .arg(file)
        .arg("--quoting-style=escape")
        .arg("--directory")
        .arg(&source.dir)
        .args([
            "--format=posix",
            "--numeric-owner",
            "--sparse",
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--warning=no-file-ignored",
            // 1 MiB records: one write per MiB into the pipe instead of a hundred (the end
            // of the archive is padded with zeros to a whole record, after its end marker).
            "--record-size=1048576",
            "--no-recursion",
            "--null",
            "--verbatim-files-from",
            "--files-from=-",
        ])
        .stdin(from_feed);
    Ok(Archive {
        tar: cmd,
        feed: Feed {
            rules: source.rules.clone(),
            to_tar,
        },
    })
}

/// The exact length of the archive a backup of `source` would write now: GNU tar writing to
/// /dev/null stats every file (and reads sparse maps, ACLs, xattrs) but reads no file data,
/// and reports the bytes it would have written. The stream pads that to whole 1 MiB records.
pub async fn archive_size(source: &Source) -> Result<u64, MethodError> {
    let Archive { mut tar, feed } = tar_to(source, "--file=/dev/null")?;
    tar.arg("--totals");
    let child = tar
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "tar",
            source: e,
        })?;
    // tar holds the feed's read end now; this process's copy goes with the command.
    drop(tar);
    let listed = feed.start();
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for tar failed: {e}")))?;
    drop(listed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let total = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes written: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    let bytes = total.ok_or_else(|| {
        MethodError::Failed(format!(
            "sizing the archive with tar failed: {}",
            describe_failure(out.status.code(), &stderr)
        ))
    })?;
    Ok(bytes.div_ceil(RECORD) * RECORD)
}

/// tar's record size (`--record-size`): the archive's end is padded to a whole record.
pub const RECORD: u64 = 1 << 20;

/// Whether a `-v` volume of `size_gib` holds an archive of `archive` bytes, with room for
/// the directory to grow by 1% (and a record) while the backup runs: an archive that
/// overflows the volume would already have overwritten the backup before it.
pub fn archive_fits(archive: u64, size_gib: i32) -> bool {
    let capacity = u64::try_from(size_gib).unwrap_or(0) << 30;
    archive.saturating_add(archive / 100).saturating_add(RECORD) <= capacity
}

/// A regular file that tar says changed or shrank while it read it: its member may be torn
/// (GNU tar pads a shrunk file with zeros). `line` is one of tar's messages, `root` the
/// directory tar ran in. A directory whose listing changed, or a file removed before it was
/// read, is no torn member: a live tree must not make every backup incomplete.
pub fn torn_member(line: &str, root: &std::path::Path) -> Option<std::path::PathBuf> {
    let rest = line.strip_prefix("tar: ")?;
    if let Some(name) = rest.strip_suffix(": file changed as we read it") {
        let path = root.join(unescape(name));
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        return (!is_dir).then_some(path);
    }
    let (name, tail) = rest.split_once(": File shrank by ")?;
    tail.ends_with("; padding with zeros")
        .then(|| root.join(unescape(name)))
}

/// Undoes tar's `escape` quoting: backslash escapes and three-digit octal bytes.
pub fn unescape(quoted: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = quoted.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 == b.len() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            out.push(
                d.iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
            );
            i += 4;
            continue;
        }
        out.push(match b[i + 1] {
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'a' => 7,
            b'b' => 8,
            b'f' => 12,
            b'v' => 11,
            other => other,
        });
        i += 2;
    }
    std::ffi::OsString::from_vec(out).into()
}

/// What tar's messages said: the members that may be torn, and whether an exit status of
/// 2 (some file could not be archived) is explained by files removed after the walk
/// listed them alone.
#[derive(Debug, Default)]
pub(crate) struct Messages {
    torn: Vec<std::path::PathBuf>,
    vanished: usize,
    /// A message that is neither a vanished file nor one of tar's harmless warnings.
    other: bool,
}

impl Messages {
    fn read(&mut self, line: &str, root: &std::path::Path) {
        if let Some(path) = torn_member(line, root) {
            self.torn.push(path);
        } else if vanished(line, root) {
            self.vanished += 1;
        } else if !harmless(line) {
            self.other = true;
        }
    }

    /// Whether tar's exit status `code` means some file is not in the archive. 2 is
    /// forgiven only when every message explains it as a file removed after it was listed
    /// (tar's own recursion calls that a warning; for a listed name it is an error).
    fn unreadable(&self, code: i32) -> bool {
        code == 2 && (self.other || self.vanished == 0)
    }
}

/// A listed name that tar could not find, and that is gone now: removed after the walk
/// listed it. tar quotes names with escapes, so `: ` in a name cannot fake the suffix of
/// another message.
fn vanished(line: &str, root: &std::path::Path) -> bool {
    let Some(rest) = line.strip_prefix("tar: ") else {
        return false;
    };
    ["stat", "open", "readlink"].iter().any(|verb| {
        rest.strip_suffix(&format!(": Cannot {verb}: No such file or directory"))
            .is_some_and(|name| {
                std::fs::symlink_metadata(root.join(unescape(name)))
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            })
    })
}

/// tar's warnings that say nothing is missing from the archive (a directory whose listing
/// changed: the walk listed it already; a socket, which tar cannot archive).
fn harmless(line: &str) -> bool {
    line == "tar: Exiting with failure status due to previous errors"
        || [
            ": file changed as we read it",
            ": File removed before we read it",
            ": socket ignored",
        ]
        .iter()
        .any(|s| line.ends_with(s))
}

/// Passes tar's messages on to stderr as they come, and reads them.
pub(crate) async fn watch_tar_messages(
    stderr: Option<tokio::process::ChildStderr>,
    root: std::path::PathBuf,
) -> Messages {
    use tokio::io::AsyncBufReadExt;
    let mut messages = Messages::default();
    let Some(stderr) = stderr else {
        return messages;
    };
    let mut lines = tokio::io::BufReader::new(stderr).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let line = String::from_utf8_lossy(&line).into_owned();
        crate::report::say(&line);
        messages.read(&line, &root);
    }
    messages
}

/// Waits for a local tar fed by [`Feed`]: whether some file is not in the archive (tar's
/// exit status as its messages explain it, and directories the walk could not read, each
/// named on stderr), and the members that may be torn.
pub(crate) async fn finish_tar(
    tar: &mut tokio::process::Child,
    messages: tokio::task::JoinHandle<Messages>,
    listed: tokio::sync::oneshot::Receiver<std::io::Result<Listed>>,
) -> Result<(bool, Vec<std::path::PathBuf>), MethodError> {
    let status = tar
        .wait()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for tar failed: {e}")))?;
    let messages = messages.await.unwrap_or_default();
    // GNU tar: 1 = some file differed (changed while read, shrank); 2 = some files could not
    // be read (the archive holds the rest).
    let code = match status.code() {
        Some(code @ 0..=2) => code,
        _ => return Err(MethodError::Failed(format!("tar failed ({status})"))),
    };
    let listed = listed
        .await
        .map_err(|_| MethodError::Failed("listing the directory for tar stopped".into()))?
        .map_err(|e| {
            MethodError::Failed(format!("feeding tar the names to archive failed: {e}"))
        })?;
    for (dir, e) in &listed.unreadable {
        crate::report::say(&format!(
            "ec2-backup: {}: cannot read the directory ({e}); what it holds is not in the backup",
            crate::quote::c_escape(&std::path::Path::new(".").join(dir))
        ));
    }
    let unreadable = messages.unreadable(code) || !listed.unreadable.is_empty();
    let torn = messages.torn;
    Ok((unreadable, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn archive_of(source: &Source) -> Vec<u8> {
        let Archive { mut tar, feed } = tar_command(source).unwrap();
        let child = tar.stdout(Stdio::piped()).spawn().unwrap();
        drop(tar);
        let listed = feed.start();
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success());
        listed.await.unwrap().unwrap();
        out.stdout
    }

    #[tokio::test]
    async fn tar_archives_exactly_what_the_walk_lists() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("-d/skip.o")).unwrap();
        std::fs::write(root.join("-d/skip.o/inside"), b"x").unwrap();
        std::fs::write(root.join("-d/kept"), b"x").unwrap();
        std::fs::write(root.join("new\nline *"), b"x").unwrap();
        std::fs::write(root.join("drop.o"), b"x").unwrap();
        let selection = crate::select::Selection::new(&["*.o".into()], &[], false).unwrap();
        let source = Source::new(&root, &selection);
        let bytes = archive_of(&source).await;
        let mut list = std::process::Command::new("tar")
            .args(["--list", "--quoting-style=escape"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // tar stops reading at the archive's end, before the last record's padding.
        let _ = list.stdin.take().unwrap().write_all(&bytes);
        let out = list.wait_with_output().unwrap();
        let members = String::from_utf8(out.stdout).unwrap();
        assert_eq!(members, "./\n./-d/\n./-d/kept\n./new\\nline *\n");
    }

    #[test]
    fn exit_2_is_forgiven_only_for_files_removed_after_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("here"), b"x").unwrap();
        let read = |lines: &[&str]| {
            let mut m = Messages::default();
            for l in lines {
                m.read(l, root);
            }
            m
        };
        let gone = read(&[
            "tar: ./gone\\n: Cannot stat: No such file or directory",
            "tar: ./gone2: Cannot open: No such file or directory",
            "tar: Exiting with failure status due to previous errors",
        ]);
        assert!(!gone.unreadable(2) && !gone.unreadable(0));
        // The file is there: tar failed for another reason.
        assert!(read(&["tar: ./here: Cannot stat: No such file or directory"]).unreadable(2));
        assert!(read(&["tar: ./x: Cannot open: Permission denied"]).unreadable(2));
        assert!(read(&[
            "tar: ./gone: Cannot stat: No such file or directory",
            "tar: ./y: Read error at byte 0, while reading 512 bytes: Input/output error",
        ])
        .unreadable(2));
        // An exit status of 2 that no message explains is not forgiven.
        assert!(read(&[]).unreadable(2));
        assert!(!read(&["tar: ./s: socket ignored"]).unreadable(1));
    }

    #[test]
    fn torn_members_are_regular_files_that_changed_or_shrank() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("a\nb c\\d"), b"x").unwrap();
        let torn = |line: &str| torn_member(line, root);
        assert_eq!(
            torn("tar: ./a\\nb c\\\\d: file changed as we read it"),
            Some(root.join("./a\nb c\\d"))
        );
        assert_eq!(
            torn("tar: ./big: File shrank by 4096 bytes; padding with zeros"),
            Some(root.join("./big"))
        );
        // A directory whose listing changed, a file gone before it was read: not torn.
        assert_eq!(torn("tar: ./sub: file changed as we read it"), None);
        assert_eq!(torn("tar: ./gone: File removed before we read it"), None);
        assert_eq!(torn("tar: ./x: Cannot open: Permission denied"), None);
        // Octal escapes are bytes (names need not be UTF-8).
        use std::os::unix::ffi::OsStrExt;
        let p = torn("tar: ./\\377\\303x: file changed as we read it").unwrap();
        assert_eq!(p.file_name().unwrap().as_bytes(), b"\xff\xc3x");
    }

    #[tokio::test]
    async fn archive_size_is_the_length_tar_really_writes() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..300u32 {
            let body: Vec<u8> = (0..4096u32).map(|j| (i * 31 + j) as u8).collect();
            std::fs::write(dir.path().join(format!("f{i}")), body).unwrap();
        }
        std::fs::write(dir.path().join("x".repeat(200)), b"long name").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let source = Source::new(&root, &Default::default());
        let sized = archive_size(&source).await.unwrap();
        assert_eq!(sized, archive_of(&source).await.len() as u64);
        assert!(archive_fits(sized, 1));
        assert!(!archive_fits(1 << 30, 1));
    }
}
