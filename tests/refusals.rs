//! Bad input: one sentence on stderr, exit > 0, and nothing created in the (simulated) cloud.

mod common;

use std::fs;
use std::process::Command;

use common::*;

/// Runs ec2-backup as prepared and checks it was refused with nothing created; returns the
/// message.
fn refused(cmd: &mut Command) -> (i32, String) {
    let before = inventory();
    let r = run(cmd);
    let line = r.refused().to_string();
    assert_eq!(
        inventory(),
        before,
        "a refused run created something: {line}"
    );
    (r.code, line)
}

fn small_dir() -> tempfile::TempDir {
    let s = scratch();
    fs::write(s.path().join("f"), b"x").unwrap();
    s
}

#[test]
fn help_prints_usage_and_exits_0() {
    let r = run(ec2_backup().arg("-h"));
    assert_eq!(r.code, 0);
    assert!(
        r.stdout
            .contains("Usage: ec2-backup [-h] [-m method] [-v volume-id]"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("EC2_BACKUP_FLAGS_AWS"));
}

#[test]
fn unknown_method() {
    let d = small_dir();
    let (code, line) = refused(ec2_backup().args(["-m", "tar"]).arg(d.path()));
    assert_eq!(code, 2);
    assert!(line.contains("Unknown method 'tar'"), "{line}");
}

#[test]
fn unknown_option_and_missing_dir() {
    let (code, line) = refused(ec2_backup().args(["-x", "."]));
    assert_eq!(code, 2);
    assert!(line.contains("'-x'"), "{line}");
    let (_, line) = refused(&mut ec2_backup());
    assert!(line.contains("directory to back up"), "{line}");
}

#[test]
fn exclude_problems() {
    let d = small_dir();
    let missing = d.path().join("no-such-file");
    let (code, line) = refused(
        ec2_backup()
            .arg("--exclude-from")
            .arg(&missing)
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(
        line.contains("exclude file") && line.contains("cannot be read"),
        "{line}"
    );
    // A directory given as the file: read(2) fails.
    let (code, line) = refused(
        ec2_backup()
            .arg("--exclude-from")
            .arg(d.path())
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(line.contains("cannot be read"), "{line}");
    let (code, line) = refused(ec2_backup().arg("--exclude=").arg(d.path()));
    assert_eq!(code, 2);
    assert!(line.contains("empty pattern"), "{line}");
    for itself in ["/", ".", "./"] {
        let (code, line) = refused(ec2_backup().args(["--exclude", itself]).arg(d.path()));
        assert_eq!(code, 2);
        assert!(line.contains("the directory itself"), "{line}");
    }
    let (code, line) = refused(ec2_backup().args(["--exclude", "*"]).arg(d.path()));
    assert_eq!(code, 2);
    assert!(line.contains("every entry"), "{line}");
    // verify refuses the same, before looking for the volume.
    let (code, line) = refused(
        ec2_backup()
            .args(["verify", "vol-0123456789abcdef0"])
            .arg(d.path())
            .args(["--exclude", "/"]),
    );
    assert_eq!(code, 2);
    assert!(line.contains("the directory itself"), "{line}");
}

#[test]
fn directory_problems() {
    let d = small_dir();
    let (code, line) = refused(ec2_backup().arg(d.path().join("missing")));
    assert_eq!(code, 2);
    assert!(line.contains("does not exist"), "{line}");
    let (_, line) = refused(ec2_backup().arg(d.path().join("f")));
    assert!(line.contains("is not a directory"), "{line}");
}

#[test]
fn malformed_and_missing_volumes() {
    let d = small_dir();
    let (code, line) = refused(ec2_backup().args(["-v", "vol-xyz"]).arg(d.path()));
    assert_eq!(code, 2);
    assert!(line.contains("is not a volume ID"), "{line}");
    let (code, line) = refused(
        ec2_backup()
            .args(["-v", "vol-0123456789abcdef0"])
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(line.contains("does not exist"), "{line}");
}

#[test]
fn volume_in_use_is_refused() {
    let vol = make_volume("us-east-1a", 1);
    boto(&format!(
        "ami = boto3.client('ssm').get_parameter(Name='/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64')['Parameter']['Value']\n\
         i = ec2.run_instances(ImageId=ami, InstanceType='t3.micro', MinCount=1, MaxCount=1, Placement={{'AvailabilityZone': 'us-east-1a'}})['Instances'][0]['InstanceId']\n\
         ec2.get_waiter('instance_running').wait(InstanceIds=[i], WaiterConfig={{'Delay': 1}})\n\
         ec2.attach_volume(VolumeId='{vol}', InstanceId=i, Device='/dev/sdf')\n\
         ec2.get_waiter('volume_in_use').wait(VolumeIds=['{vol}'], WaiterConfig={{'Delay': 1}})\n\
         print(i)"
    ));
    let d = small_dir();
    let (code, line) = refused(ec2_backup().args(["-v", &vol]).arg(d.path()));
    assert_eq!(code, 2);
    assert!(
        line.contains("in-use") && line.contains("detach it first"),
        "{line}"
    );
    boto(&format!(
        "for r in ec2.describe_instances(Filters=[{{'Name': 'instance-state-name', 'Values': ['running']}}])['Reservations']:\n    \
            [ec2.terminate_instances(InstanceIds=[i['InstanceId']]) for i in r['Instances'] if any(b.get('Ebs', {{}}).get('VolumeId') == '{vol}' for b in i.get('BlockDeviceMappings', []))]"
    ));
}

#[test]
fn volume_too_small_is_refused() {
    let vol = make_volume("us-east-1a", 1);
    let d = small_dir();
    // Allocated (not sparse) space counts: 1.2 GiB does not fit on 1 GiB.
    let st = Command::new("fallocate")
        .args(["-l", "1200M"])
        .arg(d.path().join("big"))
        .status()
        .unwrap();
    assert!(st.success());
    let (code, line) = refused(ec2_backup().args(["-v", &vol]).arg(d.path()));
    assert_eq!(code, 2);
    assert!(line.contains("too small"), "{line}");
}

#[test]
fn unsupported_aws_flag() {
    let d = small_dir();
    let (code, line) = refused(
        ec2_backup()
            .env("EC2_BACKUP_FLAGS_AWS", "--count 2")
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(line.contains("unsupported flag '--count'"), "{line}");
}

#[test]
fn unknown_instance_type() {
    let d = small_dir();
    let (code, line) = refused(
        ec2_backup()
            .env("EC2_BACKUP_FLAGS_AWS", "--instance-type t9.huge")
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(line.contains("t9.huge"), "{line}");
}

#[test]
fn ssh_identity_that_does_not_exist() {
    let d = small_dir();
    let (code, line) = refused(
        ec2_backup()
            .env("EC2_BACKUP_FLAGS_SSH", "-i ~/.ssh/nope")
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(
        line.contains(".ssh/nope") && line.contains("does not exist"),
        "{line}"
    );
}

#[test]
fn key_pair_in_aws_but_private_key_missing() {
    ensure_key_pair();
    let d = small_dir();
    let empty_home = scratch();
    let (code, line) = refused(ec2_backup().env("HOME", empty_home.path()).arg(d.path()));
    assert_eq!(code, 2);
    assert!(
        line.contains("EC2-Backup-Key") && line.contains("private key"),
        "{line}"
    );
}

#[test]
fn launch_flags_naming_nothing_are_refused_before_anything_is_made() {
    let d = small_dir();
    for (flags, expect) in [
        ("--image-id ami-0123456789abcdef0", "does not exist"),
        ("--security-group-ids sg-0123456789abcdef0", "do not exist"),
        ("--subnet-id subnet-0123456789abcdef0", "subnet"),
        (
            "--instance-type t4g.micro --image-id ami-0d27e0fb3bac4d724",
            "is x86_64 but",
        ),
    ] {
        let (code, line) = refused(
            ec2_backup()
                .env("EC2_BACKUP_FLAGS_AWS", flags)
                .arg(d.path()),
        );
        assert_eq!(code, 2, "{flags}: {line}");
        assert!(line.contains(expect), "{flags}: {line}");
    }
}

#[test]
fn a_bad_ssh_cidr_is_refused() {
    let d = small_dir();
    let (code, line) = refused(
        ec2_backup()
            .env("EC2_BACKUP_SSH_CIDR", "0.0.0.0/99")
            .arg(d.path()),
    );
    assert_eq!(code, 2);
    assert!(line.contains("EC2_BACKUP_SSH_CIDR"), "{line}");
}
