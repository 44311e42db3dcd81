//! Round trips through the real binary and the simulator, checked on the volume's bytes.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::tree;
use common::*;

/// A source directory whose own name is hostile too.
fn hostile_source(scratch: &Path) -> std::path::PathBuf {
    let src = scratch.join("src $(id) ; 'q' \"dq\" -dash");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    src
}

#[test]
fn dd_round_trip_of_a_hostile_tree() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = hostile_source(s.path());
    let run = backup(&[], &src);
    let vol = run.volume_id();
    assert_no_live_instances();

    let v = volume(&vol).expect("the volume exists");
    assert_eq!(v["state"], "available");
    assert_eq!(v["size"], 1, "2x a ~4 MiB tree rounds up to 1 GiB");
    assert_eq!(v["tags"]["ec2-backup:completed"], "true");
    assert_eq!(v["tags"]["ec2-backup:method"], "dd");

    let out = s.path().join("restored");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    let diffs = tree::differences(&src, &out, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(
        tree::allocated(&out.join("sparse.img")) < 1 << 20,
        "sparse file stays sparse"
    );

    assert_tagged_checksum_is_the_volumes(&vol, &v);
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a file name was run by a shell"
    );
}

/// The archive's checksum recorded on the volume is that of the bytes at its start.
fn assert_tagged_checksum_is_the_volumes(vol: &str, v: &serde_json::Value) {
    let len: u64 = v["tags"]["ec2-backup:bytes"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let data = fs::read(volume_file(vol)).unwrap();
    use sha2::Digest;
    let sum = hex::encode(sha2::Sha256::digest(&data[..len as usize]));
    assert_eq!(v["tags"]["ec2-backup:sha256"], sum.as_str());
}

/// A helper image without python3 cannot hash while it writes: the archive is read back
/// from the device and hashed there instead.
#[test]
fn dd_on_a_helper_without_python_reads_the_archive_back() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    let faults = Faults::new();
    faults.set(&["no-python"]);
    let run = backup(&[], &src);
    drop(faults);
    let vol = run.volume_id();
    assert_no_live_instances();
    let v = volume(&vol).expect("the volume exists");
    assert_eq!(v["tags"]["ec2-backup:completed"], "true");
    assert_tagged_checksum_is_the_volumes(&vol, &v);
    let out = s.path().join("restored");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    let diffs = tree::differences(&src, &out, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn rsync_round_trip_then_incremental_with_deletions() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = hostile_source(s.path());
    let run = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src);
    let vol = run.volume_id();
    assert_no_live_instances();
    {
        let m = Mounted::new(&vol);
        let diffs = tree::differences(&src, m.path(), &["lost+found"]);
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        assert!(m.path().join("lost+found").is_dir());
        assert!(tree::allocated(&m.path().join("sparse.img")) < 1 << 20);
    }

    // Change the tree: add, modify, delete a file and a whole directory.
    fs::write(src.join("added.txt"), b"new file").unwrap();
    fs::write(src.join("random.bin"), tree::noise(1 << 20, 99)).unwrap();
    fs::remove_file(src.join("plain.txt")).unwrap();
    fs::remove_dir_all(src.join("nested")).unwrap();
    tree::set_mtime(&src, 1_100_000_000, 0);
    let again = backup(
        &[
            OsStr::new("-m"),
            OsStr::new("rsync"),
            OsStr::new("-v"),
            OsStr::new(&vol),
        ],
        &src,
    );
    assert_eq!(again.volume_id(), vol, "the same volume is reused");
    assert_no_live_instances();
    let m = Mounted::new(&vol);
    let diffs = tree::differences(&src, m.path(), &["lost+found"]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(!m.path().join("nested").exists());
    assert!(
        m.path().join("lost+found").is_dir(),
        "lost+found is left alone"
    );
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a file name was run by a shell"
    );
}

#[test]
fn xen_instance_type_finds_the_xvd_device() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), tree::noise(100_000, 1)).unwrap();
    let run = run(ec2_backup()
        .env("EC2_BACKUP_FLAGS_AWS", "--instance-type t2.micro")
        .arg(&src));
    let vol = run.volume_id();
    let st = status();
    let inst = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|i| i["type"] == "t2.micro")
        .cloned();
    assert!(inst.is_some(), "a t2.micro helper was used");
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert!(tree::differences(&src, &out, &[]).is_empty());
    assert_no_live_instances();
}

#[test]
fn existing_volume_in_another_zone_launches_the_helper_there() {
    let vol = make_volume("us-east-1c", 1);
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("file"), b"zone test").unwrap();
    let run = backup(&[OsStr::new("-v"), OsStr::new(&vol)], &src);
    assert_eq!(run.volume_id(), vol);
    let st = status();
    let last = st["instances"].as_array().unwrap().last().cloned().unwrap();
    assert_eq!(last["zone"], "us-east-1c");
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert!(tree::differences(&src, &out, &[]).is_empty());
    assert_no_live_instances();
}

/// An identity AWS knows nothing about (named in EC2_BACKUP_FLAGS_SSH, with `~`) reaches the
/// helper through the cloud-config the tool gives it; the key pair's private key is absent.
#[test]
fn ssh_flags_identity_unknown_to_aws_still_works() {
    let home = scratch();
    let ssh_dir = home.path().join(".ssh");
    fs::create_dir(&ssh_dir).unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(ssh_dir.join("mine"))
        .status()
        .unwrap();
    assert!(st.success());
    // A key pair whose private half nobody here has.
    let other = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let public = fs::read_to_string(other.path().join("k.pub")).unwrap();
    let name = format!("elsewhere-{}", std::process::id());
    boto(&format!(
        "ec2.import_key_pair(KeyName='{name}', PublicKeyMaterial=b'{}')",
        public.trim()
    ));
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"identity test").unwrap();
    let run = run(ec2_backup()
        .env("HOME", home.path())
        .env("EC2_BACKUP_FLAGS_AWS", format!("--key-name {name}"))
        .env(
            "EC2_BACKUP_FLAGS_SSH",
            "-i ~/.ssh/mine -o IdentitiesOnly=yes",
        )
        .arg(&src));
    let vol = run.volume_id();
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert!(tree::differences(&src, &out, &[]).is_empty());
    assert!(
        !home.path().join(".ssh/EC2-Backup-Key").exists(),
        "no default key was made"
    );
    assert_no_live_instances();
}

/// `.` is a directory like any other (the tool resolves it before anything else).
#[test]
fn dot_is_the_current_directory() {
    let s = scratch();
    let src = s.path().join("here");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"dot").unwrap();
    let run = run(ec2_backup().current_dir(&src).arg("."));
    let vol = run.volume_id();
    let v = volume(&vol).unwrap();
    let recorded = v["tags"]["ec2-backup:source-dir"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(Path::new(&recorded), fs::canonicalize(&src).unwrap());
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert!(tree::differences(&src, &out, &[]).is_empty());
}

/// Switching methods on a volume never destroys the backup it holds: dd refuses to write
/// over a filesystem, rsync refuses to format over an archive.
#[test]
fn switching_methods_on_a_volume_is_refused_and_the_backup_survives() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("precious"), b"keep me").unwrap();

    let fs_vol = backup(&[OsStr::new("-m"), OsStr::new("rsync")], &src).volume_id();
    let tags_before = volume(&fs_vol).unwrap()["tags"].clone();
    let r = backup(&[OsStr::new("-v"), OsStr::new(&fs_vol)], &src);
    let last = r.stderr.lines().last().unwrap_or("").to_string();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(last.contains("holds an rsync backup"), "{last}");
    assert_eq!(volume(&fs_vol).unwrap()["state"], "available");
    // The refusal came before any write: the backup still vouches for itself.
    assert_eq!(volume(&fs_vol).unwrap()["tags"], tags_before);
    {
        let m = Mounted::new(&fs_vol);
        assert_eq!(fs::read(m.path().join("precious")).unwrap(), b"keep me");
    }

    let tar_vol = backup(&[], &src).volume_id();
    let tags_before = volume(&tar_vol).unwrap()["tags"].clone();
    assert_eq!(tags_before["ec2-backup:completed"], "true");
    let r = backup(
        &[
            OsStr::new("-m"),
            OsStr::new("rsync"),
            OsStr::new("-v"),
            OsStr::new(&tar_vol),
        ],
        &src,
    );
    let last = r.stderr.lines().last().unwrap_or("").to_string();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(last.contains("holds a dd backup"), "{last}");
    assert_eq!(volume(&tar_vol).unwrap()["state"], "available");
    assert_eq!(volume(&tar_vol).unwrap()["tags"], tags_before);
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&tar_vol, &out);
    assert_eq!(fs::read(out.join("precious")).unwrap(), b"keep me");
    assert_no_live_instances();
}

/// ssh splits its `-o` values at spaces: a TMPDIR with a space in its path once broke the
/// pinned known_hosts and the control socket. The run's private files go to /tmp then.
#[test]
fn a_tmpdir_with_spaces_still_works() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"tmp").unwrap();
    let tmp = s.path().join("tmp with space %d");
    fs::create_dir(&tmp).unwrap();
    let vol = run(ec2_backup().env("TMPDIR", &tmp).arg(&src)).volume_id();
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert_eq!(fs::read(out.join("f")).unwrap(), b"tmp");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "nothing left in TMPDIR"
    );
    assert_no_live_instances();
}
