//! Reading a dd backup back: the archive streamed from the device (opened read-only, and the
//! device itself set read-only first) over ssh into a local consumer (tar extracting or
//! comparing, or this process's stdout), hashed on its way. With the archive's length from
//! its tag, exactly that many bytes are read; without it, the stream runs until the consumer
//! has seen tar's end marker and stops reading.

use std::io::{Read, Write};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::helper::ssh::{describe_failure, detach_from_terminal_signals, Session};
use crate::method::MethodError;

/// Sets the device read-only (the kernel then refuses every write to it, whatever runs on
/// the helper), then reads `$2` bytes of it (all of it when `$2` is empty) to stdout.
const READ_SCRIPT: &str = r#"set -eu
dev=$1 bytes=$2
blockdev --setro "$dev"
if [ -n "$bytes" ]; then exec dd if="$dev" bs=1M iflag=count_bytes count="$bytes" status=none
else exec dd if="$dev" bs=1M status=none; fi
"#;

/// Where the archive goes.
pub enum Sink {
    /// This process's stdout (`restore VOL -`).
    Stdout,
    /// Local processes' stdin (tar), each run to its end; their outputs are returned.
    Processes(Vec<Command>),
}

/// What was read.
pub struct ReadBack {
    pub bytes: u64,
    pub sha256: String,
    /// The consumers' outputs (stdout, stderr, exit status), for [`Sink::Processes`].
    pub outputs: Vec<std::process::Output>,
}

/// Streams the archive on `device` into `sink`. `bytes`: its length, if known.
pub async fn read(
    ssh: &Session,
    device: &str,
    bytes: Option<u64>,
    sink: Sink,
    progress: &indicatif::ProgressBar,
) -> Result<ReadBack, MethodError> {
    let spawn = |program: &'static str| move |e| MethodError::Spawn { program, source: e };
    let length = bytes.map(|b| b.to_string()).unwrap_or_default();
    let (from_helper, helper_out) = std::io::pipe().map_err(spawn("ssh"))?;
    crate::method::widen_pipe(&from_helper);
    let mut reader = ssh
        .command(&[
            "sudo",
            "-n",
            "sh",
            "-c",
            READ_SCRIPT,
            "read",
            device,
            &length,
        ])?
        .stdin(Stdio::null())
        .stdout(helper_out)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn("ssh"))?;
    let delivered = deliver(from_helper, bytes, sink, progress).await;
    let (copied, outputs) = match delivered {
        Ok(d) => d,
        Err(e) => {
            let _ = reader.start_kill();
            return Err(e);
        }
    };
    // A consumer that has seen the end of the archive stops reading: the rest of the device
    // need not come, and the helper's dd is stopped with its ssh.
    let whole = copied.as_ref().is_ok_and(|c| c.complete);
    if !whole {
        let _ = reader.start_kill();
    }
    let helper = reader
        .wait_with_output()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for ssh failed: {e}")))?;
    let copied = copied?;
    if copied.complete && !helper.status.success() {
        return Err(MethodError::Cut(describe_failure(
            helper.status.code(),
            &String::from_utf8_lossy(&helper.stderr),
        )));
    }
    if let Some(expected) = bytes {
        if copied.bytes != expected && outputs.iter().all(|o| o.status.success()) {
            return Err(MethodError::Cut(format!(
                "the helper sent {} of the archive's {expected} bytes",
                copied.bytes
            )));
        }
    }
    Ok(ReadBack {
        bytes: copied.bytes,
        sha256: copied.sha256,
        outputs,
    })
}

/// Feeds the archive coming on `from` to `sink` (its consumers started here, each run to its
/// end), hashing and counting; `bytes`: its length, if known. Shared by every way an
/// archive is read back (a helper's device, snapshot blocks).
pub(crate) async fn deliver(
    from: std::io::PipeReader,
    bytes: Option<u64>,
    sink: Sink,
    progress: &indicatif::ProgressBar,
) -> Result<(Result<Copied, MethodError>, Vec<std::process::Output>), MethodError> {
    let spawn = |program: &'static str| move |e| MethodError::Spawn { program, source: e };
    let (to_sink, consumers) = match sink {
        Sink::Stdout => (Out::Stdout, Vec::new()),
        Sink::Processes(commands) => {
            let (mut pipes, mut children) = (Vec::new(), Vec::new());
            for mut cmd in commands {
                let (sink_in, to_sink) = std::io::pipe().map_err(spawn("tar"))?;
                crate::method::widen_pipe(&to_sink);
                detach_from_terminal_signals(&mut cmd);
                let child = cmd
                    .stdin(sink_in)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(spawn("tar"))?;
                pipes.push(to_sink);
                children.push(child);
            }
            (Out::Pipes(pipes), children)
        }
    };
    let bar = progress.clone();
    let (done, copied) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ec2-backup-read".into())
        .spawn(move || {
            let _ = done.send(copy(from, to_sink, bytes, &bar));
        })
        .map_err(|e| MethodError::Failed(format!("cannot start the stream's thread: {e}")))?;
    let consumed = futures_join_all(consumers);
    let (copied, outputs) = tokio::join!(copied, consumed);
    progress.finish_and_clear();
    let copied = copied.map_err(|_| MethodError::Failed("the archive's stream stopped".into()))?;
    let outputs =
        outputs.map_err(|e| MethodError::Failed(format!("waiting for tar failed: {e}")))?;
    Ok((copied, outputs))
}

/// Waits for every consumer, in order.
async fn futures_join_all(
    children: Vec<tokio::process::Child>,
) -> std::io::Result<Vec<std::process::Output>> {
    let waits: Vec<_> = children
        .into_iter()
        .map(|c| tokio::spawn(c.wait_with_output()))
        .collect();
    let mut outputs = Vec::new();
    for w in waits {
        outputs.push(w.await.map_err(std::io::Error::other)??);
    }
    Ok(outputs)
}

enum Out {
    Stdout,
    Pipes(Vec<std::io::PipeWriter>),
}

pub(crate) struct Copied {
    pub bytes: u64,
    pub sha256: String,
    /// The whole stream was read (the helper's end closed, or `limit` reached), rather than
    /// the consumer going away first.
    pub complete: bool,
}

/// Copies from the helper to the sink, hashing and counting, until `limit` bytes, the
/// helper's end, or the sink going away (a consumer that is done).
fn copy(
    mut from: std::io::PipeReader,
    to: Out,
    limit: Option<u64>,
    progress: &indicatif::ProgressBar,
) -> Result<Copied, MethodError> {
    let mut stdout = std::io::stdout().lock();
    // Consumers still reading; one that is done (it has seen the archive's end) drops out.
    // stdout too: `restore - | tar -x` ends its read at the archive's end marker.
    let (mut pipes, mut to_stdout) = match to {
        Out::Pipes(p) => (p.into_iter().map(Some).collect::<Vec<_>>(), false),
        Out::Stdout => (Vec::new(), true),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let mut complete = true;
    loop {
        let want = limit.map_or(buf.len() as u64, |l| (l - bytes).min(buf.len() as u64));
        if want == 0 {
            break;
        }
        let n = match from.read(&mut buf[..want as usize]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(MethodError::Cut(format!(
                    "reading from the helper failed: {e}"
                )))
            }
        };
        let failed =
            |e: std::io::Error| MethodError::Failed(format!("writing the archive failed: {e}"));
        if to_stdout {
            match stdout.write_all(&buf[..n]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => to_stdout = false,
                Err(e) => return Err(failed(e)),
            }
        }
        for slot in pipes.iter_mut() {
            let Some(p) = slot else { continue };
            match p.write_all(&buf[..n]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => *slot = None,
                Err(e) => return Err(failed(e)),
            }
        }
        // Every consumer has seen the archive's end. With its length known, the rest (the
        // last record's padding) is still read and hashed: the checksum covers it all.
        if !to_stdout && pipes.iter().all(Option::is_none) && limit.is_none() {
            // (A stream with no length has nothing to check the rest against.)
            complete = false;
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        progress.inc(n as u64);
    }
    if to_stdout {
        match stdout.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                return Err(MethodError::Failed(format!(
                    "writing the archive failed: {e}"
                )))
            }
        }
    }
    Ok(Copied {
        bytes,
        sha256: hex::encode(hasher.finalize()),
        complete,
    })
}

/// The local tar that extracts an archive from stdin into `dir`, keeping everything the
/// backup kept (owners as numbers when run as root, modes, ACLs, xattrs, sparse files);
/// `paths`, when given, are the members to extract (each with what is below it), matched
/// literally.
pub fn extract_command(dir: &std::path::Path, paths: &[std::ffi::OsString]) -> Command {
    let mut cmd = Command::new("tar");
    cmd.env("LC_ALL", "C")
        .arg("--extract")
        .arg("--file=-")
        .arg("--quoting-style=escape")
        .arg("--directory")
        .arg(dir)
        .args([
            "--numeric-owner",
            "--same-permissions",
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--no-wildcards",
            "--record-size=1048576",
        ]);
    if !paths.is_empty() {
        cmd.arg("--");
        cmd.args(paths);
    }
    cmd
}

/// The local tar that compares an archive from stdin with `dir` (GNU tar's `--compare`: file
/// contents byte for byte, type, mode, owner, group, mtime, size, link targets, hard links).
/// Its differences name members with every colon escaped, so `NAME: what` parses.
pub fn compare_command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new("tar");
    cmd.env("LC_ALL", "C")
        .arg("--compare")
        .arg("--file=-")
        .arg("--quoting-style=escape")
        .arg("--directory")
        .arg(dir)
        .args(["--numeric-owner", "--record-size=1048576"]);
    cmd
}

/// The local tar that lists an archive's members from stdin, one escaped name a line.
pub fn list_command() -> Command {
    let mut cmd = Command::new("tar");
    cmd.env("LC_ALL", "C")
        .arg("--list")
        .arg("--file=-")
        .arg("--quoting-style=escape")
        .arg("--record-size=1048576");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy stops at the limit, hashes what it passed on, and a consumer that goes away
    /// early makes it stop without error (the stream was not complete).
    #[test]
    fn copy_stops_at_the_limit_or_when_the_consumer_is_done() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (from, mut into) = std::io::pipe().unwrap();
        let feed = data.clone();
        let feeder = std::thread::spawn(move || {
            let _ = into.write_all(&feed);
        });
        let (mut sink_out, sink_in) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            sink_out.read_to_end(&mut got).unwrap();
            got
        });
        let bar = indicatif::ProgressBar::hidden();
        let copied = copy(from, Out::Pipes(vec![sink_in]), Some(1_000_000), &bar).unwrap();
        assert!(copied.complete);
        assert_eq!(copied.bytes, 1_000_000);
        assert_eq!(
            copied.sha256,
            hex::encode(Sha256::digest(&data[..1_000_000]))
        );
        assert_eq!(reader.join().unwrap(), &data[..1_000_000]);
        drop(feeder);

        let (from, mut into) = std::io::pipe().unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = into.write_all(&data);
        });
        let (sink_out, sink_in) = std::io::pipe().unwrap();
        drop(sink_out);
        let copied = copy(from, Out::Pipes(vec![sink_in]), None, &bar).unwrap();
        assert!(!copied.complete);
        feeder.join().unwrap();
    }
}
