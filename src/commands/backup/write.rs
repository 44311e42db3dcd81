//! Writing the directory onto the attached volume: what a `-v` volume holds is checked
//! first (see [`probe`]), its old tags stop vouching for it only once writing starts, then
//! the method runs onto the device.

use crate::cloud::{Cloud, Tags};
use crate::error::Error;
use crate::helper::lease::Attached;
use crate::helper::probe;
use crate::helper::ssh::Session;
use crate::ledger::Resource;
use crate::method::{dd, rsync, Method, MethodError, Source, Transfer};
use crate::tags::{hostname, key, truncate};

use super::{progress_bar, Job};

impl Job {
    /// Runs the method onto the attached volume's device. A refusal leaves an intact backup
    /// exactly as it was, tags included.
    pub(super) async fn write(&self, attached: &Attached) -> Result<Transfer, Error> {
        let (volume_id, dev) = (&attached.volume_id, &attached.device);
        let ssh = self.lease.session().await?;
        let ssh: &Session = &ssh;
        let write = self.may_write(ssh, volume_id, dev).await?;
        self.lease
            .report
            .step(&format!("{volume_id} is {dev} on the helper; transferring"));
        let source = Source::new(&self.plan.dir, &self.options.selection);
        let reused = self.plan.existing_volume.is_some();
        match self.options.method {
            Method::Dd => {
                if reused {
                    self.unvouch(volume_id).await?;
                }
                let estimate = self
                    .plan
                    .archive_bytes
                    .unwrap_or(self.plan.inventory.footprint);
                let bar = progress_bar(estimate);
                Ok(dd::backup(ssh, &source, dev, &bar).await?)
            }
            Method::Rsync => {
                let inventory = &self.plan.inventory;
                let make_fs = (write == probe::Plan::MakeFilesystem)
                    .then(|| rsync::inodes_for(inventory.entries, attached.size_gib));
                if reused && make_fs.is_some() {
                    self.unvouch(volume_id).await?;
                }
                let ledger = &self.lease.ledger;
                ledger.record(Resource::Mount(rsync::MOUNT_POINT.into()));
                let capacity = rsync::mount(ssh, dev, make_fs).await?;
                if make_fs.is_some() {
                    self.lease
                        .report
                        .step("made an ext4 filesystem on the volume");
                }
                if let Some(short) =
                    capacity.shortfall(inventory.footprint, inventory.largest, inventory.entries)
                {
                    return Err(MethodError::Refused(format!(
                        "the volume {volume_id} is too small for this directory: {short}; nothing was written to it"
                    ))
                    .into());
                }
                if reused && make_fs.is_none() {
                    self.unvouch(volume_id).await?;
                }
                let transfer = rsync::backup(ssh, &source, self.lease.workdir()).await?;
                rsync::unmount(ssh).await?;
                ledger.forget(&Resource::Mount(rsync::MOUNT_POINT.into()));
                Ok(transfer)
            }
        }
    }

    /// What may be done to the device: a volume this run created is blank; a `-v` volume is
    /// probed, and written only as [`probe::decide`] allows.
    async fn may_write(
        &self,
        ssh: &Session,
        volume_id: &str,
        dev: &str,
    ) -> Result<probe::Plan, Error> {
        let Some(volume) = &self.plan.existing_volume else {
            return Ok(match self.options.method {
                Method::Dd => probe::Plan::WriteArchive,
                Method::Rsync => probe::Plan::MakeFilesystem,
            });
        };
        let content = probe::probe(ssh, dev).await?;
        self.lease
            .report
            .step(&format!("{volume_id} holds {content:?}"));
        probe::decide(
            volume_id,
            &content,
            &volume.tags,
            self.options.method,
            self.options.overwrite,
        )
        .map_err(|why| MethodError::Refused(why).into())
    }

    /// What a reused volume held is about to change: its old tags must stop vouching for it
    /// until this run vouches for the new contents.
    async fn unvouch(&self, volume_id: &str) -> Result<(), Error> {
        let stale: Tags = [key::SHA256, key::BYTES]
            .iter()
            .map(|k| (k.to_string(), String::new()))
            .chain([(key::COMPLETED.to_string(), "false".to_string())])
            .collect();
        Ok(self.lease.cloud.create_tags(volume_id, &stale).await?)
    }

    /// The tags that say what the volume holds (and the run's own).
    pub(super) fn volume_tags(&self, completed: bool) -> Tags {
        let host = hostname();
        let dir = truncate(&self.plan.dir.to_string_lossy(), 255);
        let name = truncate(&format!("ec2-backup {host}:{dir}"), 255);
        let mut tags = self.lease.tags(&[
            (key::SOURCE_HOST, host),
            (key::SOURCE_DIR, dir),
            (key::SOURCE_DIR_HASH, dir_hash(&self.plan.dir)),
            (key::METHOD, self.options.method.as_str().to_string()),
            (key::COMPLETED, completed.to_string()),
        ]);
        tags.extend(
            crate::tags::selection(&self.options.selection)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        // A user's own volume keeps its own name, and is marked as theirs.
        match self.plan.existing_volume {
            None => tags.push((key::NAME.into(), name)),
            Some(_) => tags.push((key::NAMED_VOLUME.into(), "true".into())),
        }
        tags
    }
}

/// The SHA-256 of the directory's path bytes: its identity for `prune`'s groups, whole even
/// when the path tag is cut.
pub fn dir_hash(dir: &std::path::Path) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    hex::encode(sha2::Sha256::digest(dir.as_os_str().as_bytes()))
}
