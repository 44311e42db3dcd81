//! Mount points below the directory whose contents a backup skips: pseudo-filesystems
//! always (proc, sysfs, tmpfs, ...: `ec2-backup /` works), and with `--one-file-system`
//! every filesystem other than the directory's own (by device number, as tar and rsync
//! judge it: a bind mount of the same filesystem is not another one). Their mount points
//! are kept, as empty directories.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Filesystem types whose contents are not data worth backing up.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "ramfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "autofs",
    "binfmt_misc",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
    "selinuxfs",
];

/// The mount points strictly below `root` (canonical) whose contents are skipped, from
/// /proc/self/mountinfo.
pub fn skipped_below(root: &Path, one_file_system: bool) -> HashSet<PathBuf> {
    let Ok(text) = std::fs::read("/proc/self/mountinfo") else {
        return HashSet::new();
    };
    let root_dev = std::fs::metadata(root).map(|m| m.dev()).ok();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|(point, _)| point != root && point.starts_with(root))
        .filter(|(point, fstype)| {
            PSEUDO_FS.contains(&fstype.as_str())
                || (one_file_system && std::fs::metadata(point).map(|m| m.dev()).ok() != root_dev)
        })
        .map(|(point, _)| point)
        .collect()
}

/// (mount point, filesystem type) pairs of a mountinfo text, with its octal escapes undone
/// (read as bytes: a mount point need not be UTF-8).
fn parse_mountinfo(text: &[u8]) -> Vec<(PathBuf, String)> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            let sep = fields.iter().position(|f| *f == b"-")?;
            let point = fields.get(4)?;
            let fstype = fields.get(sep + 1)?;
            Some((
                PathBuf::from(unescape_octal(point)),
                String::from_utf8_lossy(fstype).into_owned(),
            ))
        })
        .collect()
}

fn unescape_octal(bytes: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        if bytes[i] == b'\\' {
            if let Some(Ok(v)) = digits.map(|d| u8::from_str_radix(d, 8)) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing_unescapes_and_finds_types() {
        let text = b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    30 1 8:1 / /mnt/with\\040space rw - ext4 /dev/sda1 rw\n\
                    31 1 0:5 / /run shared:1 master:2 - tmpfs tmpfs rw\n\
                    32 1 8:2 / /mnt/\xff rw - ext4 /dev/sda2 rw\n";
        let got = parse_mountinfo(text);
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/proc"), "proc".to_string()),
                (PathBuf::from("/mnt/with space"), "ext4".to_string()),
                (PathBuf::from("/run"), "tmpfs".to_string()),
                (
                    PathBuf::from(OsString::from_vec(b"/mnt/\xff".to_vec())),
                    "ext4".to_string()
                ),
            ]
        );
    }

    #[test]
    fn pseudo_filesystems_below_root_are_skipped() {
        // /proc is a pseudo-filesystem on every Linux machine that runs this.
        assert!(skipped_below(Path::new("/"), false).contains(Path::new("/proc")));
        assert!(!skipped_below(Path::new("/proc"), false).contains(Path::new("/proc")));
    }
}
