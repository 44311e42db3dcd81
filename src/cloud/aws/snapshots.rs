//! [`Snapshots`] through the EC2 SDK.

use aws_sdk_ec2::types::{Filter, ResourceType};

use super::{fail, is_code, tag_map, tag_spec, AwsCloud};
use crate::cloud::snapshot::{Snapshot, Snapshots};
use crate::cloud::{CloudError, CloudResult, Tags};

fn snapshot(s: &aws_sdk_ec2::types::Snapshot) -> Snapshot {
    Snapshot {
        id: s.snapshot_id().unwrap_or_default().to_string(),
        state: s
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        progress: s.progress().map(str::to_string),
        volume_id: s.volume_id().map(str::to_string),
        size_gib: s.volume_size(),
        started: s
            .start_time()
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        message: s.state_message().map(str::to_string),
        tags: tag_map(s.tags()),
    }
}

impl Snapshots for AwsCloud {
    async fn create_snapshot(
        &self,
        volume: &str,
        description: &str,
        tags: &Tags,
    ) -> CloudResult<String> {
        let action = "Creating the snapshot";
        let out = self
            .ec2
            .create_snapshot()
            .volume_id(volume)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, tags))
            .send()
            .await
            .map_err(|e| fail(action, e))?;
        out.snapshot_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::new(action, "EC2 returned no snapshot ID"))
    }

    async fn describe_snapshot(&self, id: &str) -> CloudResult<Option<Snapshot>> {
        match self.ec2.describe_snapshots().snapshot_ids(id).send().await {
            Ok(out) => Ok(out.snapshots().first().map(snapshot)),
            Err(e) if is_code(&e, "InvalidSnapshot.NotFound") => Ok(None),
            Err(e) => Err(fail("Describing the snapshot", e)),
        }
    }

    async fn delete_snapshot(&self, id: &str) -> CloudResult<()> {
        match self.ec2.delete_snapshot().snapshot_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(fail("Deleting the snapshot", e)),
        }
    }

    async fn snapshots_tagged(&self, key: &str) -> CloudResult<Vec<Snapshot>> {
        let pages: Vec<_> = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(Filter::builder().name("tag-key").values(key).build())
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| fail("Listing snapshots made by ec2-backup", e))?;
        Ok(pages
            .iter()
            .flat_map(|p| p.snapshots())
            .map(snapshot)
            .collect())
    }

    async fn create_volume_from(
        &self,
        zone: &str,
        snapshot: &str,
        size_gib: i32,
        tags: &Tags,
    ) -> CloudResult<String> {
        self.new_volume(zone, size_gib, Some(snapshot), tags).await
    }
}
