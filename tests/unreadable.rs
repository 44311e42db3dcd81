//! Files the user cannot read: each is named on stderr, the rest is backed up, the volume is
//! kept and its ID printed, and the exit status is 3 (incomplete). Runs the tool as `nobody`,
//! since root can read everything.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

const NOBODY: u32 = 65534;

fn chown_r(path: &Path, uid: u32) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A HOME for `nobody` holding the shared EC2-Backup-Key, and the command to run as nobody.
fn as_nobody(home: &Path) -> Command {
    ensure_key_pair();
    let shared = common::home().join(".ssh/EC2-Backup-Key");
    let ssh = home.join(".ssh");
    fs::create_dir_all(&ssh).unwrap();
    fs::copy(&shared, ssh.join("EC2-Backup-Key")).unwrap();
    fs::set_permissions(
        ssh.join("EC2-Backup-Key"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).unwrap();
    chown_r(home, NOBODY);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &NOBODY.to_string(),
        "--regid",
        &NOBODY.to_string(),
        "--clear-groups",
    ])
    .arg(env!("CARGO_BIN_EXE_ec2-backup"))
    .env("HOME", home)
    .env("TMPDIR", home)
    .env_remove("EC2_BACKUP_FLAGS_AWS")
    .env_remove("EC2_BACKUP_FLAGS_SSH")
    .env_remove("EC2_BACKUP_VERBOSE");
    cmd
}

fn tree_with_unreadable(root: &Path) {
    fs::create_dir(root).unwrap();
    fs::write(root.join("readable"), b"fine").unwrap();
    fs::create_dir(root.join("open-dir")).unwrap();
    fs::write(root.join("open-dir/inner"), b"fine too").unwrap();
    chown_r(root, NOBODY);
    // Root-owned and private: nobody cannot read these.
    fs::write(root.join("secret-file"), b"root only").unwrap();
    fs::set_permissions(root.join("secret-file"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(root.join("secret-dir")).unwrap();
    fs::write(root.join("secret-dir/x"), b"hidden").unwrap();
    fs::set_permissions(root.join("secret-dir"), fs::Permissions::from_mode(0o700)).unwrap();
}

fn check_incomplete(r: &Run) -> String {
    assert_eq!(r.code, 3, "exit 3 for an incomplete backup: {}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "the volume ID is still printed: {:?}",
        r.stdout
    );
    assert!(r.stderr.contains("secret-file"), "{}", r.stderr);
    assert!(r.stderr.contains("secret-dir"), "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(last.contains("could not be read"), "{last}");
    lines[0].to_string()
}

#[test]
fn dd_backs_up_what_it_can_read_and_says_what_it_could_not() {
    let s = scratch();
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = s.path().join("src");
    tree_with_unreadable(&src);
    let home = s.path().join("home");
    let r = Run::from(as_nobody(&home).arg(&src).output().unwrap());
    let vol = check_incomplete(&r);
    let v = volume(&vol).expect("the volume is kept");
    assert_eq!(
        v["tags"]["ec2-backup:completed"], "false",
        "tagged as incomplete"
    );
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert_eq!(fs::read(out.join("readable")).unwrap(), b"fine");
    assert_eq!(fs::read(out.join("open-dir/inner")).unwrap(), b"fine too");
    assert!(!out.join("secret-file").exists());
    assert_no_live_instances();
}

#[test]
fn rsync_backs_up_what_it_can_read_and_says_what_it_could_not() {
    let s = scratch();
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = s.path().join("src");
    tree_with_unreadable(&src);
    let home = s.path().join("home");
    let r = Run::from(
        as_nobody(&home)
            .args(["-m", "rsync"])
            .arg(&src)
            .output()
            .unwrap(),
    );
    let vol = check_incomplete(&r);
    let m = Mounted::new(&vol);
    assert_eq!(fs::read(m.path().join("readable")).unwrap(), b"fine");
    assert_eq!(
        fs::read(m.path().join("open-dir/inner")).unwrap(),
        b"fine too"
    );
    drop(m);
    assert_no_live_instances();
}

/// A restore run as another user than root cannot give files their owners back: it restores
/// everything else, says so once, and exits 3.
#[test]
fn restore_as_non_root_says_owners_are_lost_and_exits_3() {
    let s = scratch();
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = s.path().join("owned");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("theirs"), b"owned by 1234").unwrap();
    std::os::unix::fs::chown(src.join("theirs"), Some(1234), Some(1234)).unwrap();
    let vol = run(ec2_backup().arg(&src)).volume_id();
    let home = s.path().join("home");
    let mut cmd = as_nobody(&home);
    let out = home.join("back");
    let r = run(cmd.arg("restore").arg(&vol).arg(&out));
    assert_eq!(r.code, 3, "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap();
    assert!(last.contains("not as root"), "{last}");
    assert_eq!(fs::read(out.join("theirs")).unwrap(), b"owned by 1234");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(out.join("theirs")).unwrap().uid(), NOBODY);
    assert_no_live_instances();
}
