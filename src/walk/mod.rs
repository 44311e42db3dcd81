//! Planning: what the directory holds and how big a volume it needs, decided before anything
//! is created in the cloud.
//!
//! The walk is the tool's own (no `du`): it never follows symlinks, counts hard-linked files
//! once, counts sparse files by the blocks they really use, and takes in only what the
//! [`Rules`] take in: nothing an exclude pattern matches, and not the contents of the mount
//! points [`mounts`] skips. The transfers ask the same rules ([`list`] feeds tar; rsync gets
//! the paths a walk left out), so the volume's size, the archive and the mirror agree on
//! what is in the backup.

pub mod list;
pub mod mounts;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use thiserror::Error;

use crate::select::Selection;

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
    /// Bytes of regular files' lengths that hold no allocated block: holes, or data that a
    /// compressing filesystem (ZFS) stores in fewer blocks. tar stores the latter in full.
    pub unallocated: u64,
    /// A conservative estimate of the space the backup takes on the volume, in either
    /// format: data rounded up to 4 KiB blocks, plus 4 KiB per directory (an ext4 directory
    /// block) and 2 KiB per other entry (a pax archive's header pair is 1.5 KiB).
    pub footprint: u64,
    /// The largest regular file (rsync writes a changed file's new copy beside the old one).
    pub largest: u64,
    /// Mount points (relative to the directory) whose contents are not backed up.
    pub skipped: Vec<PathBuf>,
    /// What the exclude patterns left out (relative): each path where the walk stopped,
    /// not what is below it.
    pub excluded: Vec<PathBuf>,
    /// Paths the walk could not read; the transfer will report them too.
    pub unreadable: Vec<PathBuf>,
}

/// What a walk of a directory takes in.
#[derive(Debug, Clone)]
pub struct Rules {
    root: PathBuf,
    selection: Selection,
    skipped: Arc<HashSet<PathBuf>>,
}

/// What the rules say of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Left out, with everything below it.
    Out,
    In,
    /// A mount point: the directory is kept, its contents are not.
    Empty,
}

impl Rules {
    /// The rules for `root` (canonical): the selection's patterns, and the mount points
    /// below it whose contents are skipped, as mounted now.
    pub fn new(root: &Path, selection: &Selection) -> Rules {
        Rules {
            root: root.to_path_buf(),
            selection: selection.clone(),
            skipped: Arc::new(mounts::skipped_below(root, selection.one_file_system)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The decision for the entry at `path` (below the root).
    pub fn decide(&self, path: &Path, is_dir: bool) -> Decision {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        if self.selection.excludes(rel, is_dir) {
            Decision::Out
        } else if is_dir && self.skipped.contains(path) {
            Decision::Empty
        } else {
            Decision::In
        }
    }

    /// The skipped mount points, relative to the root, sorted.
    pub fn skipped(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .skipped
            .iter()
            .filter_map(|p| p.strip_prefix(&self.root).ok().map(Path::to_path_buf))
            .collect();
        out.sort();
        out
    }
}

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
pub fn inventory(rules: &Rules) -> Result<Inventory, PlanError> {
    let root = rules.root();
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
            .map(|_| scope.spawn(|| walk_part(rules, &queue)))
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
        inv.unallocated += part.inv.unallocated;
        inv.largest = inv.largest.max(part.inv.largest);
        inv.skipped.extend(part.inv.skipped);
        inv.excluded.extend(part.inv.excluded);
        inv.unreadable.extend(part.inv.unreadable);
        links.extend(part.links);
    }
    // A hard-linked file counts once, whichever thread saw it.
    for used in links.values() {
        inv.data_bytes += used;
        inv.footprint += used.div_ceil(4096) * 4096;
    }
    inv.skipped.sort();
    inv.excluded.sort();
    inv.unreadable.sort();
    Ok(inv)
}

/// [`inventory`] on a thread of its own, so that async work goes on meanwhile. Not a tokio
/// blocking task: a walk stuck in a hung network mount must not keep a run that was
/// interrupted from exiting (the runtime waits for its blocking tasks; a plain thread ends
/// with the process).
pub async fn inventory_in_thread(rules: &Rules) -> Result<Inventory, PlanError> {
    let owned = rules.clone();
    let (done, walked) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ec2-backup-walk".into())
        .spawn(move || {
            let _ = done.send(inventory(&owned));
        })
        .map_err(|_| PlanError::Walk(rules.root().to_path_buf()))?;
    walked
        .await
        .map_err(|_| PlanError::Walk(rules.root().to_path_buf()))?
}

/// What a transfer leaves out: the paths exclude patterns match (found by a walk now, when
/// there are patterns) and the mount points whose contents are skipped.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    pub excluded: Vec<PathBuf>,
    pub skipped: Vec<PathBuf>,
}

pub async fn exclusions(rules: &Rules) -> Result<Exclusions, PlanError> {
    if rules.selection().patterns().is_empty() {
        return Ok(Exclusions {
            excluded: Vec::new(),
            skipped: rules.skipped(),
        });
    }
    let inv = inventory_in_thread(rules).await?;
    Ok(Exclusions {
        excluded: inv.excluded,
        skipped: inv.skipped,
    })
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

fn walk_part(rules: &Rules, queue: &Queue) -> Part {
    let mut part = Part::default();
    while let Some(dir) = queue.next() {
        let mut found = Vec::new();
        read_one(rules, &dir, &mut part, &mut found);
        queue.done(found);
    }
    part
}

fn read_one(rules: &Rules, dir: &Path, part: &mut Part, found: &mut Vec<PathBuf>) {
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
        let path = entry.path();
        let decision = rules.decide(&path, kind.is_dir());
        if decision == Decision::Out {
            inv.excluded.push(relative(rules.root(), &path));
            continue;
        }
        inv.entries += 1;
        inv.footprint += if kind.is_dir() { DIR_COST } else { ENTRY_COST };
        if kind.is_dir() {
            match decision {
                Decision::Empty => inv.skipped.push(relative(rules.root(), &path)),
                _ => found.push(path),
            }
        } else if kind.is_file() {
            let Ok(meta) = entry.metadata() else {
                inv.unreadable.push(entry.path());
                continue;
            };
            let used = (meta.blocks() * 512).min(meta.len());
            inv.unallocated += meta.len() - used;
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

fn relative(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn walk(root: &Path, selection: &Selection) -> Inventory {
        let root = fs::canonicalize(root).unwrap();
        inventory(&Rules::new(&root, selection)).unwrap()
    }

    #[test]
    fn excluded_entries_are_not_counted_and_their_contents_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("keep/cache/deep")).unwrap();
        fs::write(root.join("keep/cache/deep/big"), vec![1u8; 100_000]).unwrap();
        fs::write(root.join("keep/a.log"), vec![1u8; 50_000]).unwrap();
        fs::write(root.join("keep/f"), b"x").unwrap();
        let selection = Selection::new(&["cache/".into(), "*.log".into()], &[], false).unwrap();
        let inv = walk(root, &selection);
        // The root, keep, keep/f.
        assert_eq!(inv.entries, 3);
        assert_eq!(inv.data_bytes, 1);
        assert_eq!(
            inv.excluded,
            [PathBuf::from("keep/a.log"), PathBuf::from("keep/cache")]
        );
        assert_eq!(walk(root, &Selection::default()).entries, 7);
    }

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
    fn inventory_counts_hard_links_once_and_skips_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a"), vec![1u8; 10_000]).unwrap();
        fs::hard_link(root.join("a"), root.join("b")).unwrap();
        symlink("/usr", root.join("link")).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/c"), b"hello").unwrap();
        let inv = walk(root, &Selection::default());
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
        let inv = walk(dir.path(), &Selection::default());
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
