//! On a slow link, compressible data goes over the wire compressed and incompressible data
//! as it is; either way the volume holds the plain archive.

mod common;

use std::fs;

use common::*;

fn backup_json(dir: &std::path::Path) -> serde_json::Value {
    let r = run(ec2_backup().arg("--json").arg(dir));
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(r.stdout.trim()).unwrap()
}

fn restored_matches(vol: &str, src: &std::path::Path) {
    let out = scratch();
    extract_dd(vol, out.path());
    let diffs = tree::differences(src, out.path(), &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn slow_link_compresses_text_but_not_noise() {
    let faults = Faults::new();
    faults.set(&["link", "50"]);

    let text = scratch();
    let line = b"pub fn backup(dir: &Path) -> Result<VolumeId, Error> { todo!() } // comment\n";
    fs::write(text.path().join("code.rs"), line.repeat(200_000)).unwrap();
    let v = backup_json(text.path());
    assert_eq!(v["wire"], "zstd", "{v}");
    assert!(
        v["wire_bytes"].as_u64().unwrap() * 4 < v["bytes"].as_u64().unwrap(),
        "{v}"
    );
    restored_matches(v["volume_id"].as_str().unwrap(), text.path());

    let noise = scratch();
    fs::write(noise.path().join("random.bin"), tree::noise(12 << 20, 11)).unwrap();
    let v = backup_json(noise.path());
    assert_eq!(v["wire"], "plain", "{v}");
    restored_matches(v["volume_id"].as_str().unwrap(), noise.path());
    assert_no_live_instances();
}
