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
use std::time::Duration;

use tokio::process::Command;

pub mod read;

use crate::helper::ssh::{describe_failure, detach_from_terminal_signals, Session};
use crate::method::{MethodError, Source, Transfer};
use crate::report::say;
use crate::walk::Exclusions;

/// Where the volume is mounted on the helper.
pub const MOUNT_POINT: &str = "/mnt/ec2-backup";

/// Mounts the device $1 on $2, first making an ext4 filesystem with $4 inodes when $3 is
/// `mkfs` (the caller decided that from the probe: the device is blank, or the user gave
/// --overwrite). Then prints the mounted filesystem's block size, blocks, free and available
/// blocks, and inodes, for the capacity check.
const MOUNT_SCRIPT: &str = r#"set -eu
dev=$1 mnt=$2 make=$3 inodes=$4 label=$5
if [ "$make" = mkfs ]; then
  mkfs.ext4 -q -F -L "$label" -N "$inodes" -E lazy_itable_init=1,lazy_journal_init=1 -- "$dev"
fi
mkdir -p -- "$mnt"
mount -t ext4 -- "$dev" "$mnt"
stat -f -c 'statfs %S %b %f %a %c' -- "$mnt"
"#;

/// umount writes the filesystem's data and journal out before it returns.
const UNMOUNT_SCRIPT: &str = r#"set -eu
if mountpoint -q -- "$1"; then umount -- "$1"; fi
"#;

/// The mounted filesystem's size, as statfs reports it (ext4 leaves its own metadata out of
/// `blocks`, so what the mirror may use is what the check compares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub block_size: u64,
    pub blocks: u64,
    pub free: u64,
    pub available: u64,
    pub inodes: u64,
}

impl Capacity {
    fn parse(output: &str) -> Option<Capacity> {
        let line = output.lines().rev().find(|l| l.starts_with("statfs "))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        match n[..] {
            [block_size, blocks, free, available, inodes] => Some(Capacity {
                block_size,
                blocks,
                free,
                available,
                inodes,
            }),
            _ => None,
        }
    }

    /// Why the finished mirror of a tree would not fit, if it would not: its bytes (the
    /// footprint, plus room for the largest file's temporary copy while rsync replaces it)
    /// within the blocks an unprivileged user could fill, and its entries within the inodes
    /// (ext4 keeps the first 11 for itself, lost+found takes one).
    pub fn shortfall(&self, footprint: u64, largest: u64, entries: u64) -> Option<String> {
        let reserved = self.free.saturating_sub(self.available);
        let bytes = self.blocks.saturating_sub(reserved) * self.block_size;
        let needed = footprint.saturating_add(largest);
        if needed > bytes {
            return Some(format!(
                "its filesystem holds {} MiB but the mirror needs about {} MiB",
                bytes >> 20,
                needed.div_ceil(1 << 20)
            ));
        }
        if entries + 12 > self.inodes {
            return Some(format!(
                "its filesystem has {} inodes but the directory has {entries} entries",
                self.inodes
            ));
        }
        None
    }
}

/// Inodes for a filesystem made for a tree of `entries`: twice as many, so a mirror can
/// grow, and never fewer than ext4's default of one per 16 KiB.
pub fn inodes_for(entries: u64, size_gib: i32) -> u64 {
    let default = (u64::try_from(size_gib).unwrap_or(1) << 30) / 16384;
    entries.saturating_mul(2).saturating_add(64).max(default)
}

/// Mounts the volume's filesystem, first making one when `make_fs` gives its inode count;
/// returns the mounted filesystem's capacity.
pub async fn mount(
    ssh: &Session,
    device: &str,
    make_fs: Option<u64>,
) -> Result<Capacity, MethodError> {
    let (make, inodes) = match make_fs {
        Some(n) => ("mkfs", n.to_string()),
        None => ("mount", "0".to_string()),
    };
    let words = [
        "sudo",
        "-n",
        "sh",
        "-c",
        MOUNT_SCRIPT,
        "mount",
        device,
        MOUNT_POINT,
        make,
        &inodes,
        crate::helper::probe::FS_LABEL,
    ];
    let what = match make_fs {
        Some(_) => "Making and mounting the volume's filesystem",
        None => "Mounting the volume's filesystem",
    };
    let out = ssh.run_for(what, &words, MOUNT_LIMIT).await?;
    Capacity::parse(&out).ok_or_else(|| {
        MethodError::Failed(format!(
            "the helper did not report the mounted filesystem's size ({})",
            out.trim()
        ))
    })
}

/// mkfs with lazy inode tables and mount are quick even for large volumes; umount may have
/// a lot of dirty data to write out first.
const MOUNT_LIMIT: Duration = Duration::from_secs(300);
pub const UNMOUNT_LIMIT: Duration = Duration::from_secs(900);

pub async fn unmount(ssh: &Session) -> Result<(), MethodError> {
    ssh.run_for(
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
        UNMOUNT_LIMIT,
    )
    .await?;
    Ok(())
}

/// What every rsync of the tool keeps and how it reaches the helper: all of SPEC §3, as root
/// on the helper, and a hung disk or link (no data either way for 5 minutes) ends it (exit 30).
pub const KEEP: &[&str] = &[
    "--archive",
    "--hard-links",
    "--acls",
    "--xattrs",
    "--sparse",
    "--numeric-ids",
    "--rsync-path=sudo -n rsync",
    "--timeout=300",
];

/// How each file rsync writes is logged (`--log-file-format`): no name, so that the log
/// parses whatever the names hold.
const LOG_FORMAT: &str = "ec2-backup %i %l";

/// What rsync leaves out, as rules it reads from stdin (`--from0 --filter=. -`), one
/// NUL-ended rule each: every path the walk left out, anchored at the directory and matched
/// literally, and the contents of every skipped mount point. They are hide rules (`H`, the
/// sending side only), so they protect nothing on the mirror: under `--delete` it loses what
/// it still holds of them. The walk decides; rsync's own pattern language only carries its
/// answer.
pub fn hide_rules(ex: &Exclusions) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut rules = Vec::new();
    for path in &ex.excluded {
        rules.extend_from_slice(b"H /");
        rules.extend(crate::quote::rsync_literal(
            path.as_os_str().as_bytes(),
            false,
        ));
        rules.push(0);
    }
    for path in &ex.skipped {
        rules.extend_from_slice(b"H /");
        rules.extend(crate::quote::rsync_literal(
            path.as_os_str().as_bytes(),
            true,
        ));
        rules.extend_from_slice(b"/*\0");
    }
    rules
}

/// The options that give rsync the rules of [`hide_rules`] on its stdin.
pub const HIDE_FROM_STDIN: &[&str] = &["--from0", "--filter=. -"];

/// The local rsync command mirroring `source` onto the mounted volume, logging what it
/// writes to `log`; it reads [`hide_rules`] from its stdin.
pub fn rsync_command(ssh: &Session, source: &Source, log: &Path) -> Result<Command, MethodError> {
    let mut cmd = Command::new("rsync");
    cmd.args(KEEP)
        .args(["--delete", "--filter=P /lost+found"])
        .args(HIDE_FROM_STDIN);
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
    let left_out = crate::walk::exclusions(&source.rules)
        .await
        .map_err(|e| MethodError::Failed(e.to_string()))?;
    let cmd = rsync_command(ssh, source, &log)?;
    let mut transfer = sync(cmd, hide_rules(&left_out)).await?;
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

/// Runs a prepared rsync to its end (killed if the run is dropped), `stdin` written to it,
/// stderr captured.
pub(crate) async fn run_rsync(
    mut cmd: Command,
    stdout: Stdio,
    stdin: Vec<u8>,
) -> Result<std::process::Output, MethodError> {
    use tokio::io::AsyncWriteExt;
    detach_from_terminal_signals(&mut cmd);
    let spawn = |e| MethodError::Spawn {
        program: "rsync",
        source: e,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn)?;
    let mut to_rsync = child.stdin.take();
    // Written beside the wait: rsync may stop reading (a failure) before the end.
    let feed = async move {
        if let Some(pipe) = to_rsync.as_mut() {
            let _ = pipe.write_all(&stdin).await;
        }
        drop(to_rsync);
    };
    let (_, out) = tokio::join!(feed, child.wait_with_output());
    out.map_err(spawn)
}

async fn sync(mut cmd: Command, rules: Vec<u8>) -> Result<Transfer, MethodError> {
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
    let out = run_rsync(cmd, progress, rules).await?;
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

#[cfg(test)]
mod capacity_tests {
    use super::*;

    #[test]
    fn capacity_parses_statfs_and_checks_bytes_and_inodes() {
        let c = Capacity::parse("statfs 4096 253764 250000 237000 65536\n").unwrap();
        assert_eq!(c.inodes, 65536);
        // 253764 blocks less 13000 reserved: ~940 MiB.
        assert_eq!(c.shortfall(900 << 20, 1 << 20, 1000), None);
        let e = c.shortfall(939 << 20, 2 << 20, 1000).unwrap();
        assert!(e.contains("MiB"), "{e}");
        let e = c.shortfall(1 << 20, 0, 65530).unwrap();
        assert!(e.contains("65536 inodes"), "{e}");
        assert!(Capacity::parse("statfs 4096 x 1 1 1").is_none());
        assert!(Capacity::parse("nothing").is_none());
    }

    #[test]
    fn inodes_grow_with_the_tree_never_below_the_default() {
        assert_eq!(inodes_for(10, 1), 65536);
        assert_eq!(inodes_for(100_000, 1), 200_064);
    }
}
