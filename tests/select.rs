//! Choosing what is backed up: `--exclude`, `--exclude-from` and `--one-file-system` with
//! both methods, checked on the volume itself: what they leave out is absent, everything
//! else is identical, the volume is sized from what remains, a mirror loses a directory
//! excluded later, hostile patterns stay data, and verify takes the same options.

mod common;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::tree;
use common::*;

/// The patterns every test here uses, hostile ones among them, and what they leave out of
/// [`source`]'s tree.
fn patterns() -> Vec<OsString> {
    [
        "cache/",
        "*.o",
        "new\nline",
        "-leading-dash",
        "back\\\\slash",
        "not-utf8-??-name",
        "$(touch*",
        "`touch /var/tmp/ec2b-pwned`",
        "/nested/a/b/c/d/e/f/g/deep.txt",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

fn left_out() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [
        "cache",
        "build/x.o",
        "new\nline",
        "-leading-dash",
        "back\\slash",
        tree::TRAP_NAME,
        "nested/a/b/c/d/e/f/g/deep.txt",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    v.push(PathBuf::from(tree::os(b"not-utf8-\xff\xfe-name")));
    v
}

/// The hostile tree, plus a build product for the patterns to leave out.
fn source(scratch: &Path) -> PathBuf {
    let src = scratch.join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    fs::create_dir(src.join("build")).unwrap();
    fs::write(src.join("build/x.o"), b"object").unwrap();
    fs::write(src.join("build/x.c"), b"source").unwrap();
    tree::set_mtime(&src.join("build"), 1_000_000_000, 5);
    tree::set_mtime(&src, 1_000_000_000, 123_456_789);
    src
}

/// A large directory for the patterns to leave out: `cache`, `big` MiB allocated.
fn add_cache(src: &Path, big: u64) {
    fs::create_dir_all(src.join("cache/deep")).unwrap();
    let st = Command::new("fallocate")
        .args(["-l", &format!("{big}M")])
        .arg(src.join("cache/deep/blob"))
        .status()
        .unwrap();
    assert!(st.success(), "fallocate");
    tree::set_mtime(src, 1_000_000_000, 123_456_789);
}

/// A copy of `src` without `left_out` (those it has), its directories' times as in `src`:
/// what the backup must hold.
fn expected(src: &Path, into: &Path, left_out: &[PathBuf]) -> PathBuf {
    let dest = into.join("expected");
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&dest)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a");
    for rel in left_out {
        let p = dest.join(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).unwrap(),
            Ok(_) => fs::remove_file(&p).unwrap(),
            Err(_) => {}
        }
    }
    // Removing an entry touched its directory.
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(src.join(&rel)).unwrap();
        for e in fs::read_dir(dest.join(&rel)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(rel.join(e.file_name()));
            }
        }
        tree::set_mtime(&dest.join(&rel), m.mtime(), m.mtime_nsec());
    }
    dest
}

fn args(method: &str, extra: &[OsString]) -> Vec<OsString> {
    let mut a = vec![OsString::from("-m"), OsString::from(method)];
    for p in extra {
        let mut arg = OsString::from("--exclude=");
        arg.push(p);
        a.push(arg);
    }
    a
}

fn run_with(a: &[OsString], dir: &Path) -> Run {
    run(ec2_backup().args(a).arg(dir))
}

fn verify(vol: &str, dir: &Path, extra: &[OsString]) -> Run {
    run(ec2_backup()
        .arg("verify")
        .arg(vol)
        .arg(dir)
        .args(args("dd", extra).into_iter().skip(2)))
}

#[test]
fn dd_leaves_out_what_the_patterns_match_and_sizes_the_volume_from_the_rest() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = source(s.path());
    // The copy to compare with is made before cache/ (700 MiB: with it the volume would
    // need 2 GiB) is added.
    let want = expected(&src, s.path(), &left_out());
    add_cache(&src, 700);
    assert!(tree::allocated(&src.join("cache/deep/blob")) > 600 << 20);
    let vol = run_with(&args("dd", &patterns()), &src).volume_id();
    assert_no_live_instances();
    let v = volume(&vol).unwrap();
    assert_eq!(
        v["size"], 1,
        "the volume is sized from what the excludes leave"
    );
    assert_eq!(v["tags"]["ec2-backup:excludes"], "9");
    assert_eq!(v["tags"]["ec2-backup:completed"], "true");

    let out = s.path().join("restored");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    let diffs = tree::differences(&want, &out, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a pattern reached a shell"
    );

    // verify with the same patterns (in another order): identical.
    let mut reversed = patterns();
    reversed.reverse();
    let r = verify(&vol, &src, &reversed);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // Without them: the sets differ, and what they left out is only in the directory.
    let r = verify(&vol, &src, &[]);
    assert_eq!(r.code, 5, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.lines().next().unwrap().starts_with("excludes: "),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("only in the directory: ./cache\n"),
        "{}",
        r.stdout
    );
    let listed = run(ec2_backup().args(["list", "--json"]));
    let all: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let entry = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == vol.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["excludes"], 9);
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a pattern reached a shell"
    );
}

#[test]
fn rsync_leaves_out_what_the_patterns_match_and_drops_what_is_excluded_later() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = source(s.path());
    add_cache(&src, 2);
    // First run: everything but cache/ is excluded as in the dd test.
    let first: Vec<OsString> = patterns().into_iter().skip(1).collect();
    let vol = run_with(&args("rsync", &first), &src).volume_id();
    assert_no_live_instances();
    let mut first_out = left_out();
    first_out.retain(|p| p != Path::new("cache"));
    {
        let m = Mounted::new(&vol);
        let want = expected(&src, s.path(), &first_out);
        let diffs = tree::differences(&want, m.path(), &["lost+found"]);
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        assert!(m.path().join("cache/deep/blob").is_file());
        fs::remove_dir_all(&want).unwrap();
    }

    // Second run on the same volume: cache/ is excluded too, from a file; the mirror loses it.
    let file = s.path().join("excludes");
    let mut text = b"# what the nightly backup leaves out\n\ncache/\n".to_vec();
    text.extend_from_slice(b"not-utf8-??-name\n");
    fs::write(&file, &text).unwrap();
    let mut again = args("rsync", &first);
    again.retain(|a| a.as_bytes() != b"--exclude=not-utf8-??-name");
    again.extend([
        "--exclude-from".into(),
        file.clone().into(),
        "-v".into(),
        OsString::from(&vol),
    ]);
    assert_eq!(run_with(&again, &src).volume_id(), vol);
    assert_no_live_instances();
    let m = Mounted::new(&vol);
    let want = expected(&src, s.path(), &left_out());
    let diffs = tree::differences(&want, m.path(), &["lost+found"]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(
        !m.path().join("cache").exists(),
        "the newly excluded directory is gone"
    );
    assert!(m.path().join("lost+found").is_dir(), "lost+found stays");
    drop(m);
    // verify takes the same selection, from the same file.
    let r = run(ec2_backup()
        .arg("verify")
        .arg(&vol)
        .arg(&src)
        .args(again.iter().skip(2).take(again.len() - 4))
        .arg("--exclude-from")
        .arg(&file));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a pattern reached a shell"
    );
}

/// A filesystem of its own mounted inside the tree, unmounted (and its loop device freed)
/// when dropped.
struct SecondFs {
    point: PathBuf,
    device: String,
}

impl SecondFs {
    fn new(image: &Path, point: &Path) -> SecondFs {
        let st = Command::new("truncate")
            .args(["-s", "16M"])
            .arg(image)
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4");
        fs::create_dir(point).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup");
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let second = SecondFs {
            point: point.to_path_buf(),
            device,
        };
        // A loop device keeps the read-only flag a helper of the simulator may have set.
        let st = Command::new("blockdev")
            .args(["--setrw", &second.device])
            .status()
            .unwrap();
        assert!(st.success(), "blockdev --setrw");
        let st = Command::new("mount")
            .arg(&second.device)
            .arg(point)
            .status()
            .unwrap();
        assert!(st.success(), "mount");
        fs::write(point.join("on-the-other-fs"), b"elsewhere").unwrap();
        second
    }
}

impl Drop for SecondFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn one_file_system_skips_a_filesystem_mounted_inside_with_both_methods() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("here"), b"on the tree's own filesystem").unwrap();
    let other = SecondFs::new(&s.path().join("fs.img"), &src.join("mnt"));
    let x = [OsStr::new("--one-file-system")];

    let vol = backup(&x, &src).volume_id();
    assert_eq!(
        volume(&vol).unwrap()["tags"]["ec2-backup:one-file-system"],
        "true"
    );
    let out = s.path().join("dd");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert_eq!(
        fs::read(out.join("here")).unwrap(),
        b"on the tree's own filesystem"
    );
    assert!(out.join("mnt").is_dir(), "the mount point is kept");
    assert_eq!(
        fs::read_dir(out.join("mnt")).unwrap().count(),
        0,
        "and empty"
    );
    assert_eq!(
        verify(&vol, &src, &[]).code,
        5,
        "verify without the option differs"
    );
    let r = run(ec2_backup().arg("verify").arg(&vol).arg(&src).args(x));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);

    // Without the option, the other filesystem is backed up as before.
    let all = backup(&[], &src).volume_id();
    let out = s.path().join("dd-all");
    fs::create_dir(&out).unwrap();
    extract_dd(&all, &out);
    assert_eq!(
        fs::read(out.join("mnt/on-the-other-fs")).unwrap(),
        b"elsewhere"
    );

    // rsync: a mirror made without the option loses the other filesystem's files with it.
    let vol = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src).volume_id();
    {
        let m = Mounted::new(&vol);
        assert!(m.path().join("mnt/on-the-other-fs").is_file());
    }
    let again = [
        OsStr::new("-m"),
        OsStr::new("rsync"),
        OsStr::new("-v"),
        OsStr::new(&vol),
        OsStr::new("--one-file-system"),
    ];
    assert_eq!(backup(&again, &src).volume_id(), vol);
    let m = Mounted::new(&vol);
    assert_eq!(
        fs::read(m.path().join("here")).unwrap(),
        b"on the tree's own filesystem"
    );
    assert!(m.path().join("mnt").is_dir(), "the mount point is kept");
    assert_eq!(
        fs::read_dir(m.path().join("mnt")).unwrap().count(),
        0,
        "and empty"
    );
    drop(m);
    drop(other);
    assert_no_live_instances();
}
