//! Bringing the helper up: the key pair, the ssh security group, the instance; then, while
//! it boots, the volume (created, and attached once the instance runs) and the ssh login.

use std::path::Path;

use crate::cloud::{wait, Cloud, LaunchRequest};
use crate::error::Error;
use crate::keys::{self, KeyPlan};
use crate::ledger::Resource;
use crate::ssh::Session;
use crate::userdata;

use super::{Job, DEVICE, LOGIN_USER, STATE_LIMIT};

impl Job {
    /// Makes the key pair ready as planned; returns the identity file to log in with.
    pub(super) async fn ensure_key_pair(&self) -> Result<Option<std::path::PathBuf>, Error> {
        let name = &self.plan.key_name;
        match &self.plan.key {
            KeyPlan::Existing { identity } => Ok(identity.clone()),
            KeyPlan::Create { path } => {
                self.report.step(&format!("creating the key pair {name}"));
                let (c, n, tags) = (self.cloud.clone(), name.clone(), self.tags(&[]));
                let bare = Resource::KeyPair {
                    name: name.clone(),
                    file: None,
                };
                let made = bare.clone();
                let pem = self
                    .ledger
                    .create(
                        async move { c.create_key_pair(&n, &tags).await },
                        move |_| made,
                    )
                    .await?;
                keys::save_private_key(path, &pem)?;
                self.ledger.forget(&bare);
                self.ledger.record(Resource::KeyPair {
                    name: name.clone(),
                    file: Some(path.clone()),
                });
                Ok(Some(path.clone()))
            }
            KeyPlan::Import { path, public_key } => {
                self.report.step(&format!(
                    "importing {} as the key pair {name}",
                    path.display()
                ));
                let (c, n, key, tags) = (
                    self.cloud.clone(),
                    name.clone(),
                    public_key.clone(),
                    self.tags(&[]),
                );
                let made = Resource::KeyPair {
                    name: name.clone(),
                    file: None,
                };
                self.ledger
                    .create(
                        async move { c.import_key_pair(&n, &key, &tags).await },
                        move |_| made,
                    )
                    .await?;
                Ok(Some(path.clone()))
            }
        }
    }

    /// The helper's security groups: the user's, and one of this run's own letting ssh in
    /// from the caller's address only, when the plan calls for it.
    pub(super) async fn security_groups(&self) -> Result<Vec<String>, Error> {
        let (cloud, plan, report) = (&self.cloud, &self.plan, &self.report);
        let mut groups = self.options.launch.security_group_ids.clone();
        if let Some(g) = &plan.ssh_group {
            let name = format!("ec2-backup-{}", self.run_id);
            let (c, g2, tags) = (
                cloud.clone(),
                g.clone(),
                self.tags(&[("Name", name.clone())]),
            );
            let id = self
                .ledger
                .create(
                    async move { c.create_ssh_group(&name, &g2.vpc, &g2.cidr, &tags).await },
                    |id: &String| Resource::SecurityGroup(id.clone()),
                )
                .await?;
            report.step(&format!("created {id}: ssh from {} only", g.cidr));
            groups.push(id);
        }

        Ok(groups)
    }

    /// Launches the helper with the host key it is to present and the keys it accepts.
    pub(super) async fn launch(
        &self,
        groups: Vec<String>,
        host_private: &str,
        host_public: &str,
    ) -> Result<String, Error> {
        let (cloud, plan, report) = (&self.cloud, &self.plan, &self.report);
        let mut authorized = plan.extra_authorized_keys.clone();
        if let KeyPlan::Import { public_key, .. } = &plan.key {
            authorized.push(public_key.clone());
        }
        let request = LaunchRequest {
            image_id: plan.image_id.clone(),
            root_disk: plan.root_disk.clone(),
            instance_type: plan.instance_type.clone(),
            key_name: plan.key_name.clone(),
            zone: plan.zone.clone(),
            subnet_id: self.options.launch.subnet_id.clone(),
            security_group_ids: groups,
            iam_instance_profile: self.options.launch.iam_instance_profile.clone(),
            user_data: userdata::cloud_config(host_private, host_public, &authorized),
            tags: self.tags(&[("Name", format!("ec2-backup helper {}", self.run_id))]),
        };
        report.step("launching the helper instance");
        let c = cloud.clone();
        let instance_id = self
            .ledger
            .create(
                async move { c.run_instance(&request).await },
                |id: &String| Resource::Instance(id.clone()),
            )
            .await?;
        report.step(&format!("launched {instance_id}"));
        Ok(instance_id)
    }

    /// Makes the volume ready and logs in on the helper, both while it boots; returns the
    /// attached volume's ID and size, with the ssh session kept in the job.
    pub(super) async fn bring_up(
        &self,
        instance_id: &str,
        workdir: &Path,
        identity: Option<&Path>,
        host_public: &str,
    ) -> Result<(String, i32), Error> {
        let (cloud, plan, report) = (&self.cloud, &self.plan, &self.report);
        // While the instance boots: the volume is made ready (and attached once the
        // instance runs), and ssh is tried as soon as the helper's address is known.
        let volume = async {
            if let Some(v) = &plan.existing_volume {
                return Ok((v.id.clone(), v.size_gib));
            }
            let mut tags = self.volume_tags(false);
            tags.push((crate::gc::CREATED_VOLUME_TAG.into(), "true".into()));
            let (c, zone, gib) = (cloud.clone(), plan.zone.clone(), plan.new_volume_gib);
            let id = self
                .ledger
                .create(
                    async move { c.create_volume(&zone, gib, &tags).await },
                    |id: &String| Resource::Volume(id.clone()),
                )
                .await?;
            report.step(&format!("created {id} ({} GiB)", plan.new_volume_gib));
            wait::volume_state(cloud, &id, "available", None, STATE_LIMIT).await?;
            Ok::<_, Error>((id, plan.new_volume_gib))
        };
        // One poll of the instance serves both waits; once ssh gets in, the instance is up,
        // so it looks again at once rather than after the pause the poll has grown to.
        let instance = wait::InstanceWatch::default();
        let running = {
            let waiter = instance.waiter();
            async move {
                let described = waiter.running().await;
                report.step(&format!(
                    "{instance_id} is running at {}",
                    described.address.unwrap_or_default()
                ));
                Ok::<_, Error>(())
            }
        };
        let attached = async {
            let ((volume_id, size_gib), ()) = tokio::try_join!(volume, running)?;
            let (c, v, i) = (cloud.clone(), volume_id.clone(), instance_id.to_string());
            self.ledger
                .create(
                    async move { c.attach_volume(&v, &i, DEVICE).await.map(|()| (v, i)) },
                    |(volume, instance): &(String, String)| Resource::Attachment {
                        volume: volume.clone(),
                        instance: instance.clone(),
                    },
                )
                .await?;
            wait::volume_state(
                cloud,
                &volume_id,
                "attached",
                Some(instance_id),
                STATE_LIMIT,
            )
            .await?;
            Ok::<_, Error>((volume_id, size_gib))
        };
        let address = instance.waiter();
        let connected = async {
            let host = address.address().await;
            let mut session = Session::new(
                &host,
                LOGIN_USER,
                workdir,
                identity,
                &self.options.ssh,
                host_public,
            )?;
            session.connect(self.options.boot_timeout).await?;
            instance.poke();
            Ok::<_, Error>(session)
        };
        // The waiters exist before the poll starts: it goes on while any is left.
        let polled =
            async { Ok::<_, Error>(instance.poll(cloud, instance_id, STATE_LIMIT).await?) };
        let ((), (volume_id, size_gib), session) = tokio::try_join!(polled, attached, connected)?;
        *self.ssh.lock().await = Some(session);
        Ok((volume_id, size_gib))
    }
}
