//! `dd`: the directory becomes a POSIX (pax) tar archive, streamed from here over ssh and
//! written raw onto the device from byte 0. The pax format carries long names, large and
//! sparse files, hard links, symlinks, numeric owners, ACLs, xattrs and names that are not
//! UTF-8. The stream passes through this process (spliced, not copied, when it is not
//! compressed) so that its length and SHA-256 are known here; the helper hashes the very bytes
//! it writes, and the two must agree.

use std::process::Stdio;

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use tokio::process::Command;

pub mod read;

use crate::helper::ssh::{describe_failure, detach_from_terminal_signals, Session};
use crate::method::wire::{self, Wire, SAMPLE};
use crate::method::{MethodError, Source, Transfer};

/// Writes stdin (decompressed first when $2 is zstd) to the device $1 and fsyncs it. With
/// python3 on the helper (every cloud-init image has it), the bytes are hashed as they are
/// written and `sha256 HEX BYTES` is printed; without it dd writes and the caller reads the
/// archive back to hash it.
/// `$3` is [`WRITER`].
/// What the device holds was checked before (see [`crate::probe`]).
const WRITE_SCRIPT: &str = r#"set -euo pipefail
dev=$1 wire=$2 writer=$3
if python3 -I -c '' >/dev/null 2>&1; then write() { python3 -I -c "$writer" "$dev"; }
else write() { dd of="$dev" bs=1M iflag=fullblock conv=fsync status=none; }; fi
if [ "$wire" = zstd ]; then zstd -q -d -c | write; else write; fi
"#;

/// The helper's writer: 1 MiB blocks from stdin to the device, each hashed (OpenSSL's
/// SHA-256 behind hashlib) on its way; a 1 MiB stdin pipe lets sshd run ahead of the writes.
/// Every 16 MiB written are handed to the disk at once (fadvise DONTNEED starts their
/// writeback; repeated over the 16 MiB before, by then written, it frees their cache pages),
/// so the device is written while the stream goes on instead of in one long fsync at the end,
/// and a small helper's memory stays free. O_EXCL: the kernel refuses a device in use
/// (mounted, or held by another user).
const WRITER: &str = r#"import fcntl, hashlib, os, sys
try:
    fcntl.fcntl(0, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
except OSError:
    pass
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_EXCL)
digest, total, flushed = hashlib.sha256(), 0, 0
buf = memoryview(bytearray(1 << 20))
while True:
    filled = 0
    while filled < len(buf):
        got = os.readv(0, [buf[filled:]])
        if got == 0:
            break
        filled += got
    if filled == 0:
        break
    digest.update(buf[:filled])
    done = 0
    while done < filled:
        wrote = os.write(fd, buf[done:filled])
        if wrote <= 0:
            sys.exit("writing to the device made no progress")
        done += wrote
    total += filled
    if total - flushed >= 16 << 20:
        start = max(0, flushed - (16 << 20))
        os.posix_fadvise(fd, start, total - start, os.POSIX_FADV_DONTNEED)
        flushed = total
os.fsync(fd)
os.close(fd)
print("sha256", digest.hexdigest(), total)
"#;

/// Reads the first $2 bytes back from the device and prints their SHA-256 (helpers without
/// python3). OpenSSL's digest uses the CPU's SHA instructions (6x coreutils' sha256sum
/// here), so it is preferred.
const READ_BACK_SCRIPT: &str = r#"set -euo pipefail
if command -v openssl >/dev/null 2>&1; then digest() { openssl dgst -sha256 -r; }
else digest() { sha256sum; }; fi
dd if="$1" bs=4M iflag=count_bytes count="$2" status=none | digest
"#;

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

pub async fn backup(
    ssh: &Session,
    source: &Source,
    device: &str,
    progress: &indicatif::ProgressBar,
) -> Result<Transfer, MethodError> {
    let (from_tar, tar_out) = std::io::pipe().map_err(|e| MethodError::Spawn {
        program: "tar",
        source: e,
    })?;
    crate::method::widen_pipe(&from_tar);
    // The command (and with it this process's copy of the pipe's write end) is dropped once
    // tar runs, so that tar's exit is the end of the stream.
    let Archive { tar: mut cmd, feed } = tar_command(source)?;
    let mut tar = {
        detach_from_terminal_signals(&mut cmd);
        cmd.stdout(tar_out)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| MethodError::Spawn {
                program: "tar",
                source: e,
            })?
    };
    // tar holds the feed's read end now; this process's copy goes with the command.
    drop(cmd);
    let listed = feed.start();

    let messages = tokio::spawn(watch_tar_messages(tar.stderr.take(), source.dir.clone()));
    // Look at the start of the archive, then decide how to send it.
    let (from_tar, sample) = tokio::task::spawn_blocking(move || {
        let mut sample = Vec::with_capacity(SAMPLE);
        let read = (&from_tar).take(SAMPLE as u64).read_to_end(&mut sample);
        read.map(|_| (from_tar, sample))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|read| read)
    .map_err(|e| MethodError::Failed(format!("reading from tar failed: {e}")))?;
    let wire = if sample.len() == SAMPLE {
        let measured = wire::measure(&sample);
        match measured.ratio <= 0.8 {
            true => match wire::probe(ssh, &sample).await {
                Some(link) => wire::choose(measured, link),
                None => Wire::Plain,
            },
            false => Wire::Plain,
        }
    } else {
        Wire::Plain
    };

    let (helper_in, to_helper) = std::io::pipe().map_err(|e| MethodError::Spawn {
        program: "ssh",
        source: e,
    })?;
    crate::method::widen_pipe(&to_helper);
    let writer = ssh
        .command(&[
            "sudo",
            "-n",
            "bash",
            "-c",
            WRITE_SCRIPT,
            "write",
            device,
            wire.as_str(),
            WRITER,
        ])?
        .stdin(helper_in)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "ssh",
            source: e,
        })?;
    let pump = Pump::new(from_tar, to_helper, wire, progress.clone());
    let (done, pumped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ec2-backup-stream".into())
        .spawn(move || {
            let _ = done.send(pump.run(sample));
        })
        .map_err(|e| MethodError::Failed(format!("cannot start the stream's thread: {e}")))?;
    let helper = writer.wait_with_output();
    let stall = stalled(progress, STALL);
    tokio::pin!(helper, pumped, stall);
    let (pumped, out) = tokio::select! {
        () = &mut stall => {
            // Dropping the helper's ssh ends the stream; the pump thread then stops on EPIPE.
            let _ = tar.start_kill();
            progress.finish_and_clear();
            return Err(MethodError::Cut(format!(
                "no data moved for {} s (a hung disk or link)",
                STALL.as_secs()
            )));
        }
        out = &mut helper => {
            // The helper's end is gone: a tar stalled on a file would hold the stream up
            // until it reads on, so it is stopped.
            if !matches!(&out, Ok(o) if o.status.success()) {
                let _ = tar.start_kill();
            }
            (pumped.await, out)
        }
        pumped = &mut pumped => (pumped, helper.await),
    };
    progress.finish_and_clear();
    let Pumped {
        bytes,
        wire_bytes,
        sha256: local,
        cut,
    } = pumped
        .map_err(|_| MethodError::Failed("the stream to the helper stopped".into()))?
        .map_err(MethodError::Failed)?;
    let out = out.map_err(|e| MethodError::Failed(format!("waiting for ssh failed: {e}")))?;
    if let (true, Some(e)) = (out.status.success(), &cut) {
        let _ = tar.kill().await;
        return Err(MethodError::Failed(format!(
            "sending the archive to the helper failed: {e}"
        )));
    }
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = tar.kill().await;
        if stderr.contains("No space left") {
            return Err(MethodError::Failed(format!(
                "the archive ({bytes} bytes so far) does not fit on the volume"
            )));
        }
        return Err(MethodError::Cut(describe_failure(
            out.status.code(),
            &stderr,
        )));
    }
    let (unreadable, torn) = finish_tar(&mut tar, messages, listed).await?;
    let remote = match written_digest(&String::from_utf8_lossy(&out.stdout)) {
        Some((sum, written)) if written == bytes => sum,
        Some((sum, written)) => {
            return Err(MethodError::Failed(format!(
                "the helper wrote {written} bytes (SHA-256 {sum}) but {bytes} were sent"
            )))
        }
        None => read_back(ssh, device, bytes).await?,
    };
    if remote != local {
        return Err(MethodError::Mismatch { local, remote });
    }
    Ok(Transfer {
        bytes,
        sha256: Some(local),
        incomplete: unreadable || !torn.is_empty(),
        changed: torn,
        wire: Some(wire.as_str()),
        wire_bytes,
    })
}

/// How long the stream may move no byte at all before the transfer counts as hung.
const STALL: std::time::Duration = std::time::Duration::from_secs(300);

/// Ends once `progress` has not moved for `limit` (a hung helper disk fills the pipes and
/// then blocks every write without any error; ssh's keepalives still get through).
async fn stalled(progress: &indicatif::ProgressBar, limit: std::time::Duration) {
    let (mut last, mut since) = (progress.position(), std::time::Instant::now());
    loop {
        tokio::time::sleep(limit / 30).await;
        let now = progress.position();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

/// The writer's `sha256 HEX BYTES` line, when the helper had python3 to hash while writing.
fn written_digest(stdout: &str) -> Option<(String, u64)> {
    let line = stdout.lines().rev().find(|l| l.starts_with("sha256 "))?;
    let mut words = line.split_whitespace().skip(1);
    let sum = words.next()?;
    let bytes = words.next()?.parse().ok()?;
    (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (sum.to_ascii_lowercase(), bytes))
}

/// Hashes the archive's `bytes` as read back from the device (a helper without python3).
async fn read_back(ssh: &Session, device: &str, bytes: u64) -> Result<String, MethodError> {
    let out = ssh
        .run(
            "Reading the archive back from the volume",
            &[
                "sudo",
                "-n",
                "bash",
                "-c",
                READ_BACK_SCRIPT,
                "read-back",
                device,
                &bytes.to_string(),
            ],
        )
        .await?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}

/// The stream from tar to the helper, on a thread of its own with plain blocking reads and
/// writes of whole 1 MiB chunks: each of tar's records and each of ssh's reads wakes this
/// thread at most once (an async pipe wakes its reader for every write into it, ~100,000
/// times per GiB of tar's 10 KiB records). Every byte is hashed (as the volume will hold
/// it), counted, and compressed into its own zstd frame when the wire is zstd.
struct Pump {
    from_tar: std::io::PipeReader,
    to_helper: std::io::PipeWriter,
    hasher: Sha256,
    bytes: u64,
    wire_bytes: u64,
    wire: Wire,
    progress: indicatif::ProgressBar,
}

/// What went through. `cut`: writing to ssh failed, the helper's end went away (ssh's own
/// exit says why).
struct Pumped {
    bytes: u64,
    wire_bytes: u64,
    sha256: String,
    cut: Option<std::io::Error>,
}

/// Why a stream stopped before its end.
enum Stop {
    /// Writing to ssh failed.
    Cut(std::io::Error),
    /// Something on this side failed (reading from tar, compressing): the whole message.
    Local(String),
}

impl Pump {
    fn new(
        from_tar: std::io::PipeReader,
        to_helper: std::io::PipeWriter,
        wire: Wire,
        progress: indicatif::ProgressBar,
    ) -> Self {
        Pump {
            from_tar,
            to_helper,
            hasher: Sha256::new(),
            bytes: 0,
            wire_bytes: 0,
            wire,
            progress,
        }
    }

    fn run(mut self, first: Vec<u8>) -> Result<Pumped, String> {
        let sent = self.send(&first).and_then(|()| match self.wire {
            Wire::Plain => self.forward(),
            Wire::Zstd => self.copy(),
        });
        drop(first);
        let cut = match sent {
            Ok(()) => None,
            Err(Stop::Cut(e)) => Some(e),
            Err(Stop::Local(why)) => return Err(why),
        };
        Ok(Pumped {
            bytes: self.bytes,
            wire_bytes: self.wire_bytes,
            sha256: hex::encode(self.hasher.finalize()),
            cut,
        })
    }

    /// Plain wire: tar's pages go on to ssh's pipe without being copied here (splice); a
    /// duplicate of each chunk (tee, which shares the pages) is read back to hash it. Whole
    /// pages, because tar writes whole 1 MiB records. Where tee is refused (a sandbox that
    /// filters it), the rest is copied instead: tee takes nothing out of the pipe.
    fn forward(&mut self) -> Result<(), Stop> {
        let Ok((mut copies, copies_in)) = std::io::pipe() else {
            return self.copy();
        };
        crate::method::widen_pipe(&copies_in);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            // SAFETY: tee and splice take descriptors this thread owns and no memory.
            let teed = retry(|| unsafe {
                libc::tee(
                    self.from_tar.as_raw_fd(),
                    copies_in.as_raw_fd(),
                    buf.len(),
                    0,
                )
            });
            let Ok(teed) = teed else {
                return self.copy();
            };
            if teed == 0 {
                return Ok(());
            }
            let mut left = teed;
            while left > 0 {
                let moved = retry(|| unsafe {
                    libc::splice(
                        self.from_tar.as_raw_fd(),
                        std::ptr::null_mut(),
                        self.to_helper.as_raw_fd(),
                        std::ptr::null_mut(),
                        left,
                        0,
                    )
                });
                match moved {
                    Ok(0) => return Err(Stop::Cut(std::io::ErrorKind::WriteZero.into())),
                    Ok(n) => left -= n,
                    Err(e) => return Err(Stop::Cut(e)),
                }
            }
            copies
                .read_exact(&mut buf[..teed])
                .map_err(|e| Stop::Local(format!("reading back the stream's copy failed: {e}")))?;
            self.count(&buf[..teed], teed);
        }
    }

    /// Every chunk read here (and, on the zstd wire, compressed into its own frame).
    fn copy(&mut self) -> Result<(), Stop> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = fill(&mut self.from_tar, &mut buf)
                .map_err(|e| Stop::Local(format!("reading from tar failed: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            self.send(&buf[..n])?;
        }
    }

    fn count(&mut self, data: &[u8], wire_bytes: usize) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        self.wire_bytes += wire_bytes as u64;
        self.progress.inc(data.len() as u64);
    }

    fn send(&mut self, data: &[u8]) -> Result<(), Stop> {
        if data.is_empty() {
            return Ok(());
        }
        let frame;
        let wire = match self.wire {
            Wire::Plain => data,
            Wire::Zstd => {
                frame = wire::compress(data)
                    .map_err(|e| Stop::Local(format!("compressing the archive failed: {e}")))?;
                &frame
            }
        };
        self.count(data, wire.len());
        self.to_helper.write_all(wire).map_err(Stop::Cut)
    }
}

/// A tee or splice call, repeated when a signal interrupts it; the count it moved.
fn retry(mut call: impl FnMut() -> libc::ssize_t) -> std::io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads until `buf` is full or the stream ends; the count read.
fn fill(from: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pump from a pipe fed with `first` + `rest` (in odd-sized writes) into a pipe
    /// read to the end; what it reported and what came out.
    fn pump(wire: Wire, first: &[u8], rest: &[u8], read_out: bool) -> (Pumped, Vec<u8>) {
        let (from_tar, mut tar_out) = std::io::pipe().unwrap();
        let (mut helper_in, to_helper) = std::io::pipe().unwrap();
        let rest = rest.to_vec();
        let feeder = std::thread::spawn(move || {
            for chunk in rest.chunks(10_240 * 3 + 17) {
                if tar_out.write_all(chunk).is_err() {
                    break;
                }
            }
        });
        // Without a reader, the helper's end is gone before the pump starts.
        let reader = read_out.then(|| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                helper_in.read_to_end(&mut out).unwrap();
                out
            })
        });
        let pump = Pump::new(from_tar, to_helper, wire, indicatif::ProgressBar::hidden());
        let pumped = pump.run(first.to_vec()).unwrap();
        feeder.join().unwrap();
        (
            pumped,
            reader.map(|r| r.join().unwrap()).unwrap_or_default(),
        )
    }

    fn data() -> (Vec<u8>, Vec<u8>) {
        let first: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let rest: Vec<u8> = (0..3_500_000u32).map(|i| (i * 7 % 253) as u8).collect();
        (first, rest)
    }

    #[test]
    fn plain_pump_forwards_and_hashes_every_byte_in_order() {
        let (first, rest) = data();
        let (pumped, out) = pump(Wire::Plain, &first, &rest, true);
        let whole = [first, rest].concat();
        assert!(pumped.cut.is_none());
        assert_eq!(out, whole);
        assert_eq!(pumped.bytes, whole.len() as u64);
        assert_eq!(pumped.wire_bytes, whole.len() as u64);
        assert_eq!(pumped.sha256, hex::encode(Sha256::digest(&whole)));
    }

    #[test]
    fn zstd_pump_sends_frames_of_the_same_bytes() {
        let (first, rest) = data();
        let (pumped, out) = pump(Wire::Zstd, &first, &rest, true);
        let whole = [first, rest].concat();
        assert!(pumped.cut.is_none());
        assert_eq!(zstd::decode_all(&out[..]).unwrap(), whole);
        assert_eq!(pumped.wire_bytes, out.len() as u64);
        assert!(pumped.wire_bytes < pumped.bytes);
        assert_eq!(pumped.sha256, hex::encode(Sha256::digest(&whole)));
    }

    #[test]
    fn pump_stops_when_the_helper_goes_away() {
        let (first, rest) = data();
        // With no first chunk, the plain wire's cut comes from splice, not from a write.
        for (wire, first) in [(Wire::Plain, &[][..]), (Wire::Zstd, &first[..])] {
            let (pumped, _) = pump(wire, first, &rest, false);
            let cut = pumped.cut.expect("the pump saw the helper go");
            assert_eq!(cut.kind(), std::io::ErrorKind::BrokenPipe, "{wire:?}");
            assert!(pumped.bytes < rest.len() as u64, "{wire:?}");
        }
    }

    /// Runs the archive of `source` to its end; its bytes.
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

    #[tokio::test]
    async fn a_stream_that_stops_moving_counts_as_stalled() {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_length(100);
        let moving = async {
            for _ in 0..20 {
                bar.inc(1);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        let limit = std::time::Duration::from_millis(300);
        tokio::select! {
            () = stalled(&bar, limit) => panic!("stalled while data moved"),
            () = moving => {}
        }
        let started = std::time::Instant::now();
        stalled(&bar, limit).await;
        assert!(started.elapsed() >= limit);
    }
}
