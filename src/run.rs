//! One backup run, start to finish: decide, create (recording each resource in the ledger),
//! transfer, tear down; and on failure or signal, unwind the ledger.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cloud::aws::{self, AwsCloud};
use crate::cloud::{wait, Cloud, LaunchRequest, Tags};
use crate::device;
use crate::error::Error;
use crate::keys::{self, KeyPlan};
use crate::ledger::{Ledger, Resource};
use crate::method::{dd, rsync, Method, Source, Transfer};
use crate::prepare::{self, Options, Plan};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::ssh::Session;
use crate::tags::{hostname, new_run_id, now, truncate};
use crate::userdata;

/// The device name requested at attach time; the helper may show it under another name.
const DEVICE: &str = "/dev/sdf";
/// The login user of the Amazon Linux images the helper runs.
const LOGIN_USER: &str = "ec2-user";
const STATE_LIMIT: Duration = Duration::from_secs(300);

/// A finished backup.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub volume_id: String,
    pub size_gib: i32,
    pub method: Method,
    pub instance_type: String,
    pub zone: String,
    pub region: String,
    pub seconds: f64,
    pub transfer: Transfer,
    /// What the teardown after a successful backup could not remove.
    pub leftovers: Vec<String>,
}

/// A failed run: the error, and what cleanup could not remove.
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub leftovers: Vec<String>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            leftovers: Vec::new(),
        }
    }
}

/// What a run produced: a backup, or with `--dry-run` only the plan.
#[derive(Debug)]
pub enum Done {
    Backup(Outcome),
    DryRun(Box<Plan>),
}

/// Runs a backup as the options say.
pub async fn run(options: Options) -> Result<Done, Failure> {
    let started = std::time::Instant::now();
    let report = Reporter::new(options.verbose);
    let mut signals =
        Signals::new().map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
    let local = prepare::check_local(&options, &report)?;
    let cloud = aws::connect().await.map_err(prepare::input)?;
    let region = cloud.region.clone();
    let plan = tokio::select! {
        p = prepare::decide(&cloud, &region, &options, local, &report) => p?,
        e = signals.recv() => return Err(e.into()),
    };
    if options.dry_run {
        return Ok(Done::DryRun(Box::new(plan)));
    }
    let workdir = tempfile::Builder::new()
        .prefix("ec2-backup.")
        .tempdir()
        .map_err(|e| Error::Usage(format!("cannot make a private temporary directory: {e}")))?;
    let job = Job {
        cloud,
        options,
        plan,
        ledger: Arc::new(Ledger::default()),
        ssh: Mutex::new(None),
        report,
        run_id: new_run_id(),
        started,
    };
    let result = tokio::select! {
        r = job.execute(workdir.path()) => r,
        e = signals.recv() => Err(e),
    };
    match result {
        Ok(mut outcome) => {
            outcome.leftovers = job.cleanup(&mut signals).await;
            Ok(Done::Backup(outcome))
        }
        Err(error) => {
            job.report.step(&format!("failed: {error}; cleaning up"));
            let leftovers = job.cleanup(&mut signals).await;
            Err(Failure { error, leftovers })
        }
    }
}

struct Job {
    cloud: AwsCloud,
    options: Options,
    plan: Plan,
    ledger: Arc<Ledger>,
    /// The connection to the helper, once there is one; cleanup uses it to unmount.
    ssh: Mutex<Option<Session>>,
    report: Reporter,
    run_id: String,
    started: std::time::Instant,
}

impl Job {
    async fn execute(&self, workdir: &Path) -> Result<Outcome, Error> {
        let (cloud, plan, report) = (&self.cloud, &self.plan, &self.report);
        let (host_private, host_public) = keys::make_host_key(workdir)?;
        let identity = self.ensure_key_pair().await?;

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
            user_data: userdata::cloud_config(&host_private, &host_public, &authorized),
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
        // Once ssh gets in, the instance is up: look at its state again at once rather than
        // after the long pause its poll has grown to.
        let ssh_up = tokio::sync::Notify::new();
        let running = async {
            let instance = tokio::select! {
                i = wait::instance_running(cloud, &instance_id, STATE_LIMIT) => i?,
                i = async {
                    ssh_up.notified().await;
                    wait::instance_running(cloud, &instance_id, STATE_LIMIT).await
                } => i?,
            };
            report.step(&format!(
                "{instance_id} is running at {}",
                instance.address.unwrap_or_default()
            ));
            Ok::<_, Error>(())
        };
        let attached = async {
            let ((volume_id, size_gib), ()) = tokio::try_join!(volume, running)?;
            let (c, v, i) = (cloud.clone(), volume_id.clone(), instance_id.clone());
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
                Some(&instance_id),
                STATE_LIMIT,
            )
            .await?;
            Ok::<_, Error>((volume_id, size_gib))
        };
        let connected = async {
            let host = wait::instance_address(cloud, &instance_id, STATE_LIMIT).await?;
            let mut session = Session::new(
                &host,
                LOGIN_USER,
                workdir,
                identity.as_deref(),
                &self.options.ssh,
                &host_public,
            )?;
            session.connect(self.options.boot_timeout).await?;
            ssh_up.notify_one();
            Ok::<_, Error>(session)
        };
        let ((volume_id, size_gib), session) = tokio::try_join!(attached, connected)?;
        *self.ssh.lock().await = Some(session);
        report.step("connected; looking for the volume's device");
        if plan.existing_volume.is_some() {
            // What the volume held is about to change: its old tags must stop vouching for
            // it until this run vouches for the new contents.
            let stale: Tags = [
                "ec2-backup:completed",
                "ec2-backup:sha256",
                "ec2-backup:bytes",
            ]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    if k.ends_with("completed") {
                        "false"
                    } else {
                        ""
                    }
                    .to_string(),
                )
            })
            .collect();
            cloud.create_tags(&volume_id, &stale).await?;
        }

        let transfer = {
            let guard = self.ssh.lock().await;
            let ssh = guard.as_ref().expect("connected above");
            let found = ssh
                .run(
                    "Finding the volume's device",
                    &device::find_command(&volume_id, DEVICE, size_gib, 300),
                )
                .await?;
            let dev = device::parse_found(&found).ok_or_else(|| {
                Error::Invalid(format!(
                    "the helper reported no usable device for {volume_id}"
                ))
            })?;
            report.step(&format!("{volume_id} is {dev} on the helper; transferring"));
            self.transfer(ssh, &dev, &volume_id, workdir).await?
        };
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
        // The data is on the volume (written and flushed, or unmounted). Detaching, tagging
        // and terminating the helper now go on at once: termination never takes a volume
        // that was attached after launch with it, and the explicit detach frees the volume
        // sooner than termination would.
        cloud.detach_volume(&volume_id, &instance_id).await?;
        let mut done = self.volume_tags(!transfer.incomplete);
        done.push((crate::gc::FINISHED_TAG.into(), now()));
        if let Some(sum) = &transfer.sha256 {
            done.push(("ec2-backup:sha256".into(), sum.clone()));
            done.push(("ec2-backup:bytes".into(), transfer.bytes.to_string()));
        }
        let volume_done = async {
            tokio::try_join!(
                async {
                    wait::volume_state(cloud, &volume_id, "available", None, STATE_LIMIT).await?;
                    self.ledger.forget(&Resource::Attachment {
                        volume: volume_id.clone(),
                        instance: instance_id.clone(),
                    });
                    Ok::<_, Error>(())
                },
                async { Ok(cloud.create_tags(&volume_id, &done).await?) },
            )
        };
        // An early start only: the ledger still holds the instance, and its unwind makes
        // the call again (EC2 accepts it for an instance already going) and waits for the
        // end. So a failure here must not fail the backup, which is whole.
        let (volume_done, terminating) =
            tokio::join!(volume_done, cloud.terminate_instance(&instance_id));
        volume_done?;
        if let Err(e) = terminating {
            report.step(&format!("{e}; trying again in the cleanup"));
        }
        // From here on the backup is safe: the volume and the key pair are kept.
        self.ledger.forget(&Resource::Volume(volume_id.clone()));
        for r in self.ledger.snapshot() {
            if matches!(r, Resource::KeyPair { .. }) {
                self.ledger.forget(&r);
            }
        }
        // The rest (helper, security group) goes the way a failed run's would, in `run`,
        // where a signal can no longer hide the kept volume.
        Ok(Outcome {
            volume_id,
            size_gib,
            method: self.options.method,
            instance_type: plan.instance_type.clone(),
            zone: plan.zone.clone(),
            region: plan.region.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
            transfer,
            leftovers: Vec::new(),
        })
    }

    async fn transfer(
        &self,
        ssh: &Session,
        dev: &str,
        volume_id: &str,
        workdir: &Path,
    ) -> Result<Transfer, Error> {
        let source = Source {
            dir: self.plan.dir.clone(),
            skip_contents_of: self.plan.inventory.pseudo_mounts.clone(),
        };
        match self.options.method {
            Method::Dd => {
                // The archive is about the data plus a header or two per entry.
                let estimate = self.plan.inventory.data_bytes + self.plan.inventory.entries * 1536;
                let bar = progress_bar(estimate);
                Ok(dd::backup(ssh, &source, dev, volume_id, &bar).await?)
            }
            Method::Rsync => {
                self.ledger.record(Resource::Mount);
                if rsync::mount(ssh, dev, volume_id).await? {
                    self.report.step("made an ext4 filesystem on the volume");
                }
                let transfer = rsync::backup(ssh, &source, workdir).await?;
                rsync::unmount(ssh).await?;
                self.ledger.forget(&Resource::Mount);
                Ok(transfer)
            }
        }
    }

    /// Makes the key pair ready as planned; returns the identity file to log in with.
    async fn ensure_key_pair(&self) -> Result<Option<std::path::PathBuf>, Error> {
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

    fn tags(&self, extra: &[(&str, String)]) -> Tags {
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

    fn volume_tags(&self, completed: bool) -> Tags {
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

    /// Unwinds the ledger. A signal during cleanup says what is still being removed; a
    /// second one stops waiting and lists what is left.
    async fn cleanup(&self, signals: &mut Signals) -> Vec<String> {
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
}

/// Bytes, rate and ETA on stderr, drawn only when stderr is a terminal.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bytes:>10} of ~{total_bytes} at {bytes_per_sec}, {eta} left {wide_bar}",
    ) {
        bar.set_style(style);
    }
    bar
}
