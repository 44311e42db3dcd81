//! Never destroy a backup: what a `-v` volume holds is checked before it is written, a volume
//! too small is refused before a byte is written, torn files make a backup incomplete, a
//! filesystem the tool makes has inodes for the tree, and runs started together all succeed.
//! Every check is on the volume's backing file or in EC2's state.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tree;
use common::*;
use sha2::Digest;

fn sha_of_file(path: &Path) -> String {
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn small_tree(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("new"), b"the new backup").unwrap();
    src
}

/// A 1 GiB volume whose backing file gets `prepare` done to it (it is detached).
fn volume_holding(prepare: impl FnOnce(&Path)) -> String {
    let vol = make_volume("us-east-1a", 1);
    prepare(&volume_file(&vol));
    vol
}

fn mkfs(file: &Path, label: &str) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label])
        .arg(file)
        .status()
        .unwrap();
    assert!(st.success());
}

fn args<'a>(method: &'a str, vol: &'a str, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut a: Vec<&'a OsStr> = vec![
        OsStr::new("-m"),
        OsStr::new(method),
        OsStr::new("-v"),
        OsStr::new(vol),
    ];
    a.extend(extra.iter().map(|x| OsStr::new(*x)));
    a
}

/// A user's own ext4 volume named by mistake: neither method writes it, its bytes and tags
/// are unchanged, and nothing is left running. With --overwrite, rsync makes its own.
#[test]
fn a_foreign_filesystem_is_never_written_without_overwrite() {
    ensure_key_pair();
    let s = scratch();
    let src = small_tree(s.path());
    let vol = volume_holding(|f| mkfs(f, "home"));
    let before = sha_of_file(&volume_file(&vol));
    for method in ["rsync", "dd"] {
        let r = backup(&args(method, &vol, &[]), &src);
        let line = r.refused();
        assert_eq!(r.code, 1, "{line}");
        assert!(
            line.contains("holds a filesystem (ext4, labelled 'home')")
                && line.contains("--overwrite"),
            "{line}"
        );
        assert_no_live_instances();
        assert_eq!(
            sha_of_file(&volume_file(&vol)),
            before,
            "-m {method} wrote the volume"
        );
        let v = volume(&vol).unwrap();
        assert_eq!(v["state"], "available");
        assert!(v["tags"].get("ec2-backup:completed").is_none(), "{v}");
    }
    let r = backup(&args("rsync", &vol, &["--overwrite"]), &src);
    assert_eq!(r.volume_id(), vol);
    let m = Mounted::new(&vol);
    assert_eq!(fs::read(m.path().join("new")).unwrap(), b"the new backup");
    let label = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "LABEL"])
        .arg(volume_file(&vol))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "ec2-backup");
}

/// Data blkid does not know (a raw database device, noise) is not "blank".
#[test]
fn unknown_data_is_not_blank() {
    ensure_key_pair();
    let s = scratch();
    let src = small_tree(s.path());
    let vol = volume_holding(|f| {
        use std::io::{Seek, Write};
        let mut file = fs::OpenOptions::new().write(true).open(f).unwrap();
        file.seek(std::io::SeekFrom::Start(4096)).unwrap();
        file.write_all(&tree::noise(64 << 10, 7)).unwrap();
    });
    let before = sha_of_file(&volume_file(&vol));
    for method in ["dd", "rsync"] {
        let r = backup(&args(method, &vol, &[]), &src);
        let line = r.refused();
        assert_eq!(r.code, 1, "{line}");
        assert!(line.contains("neither blank nor a known format"), "{line}");
        assert_eq!(sha_of_file(&volume_file(&vol)), before);
    }
    assert_no_live_instances();
}

/// A probe that fails (blkid broken on the helper) refuses, even for a blank volume, and
/// even with --overwrite: the tool cannot tell, so it changes nothing.
#[test]
fn a_failing_probe_refuses_and_changes_nothing() {
    ensure_key_pair();
    let s = scratch();
    let src = small_tree(s.path());
    let vol = make_volume("us-east-1a", 1);
    let faults = Faults::new();
    faults.set(&["broken-tool", "blkid", "2"]);
    for method in ["rsync", "dd"] {
        let r = backup(&args(method, &vol, &[]), &src);
        let line = r.refused();
        assert_eq!(r.code, 1, "{line}");
        assert!(line.contains("Could not tell what the volume"), "{line}");
        assert!(line.contains("blkid failed with exit status 4"), "{line}");
        assert_eq!(
            tree::allocated(&volume_file(&vol)),
            0,
            "the blank volume was written"
        );
    }
    drop(faults);
    assert_no_live_instances();
    assert!(volume(&vol).unwrap()["tags"]
        .get("ec2-backup:method")
        .is_none());
}

/// A dd backup on a 1 GiB volume, then the tree grows to an archive of just over 1 GiB that
/// the old estimate (1 KiB per entry) let through: the second run is refused before any
/// instance exists, and the first backup is intact.
#[test]
fn a_volume_too_small_for_the_real_archive_is_refused_before_launch() {
    ensure_key_pair();
    let s = scratch();
    let src = small_tree(s.path());
    let vol = make_volume("us-east-1a", 1);
    assert_eq!(backup(&args("dd", &vol, &[]), &src).volume_id(), vol);
    let kept = volume(&vol).unwrap()["tags"].clone();
    let data_before = sha_of_file(&volume_file(&vol));

    // 1 GiB less 256 KiB of data that is not sparse: with its headers and the archive's
    // last record it no longer fits.
    {
        use std::io::Write;
        let mut f = fs::File::create(src.join("big")).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..1023 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(&chunk[..(768 << 10)]).unwrap();
    }
    let (instances, _, _) = inventory();
    let r = backup(&args("dd", &vol, &[]), &src);
    let line = r.refused();
    assert_eq!(r.code, 2, "{line}");
    assert!(line.contains("too small"), "{line}");
    assert_eq!(inventory().0, instances, "an instance was launched");
    assert_eq!(volume(&vol).unwrap()["tags"], kept);
    assert_eq!(sha_of_file(&volume_file(&vol)), data_before);
}

/// A file rewritten while tar reads it may be torn on the volume: exit 3, the file named,
/// the volume tagged incomplete. The rest of the tree is there.
#[test]
fn a_file_changing_while_it_is_read_makes_the_backup_incomplete() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("steady"), b"unchanged").unwrap();
    let live = src.join("live.db");
    fs::write(&live, tree::noise(1 << 20, 3).repeat(300)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, live) = (stop.clone(), live.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&live).unwrap();
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                f.write_at(&i.to_le_bytes(), (i * 7919 % 70_000) * 4096)
                    .unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let r = backup(&[], &src);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(r.code, 3, "{}", r.stderr);
    let vol = r.stdout.trim().to_string();
    assert!(
        vol.starts_with("vol-"),
        "the volume is still printed: {:?}",
        r.stdout
    );
    let last = r.stderr.lines().last().unwrap();
    assert!(
        last.contains("live.db changed while it was read") && last.contains(&vol),
        "{last}"
    );
    let v = volume(&vol).unwrap();
    assert_eq!(v["tags"]["ec2-backup:completed"], "false");
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert_eq!(fs::read(out.join("steady")).unwrap(), b"unchanged");
    assert_no_live_instances();
}

/// A tree of more entries than ext4's default inode ratio gives a 1 GiB volume (65,536):
/// the filesystem the tool makes has room for them all.
#[test]
fn a_tree_of_many_small_files_gets_enough_inodes() {
    let s = scratch();
    let src = s.path().join("src");
    for d in 0..70 {
        let dir = src.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            fs::File::create(dir.join(format!("f{f}"))).unwrap();
        }
    }
    let r = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src);
    let vol = r.volume_id();
    assert_eq!(volume(&vol).unwrap()["size"], 1);
    let m = Mounted::new(&vol);
    let count = fs::read_dir(m.path().join("d69")).unwrap().count();
    assert_eq!(count, 1000);
    assert!(m.path().join("d0/f0").is_file());
}

/// Three runs started at once from one HOME, on an account without the key pair: all three
/// back up, and there is one key pair whose private half is the one on disk.
#[test]
fn parallel_first_runs_all_succeed() {
    let ssh = home().join(".ssh");
    for f in ["EC2-Backup-Key", "EC2-Backup-Key.pub", "EC2-Backup-Key.pem"] {
        let _ = fs::remove_file(ssh.join(f));
    }
    boto("try:\n    ec2.delete_key_pair(KeyName='EC2-Backup-Key')\nexcept Exception:\n    pass");
    let s = scratch();
    let src = small_tree(s.path());
    for r in backups_at_once(&src, 3) {
        let vol = r.volume_id();
        let out = s.path().join(&vol);
        fs::create_dir(&out).unwrap();
        extract_dd(&vol, &out);
        assert_eq!(fs::read(out.join("new")).unwrap(), b"the new backup");
    }
    let pairs = status()["key_pairs"].clone();
    assert_eq!(
        pairs
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| *k == "EC2-Backup-Key")
            .count(),
        1
    );
    let leftovers: Vec<_> = fs::read_dir(&ssh)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ec2-backup-key."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_no_live_instances();
}
