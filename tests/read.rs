//! Reading backups back through the real binary: restore (into a directory, a part of it, or
//! a dd archive to stdout), verify (identical, then each kind of difference, a byte changed on
//! the volume included), list; the volume's bytes unchanged by all of them.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use common::tree;
use common::*;
use sha2::Digest;

fn sha_of_file(path: &Path) -> String {
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// The hostile tree plus a file whose bytes can be found on the volume.
fn source(scratch: &Path) -> std::path::PathBuf {
    let src = scratch.join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    fs::write(src.join("needle.txt"), NEEDLE.repeat(64)).unwrap();
    src
}

const NEEDLE: &str = "NEEDLE-7f3a9c-content-to-find-on-the-volume;";

fn restore(args: &[&OsStr]) -> Run {
    run(ec2_backup().arg("restore").args(args))
}

fn verify(vol: &str, dir: &Path) -> Run {
    run(ec2_backup().arg("verify").arg(vol).arg(dir))
}

/// Flips one byte of the needle file's data on the volume's backing file.
fn damage(vol: &str) {
    let file = volume_file(vol);
    let mut data = fs::read(&file).unwrap();
    let at = data
        .windows(NEEDLE.len())
        .position(|w| w == NEEDLE.as_bytes())
        .expect("the needle is on the volume");
    data[at] ^= 0x20;
    fs::write(&file, data).unwrap();
}

/// Backs up the hostile tree with `method`, restores it whole and checks it entry by entry,
/// verifies it (identical), then changes the directory and the volume and verifies again.
fn round_trip(method: &str) {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = source(s.path());
    let vol = backup(&[OsStr::new("-m"), OsStr::new(method)], &src).volume_id();
    let before = sha_of_file(&volume_file(&vol));

    let out = s.path().join("restored");
    let r = restore(&[OsStr::new(&vol), out.as_os_str()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "");
    let diffs = tree::differences(&src, &out, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(tree::allocated(&out.join("sparse.img")) < 1 << 20, "sparse");
    assert_no_live_instances();

    let r = verify(&vol, &src);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "");
    assert_eq!(
        sha_of_file(&volume_file(&vol)),
        before,
        "restore or verify wrote the volume"
    );
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a name reached a shell"
    );

    // Each kind of difference, named by path.
    fs::write(src.join("plain.txt"), b"plain TEXT\n").unwrap(); // same size: content
    fs::set_permissions(
        src.join("with space"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::write(src.join("added"), b"new").unwrap();
    fs::remove_file(src.join("empty-file")).unwrap();
    fs::write(src.join("new\nline"), b"forged: ./x\n").unwrap();
    let r = verify(&vol, &src);
    assert_eq!(r.code, 5, "{}\n{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let has = |what: &str, path: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(what) && l.ends_with(&format!(": {path}")))
    };
    assert!(has("content", "./plain.txt"), "{lines:?}");
    assert!(has("mode", "./with space"), "{lines:?}");
    assert!(has("only in the directory", "./added"), "{lines:?}");
    assert!(has("only in the backup", "./empty-file"), "{lines:?}");
    assert!(
        has("content", "./new\\nline"),
        "a newline is escaped: {lines:?}"
    );
    assert!(lines.iter().all(|l| !l.starts_with("forged")), "{lines:?}");

    // A byte changed on the volume itself: the directory, restored as it was, differs.
    fs::remove_dir_all(&src).unwrap();
    fs::rename(&out, &src).unwrap();
    damage(&vol);
    let r = verify(&vol, &src);
    assert_eq!(r.code, 5, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("./needle.txt"), "{}", r.stdout);
    assert_no_live_instances();
}

#[test]
fn dd_restore_and_verify() {
    round_trip("dd");
}

#[test]
fn rsync_restore_and_verify() {
    round_trip("rsync");
}

/// A damaged dd archive fails its restore: the checksum does not match the tag.
#[test]
fn a_damaged_dd_backup_is_not_trusted() {
    let s = scratch();
    let src = source(s.path());
    let vol = backup(&[], &src).volume_id();
    damage(&vol);
    let out = s.path().join("out");
    let r = restore(&[OsStr::new(&vol), out.as_os_str()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(last.contains("cannot be trusted"), "{last}");
    assert_no_live_instances();
}

/// `restore VOL -` writes exactly the archive to stdout, for a pipe into tar.
#[test]
fn restore_to_stdout_is_the_archive() {
    let s = scratch();
    let src = source(s.path());
    let vol = backup(&[], &src).volume_id();
    let v = volume(&vol).unwrap();
    let out = ec2_backup()
        .args(["restore", &vol, "-"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout.len().to_string(),
        v["tags"]["ec2-backup:bytes"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&out.stdout)),
        v["tags"]["ec2-backup:sha256"].as_str().unwrap()
    );
    let archive = s.path().join("archive.tar");
    fs::write(&archive, &out.stdout).unwrap();
    let listed = Command::new("tar")
        .arg("-tf")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("./needle.txt"));
    assert_no_live_instances();
}

/// An rsync backup has no archive to write to stdout: refused before any helper exists.
#[test]
fn an_rsync_backup_to_stdout_is_refused_before_anything_is_made() {
    let s = scratch();
    let src = source(s.path());
    let vol = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src).volume_id();
    let before = inventory();
    let r = restore(&[OsStr::new(&vol), OsStr::new("-")]);
    let line = r.refused();
    assert_eq!(r.code, 2, "{line}");
    assert!(line.contains("is an rsync backup"), "{line}");
    assert_eq!(inventory(), before);
}

/// Only the asked-for subtrees come back, with both methods.
#[test]
fn partial_restore_brings_back_only_those_paths() {
    for method in ["dd", "rsync"] {
        let s = scratch();
        let src = source(s.path());
        let vol = backup(&[OsStr::new("-m"), OsStr::new(method)], &src).volume_id();
        let out = s.path().join("part");
        let r = restore(&[
            OsStr::new(&vol),
            out.as_os_str(),
            OsStr::new("--path"),
            OsStr::new("nested/a"),
            OsStr::new("--path"),
            OsStr::new("with space"),
        ]);
        assert_eq!(r.code, 0, "{method}: {}", r.stderr);
        assert_eq!(
            fs::read(out.join("nested/a/b/c/d/e/f/g/deep.txt")).unwrap(),
            b"deep",
            "{method}"
        );
        assert_eq!(fs::read(out.join("with space")).unwrap(), b"with space");
        assert!(!out.join("plain.txt").exists(), "{method}: more than asked");
    }
    assert_no_live_instances();
}

/// A directory that is not empty is refused before anything is created.
#[test]
fn a_non_empty_directory_is_refused_and_nothing_is_created() {
    ensure_key_pair();
    let s = scratch();
    fs::write(s.path().join("occupied"), b"x").unwrap();
    let before = inventory();
    let r = restore(&[OsStr::new("vol-0123456789abcdef0"), s.path().as_os_str()]);
    let line = r.refused();
    assert_eq!(r.code, 2);
    assert!(line.contains("is not empty"), "{line}");
    assert_eq!(inventory(), before);
}

/// `list` and `list --json` show finished backups, not a user's volume.
#[test]
fn list_shows_the_backups() {
    let s = scratch();
    let src = source(s.path());
    let dd = backup(&[], &src).volume_id();
    let rs = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src).volume_id();
    let users = make_volume("us-east-1a", 1);
    let r = run(ec2_backup().args(["list", "--json"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let all: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let find = |id: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
    };
    let e = find(&dd).expect("the dd backup is listed");
    assert_eq!(e["method"], "dd");
    assert_eq!(e["kind"], "volume");
    assert_eq!(e["complete"], true);
    assert_eq!(e["source_dir"], src.to_str().unwrap());
    assert!(e["bytes"].as_u64().unwrap() > 0);
    assert_eq!(find(&rs).expect("the rsync backup")["method"], "rsync");
    assert!(find(&users).is_none(), "a user's volume is no backup");
    let table = run(ec2_backup().arg("list"));
    assert!(table.stdout.lines().next().unwrap().starts_with("ID"));
    assert!(table.stdout.contains(&dd) && table.stdout.contains(&rs));
}

/// SIGINT in the middle of a restore: the helper is gone, the volume is as it was, and the
/// message says that the directory holds a partial restore.
#[test]
fn sigint_mid_restore_leaves_nothing_and_says_the_restore_is_partial() {
    let s = scratch();
    let src = s.path().join("big");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("noise"), tree::noise(24 << 20, 13)).unwrap();
    let vol = backup(&[], &src).volume_id();
    let before = sha_of_file(&volume_file(&vol));
    let faults = Faults::new();
    faults.set(&["link", "20"]);
    let out = s.path().join("out");
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1")
        .arg("restore")
        .arg(&vol)
        .arg(&out);
    let live = common::spawn::Live::start(&mut cmd);
    live.wait_for("; restoring", std::time::Duration::from_secs(120));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    live.signal(libc::SIGINT);
    let ended = live.finish(std::time::Duration::from_secs(120));
    drop(faults);
    assert_eq!(ended.code(), Some(130), "{}", ended.show());
    let last = ended.last_line();
    assert!(
        last.contains("partial restore") || last.contains("interrupted"),
        "{last}"
    );
    assert_no_live_instances();
    assert_eq!(volume(&vol).unwrap()["state"], "available");
    assert_eq!(sha_of_file(&volume_file(&vol)), before);
}
