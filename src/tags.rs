//! The tag schema: the only place a tag key is spelled, and the small facts every resource a
//! run makes is tagged with (the run, the time, this host).

/// Tag keys. Every resource a run makes carries [`key::RUN`]; a backup volume carries the rest.
pub mod key {
    /// The run that made the resource (random, per run).
    pub const RUN: &str = "ec2-backup:run";
    /// When the resource was made (UTC, RFC 3339).
    pub const CREATED: &str = "ec2-backup:created";
    /// The host and process of the run, so that `gc` on this host can tell a live run.
    pub const HOST: &str = "ec2-backup:host";
    pub const PID: &str = "ec2-backup:pid";
    /// The run's process as nothing else can be: machine, boot, pid, the pid's start time.
    pub const PROCESS: &str = "ec2-backup:process";
    /// A volume this run created (not one the user named with `-v`).
    pub const CREATED_VOLUME: &str = "ec2-backup:created-volume";
    /// When the backup was finished and the volume detached.
    pub const FINISHED: &str = "ec2-backup:finished";
    /// "true" only when the whole directory is on the volume.
    pub const COMPLETED: &str = "ec2-backup:completed";
    /// `dd` or `rsync`: what the volume holds.
    pub const METHOD: &str = "ec2-backup:method";
    pub const SOURCE_HOST: &str = "ec2-backup:source-host";
    pub const SOURCE_DIR: &str = "ec2-backup:source-dir";
    /// dd: the archive's SHA-256 (hex) and length.
    pub const SHA256: &str = "ec2-backup:sha256";
    pub const BYTES: &str = "ec2-backup:bytes";
    /// What the backup left out: the number of exclude patterns ("0": none), the SHA-256 of
    /// their set (`select::Selection::sha256`; empty without patterns), the patterns as a
    /// JSON array of strings when that fits in a tag (else empty), and whether other
    /// filesystems were skipped ("true"/"false"). A reused volume gets all four every time.
    pub const EXCLUDES: &str = "ec2-backup:excludes";
    pub const EXCLUDES_SHA256: &str = "ec2-backup:excludes-sha256";
    pub const EXCLUDE_PATTERNS: &str = "ec2-backup:exclude-patterns";
    pub const ONE_FILE_SYSTEM: &str = "ec2-backup:one-file-system";
    /// On a key pair: a token of the import that made it (see `run::launch`).
    pub const KEY_TOKEN: &str = "ec2-backup:key-token";
    /// On the helpers' shared security group (kept between runs; `gc` removes it when idle).
    pub const SHARED_GROUP: &str = "ec2-backup:shared-group";
    /// The EC2 console name.
    /// On a snapshot: the run saw it completed and kept it (one without is a failed run's).
    pub const KEPT: &str = "ec2-backup:kept";
    /// The SHA-256 of the source directory's path bytes (the path tag is cut at 255).
    pub const SOURCE_DIR_HASH: &str = "ec2-backup:source-dir-sha256";
    /// On a volume: a user named it with -v (prune never deletes it).
    pub const NAMED_VOLUME: &str = "ec2-backup:named-volume";
    /// On a snapshot (and its volume): written by `--direct` through the EBS direct APIs.
    pub const DIRECT: &str = "ec2-backup:direct";
    /// On a snapshot: its deletion was asked for (EC2 takes it once a pending snapshot
    /// completes; until then it still looks pending).
    pub const DELETING: &str = "ec2-backup:deleting";
    pub const NAME: &str = "Name";
}

/// The tags that record what a backup left out (see [`key::EXCLUDES`]).
pub fn selection(s: &crate::select::Selection) -> Vec<(&'static str, String)> {
    vec![
        (key::EXCLUDES, s.patterns().len().to_string()),
        (key::EXCLUDES_SHA256, s.sha256().unwrap_or_default()),
        (
            key::EXCLUDE_PATTERNS,
            s.patterns_json(256).unwrap_or_default(),
        ),
        (key::ONE_FILE_SYSTEM, s.one_file_system.to_string()),
    ]
}

/// What a backup's tags say it left out: the SHA-256 of its exclude set (None: no
/// patterns, or a backup older than the tags) and whether it skipped other filesystems.
pub fn recorded_selection(
    tags: &std::collections::BTreeMap<String, String>,
) -> (Option<String>, bool) {
    let sha = tags
        .get(key::EXCLUDES_SHA256)
        .filter(|v| !v.is_empty())
        .cloned();
    let one_fs = tags.get(key::ONE_FILE_SYSTEM).is_some_and(|v| v == "true");
    (sha, one_fs)
}

pub fn new_run_id() -> String {
    use rand::Rng;
    let bytes: [u8; 6] = rand::rng().random();
    hex::encode(bytes)
}

pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// EC2 tag values hold at most 256 characters.
pub fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// This process as no other process anywhere can be: `MACHINE:BOOT:PID:START`, the machine's
/// ID, its current boot's ID, the pid and the pid's start time (pids are reused; a start time
/// within one boot is not).
pub fn process_identity() -> String {
    let pid = std::process::id();
    format!(
        "{}:{}:{pid}:{}",
        machine_id(),
        boot_id(),
        start_time(pid).unwrap_or_default()
    )
}

/// Whether the process a [`process_identity`] names is alive: Some(true/false) when it ran on
/// this machine, None when it ran elsewhere (only its age can tell then).
pub fn process_alive(identity: &str) -> Option<bool> {
    let mut parts = identity.split(':');
    let (machine, boot, pid, start) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if machine != machine_id() {
        return None;
    }
    if boot != boot_id() {
        return Some(false);
    }
    let pid: u32 = pid.parse().ok()?;
    Some(start_time(pid).is_some_and(|s| s.to_string() == start))
}

fn machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(hostname)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat, counted
/// after the command name, which may hold spaces and parentheses).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The tags every resource a run makes carries: the run, when, and the process (for `gc`).
pub fn run_tags(run_id: &str) -> crate::cloud::Tags {
    vec![
        (key::RUN.into(), run_id.to_string()),
        (key::CREATED.into(), now()),
        (key::HOST.into(), hostname()),
        (key::PID.into(), std::process::id().to_string()),
        (key::PROCESS.into(), process_identity()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_identity_names_this_process_only() {
        let me = process_identity();
        assert_eq!(process_alive(&me), Some(true));
        let parts: Vec<&str> = me.split(':').collect();
        assert_eq!(parts.len(), 4, "{me}");
        // The same pid with another start time: a reused pid, not this run.
        let reused = format!("{}:{}:{}:1", parts[0], parts[1], parts[2]);
        assert_eq!(process_alive(&reused), Some(false));
        // Another boot of this machine: dead. Another machine: unknown.
        let rebooted = format!("{}:other-boot:{}:{}", parts[0], parts[2], parts[3]);
        assert_eq!(process_alive(&rebooted), Some(false));
        assert_eq!(process_alive("elsewhere:b:1:2"), None);
    }
}
