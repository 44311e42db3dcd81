//! Small facts every resource a run makes is tagged with: the run, the time, this host.

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
