//! Moving the data and handing the volume back: its old tags withdrawn (a reused volume),
//! the device found, the method run, then detach, final tags and the helper's termination.

use std::path::Path;

use crate::cloud::{wait, Cloud, Tags};
use crate::device;
use crate::error::Error;
use crate::ledger::Resource;
use crate::method::{dd, rsync, Method, Source, Transfer};
use crate::ssh::Session;
use crate::tags::{hostname, now, truncate};

use super::{progress_bar, Job, DEVICE, STATE_LIMIT};

impl Job {
    /// What a reused volume held is about to change: its old tags must stop vouching for it
    /// until this run vouches for the new contents.
    pub(super) async fn unvouch(&self, volume_id: &str) -> Result<(), Error> {
        let stale: Tags = ["ec2-backup:sha256", "ec2-backup:bytes"]
            .iter()
            .map(|k| (k.to_string(), String::new()))
            .chain([("ec2-backup:completed".to_string(), "false".to_string())])
            .collect();
        Ok(self.cloud.create_tags(volume_id, &stale).await?)
    }

    /// Finds the volume's device on the helper and runs the method onto it.
    pub(super) async fn transfer_to(
        &self,
        volume_id: &str,
        size_gib: i32,
        workdir: &Path,
    ) -> Result<Transfer, Error> {
        let guard = self.ssh.lock().await;
        let ssh: &Session = guard.as_ref().expect("connected before the transfer");
        let found = ssh
            .run(
                "Finding the volume's device",
                &device::find_command(volume_id, DEVICE, size_gib, 300),
            )
            .await?;
        let dev = device::parse_found(&found).ok_or_else(|| {
            Error::Invalid(format!(
                "the helper reported no usable device for {volume_id}"
            ))
        })?;
        self.report
            .step(&format!("{volume_id} is {dev} on the helper; transferring"));
        let source = Source {
            dir: self.plan.dir.clone(),
            skip_contents_of: self.plan.inventory.pseudo_mounts.clone(),
        };
        match self.options.method {
            Method::Dd => {
                // The archive is about the data plus a header or two per entry.
                let estimate = self.plan.inventory.data_bytes + self.plan.inventory.entries * 1536;
                let bar = progress_bar(estimate);
                Ok(dd::backup(ssh, &source, &dev, volume_id, &bar).await?)
            }
            Method::Rsync => {
                self.ledger.record(Resource::Mount);
                if rsync::mount(ssh, &dev, volume_id).await? {
                    self.report.step("made an ext4 filesystem on the volume");
                }
                let transfer = rsync::backup(ssh, &source, workdir).await?;
                rsync::unmount(ssh).await?;
                self.ledger.forget(&Resource::Mount);
                Ok(transfer)
            }
        }
    }

    /// The data is on the volume (written and flushed, or unmounted): detaches it, tags it
    /// as this run's backup and starts the helper's termination; from here on the volume is
    /// kept whatever happens.
    pub(super) async fn finish(
        &self,
        volume_id: &str,
        instance_id: &str,
        transfer: &Transfer,
    ) -> Result<(), Error> {
        let (cloud, report) = (&self.cloud, &self.report);
        let wire = match transfer.wire {
            Some(w) => format!(" ({} on the wire, {w})", transfer.wire_bytes),
            None => String::new(),
        };
        report.step(&format!(
            "transferred {} bytes{wire}; detaching",
            transfer.bytes
        ));
        let session = self.ssh.lock().await.take();
        if let Some(mut s) = session {
            s.close().await;
        }
        // Detaching, tagging and terminating the helper go on at once: termination never
        // takes a volume that was attached after launch with it, and the explicit detach
        // frees the volume sooner than termination would.
        cloud.detach_volume(volume_id, instance_id).await?;
        let mut done = self.volume_tags(!transfer.incomplete);
        done.push((crate::gc::FINISHED_TAG.into(), now()));
        if let Some(sum) = &transfer.sha256 {
            done.push(("ec2-backup:sha256".into(), sum.clone()));
            done.push(("ec2-backup:bytes".into(), transfer.bytes.to_string()));
        }
        let volume_done = async {
            tokio::try_join!(
                async {
                    wait::volume_state(cloud, volume_id, "available", None, STATE_LIMIT).await?;
                    self.ledger.forget(&Resource::Attachment {
                        volume: volume_id.to_string(),
                        instance: instance_id.to_string(),
                    });
                    Ok::<_, Error>(())
                },
                async { Ok(cloud.create_tags(volume_id, &done).await?) },
            )
        };
        // An early start only: the ledger still holds the instance, and its unwind makes
        // the call again (EC2 accepts it for an instance already going) and waits for the
        // end. So a failure here must not fail the backup, which is whole.
        let (volume_done, terminating) =
            tokio::join!(volume_done, cloud.terminate_instance(instance_id));
        volume_done?;
        if let Err(e) = terminating {
            report.step(&format!("{e}; trying again in the cleanup"));
        }
        // From here on the backup is safe: the volume and the key pair are kept.
        self.ledger.forget(&Resource::Volume(volume_id.to_string()));
        for r in self.ledger.snapshot() {
            if matches!(r, Resource::KeyPair { .. }) {
                self.ledger.forget(&r);
            }
        }
        Ok(())
    }

    pub(super) fn tags(&self, extra: &[(&str, String)]) -> Tags {
        let mut tags: Tags = vec![
            ("ec2-backup:run".into(), self.run_id.clone()),
            ("ec2-backup:created".into(), now()),
            // Lets `ec2-backup gc` on this host tell a live run from a killed one.
            ("ec2-backup:host".into(), hostname()),
            ("ec2-backup:pid".into(), std::process::id().to_string()),
        ];
        tags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        tags
    }

    pub(super) fn volume_tags(&self, completed: bool) -> Tags {
        let host = hostname();
        let dir = truncate(&self.plan.dir.to_string_lossy(), 255);
        let name = truncate(&format!("ec2-backup {host}:{dir}"), 255);
        let mut tags = self.tags(&[
            ("ec2-backup:source-host", host),
            ("ec2-backup:source-dir", dir),
            (
                "ec2-backup:method",
                self.options.method.as_str().to_string(),
            ),
            ("ec2-backup:completed", completed.to_string()),
        ]);
        // A user's own volume keeps its own name.
        if self.plan.existing_volume.is_none() {
            tags.push(("Name".into(), name));
        }
        tags
    }
}
