//! `dd`: the directory becomes a POSIX (pax) tar archive, streamed from here over ssh and
//! written raw onto the device from byte 0. The pax format carries long names, large and
//! sparse files, hard links, symlinks, numeric owners, ACLs, xattrs and names that are not
//! UTF-8. The stream passes through this process so that its length and SHA-256 are known
//! here; the helper hashes the very bytes it writes, and the two must agree.

use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::wire::{self, Wire, SAMPLE};
use super::{MethodError, Source, Transfer};
use crate::quote::glob_escape;
use crate::ssh::{describe_failure, detach_from_terminal_signals, Session};

/// Writes stdin (decompressed first when $2 is zstd) to the device $1 and fsyncs it. With
/// python3 on the helper (every cloud-init image has it), the bytes are hashed as they are
/// written and `sha256 HEX BYTES` is printed; without it dd writes and the caller reads the
/// archive back to hash it.
/// `$3` is [`WRITER`].
const WRITE_SCRIPT: &str = r#"set -euo pipefail
dev=$1 wire=$2 writer=$3
# Never write an archive over a partition table or a filesystem (an rsync backup).
if [ -n "$(blkid -p -o value -s PTTYPE -- "$dev" 2>/dev/null || true)" ]; then exit 5; fi
if [ -n "$(blkid -p -o value -s TYPE -- "$dev" 2>/dev/null || true)" ]; then exit 6; fi
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

/// The local tar command for `source`.
pub fn tar_command(source: &Source) -> Command {
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file=-")
        .arg("--directory")
        .arg(&source.dir)
        .args([
            "--format=posix",
            "--numeric-owner",
            "--sparse",
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--anchored",
            "--warning=no-file-ignored",
        ]);
    for skip in &source.skip_contents_of {
        cmd.arg(format!("--exclude=./{}/*", glob_escape(skip)));
    }
    cmd.arg(".");
    cmd
}

pub async fn backup(
    ssh: &Session,
    source: &Source,
    device: &str,
    volume_id: &str,
    progress: &indicatif::ProgressBar,
) -> Result<Transfer, MethodError> {
    let mut tar = tar_command(source);
    detach_from_terminal_signals(&mut tar);
    let mut tar = tar
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "tar",
            source: e,
        })?;
    let mut from_tar = tar.stdout.take().expect("piped");
    super::widen_pipe(&from_tar);

    // Look at the start of the archive, then decide how to send it.
    let mut sample = Vec::with_capacity(SAMPLE);
    while sample.len() < SAMPLE {
        let before = sample.len();
        (&mut from_tar)
            .take((SAMPLE - before) as u64)
            .read_to_end(&mut sample)
            .await
            .map_err(|e| MethodError::Failed(format!("reading from tar failed: {e}")))?;
        if sample.len() == before {
            break;
        }
    }
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

    let mut writer = ssh
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
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "ssh",
            source: e,
        })?;
    let to_helper = writer.stdin.take().expect("piped");
    super::widen_pipe(&to_helper);
    let mut sender = Sender {
        to_helper,
        hasher: Sha256::new(),
        bytes: 0,
        wire_bytes: 0,
        wire,
        progress,
    };
    let mut cut = sender.send(&sample).await.err();
    drop(sample);
    // Whole 1 MiB chunks (a pipe read gives 64 KiB at most): fewer writes, and zstd frames
    // big enough to compress well.
    let mut buf = vec![0u8; 1 << 20];
    while cut.is_none() {
        let mut n = 0;
        while n < buf.len() {
            let got = from_tar
                .read(&mut buf[n..])
                .await
                .map_err(|e| MethodError::Failed(format!("reading from tar failed: {e}")))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        cut = sender.send(&buf[..n]).await.err();
    }
    let Sender {
        to_helper,
        hasher,
        bytes,
        wire_bytes,
        ..
    } = sender;
    drop(to_helper);
    progress.finish_and_clear();
    let local = hex::encode(hasher.finalize());

    let out = writer
        .wait_with_output()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for ssh failed: {e}")))?;
    if !out.status.success() || cut.is_some() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = tar.kill().await;
        match out.status.code() {
            Some(5) => return Err(MethodError::Partitioned(volume_id.to_string())),
            Some(6) => return Err(MethodError::HoldsFilesystem(volume_id.to_string())),
            _ => {}
        }
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
    let status = tar
        .wait()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for tar failed: {e}")))?;
    // GNU tar: 1 = a file changed while it was read (the archive is still whole);
    // 2 = some files could not be read (the archive holds the rest).
    let incomplete = match status.code() {
        Some(0) | Some(1) => false,
        Some(2) => true,
        _ => return Err(MethodError::Failed(format!("tar failed ({status})"))),
    };
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
        incomplete,
        wire: Some(wire.as_str()),
        wire_bytes,
    })
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

/// The stream to the helper: every byte is hashed (as the volume will hold it), counted, and
/// compressed into its own zstd frame when the wire is zstd.
struct Sender<'a> {
    to_helper: tokio::process::ChildStdin,
    hasher: Sha256,
    bytes: u64,
    wire_bytes: u64,
    wire: Wire,
    progress: &'a indicatif::ProgressBar,
}

impl Sender<'_> {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        self.progress.inc(data.len() as u64);
        match self.wire {
            Wire::Plain => {
                self.wire_bytes += data.len() as u64;
                self.to_helper.write_all(data).await
            }
            Wire::Zstd => {
                let frame = wire::compress(data)?;
                self.wire_bytes += frame.len() as u64;
                self.to_helper.write_all(&frame).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_excludes_pseudo_mount_contents_literally() {
        let source = Source {
            dir: "/".into(),
            skip_contents_of: vec!["proc".into(), "odd*[dir]".into()],
        };
        let cmd = tar_command(&source);
        let args: Vec<_> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--exclude=./proc/*".to_string()));
        assert!(args.contains(&"--exclude=./odd\\*\\[dir\\]/*".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("."));
        let dot = args.iter().position(|a| a == ".").unwrap();
        assert!(
            args.iter()
                .position(|a| a.starts_with("--exclude"))
                .unwrap()
                < dot
        );
    }
}
