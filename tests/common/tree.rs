//! A hostile directory tree (every case of SPEC §3) and an exact comparison of two trees:
//! names as bytes, types, contents, modes, numeric owners, mtimes, link targets, hard-link
//! groups and extended attributes (ACLs included).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file whose very name would run a command if any shell ever saw it unquoted: it would
/// create /var/tmp/ec2b-pwned (written without a slash, as names cannot hold one).
pub const TRAP_NAME: &str = "$(touch \"$(printf '\\057var\\057tmp\\057ec2b-pwned')\");`touch \"$(printf '\\057var\\057tmp\\057ec2b-pwned')\"`";
pub const TRAP_FILE: &str = "/var/tmp/ec2b-pwned";

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

pub fn set_mtime(path: &Path, secs: i64, nsec: i64) {
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(path).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

fn lchown(path: &Path, uid: u32, gid: u32) {
    let rc = unsafe { libc::lchown(c(path).as_ptr(), uid, gid) };
    assert_eq!(rc, 0, "lchown {}", path.display());
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let name = CString::new(name).unwrap();
    let rc = unsafe {
        libc::lsetxattr(
            c(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
}

/// Pseudo-random but repeatable bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Builds the hostile tree under `root` (which must exist).
pub fn hostile(root: &Path) {
    let j = |name: &str| root.join(name);
    write(&j("plain.txt"), b"plain text\n");
    write(&j("empty-file"), b"");
    for name in [
        "with space",
        "new\nline",
        "quote'single",
        "quote\"double",
        "dollar$HOME",
        "star*",
        "-leading-dash",
        "--rsync-path=evil",
        "semi;colon|pipe&amp",
        "back\\slash",
        "tab\there",
        "ünïcødé ☃",
        TRAP_NAME,
    ] {
        write(&j(name), name.as_bytes());
    }
    let bad = root.join(OsStr::from_bytes(b"not-utf8-\xff\xfe-name"));
    write(&bad, b"bytes");
    fs::create_dir(root.join(OsStr::from_bytes(b"dir-\xc3\x28"))).unwrap();

    fs::create_dir(j("empty-dir")).unwrap();
    let deep = j("nested/a/b/c/d/e/f/g");
    fs::create_dir_all(&deep).unwrap();
    write(&deep.join("deep.txt"), b"deep");
    let long = "L".repeat(255);
    write(&j(&long), b"long name");
    let longdir = j(&format!(
        "{}/{}/{}",
        "p".repeat(120),
        "q".repeat(120),
        "r".repeat(120)
    ));
    fs::create_dir_all(&longdir).unwrap();
    write(&longdir.join("in-long-path"), b"long path");

    symlink("plain.txt", j("link-relative")).unwrap();
    symlink("does/not/exist", j("link-dangling")).unwrap();
    symlink("/etc/hostname", j("link-absolute")).unwrap();
    symlink("nested", j("link-to-dir")).unwrap();
    symlink("with space", j("link to 'odd' $name")).unwrap();

    write(&j("hard-1"), b"hard linked content\n");
    fs::create_dir(j("sub")).unwrap();
    fs::hard_link(j("hard-1"), j("sub/hard-2")).unwrap();
    fs::hard_link(j("hard-1"), j("nested/hard-3")).unwrap();

    // Sparse: 64 MiB with two islands of data.
    let mut f = fs::File::create(j("sparse.img")).unwrap();
    f.write_all(b"head").unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(j("sparse.img"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"island", 32 << 20).unwrap();
    drop(f);

    write(&j("random.bin"), &noise(3 << 20, 7));

    // Modes and owners.
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    write(&j("secret"), b"0600");
    mode(&j("secret"), 0o600);
    write(&j("script.sh"), b"#!/bin/sh\necho hi\n");
    mode(&j("script.sh"), 0o755);
    write(&j("unreadable-by-others"), b"0000");
    mode(&j("unreadable-by-others"), 0o000);
    fs::create_dir(j("sticky")).unwrap();
    mode(&j("sticky"), 0o1777);
    write(&j("owned"), b"owned by 1234:5678");
    lchown(&j("owned"), 1234, 5678);
    write(&j("setuid"), b"setuid");
    lchown(&j("setuid"), 1234, 5678);
    mode(&j("setuid"), 0o4755);
    fs::create_dir(j("group-dir")).unwrap();
    lchown(&j("group-dir"), 4321, 8765);
    mode(&j("group-dir"), 0o2750);
    lchown(&j("link-relative"), 99, 98);

    let fifo = c(&j("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    set_xattr(&j("plain.txt"), "user.comment", b"an xattr value");
    set_xattr(&j("sub"), "user.dir-attr", b"\x00\x01binary");
    let acl = Command::new("setfacl")
        .args(["-m", "u:1234:r--"])
        .arg(j("secret"))
        .status();
    assert!(
        acl.is_ok_and(|s| s.success()),
        "setfacl (package acl) is needed"
    );

    // Times last, children before parents (writing into a directory changes its mtime).
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(
            p,
            981_173_106 + i as i64 * 3600,
            (i as i64 * 7919) % 1_000_000_000,
        );
    }
    set_mtime(root, 1_000_000_000, 123_456_789);
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<(i64, i64)>,
    size: u64,
    content: Option<[u8; 32]>,
    target: Option<OsString>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = c(path);
    let mut names = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        let m = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if m >= 0 {
            value.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}

fn entry(path: &Path) -> Entry {
    use sha2::Digest;
    let m = fs::symlink_metadata(path).unwrap();
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else {
        "special"
    };
    Entry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        // Symlink times are not part of the contract; directories' and files' are.
        mtime: (!ft.is_symlink()).then(|| (m.mtime(), m.mtime_nsec())),
        size: if ft.is_file() { m.len() } else { 0 },
        content: ft
            .is_file()
            .then(|| sha2::Sha256::digest(fs::read(path).unwrap()).into()),
        target: ft
            .is_symlink()
            .then(|| fs::read_link(path).unwrap().into_os_string()),
        xattrs: xattrs(path),
    }
}

/// Every difference between the trees at `a` and `b` (their roots included), ignoring the
/// top-level names in `ignore` on the `b` side. Empty means identical.
pub fn differences(a: &Path, b: &Path, ignore: &[&str]) -> Vec<String> {
    let mut diffs = Vec::new();
    let list = |root: &Path| -> BTreeMap<OsString, PathBuf> {
        let mut all = Vec::new();
        collect(root, &mut all);
        all.into_iter()
            .map(|p| (p.strip_prefix(root).unwrap().as_os_str().to_owned(), p))
            .filter(|(rel, _)| {
                !ignore.iter().any(|i| {
                    rel.as_bytes() == i.as_bytes()
                        || rel.as_bytes().starts_with(format!("{i}/").as_bytes())
                })
            })
            .collect()
    };
    let (la, lb) = (list(a), list(b));
    for k in la.keys().filter(|k| !lb.contains_key(*k)) {
        diffs.push(format!("missing from the copy: {k:?}"));
    }
    for k in lb.keys().filter(|k| !la.contains_key(*k)) {
        diffs.push(format!("extra in the copy: {k:?}"));
    }
    let ea = entry(a);
    let eb = entry(b);
    let root_fields = |e: &Entry| (e.mode, e.uid, e.gid, e.mtime);
    if root_fields(&ea) != root_fields(&eb) {
        diffs.push(format!(
            "root differs: {:?} vs {:?}",
            root_fields(&ea),
            root_fields(&eb)
        ));
    }
    let mut groups_a: HashMap<(u64, u64), Vec<OsString>> = HashMap::new();
    let mut groups_b: HashMap<(u64, u64), Vec<OsString>> = HashMap::new();
    for (k, pa) in &la {
        let Some(pb) = lb.get(k) else { continue };
        let (x, y) = (entry(pa), entry(pb));
        if x != y {
            diffs.push(format!("{k:?} differs:\n  source {x:?}\n  copy   {y:?}"));
        }
        for (p, groups) in [(pa, &mut groups_a), (pb, &mut groups_b)] {
            let m = fs::symlink_metadata(p).unwrap();
            if m.is_file() && m.nlink() > 1 {
                groups
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(k.clone());
            }
        }
    }
    let norm = |g: HashMap<(u64, u64), Vec<OsString>>| {
        let mut v: Vec<Vec<OsString>> = g
            .into_values()
            .map(|mut x| {
                x.sort();
                x
            })
            .collect();
        v.sort();
        v
    };
    let (ga, gb) = (norm(groups_a), norm(groups_b));
    if ga != gb {
        diffs.push(format!("hard-link groups differ: {ga:?} vs {gb:?}"));
    }
    diffs
}

/// Bytes actually allocated to a file.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

pub fn os(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}
