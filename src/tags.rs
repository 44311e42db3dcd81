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
    /// On a key pair: a token of the import that made it (see `run::launch`).
    pub const KEY_TOKEN: &str = "ec2-backup:key-token";
    /// The EC2 console name.
    pub const NAME: &str = "Name";
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
