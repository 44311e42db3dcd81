//! History: `--snapshot` and `--snapshot-only` leave completed, tagged snapshots holding the
//! backup (checked on the snapshot's own data file), restores from snapshots bring back each
//! run's own state, a `-v` overwrite first keeps the earlier backup, and `prune` deletes by
//! its policy and never touches a snapshot it did not make.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::tree;
use common::*;
use serde_json::Value;

fn json_backup(args: &[&str], dir: &Path) -> Value {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let r = backup(&args, dir);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(r.stdout.trim()).expect("one JSON object")
}

/// Extracts the tar archive a dd snapshot holds into `into`.
fn extract_snapshot(id: &str, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let st = Command::new("tar")
        .args(["--extract", "--numeric-owner", "--acls", "--xattrs"])
        .args(["--xattrs-include=*", "--same-permissions", "--file"])
        .arg(snapshot_file(id))
        .arg("--directory")
        .arg(into)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x of the snapshot file failed");
}

fn restore(source: &str, into: &Path) {
    let r = run(ec2_backup().arg("restore").arg(source).arg(into));
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn tags(v: &Value) -> &serde_json::Map<String, Value> {
    v["tags"].as_object().expect("tags")
}

fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_snapshot_holds_the_backup_and_restores_it() {
    let _ = fs::remove_file(tree::TRAP_FILE);
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    tree::hostile(&src);
    let out = json_backup(&["--snapshot", "--json"], &src);
    let vol = out["volume_id"].as_str().unwrap().to_string();
    let snap = out["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string();
    let info = snapshot(&snap).expect("the snapshot exists");
    assert_eq!(info["state"], "completed");
    let (st, vt) = (tags(&info), volume(&vol).unwrap());
    let vt = tags(&vt);
    for k in [
        "ec2-backup:method",
        "ec2-backup:sha256",
        "ec2-backup:bytes",
        "ec2-backup:run",
        "ec2-backup:finished",
        "ec2-backup:source-dir",
        "ec2-backup:source-dir-sha256",
    ] {
        assert_eq!(st.get(k), vt.get(k), "{k} as on the volume");
    }
    assert_eq!(st["ec2-backup:completed"], "true");
    assert_eq!(st["ec2-backup:kept"], "true");
    assert!(st["Name"].as_str().unwrap().starts_with("ec2-backup "));

    let from_snapshot = s.path().join("in-snapshot");
    extract_snapshot(&snap, &from_snapshot);
    let diffs = tree::differences(&src, &from_snapshot, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // Restore and verify read it through a temporary volume, deleted at the end.
    let volumes = volume_ids();
    let restored = s.path().join("restored");
    restore(&snap, &restored);
    let diffs = tree::differences(&src, &restored, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let r = run(ec2_backup().arg("verify").arg(&snap).arg(&src));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let live: Vec<String> = volume_ids()
        .into_iter()
        .filter(|v| !volumes.contains(v))
        .filter(|v| volume(v).is_some_and(|x| x["state"] != "deleted"))
        .collect();
    assert!(live.is_empty(), "temporary volumes left: {live:?}");
    assert_no_live_instances();
    assert!(
        !Path::new(tree::TRAP_FILE).exists(),
        "a name reached a shell"
    );
}

#[test]
fn snapshot_only_leaves_no_volume_and_lists_the_snapshot() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("only"), b"in the snapshot only").unwrap();
    let volumes = volume_ids();
    let r = backup(&[OsStr::new("--snapshot-only")], &src);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let snap = r.stdout.trim().to_string();
    assert!(
        snap.starts_with("snap-") && !snap.contains('\n'),
        "{:?}",
        r.stdout
    );
    let created: Vec<String> = volume_ids()
        .into_iter()
        .filter(|v| !volumes.contains(v))
        .collect();
    assert!(created.is_empty(), "volumes left: {created:?}");
    assert_eq!(snapshot(&snap).unwrap()["state"], "completed");
    let into = s.path().join("x");
    extract_snapshot(&snap, &into);
    assert_eq!(
        fs::read(into.join("only")).unwrap(),
        b"in the snapshot only"
    );

    let r = run(ec2_backup().args(["list", "--json"]));
    let list: Value = serde_json::from_str(&r.stdout).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == snap.as_str())
        .expect("listed");
    assert_eq!(entry["kind"], "snapshot");

    // -v with --snapshot-only is refused before anything is made.
    let r = run(ec2_backup()
        .args(["--snapshot-only", "-v", "vol-0123456789abcdef0"])
        .arg(&src));
    assert_eq!(r.code, 2, "{}", r.stderr);
    r.refused();
}

#[test]
fn rsync_history_restores_each_runs_own_state() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("kept"), b"first").unwrap();
    fs::write(src.join("removed-later"), b"only in run 1").unwrap();
    let first = json_backup(&["-m", "rsync", "--snapshot", "--json"], &src);
    let vol = first["volume_id"].as_str().unwrap().to_string();
    let s1 = first["snapshot_id"].as_str().unwrap().to_string();
    let state1 = s.path().join("state1");
    copy_tree(&src, &state1);

    fs::write(src.join("kept"), b"second, longer").unwrap();
    fs::remove_file(src.join("removed-later")).unwrap();
    fs::write(src.join("added"), b"only in run 2").unwrap();
    let second = json_backup(&["-m", "rsync", "-v", &vol, "--snapshot", "--json"], &src);
    let s2 = second["snapshot_id"].as_str().unwrap().to_string();
    assert_ne!(s1, s2);

    let r1 = s.path().join("r1");
    restore(&s1, &r1);
    let diffs = tree::differences(&state1, &r1, &["lost+found"]);
    assert!(diffs.is_empty(), "run 1's state: {}", diffs.join("\n"));
    let r2 = s.path().join("r2");
    restore(&s2, &r2);
    let diffs = tree::differences(&src, &r2, &["lost+found"]);
    assert!(diffs.is_empty(), "run 2's state: {}", diffs.join("\n"));
    assert_no_live_instances();
}

#[test]
fn overwriting_a_volume_with_snapshot_first_keeps_its_earlier_backup() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"earlier backup").unwrap();
    let vol = backup(&[], &src).volume_id();
    let earlier_run = tags(&volume(&vol).unwrap())["ec2-backup:run"].clone();

    fs::write(src.join("f"), b"the new one").unwrap();
    let r = backup(
        &[OsStr::new("-v"), OsStr::new(&vol), OsStr::new("--snapshot")],
        &src,
    );
    assert_eq!(r.volume_id(), vol);
    let before = r
        .stderr
        .lines()
        .find(|l| l.contains("had no snapshot"))
        .and_then(|l| id_after(l, "snap-"))
        .unwrap_or_else(|| panic!("no warning: {}", r.stderr));
    let info = snapshot(&before).unwrap();
    assert_eq!(info["state"], "completed");
    assert_eq!(
        tags(&info)["ec2-backup:run"],
        earlier_run,
        "the earlier backup's tags"
    );
    let old = s.path().join("old");
    extract_snapshot(&before, &old);
    assert_eq!(fs::read(old.join("f")).unwrap(), b"earlier backup");

    // The next run's backup has its snapshot now: no second one of it.
    fs::write(src.join("f"), b"third").unwrap();
    let r = backup(
        &[OsStr::new("-v"), OsStr::new(&vol), OsStr::new("--snapshot")],
        &src,
    );
    r.volume_id();
    assert!(!r.stderr.contains("had no snapshot"), "{}", r.stderr);
}

fn id_after(text: &str, prefix: &str) -> Option<String> {
    let at = text.find(prefix)?;
    Some(
        text[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect(),
    )
}

/// Snapshots of one small volume with made-up tags (times, groups), as prune sees them.
fn made_up_snapshots(vol: &str, specs: &[(&str, &str, &str, bool)]) -> Vec<String> {
    let mut code = String::from("ids = []\n");
    for (host, dir, finished, kept) in specs {
        let mut tags = format!(
            "[{{'Key': 'ec2-backup:run', 'Value': 'r-{finished}'}}, {{'Key': 'ec2-backup:method', 'Value': 'dd'}}, \
             {{'Key': 'ec2-backup:source-host', 'Value': '{host}'}}, {{'Key': 'ec2-backup:source-dir', 'Value': '{dir}'}}, \
             {{'Key': 'ec2-backup:source-dir-sha256', 'Value': 'h-{dir}'}}, {{'Key': 'ec2-backup:completed', 'Value': 'true'}}, \
             {{'Key': 'ec2-backup:finished', 'Value': '{finished}'}}"
        );
        if *kept {
            tags.push_str(", {'Key': 'ec2-backup:kept', 'Value': 'true'}");
        }
        tags.push(']');
        code.push_str(&format!(
            "ids.append(ec2.create_snapshot(VolumeId='{vol}', TagSpecifications=[{{'ResourceType': 'snapshot', 'Tags': {tags}}}])['SnapshotId'])\n"
        ));
    }
    code.push_str(
        "import time\nfor i in ids:\n    while ec2.describe_snapshots(SnapshotIds=[i])['Snapshots'][0]['State'] != 'completed': time.sleep(0.2)\nprint(' '.join(ids))",
    );
    boto(&code).split_whitespace().map(str::to_string).collect()
}

fn exists(id: &str) -> bool {
    snapshot(id).is_some()
}

#[test]
fn prune_keeps_what_its_policy_says_and_only_touches_its_own() {
    let vol = make_volume("us-east-1a", 1);
    // Hosts of this run only: the simulator keeps earlier runs' snapshots.
    let (ha, hb) = (
        format!("prune-{}-a", std::process::id()),
        format!("prune-{}-b", std::process::id()),
    );
    let a = |t: &'static str| (ha.as_str(), "/data", t, true);
    let ids = made_up_snapshots(
        &vol,
        &[
            a("2026-11-25T01:00:00Z"),
            a("2026-11-27T01:00:00Z"),
            a("2026-11-28T01:00:00Z"),
            a("2026-11-29T01:00:00Z"),
            a("2026-11-29T23:00:00Z"),
            (hb.as_str(), "/data", "2026-11-20T05:00:00Z", true),
            (hb.as_str(), "/data", "2026-11-21T05:00:00Z", true),
            // Not kept by its run (a failed run's): gc's, not prune's.
            (ha.as_str(), "/data", "2026-11-01T01:00:00Z", false),
        ],
    );
    let foreign = boto(&format!(
        "print(ec2.create_snapshot(VolumeId='{vol}', Description='the user\\'s own')['SnapshotId'])"
    ));
    let r = run(ec2_backup().args(["prune"]));
    assert_eq!(r.code, 2, "no rule: {}", r.stderr);
    r.refused();

    let r = run(ec2_backup().args(["prune", "--keep-daily", "2", "--keep-last", "1"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        ids.iter().all(|i| exists(i)),
        "nothing deleted without --yes"
    );
    let line = |id: &str| {
        r.stdout
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not listed: {}", r.stdout))
            .to_string()
    };
    assert!(
        line(&ids[0]).starts_with("would delete"),
        "{}",
        line(&ids[0])
    );
    assert!(line(&ids[4]).starts_with("keep") && line(&ids[4]).contains("daily 2026-11-29"));
    assert!(!r.stdout.contains(&foreign) && !r.stdout.contains(&ids[7]));

    let r = run(ec2_backup().args(["prune", "--keep-daily", "2", "--keep-last", "1", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let kept: Vec<bool> = ids.iter().map(|i| exists(i)).collect();
    // Group a: the newest of 29th and of 28th (daily 2), the 29th's newest is also last 1.
    // Group b: daily 2 keeps both days.
    assert_eq!(
        kept,
        [false, false, true, false, true, true, true, true],
        "{}",
        r.stdout
    );
    assert!(
        exists(&foreign),
        "a snapshot the tool did not make is never touched"
    );
}

#[test]
fn a_failed_snapshot_leaves_the_backup_on_its_volume_with_exit_6() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"still backed up").unwrap();
    let snapshots_before = status()["snapshots"].as_array().unwrap().len();
    let faults = Faults::new();
    faults.api("CreateSnapshot", "InternalError", 8);
    let r = backup(&[OsStr::new("--snapshot-only")], &src);
    drop(faults);
    assert_eq!(r.code, 6, "{}", r.stderr);
    let vol = r.stdout.trim().to_string();
    assert!(
        vol.starts_with("vol-"),
        "the volume is named on stdout: {:?}",
        r.stdout
    );
    let last = r.stderr.lines().last().unwrap();
    assert!(
        last.contains(&vol) && last.contains("without a snapshot"),
        "{last}"
    );
    let v = volume(&vol).expect("the volume stands");
    assert_eq!(tags(&v)["ec2-backup:completed"], "true");
    let into = s.path().join("x");
    fs::create_dir(&into).unwrap();
    extract_dd(&vol, &into);
    assert_eq!(fs::read(into.join("f")).unwrap(), b"still backed up");
    assert_eq!(
        status()["snapshots"].as_array().unwrap().len(),
        snapshots_before
    );
    assert_no_live_instances();
}

#[test]
fn sigint_while_waiting_for_the_snapshot_deletes_it_and_keeps_the_backup() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"kept on the volume").unwrap();
    let faults = Faults::new();
    faults.set(&["snapshot-delay", "6"]);
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1")
        .arg("--snapshot")
        .arg(&src);
    let live = common::spawn::Live::start(&mut cmd);
    let line = live.wait_for("snapshotting", std::time::Duration::from_secs(120));
    let snap = id_after(&line, "snap-").expect("the snapshot's ID");
    std::thread::sleep(std::time::Duration::from_millis(500));
    live.signal(libc::SIGINT);
    let ended = live.finish(std::time::Duration::from_secs(120));
    drop(faults);
    assert_eq!(ended.code(), Some(130), "{}", ended.show());
    let vol = ended.stdout.trim().to_string();
    assert!(vol.starts_with("vol-"), "{}", ended.show());
    assert_eq!(tags(&volume(&vol).unwrap())["ec2-backup:completed"], "true");
    assert!(
        ended.last_line().contains("without a snapshot"),
        "{}",
        ended.show()
    );
    // EC2 takes a pending snapshot's deletion once it completes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while exists(&snap) {
        assert!(
            std::time::Instant::now() < deadline,
            "{snap} was not deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert_no_live_instances();
}

#[test]
fn kms_key_id_encrypts_the_volume_and_its_snapshot_with_that_key() {
    let key = boto(
        "kms = boto3.client('kms')\nprint(kms.create_key(Description='ec2-backup test')['KeyMetadata']['Arn'])",
    );
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"encrypted with a key of mine").unwrap();
    let out = json_backup(&["--snapshot", "--json", "--kms-key-id", &key], &src);
    let vol = out["volume_id"].as_str().unwrap();
    let snap = out["snapshot_id"].as_str().unwrap();
    let described = boto(&format!(
        "v = ec2.describe_volumes(VolumeIds=['{vol}'])['Volumes'][0]\n\
         n = ec2.describe_snapshots(SnapshotIds=['{snap}'])['Snapshots'][0]\n\
         print(v['Encrypted'], v.get('KmsKeyId'), n['Encrypted'], n.get('KmsKeyId'))"
    ));
    assert_eq!(described, format!("True {key} True {key}"));
}

#[test]
fn gc_deletes_the_unkept_snapshot_of_a_run_killed_while_it_waited() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"killed while snapshotting").unwrap();
    let faults = Faults::new();
    faults.set(&["snapshot-delay", "4"]);
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1")
        .arg("--snapshot")
        .arg(&src);
    let live = common::spawn::Live::start(&mut cmd);
    let line = live.wait_for("snapshotting", std::time::Duration::from_secs(120));
    let snap = id_after(&line, "snap-").expect("the snapshot's ID");
    live.signal(libc::SIGKILL);
    let ended = live.finish(std::time::Duration::from_secs(60));
    drop(faults);
    assert_eq!(ended.code(), None, "killed: {}", ended.show());
    let r = run(ec2_backup().arg("gc"));
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(&snap) && l.contains("unkept snapshot")),
        "{}",
        r.stdout
    );
    assert!(exists(&snap), "listed, not deleted");
    let r = run(ec2_backup().args(["gc", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while exists(&snap) {
        assert!(
            std::time::Instant::now() < deadline,
            "{snap} was not deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // The kept backups of other runs are untouched by gc.
    let r = run(ec2_backup().args(["list", "--json"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
}
