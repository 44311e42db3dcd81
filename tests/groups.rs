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

/// The CIDRs the shared group admits to port 22.
fn shared_group_admits() -> Vec<String> {
    let out = boto(
        "g = ec2.describe_security_groups(Filters=[{'Name': 'group-name', 'Values': ['ec2-backup-ssh']}])['SecurityGroups']\n\
         print(' '.join(r['CidrIp'] for x in g for p in x['IpPermissions'] for r in p.get('IpRanges', [])))",
    );
    out.split_whitespace().map(str::to_string).collect()
}

#[test]
fn a_helper_admits_only_what_its_group_says_and_the_tool_finds_its_own_address() {
    ensure_key_pair();
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"admitted").unwrap();
    let volumes = volume_ids();

    // A rule for an address this machine does not send from: the helper never answers (the
    // simulator drops what its groups do not admit, as EC2 does), and the run cleans up.
    let r = run(ec2_backup()
        .env("EC2_BACKUP_SSH_CIDR", "203.0.113.9")
        .env("EC2_BACKUP_BOOT_TIMEOUT", "6")
        .arg(&src));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("did not accept ssh"), "{}", r.stderr);
    assert!(
        r.stderr.contains("no answer"),
        "dropped, not refused: {}",
        r.stderr
    );
    assert_no_live_instances();
    assert_eq!(volume_ids(), volumes, "the failed run's volume was deleted");

    // Without it, the tool admits the address the helper sees: the local end of the route
    // to the helper (the host side of its link in the simulator), not the endpoint's route.
    let r = run(ec2_backup().env("EC2_BACKUP_VERBOSE", "1").arg(&src));
    let volume = r.volume_id();
    let admitted = r
        .stderr
        .lines()
        .find_map(|l| l.split("admits ssh from ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no rule reported: {}", r.stderr))
        .to_string();
    let address = r
        .stderr
        .lines()
        .find_map(|l| l.split(" is running at ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let ip: std::net::Ipv4Addr = address.parse().unwrap();
    let host_side = std::net::Ipv4Addr::from(u32::from(ip) - 1);
    assert_eq!(admitted, format!("{host_side}/32"), "helper at {address}");
    assert!(shared_group_admits().contains(&admitted));
    assert_ne!(admitted, "127.0.0.1/32");
    let out = scratch();
    let dest = out.path().join("restored");
    fs::create_dir(&dest).unwrap();
    extract_dd(&volume, &dest);
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"admitted");
}
