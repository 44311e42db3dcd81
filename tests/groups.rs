//! The helpers' shared security group: one per VPC, made once even by runs started together,
//! kept between runs (a run never waits to delete it), removed by gc when no helper uses it.

mod common;

use std::fs;

use common::*;

fn shared_groups() -> Vec<String> {
    status()["security_groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["name"] == "ec2-backup-ssh")
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until every instance is terminated (a run returns while its helper shuts down).
fn all_terminated() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["state"] != "terminated")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "helpers still shutting down"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn runs_started_together_share_one_group_and_gc_removes_it_when_idle() {
    ensure_key_pair();
    // Start from no group at all (gc removes an idle one).
    all_terminated();
    let r = run(ec2_backup().args(["gc", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(shared_groups().is_empty(), "gc left the idle group");

    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"shared").unwrap();
    for r in backups_at_once(&src, 3) {
        r.volume_id();
    }
    let groups = shared_groups();
    assert_eq!(groups.len(), 1, "one group for all: {groups:?}");
    let st = status();
    let used: Vec<_> = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["tags"].get("ec2-backup:run").is_some())
        .filter(|i| {
            i["security_groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| *g == groups[0].as_str())
        })
        .collect();
    assert!(used.len() >= 3, "every helper was in it");
    assert_no_live_instances();

    // Kept after the runs (they returned while their helpers shut down); gc removes it once
    // no helper uses it.
    all_terminated();
    assert_eq!(shared_groups(), groups, "kept between runs");
    let r = run(ec2_backup().arg("gc"));
    assert!(r.stdout.contains(&groups[0]), "{}", r.stdout);
    let r = run(ec2_backup().args(["gc", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(shared_groups().is_empty());
}
