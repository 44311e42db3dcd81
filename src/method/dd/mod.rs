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

pub mod read;

pub use crate::method::archive::{
    archive_fits, archive_size, tar_command, torn_member, unescape, Archive, Feed, Listed, RECORD,
};
use crate::method::archive::{finish_tar, watch_tar_messages};

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
