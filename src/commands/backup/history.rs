//! The backup's history (`--snapshot`, `--snapshot-only`): a snapshot of a `-v` volume's
//! backup before it is overwritten (when it has none yet), and the snapshot of this run's
//! backup once the volume is handed back.

use crate::cloud::snapshot::Snapshots;
use crate::cloud::{wait, Cloud, Tags, Volume};
use crate::error::Error;
use crate::helper::lease::STATE_LIMIT;
use crate::history::snapshot;
use crate::tags::{key, truncate};

use super::Job;

impl Job {
    /// With `-v VOL --snapshot`: if the backup on VOL has no snapshot yet, starts one now,
    /// before anything writes to the volume, so that an overwrite that fails half-way can be
    /// undone. It is kept whatever happens to this run (it is the earlier backup); it
    /// completes on its own. Returns its ID.
    pub(super) async fn snapshot_before_writing(
        &self,
        volume: &Volume,
    ) -> Result<Option<String>, Error> {
        let tags = &volume.tags;
        if tags.get(key::COMPLETED).map(String::as_str) != Some("true") {
            return Ok(None); // no backup of ours on it, or an unfinished one: nothing to keep
        }
        let Some(run) = tags.get(key::RUN) else {
            return Ok(None);
        };
        let cloud = &self.lease.cloud;
        let existing = cloud.snapshots_tagged(key::RUN).await?;
        let covered = existing.iter().any(|s| {
            s.tags.get(key::RUN) == Some(run)
                && s.volume_id.as_deref() == Some(volume.id.as_str())
                && s.state != "error"
        });
        if covered {
            return Ok(None);
        }
        let mut snap: Tags = tags
            .iter()
            .filter(|(k, _)| k.starts_with("ec2-backup:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        snap.push((key::KEPT.into(), "true".into()));
        snap.push((key::NAME.into(), snapshot_name(tags)));
        let id = cloud
            .create_snapshot(
                &volume.id,
                &format!(
                    "ec2-backup: {}'s backup before run {}",
                    volume.id, self.lease.run_id
                ),
                &snap,
            )
            .await?;
        self.lease.report.warn(&format!(
            "{}'s backup (finished {}) had no snapshot: {id} keeps it before this run writes over it (if this run fails, 'ec2-backup restore {id} DIR' gets it back)",
            volume.id,
            tags.get(key::FINISHED).map(String::as_str).unwrap_or("at an unknown time"),
        ));
        Ok(Some(id))
    }

    /// Starts the snapshot of the handed-back volume, with its backup's tags; until kept it is
    /// on the job's history ledger, which a failure or a signal unwinds (the volume stands).
    /// The snapshot holds the volume as it is now: it may complete while the helper goes.
    pub(super) async fn start_snapshot(
        &self,
        volume_id: &str,
        backup_tags: &Tags,
    ) -> Result<String, Error> {
        let lease = &self.lease;
        let map = backup_tags.iter().cloned().collect();
        let mut tags: Tags = backup_tags
            .iter()
            .filter(|(k, _)| k != key::NAME)
            .cloned()
            .collect();
        tags.push((key::NAME.into(), snapshot_name(&map)));
        let description = format!("ec2-backup run {}", lease.run_id);
        let id =
            snapshot::start(&lease.cloud, &self.history, volume_id, &description, &tags).await?;
        lease
            .report
            .step(&format!("snapshotting {volume_id} as {id}"));
        Ok(id)
    }

    /// Waits for the snapshot taken before writing (it is the earlier backup's only copy now),
    /// warning if it did not complete.
    pub(super) async fn await_earlier(&self, id: &str) {
        let lease = &self.lease;
        if let Err(e) =
            snapshot::wait_completed(&lease.cloud, id, self.options.snapshot_limit, &lease.report)
                .await
        {
            lease.report.warn(&format!(
                "the snapshot {id} of the earlier backup did not complete: {e}"
            ));
        }
    }

    /// `--snapshot-only`: the volume this run made goes once its snapshot is kept. A volume
    /// that cannot be deleted holds the same backup: it is named, not lost.
    pub(super) async fn delete_volume(&self, volume_id: &str) -> Option<String> {
        let cloud = &self.lease.cloud;
        self.lease
            .report
            .step(&format!("deleting {volume_id}: the snapshot is the backup"));
        let available = wait::volume_state(cloud, volume_id, "available", None, STATE_LIMIT).await;
        match available.map(|_| ()) {
            Ok(()) => match cloud.delete_volume(volume_id).await {
                Ok(()) => None,
                Err(e) => Some(format!(
                    "the volume {volume_id} (it holds the snapshot's backup) could not be deleted ({e})"
                )),
            },
            Err(e) => Some(format!(
                "the volume {volume_id} (it holds the snapshot's backup) could not be deleted ({e})"
            )),
        }
    }
}

/// "ec2-backup HOST:DIR" with the backup's finish time, cut to EC2's 255 characters.
fn snapshot_name(tags: &std::collections::BTreeMap<String, String>) -> String {
    let get = |k: &str| tags.get(k).map(String::as_str).unwrap_or("?");
    truncate(
        &format!(
            "ec2-backup {}:{} {}",
            get(key::SOURCE_HOST),
            get(key::SOURCE_DIR),
            get(key::FINISHED)
        ),
        255,
    )
}
