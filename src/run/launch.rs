//! Bringing the helper up: the key pair, the ssh security group, the instance; then, while
//! it boots, the volume (created, and attached once the instance runs) and the ssh login.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cloud::{wait, Cloud, LaunchRequest};
use crate::error::Error;
use crate::keys::{self, KeyPlan};
use crate::ledger::Resource;
use crate::ssh::Session;
use crate::userdata;

use super::{Job, DEVICE, LOGIN_USER, STATE_LIMIT};

/// How long a run waits for another on this host to finish making the key pair.
const KEY_LOCK_LIMIT: Duration = Duration::from_secs(120);

impl Job {
    /// Makes the key pair ready as planned; returns the identity file to log in with.
    ///
    /// A key pair this tool makes is an ed25519 key generated here and imported (never
    /// CreateKeyPair, whose private half is lost if its answer is: ImportKeyPair can be
    /// retried). Runs on this host take turns under a lock in ~/.ssh, and each looks again
    /// once it holds it: the first makes the key and the key pair, the others find them. The
    /// key pair and its file are kept even if the run then fails: another run may already use
    /// them, and they cost nothing.
    pub(super) async fn ensure_key_pair(&self) -> Result<Option<PathBuf>, Error> {
        let name = &self.plan.key_name;
        let path = match &self.plan.key {
            KeyPlan::Existing { identity } => return Ok(identity.clone()),
            KeyPlan::Create { path } | KeyPlan::Import { path, .. } => path,
        };
        let ssh_dir = path.parent().unwrap_or(Path::new("."));
        let _turn = keys::lock(ssh_dir, name, KEY_LOCK_LIMIT).await?;
        let (public_key, made) = match &self.plan.key {
            KeyPlan::Import { public_key, .. } => (public_key.clone(), false),
            _ => keys::make_key(path)?,
        };
        if self.cloud.key_pair_tags(name).await?.is_some() {
            // Another run of this host imported it while this one waited.
            return Ok(Some(path.clone()));
        }
        self.report.step(&format!(
            "importing {} as the key pair {name}",
            path.display()
        ));
        // Tells this import's own retried request (Duplicate) from another host's import.
        let token = crate::tags::new_run_id();
        let tags = self.tags(&[(crate::tags::key::KEY_TOKEN, token.clone())]);
        match self.cloud.import_key_pair(name, &public_key, &tags).await {
            Ok(()) => Ok(Some(path.clone())),
            Err(e) if e.code.as_deref() == Some("InvalidKeyPair.Duplicate") => {
                let tags = self.cloud.key_pair_tags(name).await?.unwrap_or_default();
                if tags.get(crate::tags::key::KEY_TOKEN) == Some(&token) {
                    return Ok(Some(path.clone()));
                }
                if made {
                    // Nobody uses the key this run made: the key pair in AWS is another's.
                    let _ = std::fs::remove_file(path);
                    let mut public = path.as_os_str().to_owned();
                    public.push(".pub");
                    let _ = std::fs::remove_file(public);
                }
                Err(keys::KeyError::Raced { name: name.clone() }.into())
            }
            Err(e) => Err(e.into()),
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
                self.tags(&[(crate::tags::key::NAME, name.clone())]),
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
            user_data: userdata::cloud_config(
                host_private,
                host_public,
                &authorized,
                self.options.watchdog,
            ),
            tags: self.tags(&[(
                crate::tags::key::NAME,
                format!("ec2-backup helper {}", self.run_id),
            )]),
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
            tags.push((crate::tags::key::CREATED_VOLUME.into(), "true".into()));
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
            // The run's own volume goes with the helper if the run dies and the watchdog
            // powers it off. A user's volume is never marked.
            if plan.existing_volume.is_none() {
                cloud
                    .set_delete_on_termination(instance_id, DEVICE, &volume_id, true)
                    .await?;
            }
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
            self.start_heartbeats(&session)?;
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

impl Job {
    /// Sends the helper's watchdog a heartbeat every quarter of its limit (a timed message:
    /// an idle ssh connection to a host that died would prove nothing) until
    /// [`Job::stop_heartbeats`]. A beat that fails is tried again at the next one.
    fn start_heartbeats(&self, session: &Session) -> Result<(), Error> {
        let (program, args) =
            session.command_line(&["sudo", "-n", "touch", "--", userdata::HEARTBEAT])?;
        let every =
            (self.options.watchdog / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let report = self.report.clone();
        let task = tokio::spawn(async move {
            loop {
                let mut beat = tokio::process::Command::new(&program);
                beat.args(&args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true);
                crate::ssh::detach_from_terminal_signals(&mut beat);
                let sent = tokio::time::timeout(every, beat.status()).await;
                if !matches!(sent, Ok(Ok(s)) if s.success()) {
                    report.step("a heartbeat to the helper's watchdog did not get through");
                }
                tokio::time::sleep(every).await;
            }
        });
        let old = self
            .heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task.abort_handle());
        if let Some(old) = old {
            old.abort();
        }
        Ok(())
    }

    /// No more heartbeats: the data is safe whatever the watchdog does now, or the run is
    /// being unwound.
    pub(super) fn stop_heartbeats(&self) {
        let task = self
            .heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}
