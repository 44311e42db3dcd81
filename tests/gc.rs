//! `ec2-backup gc` after a run killed outright (kill -9): it finds exactly what that run left
//! and removes it, and never touches a completed backup, a user's volume or untagged things.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

#[test]
fn gc_removes_what_a_killed_run_left_and_nothing_else() {
    ec2sim(&["fault", "clear"]);
    // Things gc must leave alone: a user's volume, a completed backup.
    let users = make_volume("us-east-1b", 1);
    let done = {
        let d = scratch();
        fs::write(d.path().join("f"), b"kept").unwrap();
        run(ec2_backup().arg(d.path())).volume_id()
    };

    // A run killed mid-transfer (a slow link keeps it there).
    let faults = Faults::new();
    faults.set(&["link", "16"]);
    let d = scratch();
    fs::write(d.path().join("big"), common::tree::noise(24 << 20, 5)).unwrap();
    let mut child = ec2_backup()
        .env("EC2_BACKUP_VERBOSE", "1")
        .arg(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut created = None;
    let mut instance = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("created vol-").nth(1) {
            created = Some(format!("vol-{}", rest.split_whitespace().next().unwrap()));
        }
        if let Some(rest) = line.split("launched ").nth(1) {
            instance = Some(rest.trim().to_string());
        }
        if line.contains("transferring") {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let (created, instance) = (created.unwrap(), instance.unwrap());
    assert!(
        live_instances().contains(&instance),
        "kill -9 leaves the helper running"
    );

    let shown = run(ec2_backup().arg("gc"));
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(
        shown
            .stdout
            .contains(&format!("would terminate helper instance {instance}")),
        "{}",
        shown.stdout
    );
    assert!(
        shown
            .stdout
            .contains(&format!("would delete incomplete volume {created}")),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains("would delete security group"),
        "{}",
        shown.stdout
    );
    assert!(
        !shown.stdout.contains(&users) && !shown.stdout.contains(&done),
        "{}",
        shown.stdout
    );
    assert!(
        live_instances().contains(&instance),
        "gc without --yes changes nothing"
    );

    let acted = run(ec2_backup().args(["gc", "--yes"]));
    assert_eq!(acted.code, 0, "{}", acted.stderr);
    assert_no_live_instances();
    assert!(
        volume(&created).is_none(),
        "the killed run's volume is gone"
    );
    assert!(volume(&users).is_some(), "a user's volume is never touched");
    assert!(
        volume(&done).is_some(),
        "a completed backup is never touched"
    );
    let groups = status()["security_groups"].clone();
    assert!(
        !groups
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["tags"].get("ec2-backup:run").is_some()),
        "no temporary security group is left: {groups}"
    );
    // Nothing of the killed run is left. The helpers' shared group may still be there: a
    // successful run returns while its helper is shutting down, which keeps the group in use.
    let again = run(ec2_backup().arg("gc"));
    let left: Vec<&str> = again
        .stdout
        .lines()
        .filter(|l| !l.contains("the helpers' shared group"))
        .collect();
    assert!(left.is_empty(), "nothing left to find: {left:?}");
}
