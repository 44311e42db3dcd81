//! Planning: what the directory holds and how big a volume it needs, decided before anything
//! is created in the cloud.
//!
//! The walk is the tool's own (no `du`): it never follows symlinks, counts hard-linked files
//! once, counts sparse files by the blocks they really use, and does not descend into
//! pseudo-filesystems (proc, sysfs, tmpfs, ...) mounted below the directory, which are also
//! excluded from the transfer.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use thiserror::Error;

pub const GIB: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("the directory {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("the directory {path} cannot be read: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A walk thread died: its share of the tree is unknown, so the volume cannot be sized.
    #[error("sizing {0} failed: a walk thread stopped unexpectedly")]
    Walk(PathBuf),
}

/// What the sizing walk found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// Entries of any type (files, directories, links, ...), the root included.
    pub entries: u64,
    /// Bytes of file data, sparse holes and repeated hard links left out.
    pub data_bytes: u64,
    /// A conservative estimate of the space the backup takes on the volume, in either
    /// format: data rounded up to 4 KiB blocks, plus 4 KiB per directory (an ext4 directory
    /// block) and 2 KiB per other entry (a pax archive's header pair is 1.5 KiB).
    pub footprint: u64,
    /// The largest regular file (rsync writes a changed file's new copy beside the old one).
    pub largest: u64,
    /// Paths (relative to the directory, `/`-separated) of pseudo-filesystem mount points
    /// whose contents are not backed up.
    pub pseudo_mounts: Vec<String>,
    /// Paths the walk could not read; the transfer will report them too.
    pub unreadable: Vec<PathBuf>,
}

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

/// What an entry costs on the volume besides its data (see [`Inventory::footprint`]).
const DIR_COST: u64 = 4096;
const ENTRY_COST: u64 = 2048;

/// Checks that `dir` is a readable directory and returns its canonical path.
pub fn check_dir(dir: &Path) -> Result<PathBuf, PlanError> {
    let meta = fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PlanError::Missing(dir.to_path_buf()),
        _ => PlanError::Unreadable {
            path: dir.to_path_buf(),
            source: e,
        },
    })?;
    if !meta.is_dir() {
        return Err(PlanError::NotADirectory(dir.to_path_buf()));
    }
    fs::read_dir(dir).map_err(|e| PlanError::Unreadable {
        path: dir.to_path_buf(),
        source: e,
    })?;
    fs::canonicalize(dir).map_err(|e| PlanError::Unreadable {
        path: dir.to_path_buf(),
        source: e,
    })
}

/// The volume size, in GiB, for a backup of this footprint: at least twice it, at least 1.
pub fn volume_gib(footprint: u64) -> i32 {
    let gib = (footprint.saturating_mul(2)).div_ceil(GIB).max(1);
    i32::try_from(gib).unwrap_or(i32::MAX)
}

/// Whether an existing volume of `size_gib` can hold this backup.
pub fn fits(footprint: u64, size_gib: i32, filesystem: bool) -> bool {
    let capacity = u64::try_from(size_gib).unwrap_or(0) * GIB;
    // ext4 keeps about 5% for its own structures and the journal; a raw tar has no overhead.
    let usable = if filesystem {
        capacity / 100 * 95
    } else {
        capacity
    };
    footprint <= usable
}

/// Walks `root` (canonical) and sums what a backup of it holds.
///
/// The walk is spread over a few threads (it is bound by system calls, one `statx` per
/// regular file; directories and links are typed from `readdir` alone), sharing a stack of
/// directories still to read. Twice as many threads as cores: a thread waiting for the disk
/// (a cold cache) or preempted by the cloud lookups running meanwhile leaves its core to
/// another.
pub fn inventory(root: &Path) -> Result<Inventory, PlanError> {
    let pseudo: HashSet<PathBuf> = pseudo_mounts_below(root).into_iter().collect();
    let queue = Queue {
        state: Mutex::new((vec![root.to_path_buf()], 0)),
        ready: Condvar::new(),
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(4, 16);
    let parts: Option<Vec<Part>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| scope.spawn(|| walk_part(root, &pseudo, &queue)))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    let parts = parts.ok_or_else(|| PlanError::Walk(root.to_path_buf()))?;
    let mut inv = Inventory {
        entries: 1,
        footprint: DIR_COST,
        ..Inventory::default()
    };
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    for part in parts {
        inv.entries += part.inv.entries;
        inv.footprint += part.inv.footprint;
        inv.data_bytes += part.inv.data_bytes;
        inv.largest = inv.largest.max(part.inv.largest);
        inv.pseudo_mounts.extend(part.inv.pseudo_mounts);
        inv.unreadable.extend(part.inv.unreadable);
        links.extend(part.links);
    }
    // A hard-linked file counts once, whichever thread saw it.
    for used in links.values() {
        inv.data_bytes += used;
        inv.footprint += used.div_ceil(4096) * 4096;
    }
    inv.pseudo_mounts.sort();
    inv.unreadable.sort();
    Ok(inv)
}

/// Directories still to read, and how many workers are reading one now.
struct Queue {
    state: Mutex<(Vec<PathBuf>, usize)>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<PathBuf>, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next directory, or None when none is left and no worker can add more.
    fn next(&self) -> Option<PathBuf> {
        let mut g = self.lock();
        loop {
            if let Some(dir) = g.0.pop() {
                g.1 += 1;
                return Some(dir);
            }
            if g.1 == 0 {
                self.ready.notify_all();
                return None;
            }
            g = self.ready.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self, found: Vec<PathBuf>) {
        let mut g = self.lock();
        g.0.extend(found);
        g.1 -= 1;
        self.ready.notify_all();
    }
}

/// One worker's share: counts, plus hard-linked files by identity for the merge.
#[derive(Default)]
struct Part {
    inv: Inventory,
    links: Vec<((u64, u64), u64)>,
}

fn walk_part(root: &Path, pseudo: &HashSet<PathBuf>, queue: &Queue) -> Part {
    let mut part = Part::default();
    while let Some(dir) = queue.next() {
        let mut found = Vec::new();
        read_one(root, pseudo, &dir, &mut part, &mut found);
        queue.done(found);
    }
    part
}

fn read_one(
    root: &Path,
    pseudo: &HashSet<PathBuf>,
    dir: &Path,
    part: &mut Part,
    found: &mut Vec<PathBuf>,
) {
    let inv = &mut part.inv;
    let reader = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(_) => {
            inv.unreadable.push(dir.to_path_buf());
            return;
        }
    };
    for entry in reader {
        let Ok(entry) = entry else {
            inv.unreadable.push(dir.to_path_buf());
            continue;
        };
        let Ok(kind) = entry.file_type() else {
            inv.unreadable.push(entry.path());
            continue;
        };
        inv.entries += 1;
        inv.footprint += if kind.is_dir() { DIR_COST } else { ENTRY_COST };
        if kind.is_dir() {
            let path = entry.path();
            if pseudo.contains(&path) {
                inv.pseudo_mounts.push(relative(root, &path));
            } else {
                found.push(path);
            }
        } else if kind.is_file() {
            let Ok(meta) = entry.metadata() else {
                inv.unreadable.push(entry.path());
                continue;
            };
            let used = (meta.blocks() * 512).min(meta.len());
            inv.largest = inv.largest.max(used);
            if meta.nlink() > 1 {
                part.links.push(((meta.dev(), meta.ino()), used));
            } else {
                inv.data_bytes += used;
                inv.footprint += used.div_ceil(4096) * 4096;
            }
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Mount points of pseudo-filesystems strictly below `root`, from /proc/self/mountinfo.
fn pseudo_mounts_below(root: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_mountinfo(&text)
        .into_iter()
        .filter(|(point, fstype)| {
            PSEUDO_FS.contains(&fstype.as_str()) && point != root && point.starts_with(root)
        })
        .map(|(point, _)| point)
        .collect()
}

/// (mount point, filesystem type) pairs of a mountinfo text, with its octal escapes undone.
fn parse_mountinfo(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let point = fields.get(4)?;
            let fstype = fields.get(sep + 1)?;
            Some((PathBuf::from(unescape_octal(point)), fstype.to_string()))
        })
        .collect()
}

fn unescape_octal(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
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
    std::ffi::OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn sizes_round_up_to_whole_gib_at_least_one() {
        assert_eq!(volume_gib(0), 1);
        assert_eq!(volume_gib(GIB / 2), 1);
        assert_eq!(volume_gib(GIB / 2 + 1), 2);
        assert_eq!(volume_gib(3 * GIB), 6);
    }

    #[test]
    fn fit_leaves_room_for_the_filesystem() {
        assert!(fits(GIB, 1, false));
        assert!(!fits(GIB, 1, true));
        assert!(fits(GIB / 2, 1, true));
        assert!(!fits(GIB + 1, 1, false));
    }

    #[test]
    fn mountinfo_parsing_unescapes_and_finds_types() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    30 1 8:1 / /mnt/with\\040space rw - ext4 /dev/sda1 rw\n\
                    31 1 0:5 / /run shared:1 master:2 - tmpfs tmpfs rw\n";
        let got = parse_mountinfo(text);
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/proc"), "proc".to_string()),
                (PathBuf::from("/mnt/with space"), "ext4".to_string()),
                (PathBuf::from("/run"), "tmpfs".to_string()),
            ]
        );
    }

    #[test]
    fn inventory_counts_hard_links_once_and_skips_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a"), vec![1u8; 10_000]).unwrap();
        fs::hard_link(root.join("a"), root.join("b")).unwrap();
        symlink("/usr", root.join("link")).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/c"), b"hello").unwrap();
        let inv = inventory(&fs::canonicalize(root).unwrap()).unwrap();
        assert_eq!(inv.entries, 6);
        assert_eq!(inv.data_bytes, 10_000 + 5);
        // Two directories (the root, sub), four other entries, data in 4 KiB blocks.
        assert_eq!(inv.footprint, 2 * 4096 + 4 * 2048 + 12_288 + 4096);
        assert_eq!(inv.largest, 10_000);
        assert!(inv.unreadable.is_empty());
    }

    #[test]
    fn inventory_counts_sparse_files_by_used_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::File::create(dir.path().join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        let inv = inventory(&fs::canonicalize(dir.path()).unwrap()).unwrap();
        assert!(inv.data_bytes < 1 << 20, "{}", inv.data_bytes);
    }

    #[test]
    fn check_dir_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(check_dir(&file), Err(PlanError::NotADirectory(_))));
        assert!(matches!(
            check_dir(&dir.path().join("nope")),
            Err(PlanError::Missing(_))
        ));
        assert!(check_dir(dir.path()).is_ok());
    }
}
