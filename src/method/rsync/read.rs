//! Reading an rsync backup back: the volume's filesystem mounted read-only on the helper
//! (`ro,noload`: no journal replay, and the device itself set read-only first), then rsync
//! from it (restore) or a dry run against it that compares every file by checksum (verify).

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::helper::ssh::{describe_failure, Session};
use crate::method::MethodError;

/// Where a backup is mounted for reading on the helper.
pub const READ_POINT: &str = "/mnt/ec2-backup-read";

const MOUNT_RO_SCRIPT: &str = r#"set -eu
dev=$1 mnt=$2
blockdev --setro "$dev"
mkdir -p -- "$mnt"
mount -t ext4 -o ro,noload -- "$dev" "$mnt"
"#;

/// Mounts the backup's filesystem read-only at [`READ_POINT`].
pub async fn mount_read_only(ssh: &Session, device: &str) -> Result<(), MethodError> {
    ssh.run(
        "Mounting the backup read-only",
        &[
            "sudo",
            "-n",
            "sh",
            "-c",
            MOUNT_RO_SCRIPT,
            "mount-ro",
            device,
            READ_POINT,
        ],
    )
    .await?;
    Ok(())
}

/// rsync's options for reading a mirror: everything the backup keeps, names passed through
/// the protocol (never a remote shell), the mirror's `lost+found` left out.
fn reading(ssh: &Session) -> Result<Command, MethodError> {
    let mut cmd = Command::new("rsync");
    cmd.args(super::KEEP)
        .args(["--protect-args", "--exclude=/lost+found"]);
    cmd.arg("--rsh").arg(ssh.rsh()?);
    Ok(cmd)
}

/// Copies the mirror (or only `paths` of it, each with what is below it) into `dest`.
pub async fn restore(ssh: &Session, dest: &Path, paths: &[OsString]) -> Result<(), MethodError> {
    let mut cmd = reading(ssh)?;
    let host = ssh.rsync_host();
    if paths.is_empty() {
        cmd.arg(format!("{host}:{READ_POINT}/"));
    } else {
        // `/./` marks where the kept part of each path starts.
        cmd.arg("--relative");
        for p in paths {
            let mut spec = OsString::from(format!("{host}:{READ_POINT}/./"));
            spec.push(p);
            cmd.arg(spec);
        }
    }
    let mut to = OsString::from(dest.as_os_str());
    to.push("/");
    cmd.arg(to);
    let out = super::run_rsync(cmd, Stdio::piped(), Vec::new()).await?;
    match out.status.code() {
        Some(0) => Ok(()),
        code => Err(MethodError::Failed(format!(
            "rsync from the backup failed: {}",
            describe_failure(code, &String::from_utf8_lossy(&out.stderr))
        ))),
    }
}

/// Compares `dir` with the mirror: a dry run from `dir` onto it with whole-file checksums
/// (never rsync's size and mtime quick check) that itemizes every difference, leaving out of
/// `dir` what `rules` hide (see [`super::hide_rules`]: what the backup left out). Returns
/// the differences as (kind, path) pairs, paths as rsync escapes them, relative to the root.
pub async fn compare(
    ssh: &Session,
    dir: &Path,
    rules: Vec<u8>,
) -> Result<Vec<(String, String)>, MethodError> {
    let mut cmd = reading(ssh)?;
    cmd.args(["--dry-run", "--checksum", "--delete", "--out-format=%i %n"])
        .args(super::HIDE_FROM_STDIN);
    let mut from = OsString::from(dir.as_os_str());
    from.push("/");
    cmd.arg(from);
    cmd.arg(format!("{}:{READ_POINT}/", ssh.rsync_host()));
    let out = super::run_rsync(cmd, Stdio::piped(), rules).await?;
    if out.status.code() != Some(0) {
        return Err(MethodError::Failed(format!(
            "comparing with rsync failed: {}",
            describe_failure(out.status.code(), &String::from_utf8_lossy(&out.stderr))
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(itemized)
        .collect())
}

/// One line of rsync's itemized output as (what differs, path); None for a line that says
/// nothing differs (a directory whose only news is its listing).
fn itemized(line: &str) -> Option<(String, String)> {
    if let Some(path) = line.strip_prefix("*deleting ") {
        return Some(("only in the backup".into(), path.trim_start().to_string()));
    }
    let (item, path) = line.split_once(' ')?;
    let flags: Vec<char> = item.chars().collect();
    if flags.len() < 11 {
        return None;
    }
    let path = path.to_string();
    if item[2..].starts_with('+') {
        return Some(("only in the directory".into(), path));
    }
    if flags[0] == 'h' {
        return Some(("hard link".into(), path));
    }
    let what: Vec<&str> = [
        (
            2,
            'c',
            if flags[1] == 'L' {
                "link target"
            } else {
                "content"
            },
        ),
        (3, 's', "size"),
        (4, 't', "mtime"),
        (5, 'p', "mode"),
        (6, 'o', "owner"),
        (7, 'g', "group"),
        (9, 'a', "acl"),
        (10, 'x', "xattr"),
    ]
    .iter()
    .filter(|(i, c, _)| flags[*i] == *c || (*c == 't' && flags[*i] == 'T'))
    .map(|(_, _, w)| *w)
    .collect();
    (!what.is_empty()).then(|| (what.join(", "), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itemized_lines_name_what_differs() {
        let p = |k: &str, p: &str| Some((k.to_string(), p.to_string()));
        assert_eq!(itemized(">fc.t...... a b"), p("content, mtime", "a b"));
        assert_eq!(itemized(">f.s.p..... x"), p("size, mode", "x"));
        assert_eq!(itemized(".f....o.... y"), p("owner", "y"));
        assert_eq!(
            itemized("cL+++++++++ new"),
            p("only in the directory", "new")
        );
        assert_eq!(itemized("cLc........ l"), p("link target", "l"));
        assert_eq!(
            itemized("*deleting   gone/"),
            p("only in the backup", "gone/")
        );
        assert_eq!(itemized(">f+++++++++ f"), p("only in the directory", "f"));
        assert_eq!(itemized(".d..t...... d/"), p("mtime", "d/"));
        assert_eq!(itemized(".d......... d/"), None);
    }
}
