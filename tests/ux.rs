//! --dry-run and --json: what scripts and careful users rely on.

mod common;

use std::fs;

use common::*;

fn small_dir() -> tempfile::TempDir {
    let s = scratch();
    fs::write(s.path().join("f"), tree_bytes()).unwrap();
    s
}

fn tree_bytes() -> Vec<u8> {
    common::tree::noise(200_000, 3)
}

#[test]
fn dry_run_creates_nothing_and_says_what_it_would() {
    let d = small_dir();
    let before = inventory();
    let r = run(ec2_backup().arg("--dry-run").arg(d.path()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(inventory(), before, "a dry run created something");
    assert!(
        r.stdout.contains("launch a t3.micro (x86_64) helper"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("create an encrypted 1 GiB gp3 volume in us-east-1a"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("Estimated cost"), "{}", r.stdout);

    let r = run(ec2_backup()
        .args(["--dry-run", "--json", "-m", "rsync"])
        .arg(d.path()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("one JSON object");
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["method"], "rsync");
    assert_eq!(v["new_volume_gib"], 1);
    assert_eq!(v["data_bytes"], 200_000);
    assert!(v["image_id"].as_str().unwrap().starts_with("ami-"));
    assert_eq!(inventory(), before);
}

#[test]
fn json_reports_what_is_on_the_volume() {
    let d = small_dir();
    let r = run(ec2_backup().arg("--json").arg(d.path()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {:?}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let vol = v["volume_id"].as_str().unwrap().to_string();
    let bytes = v["bytes"].as_u64().unwrap();
    // The reported checksum is that of the volume's first `bytes` bytes.
    let data = fs::read(volume_file(&vol)).unwrap();
    use sha2::Digest;
    assert_eq!(
        v["sha256"],
        hex::encode(sha2::Sha256::digest(&data[..bytes as usize])).as_str()
    );
    assert_eq!(v["method"], "dd");
    assert_eq!(v["complete"], true);
    assert_eq!(v["instance_type"], "t3.micro");
    assert_eq!(v["zone"], "us-east-1a");
    assert!(v["instance_cost_usd"].as_f64().unwrap() > 0.0);
    assert_no_live_instances();
}

/// rsync's `bytes` are those of the files it wrote: all of them the first time, only the
/// changed one when the volume is reused.
#[test]
fn json_for_rsync_counts_the_bytes_written() {
    let d = small_dir();
    fs::write(d.path().join("g"), b"twelve bytes").unwrap();
    let json = |args: &[&str]| {
        let r = run(ec2_backup()
            .args(["--json", "-m", "rsync"])
            .args(args)
            .arg(d.path()));
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str::<serde_json::Value>(r.stdout.trim()).unwrap()
    };
    let first = json(&[]);
    assert_eq!(first["method"], "rsync");
    assert_eq!(first["bytes"], 200_000 + 12);
    assert_eq!(first["sha256"], serde_json::Value::Null);
    let vol = first["volume_id"].as_str().unwrap().to_string();
    fs::write(d.path().join("g"), b"thirteen byte").unwrap();
    let again = json(&["-v", &vol]);
    assert_eq!(again["volume_id"], vol.as_str());
    assert_eq!(again["bytes"], 13);
    assert_no_live_instances();
}
