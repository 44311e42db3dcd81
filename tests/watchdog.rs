//! The dead-man switch: a run killed outright (kill -9) leaves no helper running and no volume
//! of its own, without `gc`; a `-v` volume survives; and a helper that goes away after a
//! successful transfer never takes the backup with it. Checked in EC2's state.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::spawn::Live;
use common::tree;
use common::*;

/// A tree big enough that a slow link keeps the transfer going for a while.
fn big_source(scratch: &Path) -> std::path::PathBuf {
    let src = scratch.join("big");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("noise"), tree::noise(24 << 20, 11)).unwrap();
    src
}

fn instance_state(id: &str) -> Option<String> {
    status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i["state"].as_str().map(str::to_string))
}

/// Waits until `done` holds, up to `limit`; how long it took.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    started.elapsed()
}

/// Starts a verbose backup with a 30 s watchdog over a slow link and kills it outright in the
/// middle of the transfer; returns (instance, when it was killed, the run's output).
fn killed_mid_transfer(args: &[&str], src: &Path) -> (String, Instant, common::spawn::Ended) {
    let mut cmd = ec2_backup();
    cmd.env("EC2_BACKUP_VERBOSE", "1")
        .env("EC2_BACKUP_WATCHDOG_SECONDS", "30")
        .args(args)
        .arg(src);
    let live = Live::start(&mut cmd);
    live.wait_for("; transferring", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1000));
    live.signal(libc::SIGKILL);
    let killed = Instant::now();
    let ended = live.finish(Duration::from_secs(30));
    let inst = ended.launched_instance().expect("a helper was launched");
    assert!(
        matches!(instance_state(&inst).as_deref(), Some("running")),
        "the helper runs on right after kill -9"
    );
    (inst, killed, ended)
}

/// Removes the security group a killed run left (the only thing it may leave) with gc.
fn gc_the_rest() {
    let r = run(ec2_backup().args(["gc", "--yes"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn kill_9_mid_transfer_the_watchdog_takes_the_helper_and_its_volume() {
    ensure_key_pair();
    let faults = Faults::new();
    faults.set(&["link", "20"]);
    let s = scratch();
    let src = big_source(s.path());
    let (inst, killed, ended) = killed_mid_transfer(&[], &src);
    let vol = ended.created_volume().expect("a volume was created");
    drop(faults);
    wait_until(Duration::from_secs(150), "the helper terminated", || {
        matches!(instance_state(&inst).as_deref(), Some("terminated") | None)
    });
    let took = killed.elapsed();
    eprintln!(
        "watchdog: helper terminated {:.1} s after kill -9",
        took.as_secs_f64()
    );
    assert!(
        volume(&vol).is_none(),
        "the run's own volume went with its helper"
    );
    gc_the_rest();
    assert_no_live_instances();
}

#[test]
fn kill_9_mid_transfer_keeps_a_named_volume() {
    ensure_key_pair();
    let own = make_volume("us-east-1a", 1);
    let faults = Faults::new();
    faults.set(&["link", "20"]);
    let s = scratch();
    let src = big_source(s.path());
    let (inst, _, _) = killed_mid_transfer(&["-v", &own], &src);
    drop(faults);
    wait_until(Duration::from_secs(150), "the helper terminated", || {
        matches!(instance_state(&inst).as_deref(), Some("terminated") | None)
    });
    wait_until(Duration::from_secs(60), "the volume detached", || {
        volume(&own).is_some_and(|v| v["state"] == "available")
    });
    let v = volume(&own).expect("a -v volume is never deleted");
    assert_ne!(v["tags"]["ec2-backup:completed"], "true", "{v}");
    gc_the_rest();
    assert!(volume(&own).is_some(), "gc never takes a -v volume");
    assert_no_live_instances();
}

/// After the transfer, the volume is marked to outlive the helper before the heartbeats stop;
/// the helper then goes (here its watchdog fires while the run's own termination is held up
/// by throttling) and the backup stays: the run succeeds, and the volume holds the archive.
#[test]
fn a_helper_going_right_after_the_transfer_keeps_the_backup() {
    ensure_key_pair();
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("precious"), b"keep me").unwrap();
    let faults = Faults::new();
    faults.api("TerminateInstances", "RequestLimitExceeded", 3);
    let r = run(ec2_backup()
        .env("EC2_BACKUP_WATCHDOG_SECONDS", "5")
        .arg(&src));
    drop(faults);
    let vol = r.volume_id();
    let v = volume(&vol).expect("the backup volume is kept");
    assert_eq!(v["state"], "available");
    assert_eq!(v["tags"]["ec2-backup:completed"], "true");
    let out = s.path().join("out");
    fs::create_dir(&out).unwrap();
    extract_dd(&vol, &out);
    assert_eq!(fs::read(out.join("precious")).unwrap(), b"keep me");
    assert_no_live_instances();
}
