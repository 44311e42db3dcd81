//! Leasing a helper with a volume attached, for any command: the key pair, the ssh security
//! group, the instance; while it boots, the volume (made, or the user's) and the ssh login;
//! the device found; heartbeats for its watchdog; and at the end the volume handed back
//! (marked to outlive the helper, detached, tagged) and the helper terminated. Every resource
//! is recorded in the lease's [`Ledger`] the moment it exists; [`Lease::cleanup`] unwinds it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cloud::snapshot::Snapshots;
use crate::cloud::{caller, wait, LaunchRequest, Tags, Volume};
use crate::error::Error;
use crate::helper::keys::{self, KeyPlan};
use crate::helper::plan::{HelperOptions, HelperPlan};
use crate::helper::ssh::Session;
use crate::helper::{device, userdata};
use crate::ledger::{Ledger, Resource};
use crate::method::MethodError;
use crate::report::Reporter;
use crate::signals::Signals;
use crate::tags::{key, new_run_id};

/// The device name requested at attach time; the helper may show it under another name.
pub const DEVICE: &str = "/dev/sdf";
/// The login user of the Amazon Linux images the helper runs.
const LOGIN_USER: &str = "ec2-user";
/// How long any one state change may take.
pub const STATE_LIMIT: Duration = Duration::from_secs(300);
/// The security group every helper in a VPC shares (unless the user names groups).
pub const SHARED_GROUP: &str = "ec2-backup-ssh";
/// How long a run waits for another on this host to finish making the key pair.
const KEY_LOCK_LIMIT: Duration = Duration::from_secs(120);

/// The volume a lease attaches.
#[derive(Debug, Clone)]
pub enum Disk {
    /// A volume that exists (the user's `-v`, a backup to read): never deleted, never marked
    /// to go with the helper.
    Existing(Volume),
    /// A volume to create, encrypted, of this size and with these tags (beside the run's);
    /// empty, or holding a completed snapshot's data.
    New {
        gib: i32,
        tags: Tags,
        snapshot: Option<String>,
    },
}

/// The attached volume, as the helper sees it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub instance_id: String,
    pub volume_id: String,
    pub size_gib: i32,
    /// Its block device on the helper.
    pub device: String,
    /// Whether this lease created it.
    pub created: bool,
}

/// How this run logs in on its helper.
struct Login<'a> {
    /// The key pair's private key, when this machine holds it.
    identity: Option<&'a Path>,
    /// The host key the helper was given, the only one ssh accepts.
    host_public: &'a str,
    /// The shared security group, to admit this caller's address once the helper has one.
    shared_group: Option<&'a str>,
}

/// A helper leased for one command.
pub struct Lease<C: Snapshots> {
    pub cloud: C,
    pub options: HelperOptions,
    pub plan: HelperPlan,
    pub ledger: Arc<Ledger>,
    pub report: Reporter,
    pub run_id: String,
    /// The connection to the helper, once there is one; cleanup uses it to unmount.
    ssh: Mutex<Option<Session>>,
    /// The task sending the helper's watchdog its heartbeats.
    heartbeats: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// The run's private files: the helper's host key, known_hosts, ssh control sockets.
    workdir: tempfile::TempDir,
}

impl<C: Snapshots> Lease<C> {
    pub fn new(
        cloud: C,
        options: HelperOptions,
        plan: HelperPlan,
        report: Reporter,
    ) -> Result<Self, Error> {
        let workdir = tempfile::Builder::new()
            .prefix("ec2-backup.")
            .tempdir_in(private_dir_parent())
            .map_err(|e| Error::Usage(format!("cannot make a private temporary directory: {e}")))?;
        Ok(Lease {
            cloud,
            options,
            plan,
            ledger: Arc::new(Ledger::default()),
            report,
            run_id: new_run_id(),
            ssh: Mutex::new(None),
            heartbeats: Default::default(),
            workdir,
        })
    }

    /// The run's private directory (for scratch files such as rsync's log).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// Brings the helper up with `disk` attached and finds the disk's device on it.
    pub async fn open(&self, disk: Disk) -> Result<Attached, Error> {
        let (host_private, host_public) = keys::make_host_key(self.workdir())?;
        let identity = self.ensure_key_pair().await?;
        let (groups, shared) = self.security_groups().await?;
        let instance_id = self.launch(groups, &host_private, &host_public).await?;
        let created = matches!(disk, Disk::New { .. });
        let login = Login {
            identity: identity.as_deref(),
            host_public: &host_public,
            shared_group: shared.as_deref(),
        };
        let (volume_id, size_gib) = self.bring_up(&instance_id, disk, login).await?;
        self.report
            .step("connected; looking for the volume's device");
        let found = self
            .run(
                "Finding the volume's device",
                &device::find_command(&volume_id, DEVICE, size_gib, 300),
            )
            .await?;
        let device = device::parse_found(&found).ok_or_else(|| {
            MethodError::Failed(format!(
                "the helper reported no usable device for {volume_id}"
            ))
        })?;
        Ok(Attached {
            instance_id,
            volume_id,
            size_gib,
            device,
            created,
        })
    }

    /// The ssh session to the helper, held while a command uses it.
    pub async fn session(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Session>, Error> {
        tokio::sync::MutexGuard::try_map(self.ssh.lock().await, |s| s.as_mut())
            .map_err(|_| MethodError::Failed("the helper is not connected".into()).into())
    }

    /// Runs a quick remote step (see [`Session::run`]).
    pub async fn run<S: AsRef<str>>(&self, what: &str, words: &[S]) -> Result<String, Error> {
        Ok(self.session().await?.run(what, words).await?)
    }

    /// The data is on the volume (written and flushed, or unmounted; or only read): hands
    /// the volume back and starts the helper's termination. First the volume is made safe
    /// from the helper (see [`Lease::keep_volume`]); then detaching, `tags` and terminating
    /// go on at once (the explicit detach frees the volume sooner than termination would).
    /// With `keep`, the volume is the command's result and leaves the ledger; without, the
    /// ledger still deletes a volume this lease created.
    pub async fn hand_back(
        &self,
        attached: &Attached,
        tags: Option<Tags>,
        keep: bool,
    ) -> Result<(), Error> {
        let (cloud, volume_id, instance_id) =
            (&self.cloud, &attached.volume_id, &attached.instance_id);
        self.keep_volume(attached).await?;
        let session = self.ssh.lock().await.take();
        if let Some(mut s) = session {
            s.close().await;
        }
        cloud.detach_volume(volume_id, instance_id).await?;
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
                async {
                    match &tags {
                        Some(t) => Ok(cloud.create_tags(volume_id, t).await?),
                        None => Ok(()),
                    }
                },
            )
        };
        // An early start only: the ledger still holds the instance, and its unwind makes
        // the call again (EC2 accepts it for an instance already going) and waits for the
        // end. So a failure here must not fail the command, whose work is done.
        let (volume_done, terminating) =
            tokio::join!(volume_done, cloud.terminate_instance(instance_id));
        volume_done?;
        if let Err(e) = terminating {
            self.report
                .step(&format!("{e}; trying again in the cleanup"));
        }
        if keep {
            self.ledger.forget(&Resource::Volume(volume_id.to_string()));
        }
        Ok(())
    }

    /// Makes sure that nothing that happens to the helper from now on (termination, its
    /// watchdog firing, the run being killed) can take the volume with it: its
    /// DeleteOnTermination is set false explicitly (when this lease marked it) and read
    /// back. Only then do the heartbeats stop.
    async fn keep_volume(&self, attached: &Attached) -> Result<(), Error> {
        let (cloud, volume_id, instance_id) =
            (&self.cloud, &attached.volume_id, &attached.instance_id);
        if attached.created {
            cloud
                .set_delete_on_termination(instance_id, DEVICE, volume_id, false)
                .await?;
        }
        wait::until(
            "Confirming the volume outlives the helper",
            Duration::from_secs(60),
            || async {
                let v = cloud.describe_volume(volume_id).await?;
                let att = v
                    .as_ref()
                    .and_then(|v| v.attachments.iter().find(|a| &a.instance == instance_id));
                Ok(match att {
                    // Detached already (the watchdog fired): termination cannot take it.
                    None if v.is_some() => wait::Poll::Ready(()),
                    Some(a) if !a.delete_on_termination => wait::Poll::Ready(()),
                    Some(_) => wait::Poll::Pending("DeleteOnTermination is still true".into()),
                    None => wait::Poll::Pending("the volume is not visible".into()),
                })
            },
        )
        .await?;
        self.stop_heartbeats();
        Ok(())
    }

    /// Unwinds the ledger. A signal during cleanup says what is still being removed; a
    /// second one stops waiting and lists what is left.
    pub async fn cleanup(&self, signals: &mut Signals) -> Vec<String> {
        self.stop_heartbeats();
        let guard = self.ssh.lock().await;
        let ledger = &self.ledger;
        let unwind = async {
            // A create call still under way when the run stopped is awaited, so that what
            // it makes is in the ledger before the ledger is unwound.
            ledger.settle(Duration::from_secs(180)).await;
            ledger
                .unwind(&self.cloud, guard.as_ref(), &self.report)
                .await
        };
        tokio::pin!(unwind);
        let mut interrupted = false;
        loop {
            tokio::select! {
                left = &mut unwind => return left,
                e = signals.recv() => {
                    let pending: Vec<String> = self.ledger.snapshot().iter().map(Resource::describe).collect();
                    if interrupted {
                        return pending.into_iter().map(|p| format!("{p} was left behind")).collect();
                    }
                    interrupted = true;
                    crate::report::say(&format!(
                        "ec2-backup: {e} during cleanup; still removing {}; interrupt again to stop waiting and leave them.",
                        pending.join(", ")
                    ));
                }
            }
        }
    }

    /// The tags of everything this lease makes, and `extra`.
    pub fn tags(&self, extra: &[(&str, String)]) -> Tags {
        let mut tags: Tags = crate::tags::run_tags(&self.run_id);
        tags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        tags
    }

    /// Makes the key pair ready as planned; returns the identity file to log in with.
    ///
    /// A key pair this tool makes is an ed25519 key generated here and imported (never
    /// CreateKeyPair, whose private half is lost if its answer is: ImportKeyPair can be
    /// retried). Runs on this host take turns under a lock in ~/.ssh, and each looks again
    /// once it holds it: the first makes the key and the key pair, the others find them. The
    /// key pair and its file are kept even if the run then fails: another run may already use
    /// them, and they cost nothing.
    async fn ensure_key_pair(&self) -> Result<Option<PathBuf>, Error> {
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
        let token = new_run_id();
        let tags = self.tags(&[(key::KEY_TOKEN, token.clone())]);
        match self.cloud.import_key_pair(name, &public_key, &tags).await {
            Ok(()) => Ok(Some(path.clone())),
            Err(e) if e.code.as_deref() == Some("InvalidKeyPair.Duplicate") => {
                let tags = self.cloud.key_pair_tags(name).await?.unwrap_or_default();
                if tags.get(key::KEY_TOKEN) == Some(&token) {
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

    /// The helper's security groups: the user's, or the helpers' shared group
    /// ([`SHARED_GROUP`]), whose ID is returned too: it admits this caller once the helper's
    /// address shows where our ssh will come from ([`Lease::admit`]).
    ///
    /// The shared group is found or made (by name: a group made at the same moment by another
    /// run answers Duplicate and is found) and kept for later runs: a run never waits for its
    /// helper's termination only to be allowed to delete a group (on EC2 that takes tens of
    /// seconds, and the group stays "in use" a while after). A group no instance uses admits
    /// nothing; `gc` removes it when idle.
    async fn security_groups(&self) -> Result<(Vec<String>, Option<String>), Error> {
        let mut groups = self.options.launch.security_group_ids.clone();
        let Some(g) = &self.plan.ssh_group else {
            return Ok((groups, None));
        };
        let cloud = &self.cloud;
        let id = match cloud.find_group(&g.vpc, SHARED_GROUP).await? {
            Some(id) => id,
            None => {
                let tags = vec![
                    (key::NAME.to_string(), SHARED_GROUP.to_string()),
                    (key::SHARED_GROUP.to_string(), "ssh".to_string()),
                    (key::CREATED.to_string(), crate::tags::now()),
                ];
                match cloud.create_group(SHARED_GROUP, &g.vpc, &tags).await {
                    Ok(id) => {
                        self.report.step(&format!("created {id} ({SHARED_GROUP})"));
                        id
                    }
                    Err(e) if e.code.as_deref() == Some("InvalidGroup.Duplicate") => {
                        cloud.find_group(&g.vpc, SHARED_GROUP).await?.ok_or(e)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        groups.push(id.clone());
        Ok((groups, Some(id)))
    }

    /// Lets ssh from this machine into the shared group, as the helper at `host` will see it
    /// (the user's `EC2_BACKUP_SSH_CIDR`, else [`caller::source_cidr`]). Idempotent: runs
    /// from one address share the rule, which stays for the next run (the group is removed by
    /// `gc` once idle, and with it every rule).
    async fn admit(&self, group: &str, host: &str) -> Result<(), Error> {
        let cidr = match self.plan.ssh_group.as_ref().and_then(|g| g.cidr.clone()) {
            Some(cidr) => cidr,
            None => caller::source_cidr(host).await?,
        };
        self.cloud.allow_ssh(group, &cidr).await?;
        self.report.step(&format!(
            "{group} ({SHARED_GROUP}) admits ssh from {cidr} only"
        ));
        Ok(())
    }

    /// Launches the helper with the host key it is to present and the keys it accepts.
    async fn launch(
        &self,
        groups: Vec<String>,
        host_private: &str,
        host_public: &str,
    ) -> Result<String, Error> {
        let plan = &self.plan;
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
            tags: self.tags(&[(key::NAME, format!("ec2-backup helper {}", self.run_id))]),
        };
        self.report.step("launching the helper instance");
        let c = self.cloud.clone();
        let instance_id = self
            .ledger
            .create(
                async move { c.run_instance(&request).await },
                |id: &String| Resource::Instance(id.clone()),
            )
            .await?;
        self.report.step(&format!("launched {instance_id}"));
        Ok(instance_id)
    }

    /// Makes the volume ready and logs in on the helper, both while it boots; returns the
    /// attached volume's ID and size, with the ssh session kept in the lease.
    async fn bring_up(
        &self,
        instance_id: &str,
        disk: Disk,
        login: Login<'_>,
    ) -> Result<(String, i32), Error> {
        let (cloud, plan, report) = (&self.cloud, &self.plan, &self.report);
        let created = matches!(disk, Disk::New { .. });
        // While the instance boots: the volume is made ready (and attached once the
        // instance runs), and ssh is tried as soon as the helper's address is known.
        let volume = async {
            let (gib, extra, snapshot) = match disk {
                Disk::Existing(v) => return Ok((v.id, v.size_gib)),
                Disk::New {
                    gib,
                    tags,
                    snapshot,
                } => (gib, tags, snapshot),
            };
            let mut tags = self.tags(&[]);
            tags.extend(extra);
            let (c, zone, from) = (cloud.clone(), plan.zone.clone(), snapshot.clone());
            let id = self
                .ledger
                .create(
                    async move {
                        match from {
                            Some(s) => c.create_volume_from(&zone, &s, gib, &tags).await,
                            None => c.create_volume(&zone, gib, &tags).await,
                        }
                    },
                    |id: &String| Resource::Volume(id.clone()),
                )
                .await?;
            match snapshot {
                Some(s) => report.step(&format!("created {id} ({gib} GiB) from {s}")),
                None => report.step(&format!("created {id} ({gib} GiB)")),
            }
            wait::volume_state(cloud, &id, "available", None, STATE_LIMIT).await?;
            Ok::<_, Error>((id, gib))
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
            // The lease's own volume goes with the helper if the run dies and the watchdog
            // powers it off. A volume that exists already is never marked.
            if created {
                cloud
                    .set_delete_on_termination(instance_id, DEVICE, &volume_id, true)
                    .await?;
            }
            Ok::<_, Error>((volume_id, size_gib))
        };
        let address = instance.waiter();
        let connected = async {
            let host = address.address().await;
            if let Some(group) = login.shared_group {
                self.admit(group, &host).await?;
            }
            let mut session = Session::new(
                &host,
                LOGIN_USER,
                self.workdir(),
                login.identity,
                &self.options.ssh,
                login.host_public,
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

    /// Sends the helper's watchdog a heartbeat every quarter of its limit (a timed message:
    /// an idle ssh connection to a host that died would prove nothing) until the volume is
    /// safe or the lease is unwound. A beat that fails is tried again at the next one.
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
                crate::helper::ssh::detach_from_terminal_signals(&mut beat);
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

    fn stop_heartbeats(&self) {
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

/// Where the run's private directory goes: `$TMPDIR` when ssh can name files in it (its
/// `-o` values split at spaces, `ControlPath` expands `%`, and a unix socket's path holds at
/// most 108 bytes), `/tmp` otherwise.
fn private_dir_parent() -> PathBuf {
    let tmp = std::env::temp_dir();
    let text = tmp.to_string_lossy();
    let plain = text.len() <= 60
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if plain {
        tmp
    } else {
        "/tmp".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::{FakeCloud, Faulty};
    use crate::cloud::Arch;
    use crate::cloud::Cloud;
    use crate::flags::{LaunchFlags, SshFlags};
    use crate::helper::plan::SshGroup;

    fn lease<C: Snapshots>(cloud: C, home: &Path) -> Lease<C> {
        let options = HelperOptions {
            launch: LaunchFlags::default(),
            // Nothing listens on loopback's discard port: ssh attempts fail at once.
            ssh: SshFlags {
                words: vec!["-p".into(), "9".into()],
            },
            home: home.to_path_buf(),
            verbose: false,
            boot_timeout: Duration::from_secs(5),
            watchdog: Duration::from_secs(300),
        };
        let plan = HelperPlan {
            zone: "fake-1a".into(),
            instance_type: "t3.micro".into(),
            arch: Arch::X86_64,
            image_id: "ami-00000001".into(),
            root_disk: None,
            region: "fake-1".into(),
            key_name: "k".into(),
            key: KeyPlan::Existing { identity: None },
            ssh_group: Some(SshGroup {
                vpc: "vpc-1".into(),
                cidr: Some("127.0.0.1/32".into()),
            }),
            extra_authorized_keys: vec![],
        };
        Lease::new(cloud, options, plan, Reporter::new(false)).unwrap()
    }

    fn new_disk() -> Disk {
        Disk::New {
            gib: 1,
            tags: vec![(key::CREATED_VOLUME.into(), "true".into())],
            snapshot: None,
        }
    }

    /// A launch that fails at the attach leaves nothing: the volume it made, the helper and
    /// its group are gone after the unwind.
    #[tokio::test]
    async fn a_failed_attach_unwinds_everything_the_lease_made() {
        let home = tempfile::tempdir().unwrap();
        let fake = FakeCloud::default();
        let faulty = Faulty::new(fake.clone());
        faulty.fail("AttachVolume", "UnauthorizedOperation", 1, 1);
        let lease = lease(faulty, home.path());
        let e = lease.open(new_disk()).await.expect_err("the attach fails");
        assert!(e.to_string().contains("UnauthorizedOperation"), "{e}");
        let mut signals = Signals::new().unwrap();
        let left = lease.cleanup(&mut signals).await;
        assert!(left.is_empty(), "{left:?}");
        assert!(fake.volumes().is_empty(), "{:?}", fake.volumes());
        assert_eq!(fake.instance_states(), ["terminated"]);
        // Only the helpers' shared group stays, for the next run.
        assert_eq!(fake.groups().len(), 1);
        let calls = fake.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("DeleteSecurityGroup")),
            "{calls:?}"
        );
    }

    /// Every lease in a VPC shares one group: made by the first, found by the next.
    #[tokio::test]
    async fn leases_share_one_security_group() {
        let home = tempfile::tempdir().unwrap();
        let fake = FakeCloud::default();
        let first = lease(fake.clone(), home.path())
            .security_groups()
            .await
            .unwrap();
        let second = lease(fake.clone(), home.path())
            .security_groups()
            .await
            .unwrap();
        assert_eq!(first, second);
        let creates = |f: &FakeCloud| {
            f.calls()
                .iter()
                .filter(|c| c.starts_with("CreateSecurityGroup"))
                .count()
        };
        assert_eq!(creates(&fake), 1);
    }

    /// A user's volume is never deleted, whatever fails.
    #[tokio::test]
    async fn a_failed_launch_never_touches_an_existing_volume() {
        let home = tempfile::tempdir().unwrap();
        let fake = FakeCloud::default();
        let own = fake.add_volume(1);
        let faulty = Faulty::new(fake.clone());
        faulty.fail("AttachVolume", "UnauthorizedOperation", 1, 1);
        let lease = lease(faulty, home.path());
        assert!(lease.open(Disk::Existing(own.clone())).await.is_err());
        let left = lease.cleanup(&mut Signals::new().unwrap()).await;
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(fake.volumes(), std::slice::from_ref(&own.id));
        let calls = fake.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("ModifyInstanceAttribute")),
            "a user's volume is never marked: {calls:?}"
        );
    }

    /// A volume the lease made is marked to go with its helper while attached; handing it
    /// back unmarks it (read back) before the helper is terminated, so it survives.
    #[tokio::test]
    async fn a_handed_back_volume_is_unmarked_before_the_helper_goes() {
        let home = tempfile::tempdir().unwrap();
        let fake = FakeCloud::default();
        let lease = lease(fake.clone(), home.path());
        let i = fake.run_instance(&LaunchRequest::default()).await.unwrap();
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        fake.attach_volume(&v, &i, DEVICE).await.unwrap();
        fake.set_delete_on_termination(&i, DEVICE, &v, true)
            .await
            .unwrap();
        lease.ledger.record(Resource::Instance(i.clone()));
        lease.ledger.record(Resource::Volume(v.clone()));
        let attached = Attached {
            instance_id: i,
            volume_id: v.clone(),
            size_gib: 1,
            device: "/dev/nvme1n1".into(),
            created: true,
        };
        let done = vec![(key::COMPLETED.to_string(), "true".to_string())];
        lease.hand_back(&attached, Some(done), true).await.unwrap();
        let left = lease.cleanup(&mut Signals::new().unwrap()).await;
        assert!(left.is_empty(), "{left:?}");
        let kept = fake.volume(&v).expect("the backup is kept");
        assert_eq!(
            kept.tags.get(key::COMPLETED).map(String::as_str),
            Some("true")
        );
        let calls = fake.calls();
        let unmark = calls
            .iter()
            .position(|c| c.ends_with(&format!("{v} false")))
            .expect("unmarked");
        let terminate = calls
            .iter()
            .position(|c| c.starts_with("TerminateInstances"))
            .unwrap();
        assert!(unmark < terminate, "{calls:?}");
    }

    /// If the unmark fails, the volume is not declared safe: hand_back fails before any
    /// termination is asked for.
    #[tokio::test]
    async fn a_volume_that_cannot_be_unmarked_is_not_declared_safe() {
        let home = tempfile::tempdir().unwrap();
        let fake = FakeCloud::default();
        let faulty = Faulty::new(fake.clone());
        faulty.fail("ModifyInstanceAttribute", "UnauthorizedOperation", 1, 1);
        let lease = lease(faulty, home.path());
        let i = fake.run_instance(&LaunchRequest::default()).await.unwrap();
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        fake.attach_volume(&v, &i, DEVICE).await.unwrap();
        let attached = Attached {
            instance_id: i,
            volume_id: v,
            size_gib: 1,
            device: "/dev/nvme1n1".into(),
            created: true,
        };
        assert!(lease.hand_back(&attached, None, true).await.is_err());
        assert!(!fake
            .calls()
            .iter()
            .any(|c| c.starts_with("TerminateInstances")));
    }
}
