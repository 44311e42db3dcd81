//! EBS snapshots: what `--snapshot`, restores from a snapshot, `list`, `gc` and `prune` ask of
//! EC2. A trait of its own beside [`Cloud`], so that the helper's calls stay one narrow set.

use std::collections::BTreeMap;
use std::future::Future;

use super::{Cloud, CloudResult, Tags};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    /// `pending`, `completed`, `error` (also `recoverable`, `recovering` for archived ones).
    pub state: String,
    /// EC2's progress, e.g. "42%", while pending.
    pub progress: Option<String>,
    /// The volume it was taken of (EC2 shows a placeholder for some; not relied on).
    pub volume_id: Option<String>,
    pub size_gib: Option<i32>,
    /// When the snapshot was started (RFC 3339).
    pub started: Option<String>,
    /// EC2's reason when the state is `error`.
    pub message: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// `snap-` and 8 or 17 lowercase hex digits, as EC2 makes them.
pub fn valid_snapshot_id(id: &str) -> bool {
    id.strip_prefix("snap-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

pub trait Snapshots: Cloud {
    /// CreateSnapshot: the volume's data at this moment (writes after the call do not reach
    /// it), with these tags; it is `pending` until EC2 has copied it.
    fn create_snapshot(
        &self,
        volume: &str,
        description: &str,
        tags: &Tags,
    ) -> impl Future<Output = CloudResult<String>> + Send;
    fn describe_snapshot(
        &self,
        id: &str,
    ) -> impl Future<Output = CloudResult<Option<Snapshot>>> + Send;
    /// DeleteSnapshot; one that is gone already is fine. EC2 accepts it on a pending
    /// snapshot, which then goes once it completes.
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = CloudResult<()>> + Send;
    /// This account's snapshots that carry the tag key `key`.
    fn snapshots_tagged(
        &self,
        key: &str,
    ) -> impl Future<Output = CloudResult<Vec<Snapshot>>> + Send;
    /// CreateVolume from a completed snapshot, encrypted, in `zone`.
    fn create_volume_from(
        &self,
        zone: &str,
        snapshot: &str,
        size_gib: i32,
        tags: &Tags,
    ) -> impl Future<Output = CloudResult<String>> + Send;
}

#[cfg(test)]
#[test]
fn snapshot_ids() {
    assert!(valid_snapshot_id("snap-0123456789abcdef0"));
    assert!(valid_snapshot_id("snap-1a2b3c4d"));
    assert!(!valid_snapshot_id("snap-0123456789ABCDEF0"));
    assert!(!valid_snapshot_id("vol-0123456789abcdef0"));
}
