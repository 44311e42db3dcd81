//! `--direct`: backups and restores through the EBS direct APIs, with no instance, key pair
//! or security group; checked on the volume's and the snapshot's own data files.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::tree;
use common::*;
use serde_json::Value;

/// What a run must not touch: instances, key pairs, security groups (counts).
fn helpers_and_keys() -> (usize, usize, usize) {
    let st = status();
    let n = |k: &str| st[k].as_array().map_or(0, |a| a.len());
    (n("instances"), n("key_pairs"), n("security_groups"))
}

fn extract(file: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let st = Command::new("tar")
        .args(["--extract", "--numeric-owner", "--acls", "--xattrs"])
        .args(["--xattrs-include=*", "--same-permissions", "--file"])
        .arg(file)
        .arg("--directory")
        .arg(into)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x of {} failed", file.display());
}

#[test]
fn the_hostile_tree_lands_as_the_same_tar_archive_with_no_instance() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    let before = helpers_and_keys();
    let snapshots = status()["snapshots"].as_array().unwrap().len();
    let r = backup(&[OsStr::new("--direct"), OsStr::new("--json")], &src);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let vol = out["volume_id"].as_str().unwrap();
    assert_eq!(out["direct"], true);
    assert!(
        out["snapshot_id"].is_null(),
        "no snapshot kept without --snapshot"
    );
    assert_eq!(
        helpers_and_keys(),
        before,
        "no instance, key pair or group made"
    );
    let file = volume_file(vol);
    let into = s.path().join("restored");
    extract(&file, &into);
    let diffs = tree::differences(&src, &into, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // The archive's bytes are what the tags say, from byte 0.
    let v = volume(vol).unwrap();
    let tags = v["tags"].as_object().unwrap();
    let bytes: u64 = tags["ec2-backup:bytes"].as_str().unwrap().parse().unwrap();
    let data = fs::read(&file).unwrap();
    use sha2::Digest;
    let sum = hex::encode(sha2::Sha256::digest(&data[..bytes as usize]));
    assert_eq!(tags["ec2-backup:sha256"], sum.as_str());
    assert_eq!(tags["ec2-backup:direct"], "true");
    assert_eq!(tags["ec2-backup:completed"], "true");
    // The snapshot it came from is gone (deleted, or going once sealed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while status()["snapshots"].as_array().unwrap().len() > snapshots {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload's snapshot stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a name reached a shell"
    );
}

#[test]
fn snapshot_only_then_restore_and_verify_without_any_instance() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    let before = helpers_and_keys();
    let volumes = volume_ids();
    let r = backup(
        &[OsStr::new("--direct"), OsStr::new("--snapshot-only")],
        &src,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let snap = r.stdout.trim().to_string();
    assert!(snap.starts_with("snap-"), "{:?}", r.stdout);
    assert_eq!(volume_ids(), volumes, "no volume made");
    let info = snapshot(&snap).unwrap();
    assert_eq!(info["state"], "completed");
    assert_eq!(info["tags"]["ec2-backup:kept"], "true");
    let from_file = s.path().join("in-snapshot");
    extract(&snapshot_file(&snap), &from_file);
    assert!(tree::differences(&src, &from_file, &[]).is_empty());

    let restored = s.path().join("restored");
    let r = run(ec2_backup().arg("restore").arg(&snap).arg(&restored));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let diffs = tree::differences(&src, &restored, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let r = run(ec2_backup().arg("verify").arg(&snap).arg(&src));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    fs::write(src.join("plain.txt"), b"plain TEXT\n").unwrap();
    let r = run(ec2_backup().arg("verify").arg(&snap).arg(&src));
    assert_eq!(r.code, 5, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("content: ./plain.txt"), "{}", r.stdout);
    assert_eq!(helpers_and_keys(), before, "read back with no instance");
    assert_eq!(volume_ids(), volumes, "and no temporary volume");
}

#[test]
fn direct_with_a_volume_or_rsync_is_refused_before_anything_is_made() {
    let s = scratch();
    let before = (helpers_and_keys(), volume_ids());
    let r = run(ec2_backup()
        .args(["--direct", "-v", "vol-0123456789abcdef0"])
        .arg(s.path()));
    assert_eq!(r.code, 2, "{}", r.stderr);
    r.refused();
    let r = run(ec2_backup().args(["--direct", "-m", "rsync"]).arg(s.path()));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.refused().contains("rsync"));
    assert_eq!((helpers_and_keys(), volume_ids()), before);
}

/// An extended attribute's value (None when the entry has none of that name).
fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

#[test]
fn an_archive_larger_than_the_walk_says_goes_into_a_bigger_snapshot() {
    // Extended attributes count for nothing in the walk's footprint, but tar stores them:
    // 262 empty files with 4 MiB of attributes each (tmpfs takes 64 KiB values) make a
    // 1.02 GiB archive from a footprint that asks for a 1 GiB snapshot.
    let shm = tempfile::Builder::new()
        .prefix("it.xattr.")
        .tempdir_in("/dev/shm")
        .unwrap();
    let src = shm.path().join("src");
    fs::create_dir(&src).unwrap();
    let value = |f: usize, a: usize| vec![(f * 7 + a) as u8; 64 << 10];
    for f in 0..262 {
        let file = src.join(format!("f{f:03}"));
        fs::write(&file, b"").unwrap();
        for a in 0..64 {
            tree::set_xattr(&file, &format!("user.a{a:02}"), &value(f, a));
        }
    }
    let r = run(ec2_backup()
        .env("EC2_BACKUP_VERBOSE", "1")
        .args(["--direct", "--snapshot-only"])
        .arg(&src));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("sizing it"), "{}", r.stderr);
    let snap = r.stdout.trim().to_string();
    let info = snapshot(&snap).unwrap();
    assert_eq!(info["size"], 2, "{info}");
    assert_eq!(info["state"], "completed");
    let tags = info["tags"].as_object().unwrap();
    let bytes: u64 = tags["ec2-backup:bytes"].as_str().unwrap().parse().unwrap();
    assert!(bytes > 1 << 30, "{bytes}");
    // The first, too small snapshot is on its way out: marked, never kept.
    let run_id = tags["ec2-backup:run"].clone();
    let others: Vec<Value> = status()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["tags"]["ec2-backup:run"] == run_id && s["id"] != snap.as_str())
        .cloned()
        .collect();
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0]["tags"]["ec2-backup:deleting"], "true");
    assert!(others[0]["tags"].get("ec2-backup:kept").is_none());
    // What the snapshot holds is the whole tree, attributes and all.
    let into = shm.path().join("x");
    extract(&snapshot_file(&snap), &into);
    for f in [0, 131, 261] {
        let file = into.join(format!("f{f:03}"));
        assert_eq!(get_xattr(&file, "user.a00"), Some(value(f, 0)));
        assert_eq!(get_xattr(&file, "user.a63"), Some(value(f, 63)));
    }
    assert_eq!(fs::read_dir(&into).unwrap().count(), 262);
}

#[test]
fn a_sparse_file_is_sized_by_tar_before_the_snapshot_is_started() {
    // 3 GiB long, 1 MiB of data: the footprint asks for 1 GiB, and only tar knows that its
    // archive (holes left out) fits.
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    let f = fs::File::create(src.join("sparse.img")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&tree::noise(1 << 20, 9), 2 << 30).unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    let r = run(ec2_backup()
        .env("EC2_BACKUP_VERBOSE", "1")
        .args(["--direct", "--snapshot-only"])
        .arg(&src));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("sparse or compressed"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("sizing it"),
        "no second snapshot: {}",
        r.stderr
    );
    let snap = r.stdout.trim().to_string();
    let info = snapshot(&snap).unwrap();
    assert_eq!(info["size"], 1, "{info}");
    let into = s.path().join("x");
    extract(&snapshot_file(&snap), &into);
    let back = fs::File::open(into.join("sparse.img")).unwrap();
    assert_eq!(back.metadata().unwrap().len(), 3 << 30);
    let mut data = vec![0u8; 1 << 20];
    back.read_exact_at(&mut data, 2 << 30).unwrap();
    assert!(data == tree::noise(1 << 20, 9), "the data past the hole");
}

#[test]
fn throttled_and_failing_block_writes_are_absorbed() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("noise"), tree::noise(6 << 20, 5)).unwrap();
    let faults = Faults::new();
    faults.api("PutSnapshotBlock", "ThrottlingException", 6);
    faults.api("CompleteSnapshot", "InternalServerException", 1);
    let r = run(ec2_backup()
        .env("EC2_BACKUP_VERBOSE", "1")
        .args(["--direct", "--snapshot-only"])
        .arg(&src));
    let left = (
        faults.armed("PutSnapshotBlock"),
        faults.armed("CompleteSnapshot"),
    );
    drop(faults);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(left, (0, 0), "every injected failure was met and retried");
    let snap = r.stdout.trim().to_string();
    let into = s.path().join("x");
    extract(&snapshot_file(&snap), &into);
    assert_eq!(
        fs::read(into.join("noise")).unwrap(),
        tree::noise(6 << 20, 5)
    );
    assert!(r.stderr.contains("retried"), "{}", r.stderr);
}

/// tar starts beside the walk and StartSnapshot, its first blocks read ahead: a refused
/// StartSnapshot stops it and fails the run in one sentence, with nothing made.
#[test]
fn a_refused_start_snapshot_stops_the_upload_already_reading() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    // More than the blocks read ahead and the pipe hold: tar is left waiting on them.
    fs::write(src.join("noise"), tree::noise(48 << 20, 3)).unwrap();
    let (volumes, snapshots) = (volume_ids(), status()["snapshots"].clone());
    let faults = Faults::new();
    faults.api("StartSnapshot", "AccessDeniedException", 1);
    let r = run(ec2_backup().args(["--direct", "--snapshot-only"]).arg(&src));
    let left = faults.armed("StartSnapshot");
    drop(faults);
    let said = r.refused();
    assert_eq!(left, 0, "StartSnapshot was called");
    assert!(said.contains("StartSnapshot"), "{said}");
    assert_eq!(status()["snapshots"], snapshots, "no snapshot made");
    assert_eq!(volume_ids(), volumes, "no volume made");
}

/// The tool's tar, stopped (SIGSTOP) until this is dropped, when it is killed: a tar that
/// writes nothing more, as one reading a hung mount.
struct StoppedTar(i32);

impl StoppedTar {
    fn of(tool: i32) -> StoppedTar {
        let tasks = fs::read_dir(format!("/proc/{tool}/task")).unwrap();
        let tar = tasks
            .flat_map(|t| {
                let t = t.unwrap().path().join("children");
                let ids = fs::read_to_string(t).unwrap_or_default();
                ids.split_whitespace()
                    .map(|c| c.parse::<i32>().unwrap())
                    .collect::<Vec<_>>()
            })
            .find(|c| {
                fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == "tar")
            })
            .expect("the tool's tar");
        unsafe { libc::kill(tar, libc::SIGSTOP) };
        StoppedTar(tar)
    }
}

impl Drop for StoppedTar {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// A put that fails ends the run while tar writes nothing more: the upload does not wait for
/// tar's next block to notice. The first blocks go through; tar stops; the blocks sent after
/// it (the pipe's last ones) are refused.
#[test]
fn a_refused_block_ends_the_run_while_tar_writes_nothing() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("noise"), tree::noise(96 << 20, 4)).unwrap();
    let faults = Faults::new();
    faults.set(&["ebs-latency", "2000"]);
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1")
        .args(["--direct", "--snapshot-only"])
        .arg(&src);
    let live = common::spawn::Live::start(&mut cmd);
    live.wait_for("uploading", std::time::Duration::from_secs(60));
    let tar = StoppedTar::of(live.pid());
    // The first blocks in flight are answered (2 s); the next ones, read from what is left
    // in the pipe, answer 2 s after they went, refused.
    std::thread::sleep(std::time::Duration::from_millis(3000));
    faults.api("PutSnapshotBlock", "AccessDeniedException", 10_000);
    let ended = live.finish(std::time::Duration::from_secs(60));
    drop(tar);
    drop(faults);
    assert_ne!(ended.code(), Some(0), "{}", ended.show());
    assert!(ended.stderr.contains("AccessDenied"), "{}", ended.show());
    assert_eq!(ended.stdout, "", "no backup to name");
}

#[test]
fn sigint_mid_upload_leaves_no_volume_and_no_completed_snapshot() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("noise"), tree::noise(64 << 20, 9)).unwrap();
    let volumes = volume_ids();
    let faults = Faults::new();
    faults.set(&["ebs-latency", "300"]);
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1").arg("--direct").arg(&src);
    let live = common::spawn::Live::start(&mut cmd);
    let line = live.wait_for("uploading", std::time::Duration::from_secs(60));
    let snap = common::spawn::id_after(&line, "started snap-")
        .map(|rest| format!("snap-{rest}"))
        .expect("the snapshot's ID");
    std::thread::sleep(std::time::Duration::from_millis(800));
    live.signal(libc::SIGINT);
    let ended = live.finish(std::time::Duration::from_secs(120));
    drop(faults);
    assert_eq!(ended.code(), Some(130), "{}", ended.show());
    assert_eq!(ended.stdout, "", "no backup to name");
    assert_eq!(volume_ids(), volumes, "no volume made");
    // Deleted: gone, or pending with its deletion taken (EC2 removes it once it is sealed
    // or cancelled); never completed.
    if let Some(info) = snapshot(&snap) {
        assert_ne!(info["state"], "completed", "{info}");
        assert_eq!(info["deleting"], true, "{info}");
        // ... and marked, so that gc does not list it again while EC2 still shows it.
        assert_eq!(info["tags"]["ec2-backup:deleting"], "true", "{info}");
    }
}

#[test]
fn restore_to_stdout_piped_into_tar_ends_cleanly() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("needle.txt"), b"piped").unwrap();
    let r = backup(
        &[OsStr::new("--direct"), OsStr::new("--snapshot-only")],
        &src,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let snap = r.stdout.trim().to_string();
    // tar stops reading at the archive's end marker, before the last record's padding: the
    // restore must take that for a reader that is done, not for a failure.
    let mut restore = ec2_backup()
        .args(["restore", &snap, "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listed = Command::new("tar")
        .arg("-t")
        .stdin(restore.stdout.take().unwrap())
        .output()
        .unwrap();
    let done = restore.wait_with_output().unwrap();
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("./needle.txt"));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}
