//! `rsync`: the volume carries a filesystem (ext4 is made when it has none), mounted on the
//! helper; the directory is mirrored onto its root with rsync over the run's ssh connection.
//! Reusing a volume is incremental and mirrors deletions; `lost+found` is left alone.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::AsFd;
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

const UNMOUNT_SCRIPT: &str = r#"set -eu
sync
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

/// The local rsync command mirroring `source` onto the mounted volume.
pub fn rsync_command(ssh: &Session, source: &Source) -> Result<Command, MethodError> {
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
    cmd.arg("--rsh").arg(ssh.rsh()?);
    let mut src = OsString::from(source.dir.as_os_str());
    src.push("/");
    cmd.arg(src);
    cmd.arg(format!("{}:{MOUNT_POINT}/", ssh.rsync_host()));
    Ok(cmd)
}

pub async fn backup(ssh: &Session, source: &Source) -> Result<Transfer, MethodError> {
    let transfer = sync(ssh, source).await?;
    let differences = verify(ssh, source).await?;
    if differences.is_empty() {
        return Ok(transfer);
    }
    // A file changed while it was copied (a live system), or the copy is wrong: either
    // way the volume does not hold the directory as it is now.
    say(&format!(
        "ec2-backup: warning: after the transfer, {} entries differ between the directory and the volume by checksum:",
        differences.len()
    ));
    for d in differences.iter().take(20) {
        say(&format!("  {d}"));
    }
    Ok(Transfer {
        incomplete: true,
        ..transfer
    })
}

/// Proves the volume holds the directory: a dry run of the same mirror comparing full
/// checksums, which must find nothing to change. Returns rsync's itemized differences.
pub async fn verify(ssh: &Session, source: &Source) -> Result<Vec<String>, MethodError> {
    let mut cmd = rsync_command(ssh, source)?;
    cmd.args([
        "--dry-run",
        "--checksum",
        "--itemize-changes",
        "--out-format=%i %n%L",
    ]);
    let out = run_rsync(cmd, Stdio::piped()).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) | Some(23) | Some(24) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()),
        Some(c @ (10 | 12 | 30 | 35 | 255)) => Err(lost(c)),
        code => Err(MethodError::Failed(format!(
            "verifying the copy with rsync failed: {}",
            describe_failure(code, &stderr)
        ))),
    }
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

async fn sync(ssh: &Session, source: &Source) -> Result<Transfer, MethodError> {
    let mut cmd = rsync_command(ssh, source)?;
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
