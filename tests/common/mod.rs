//! Shared harness for the integration tests: they run the real `ec2-backup` binary against the
//! local EC2 simulator (`scripts/ec2sim`, started by `./scripts/test`) and check the result on
//! the volume's backing file, never the tool's own word.

#![allow(dead_code)]

pub mod spawn;
pub mod tree;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The simulator these tests talk to: the one whose variables are in the environment.
pub fn require_sim() {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "no simulator: run ./scripts/test, or eval \"$(scripts/ec2sim up)\" first"
    );
}

/// Runs `scripts/ec2sim ARGS` for the simulator in the environment; panics on failure.
pub fn ec2sim<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = Command::new(repo().join("scripts/ec2sim"))
        .args(args)
        .output()
        .expect("scripts/ec2sim runs");
    assert!(
        out.status.success(),
        "ec2sim {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn status() -> Value {
    serde_json::from_str(&ec2sim(&["status"])).expect("status is JSON")
}

/// Instances that are not terminated (pending, running, shutting-down counts as alive only
/// while not yet gone: a test requires none running or pending).
pub fn live_instances() -> Vec<String> {
    status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            matches!(
                i["state"].as_str(),
                Some("pending" | "running" | "stopping" | "stopped")
            )
        })
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn volume_ids() -> Vec<String> {
    status()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn volume(id: &str) -> Option<Value> {
    status()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .cloned()
}

pub fn volume_file(id: &str) -> PathBuf {
    PathBuf::from(ec2sim(&["volume-file", id]).trim())
}

/// The file holding a snapshot's data in the simulator (as EC2 keeps it: what the volume
/// held at the CreateSnapshot call).
pub fn snapshot_file(id: &str) -> PathBuf {
    let name = std::env::var("EC2SIM_NAME").unwrap_or_else(|_| "default".into());
    let root = std::env::var_os("EC2SIM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".sim"));
    root.join(name).join("snapshots").join(format!("{id}.img"))
}

/// A snapshot as the simulator's status shows it.
pub fn snapshot(id: &str) -> Option<Value> {
    status()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .cloned()
}

/// A scratch directory on a disk filesystem (xattrs work there, unlike some tmpfs).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("it.")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

/// The HOME the tests share: the key pair EC2-Backup-Key of the simulator lives there.
pub fn home() -> PathBuf {
    let h = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "home-{}",
        std::env::var("EC2SIM_NAME").unwrap_or_else(|_| "default".into())
    ));
    std::fs::create_dir_all(&h).unwrap();
    h
}

/// The ec2-backup binary with the simulator's environment and the shared HOME.
pub fn ec2_backup() -> Command {
    require_sim();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ec2-backup"));
    cmd.env("HOME", home())
        .env_remove("EC2_BACKUP_FLAGS_AWS")
        .env_remove("EC2_BACKUP_FLAGS_SSH")
        .env_remove("EC2_BACKUP_VERBOSE")
        .env("EC2_BACKUP_BOOT_TIMEOUT", "60");
    cmd
}

/// The outcome of one run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A successful run prints exactly one line, the volume ID.
    pub fn volume_id(&self) -> String {
        assert_eq!(self.code, 0, "ec2-backup failed: {}", self.stderr);
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "stdout must be one line: {:?}", self.stdout);
        assert!(lines[0].starts_with("vol-"), "{:?}", lines[0]);
        lines[0].to_string()
    }

    /// A refused run: exit > 0, nothing on stdout, one line on stderr.
    pub fn refused(&self) -> &str {
        assert_ne!(self.code, 0, "should have failed; stdout {:?}", self.stdout);
        assert_eq!(self.stdout, "", "nothing on stdout when failing");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one sentence on stderr: {:?}", self.stderr);
        assert!(lines[0].starts_with("ec2-backup: "), "{:?}", lines[0]);
        lines[0]
    }
}

pub fn run(cmd: &mut Command) -> Run {
    Run::from(cmd.output().expect("ec2-backup runs"))
}

/// Backs up `dir` with extra args; returns the run.
pub fn backup(args: &[&OsStr], dir: &Path) -> Run {
    run(ec2_backup().args(args).arg(dir))
}

/// Starts `n` backups of `dir` at once (one HOME, as cron entries of the same minute) and
/// waits for them all.
pub fn backups_at_once(dir: &Path, n: usize) -> Vec<Run> {
    let children: Vec<_> = (0..n)
        .map(|_| {
            ec2_backup()
                .arg(dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| Run::from(c.wait_with_output().unwrap()))
        .collect()
}

/// Extracts a dd volume's archive into `into` (as root, keeping owners, ACLs, xattrs).
pub fn extract_dd(volume_id: &str, into: &Path) {
    let file = volume_file(volume_id);
    let st = Command::new("tar")
        .args([
            "--extract",
            "--numeric-owner",
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--same-permissions",
            "--file",
        ])
        .arg(&file)
        .arg("--directory")
        .arg(into)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x of the volume file failed");
}

/// A read-only loop mount of an rsync volume, unmounted on drop.
pub struct Mounted {
    pub point: tempfile::TempDir,
}

impl Mounted {
    pub fn new(volume_id: &str) -> Mounted {
        let file = volume_file(volume_id);
        let point = scratch();
        let st = Command::new("mount")
            .args(["-o", "loop,ro,noload"])
            .arg(&file)
            .arg(point.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting the volume file failed");
        Mounted { point }
    }

    pub fn path(&self) -> &Path {
        self.point.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.point.path()).status();
    }
}

/// After every test: nothing the tool started is still alive.
pub fn assert_no_live_instances() {
    let live = live_instances();
    assert!(live.is_empty(), "instances left alive: {live:?}");
}

/// Runs Python with boto3 (from the simulator's venv) against the simulator, for setting up
/// situations the tool must refuse (a volume in use, in another zone, ...). Returns stdout.
pub fn boto(code: &str) -> String {
    require_sim();
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg("-c")
        .arg(format!(
            "import boto3, sys\nec2 = boto3.client('ec2')\n{code}"
        ))
        .output()
        .expect("venv python runs");
    assert!(
        out.status.success(),
        "boto3 snippet failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Creates a volume of `gib` GiB in `zone` and waits until it is available.
pub fn make_volume(zone: &str, gib: i32) -> String {
    boto(&format!(
        "v = ec2.create_volume(AvailabilityZone='{zone}', Size={gib})['VolumeId']\n\
         ec2.get_waiter('volume_available').wait(VolumeIds=[v], WaiterConfig={{'Delay': 1}})\n\
         print(v)"
    ))
}

/// What exists in the simulator, to prove a refused run created nothing.
pub fn inventory() -> (usize, usize, usize) {
    let s = status();
    let n = |k: &str| s[k].as_array().map(|a| a.len()).unwrap_or(0);
    (n("instances"), n("volumes"), n("key_pairs"))
}

/// The shared key pair exists in the simulator and its private key in `home()`. The first
/// backup in a fresh simulator makes them, so a test that counts what a run leaves behind
/// calls this first, whatever order the tests run in.
pub fn ensure_key_pair() {
    let in_sim = status()["key_pairs"]
        .as_array()
        .is_some_and(|k| k.iter().any(|k| k == "EC2-Backup-Key"));
    if !in_sim || !home().join(".ssh/EC2-Backup-Key").exists() {
        let d = scratch();
        std::fs::write(d.path().join("f"), b"key").unwrap();
        run(ec2_backup().arg(d.path())).volume_id();
    }
}

/// The simulator's fault switches, cleared now and again when dropped (even by a panic).
pub struct Faults(());

impl Faults {
    pub fn new() -> Faults {
        ec2sim(&["fault", "clear"]);
        Faults(())
    }

    /// `scripts/ec2sim fault ARGS`.
    pub fn set(&self, args: &[&str]) -> &Faults {
        let mut all = vec!["fault"];
        all.extend_from_slice(args);
        ec2sim(&all);
        self
    }

    pub fn api(&self, action: &str, code: &str, count: u32) -> &Faults {
        self.set(&["api", action, code, &count.to_string()])
    }

    /// How many failures of `action` are still armed (0 once all were consumed).
    pub fn armed(&self, action: &str) -> u64 {
        let name = std::env::var("EC2SIM_NAME").unwrap_or_else(|_| "default".into());
        let root = std::env::var_os("EC2SIM_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".sim"));
        let path = root.join(name).join("faults.json");
        let data: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        data["api"][action]["count"].as_u64().unwrap_or(0)
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        // No panic here: this also runs while a failed test unwinds.
        let _ = Command::new(repo().join("scripts/ec2sim"))
            .args(["fault", "clear"])
            .status();
    }
}
