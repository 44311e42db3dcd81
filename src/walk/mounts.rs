//! Mount points below the directory whose contents a backup skips: pseudo-filesystems
//! always (proc, sysfs, tmpfs, ...: `ec2-backup /` works), and with `--one-file-system`
//! every filesystem other than the directory's own (by device number, as tar and rsync
//! judge it: a bind mount of the same filesystem is not another one; the number is the one
//! mountinfo gives, so that no mount point is stat'ed: a hung network mount cannot hang the
//! run). Their mount points are kept, as empty directories.

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
        .filter(|m| m.point != root && m.point.starts_with(root))
        .filter(|m| {
            PSEUDO_FS.contains(&m.fstype.as_str()) || (one_file_system && Some(m.dev) != root_dev)
        })
        .map(|m| m.point)
        .collect()
}

/// One line of mountinfo: where, what, and the device number of its files.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fstype: String,
    dev: u64,
}

/// The mounts of a mountinfo text, with its octal escapes undone (read as bytes: a mount
/// point need not be UTF-8).
fn parse_mountinfo(text: &[u8]) -> Vec<Mount> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            let sep = fields.iter().position(|f| *f == b"-")?;
            let (major, minor) = std::str::from_utf8(fields.get(2)?).ok()?.split_once(':')?;
            let point = fields.get(4)?;
            let fstype = fields.get(sep + 1)?;
            Some(Mount {
                point: PathBuf::from(unescape_octal(point)),
                fstype: String::from_utf8_lossy(fstype).into_owned(),
                dev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
            })
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
        let got: Vec<(PathBuf, String, u64)> = parse_mountinfo(text)
            .into_iter()
            .map(|m| (m.point, m.fstype, m.dev))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    PathBuf::from("/proc"),
                    "proc".to_string(),
                    libc::makedev(0, 21)
                ),
                (
                    PathBuf::from("/mnt/with space"),
                    "ext4".to_string(),
                    libc::makedev(8, 1)
                ),
                (
                    PathBuf::from("/run"),
                    "tmpfs".to_string(),
                    libc::makedev(0, 5)
                ),
                (
                    PathBuf::from(OsString::from_vec(b"/mnt/\xff".to_vec())),
                    "ext4".to_string(),
                    libc::makedev(8, 2)
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

    #[test]
    fn mountinfo_device_numbers_are_those_stat_reports() {
        // The root filesystem's own mount: its files carry the device number mountinfo gives.
        let text = std::fs::read("/proc/self/mountinfo").unwrap();
        let root = parse_mountinfo(&text)
            .into_iter()
            .rev()
            .find(|m| m.point == Path::new("/"))
            .unwrap();
        assert_eq!(root.dev, std::fs::metadata("/").unwrap().dev());
    }
}
