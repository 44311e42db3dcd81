//! `rsync`: the volume carries a filesystem (ext4 is made when it has none), mounted on the
//! helper; the directory is mirrored onto its root with rsync over the run's ssh connection.
//! Reusing a volume is incremental and mirrors deletions; `lost+found` is left alone.
//!
//! Integrity: rsync checks every file it writes against a whole-file checksum computed on
//! both ends (part of its protocol; a mismatch is sent again once, then rsync names the file
//! and exits 23: the backup is incomplete). Files it
//! leaves alone already matched by size and modification time. No second full-checksum pass
//! is made: it would re-read the whole tree on both ends on every run, however small the
//! change.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::{MethodError, Source, Transfer};
use crate::quote::glob_escape;
use crate::report::say;
use crate::ssh::{describe_failure, detach_from_terminal_signals, Session};

/// Where the volume is mounted on the helper.
pub const MOUNT_POINT: &str = "/mnt/ec2-backup";

/// Prepares and mounts the device. Exit 4: holds a tar archive; exit 5: partitioned.
const MOUNT_SCRIPT: &str = r#"set -eu
dev=$1 mnt=$2
if [ -n "$(blkid -p -o value -s PTTYPE -- "$dev" 2>/dev/null || true)" ]; then exit 5; fi
fstype=$(blkid -p -o value -s TYPE -- "$dev" 2>/dev/null || true)
if [ -z "$fstype" ]; then
  magic=$(dd if="$dev" bs=512 count=1 2>/dev/null | dd bs=1 skip=257 count=5 2>/dev/null || true)
  if [ "$magic" = "ustar" ]; then exit 4; fi
  mkfs.ext4 -q -F -L ec2-backup -E lazy_itable_init=1,lazy_journal_init=1 -- "$dev"
  echo formatted
fi
mkdir -p -- "$mnt"
mount -- "$dev" "$mnt"
"#;

/// umount writes the filesystem's data and journal out before it returns.
const UNMOUNT_SCRIPT: &str = r#"set -eu
if mountpoint -q -- "$1"; then umount -- "$1"; fi
"#;

/// Mounts the volume's filesystem, making one if the device has none. Returns whether a
/// filesystem was made.
pub async fn mount(ssh: &Session, device: &str, volume_id: &str) -> Result<bool, MethodError> {
    let words = [
        "sudo",
        "-n",
        "sh",
        "-c",
        MOUNT_SCRIPT,
        "mount",
        device,
        MOUNT_POINT,
    ];
    let out = ssh
        .command(&words)?
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| MethodError::Spawn {
            program: "ssh",
            source: e,
        })?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).contains("formatted")),
        Some(4) => Err(MethodError::HoldsArchive(volume_id.to_string())),
        Some(5) => Err(MethodError::Partitioned(volume_id.to_string())),
        code => Err(MethodError::Failed(format!(
            "mounting the volume on the helper failed: {}",
            describe_failure(code, &String::from_utf8_lossy(&out.stderr))
        ))),
    }
}

pub async fn unmount(ssh: &Session) -> Result<(), MethodError> {
    ssh.run(
        "Unmounting the volume",
        &[
            "sudo",
            "-n",
            "sh",
            "-c",
            UNMOUNT_SCRIPT,
            "unmount",
            MOUNT_POINT,
        ],
    )
    .await?;
    Ok(())
}

/// How each file rsync writes is logged (`--log-file-format`): no name, so that the log
/// parses whatever the names hold.
const LOG_FORMAT: &str = "ec2-backup %i %l";

/// The local rsync command mirroring `source` onto the mounted volume, logging what it
/// writes to `log`.
pub fn rsync_command(ssh: &Session, source: &Source, log: &Path) -> Result<Command, MethodError> {
    let mut cmd = Command::new("rsync");
    cmd.args([
        "--archive",
        "--hard-links",
        "--acls",
        "--xattrs",
        "--sparse",
        "--numeric-ids",
        "--delete",
        "--filter=P /lost+found",
        "--rsync-path=sudo -n rsync",
    ]);
    for skip in &source.skip_contents_of {
        cmd.arg(format!("--exclude=/{}/*", glob_escape(skip)));
    }
    let mut log_file = OsString::from("--log-file=");
    log_file.push(log);
    cmd.arg(log_file);
    cmd.arg(format!("--log-file-format={LOG_FORMAT}"));
    cmd.arg("--rsh").arg(ssh.rsh()?);
    let mut src = OsString::from(source.dir.as_os_str());
    src.push("/");
    cmd.arg(src);
    cmd.arg(format!("{}:{MOUNT_POINT}/", ssh.rsync_host()));
    Ok(cmd)
}

/// Mirrors `source` onto the mounted volume; `scratch` is a private directory for rsync's log.
pub async fn backup(
    ssh: &Session,
    source: &Source,
    scratch: &Path,
) -> Result<Transfer, MethodError> {
    let log = scratch.join("rsync.log");
    let cmd = rsync_command(ssh, source, &log)?;
    let mut transfer = sync(cmd).await?;
    if let Ok(text) = std::fs::read_to_string(&log) {
        transfer.bytes = written_bytes(&text);
    }
    Ok(transfer)
}

/// The size of the regular files rsync wrote (whole, even when only a delta crossed the
/// link), summed from its log lines `DATE TIME [PID] ec2-backup ITEM LENGTH`: the items `<f`
/// (sent, as this side logs a push) and `>f` (received, as a local copy logs them).
fn written_bytes(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| {
            let mut words = line.splitn(4, ' ');
            let (_date, _time, pid) = (words.next()?, words.next()?, words.next()?);
            let rest = words.next()?.strip_prefix("ec2-backup ")?;
            if !(pid.starts_with('[') && pid.ends_with(']')) {
                return None;
            }
            let (item, length) = rest.split_once(' ')?;
            (item.starts_with("<f") || item.starts_with(">f"))
                .then(|| length.trim().parse::<u64>().ok())?
        })
        .fold(0u64, u64::saturating_add)
}

/// rsync's exits for a broken connection (socket, protocol stream, timeouts, ssh) as one
/// sentence: its own messages quote source lines that mean nothing to a user.
fn lost(code: i32) -> MethodError {
    MethodError::Cut(format!(
        "the ssh connection to the helper was lost (rsync exit {code})"
    ))
}

/// Runs a prepared rsync to its end (killed if the run is dropped), stderr captured.
async fn run_rsync(mut cmd: Command, stdout: Stdio) -> Result<std::process::Output, MethodError> {
    detach_from_terminal_signals(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| MethodError::Spawn {
            program: "rsync",
            source: e,
        })
}

async fn sync(mut cmd: Command) -> Result<Transfer, MethodError> {
    // On a terminal, rsync's own overall progress line goes to stderr (never stdout).
    let progress = if std::io::stderr().is_terminal() {
        cmd.arg("--info=progress2");
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    } else {
        Stdio::null()
    };
    let out = run_rsync(cmd, progress).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    // Pass rsync's own messages on when they name files (unreadable, vanished); a cut
    // connection is said in one sentence instead.
    if matches!(code, Some(0 | 23 | 24)) && !stderr.trim().is_empty() {
        say(stderr.trim_end());
    }
    match code {
        Some(0) | Some(24) => Ok(Transfer::default()),
        // Partial transfer: some files could not be read; the rest is on the volume.
        Some(23) => Ok(Transfer {
            incomplete: true,
            ..Transfer::default()
        }),
        Some(c @ (10 | 12 | 30 | 35 | 255)) => Err(lost(c)),
        code => Err(MethodError::Failed(format!(
            "rsync failed: {}",
            describe_failure(code, &stderr)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_bytes_counts_only_files_rsync_wrote() {
        let log = "2026/11/27 06:01:14 [24409] building file list\n\
                   2026/11/27 06:01:14 [24409] ec2-backup >f+++++++++ 1000\n\
                   2026/11/27 06:01:14 [24409] ec2-backup <f.st...... 24\n\
                   2026/11/27 06:01:14 [24409] ec2-backup cd+++++++++ 4096\n\
                   2026/11/27 06:01:14 [24409] ec2-backup hf+++++++++ 1000\n\
                   2026/11/27 06:01:14 [24409] ec2-backup *deleting   0\n\
                   2026/11/27 06:01:14 [24409] ec2-backup cL+++++++++ 7\n\
                   2026/11/27 06:01:14 [24409] rsync: [sender] x ec2-backup >f 99: gone\n\
                   2026/11/27 06:01:14 [24409] sent 247 bytes  received 78 bytes  total size 3\n";
        assert_eq!(written_bytes(log), 1024);
        assert_eq!(written_bytes(""), 0);
    }
}
