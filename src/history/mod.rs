//! History: EBS snapshots of backups (taken, awaited, kept) and the retention policy that
//! `prune` applies to them.

pub mod policy;
pub mod snapshot;
