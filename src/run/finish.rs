//! Moving the data and handing the volume back: its old tags withdrawn (a reused volume),
//! the device found, the method run, then detach, final tags and the helper's termination.

use std::path::Path;
use std::time::Duration;

use crate::cloud::{wait, Cloud, Tags};
use crate::device;
use crate::error::Error;
use crate::ledger::Resource;
use crate::method::{dd, rsync, Method, MethodError, Source, Transfer};
use crate::probe;
use crate::ssh::Session;
use crate::tags::{hostname, key, now, truncate};

use super::{progress_bar, Job, DEVICE, STATE_LIMIT};

impl Job {
    /// What a reused volume held is about to change: its old tags must stop vouching for it
    /// until this run vouches for the new contents.
    pub(super) async fn unvouch(&self, volume_id: &str) -> Result<(), Error> {
        let stale: Tags = [key::SHA256, key::BYTES]
            .iter()
            .map(|k| (k.to_string(), String::new()))
            .chain([(key::COMPLETED.to_string(), "false".to_string())])
            .collect();
        Ok(self.cloud.create_tags(volume_id, &stale).await?)
    }

    /// Finds the volume's device on the helper, makes sure it may be written, and runs the
    /// method onto it. A `-v` volume's old tags stop vouching for it only here, once writing
    /// really starts: a refusal leaves an intact backup exactly as it was.
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
            MethodError::Failed(format!(
                "the helper reported no usable device for {volume_id}"
            ))
        })?;
        let write = self.may_write(ssh, volume_id, &dev).await?;
        self.report
            .step(&format!("{volume_id} is {dev} on the helper; transferring"));
        let source = Source {
            dir: self.plan.dir.clone(),
            skip_contents_of: self.plan.inventory.pseudo_mounts.clone(),
        };
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
                Ok(dd::backup(ssh, &source, &dev, &bar).await?)
            }
            Method::Rsync => {
                let inventory = &self.plan.inventory;
                let make_fs = (write == probe::Plan::MakeFilesystem)
                    .then(|| rsync::inodes_for(inventory.entries, size_gib));
                if reused && make_fs.is_some() {
                    self.unvouch(volume_id).await?;
                }
                self.ledger.record(Resource::Mount);
                let capacity = rsync::mount(ssh, &dev, make_fs).await?;
                if make_fs.is_some() {
                    self.report.step("made an ext4 filesystem on the volume");
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
                let transfer = rsync::backup(ssh, &source, workdir).await?;
                rsync::unmount(ssh).await?;
                self.ledger.forget(&Resource::Mount);
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
        let out = ssh
            .run("Looking at what the volume holds", &probe::command(dev))
            .await?;
        let content = probe::Content::parse(&out);
        self.report.step(&format!("{volume_id} holds {content:?}"));
        probe::decide(
            volume_id,
            &content,
            &volume.tags,
            self.options.method,
            self.options.overwrite,
        )
        .map_err(|why| MethodError::Refused(why).into())
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
        self.keep_volume(volume_id, instance_id).await?;
        let session = self.ssh.lock().await.take();
        if let Some(mut s) = session {
            s.close().await;
        }
        // Detaching, tagging and terminating the helper go on at once: termination never
        // takes a volume that was attached after launch with it, and the explicit detach
        // frees the volume sooner than termination would.
        cloud.detach_volume(volume_id, instance_id).await?;
        let mut done = self.volume_tags(!transfer.incomplete);
        done.push((key::FINISHED.into(), now()));
        if let Some(sum) = &transfer.sha256 {
            done.push((key::SHA256.into(), sum.clone()));
            done.push((key::BYTES.into(), transfer.bytes.to_string()));
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
        // From here on the backup is safe: the volume is kept.
        self.ledger.forget(&Resource::Volume(volume_id.to_string()));
        Ok(())
    }

    /// Makes sure that nothing that happens to the helper from now on (termination, its
    /// watchdog firing, the run being killed) can take the volume with it: its
    /// DeleteOnTermination is set false explicitly and read back. Only then do the heartbeats
    /// stop and may the helper be terminated.
    async fn keep_volume(&self, volume_id: &str, instance_id: &str) -> Result<(), Error> {
        let cloud = &self.cloud;
        if self.plan.existing_volume.is_none() {
            cloud
                .set_delete_on_termination(instance_id, DEVICE, volume_id, false)
                .await?;
        }
        let read_back = wait::until(
            "Confirming the volume outlives the helper",
            Duration::from_secs(60),
            || async {
                let v = cloud.describe_volume(volume_id).await?;
                let att = v
                    .as_ref()
                    .and_then(|v| v.attachments.iter().find(|a| a.instance == instance_id));
                Ok(match att {
                    // Detached already (the watchdog fired): termination cannot take it.
                    None if v.is_some() => wait::Poll::Ready(()),
                    Some(a) if !a.delete_on_termination => wait::Poll::Ready(()),
                    Some(_) => wait::Poll::Pending("DeleteOnTermination is still true".into()),
                    None => wait::Poll::Pending("the volume is not visible".into()),
                })
            },
        );
        read_back.await?;
        self.stop_heartbeats();
        Ok(())
    }

    pub(super) fn tags(&self, extra: &[(&str, String)]) -> Tags {
        let mut tags: Tags = vec![
            (key::RUN.into(), self.run_id.clone()),
            (key::CREATED.into(), now()),
            // Lets `ec2-backup gc` on this host tell a live run from a killed one.
            (key::HOST.into(), hostname()),
            (key::PID.into(), std::process::id().to_string()),
            (key::PROCESS.into(), crate::tags::process_identity()),
        ];
        tags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        tags
    }

    pub(super) fn volume_tags(&self, completed: bool) -> Tags {
        let host = hostname();
        let dir = truncate(&self.plan.dir.to_string_lossy(), 255);
        let name = truncate(&format!("ec2-backup {host}:{dir}"), 255);
        let mut tags = self.tags(&[
            (key::SOURCE_HOST, host),
            (key::SOURCE_DIR, dir),
            (key::METHOD, self.options.method.as_str().to_string()),
            (key::COMPLETED, completed.to_string()),
        ]);
        // A user's own volume keeps its own name.
        if self.plan.existing_volume.is_none() {
            tags.push((key::NAME.into(), name));
        }
        tags
    }
}
