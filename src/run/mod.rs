//! One backup run, start to finish: decide, create (recording each resource in the ledger),
//! transfer, tear down; and on failure or signal, unwind the ledger. `launch` brings the
//! helper and the volume up; `finish` moves the data and hands the volume back.

mod finish;
mod launch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cloud::aws::{self, AwsCloud};
use crate::error::Error;
use crate::keys;
use crate::ledger::{Ledger, Resource};
use crate::method::{Method, Transfer};
use crate::prepare::{self, Options, Plan};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::ssh::Session;
use crate::tags::new_run_id;

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
    Backup(Box<Outcome>),
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
        .tempdir_in(private_dir_parent())
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
        heartbeats: Default::default(),
    };
    let result = tokio::select! {
        r = job.execute(workdir.path()) => r,
        e = signals.recv() => Err(e),
    };
    match result {
        Ok(mut outcome) => {
            outcome.leftovers = job.cleanup(&mut signals).await;
            Ok(Done::Backup(Box::new(outcome)))
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
    /// The task sending the helper's watchdog its heartbeats.
    heartbeats: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl Job {
    async fn execute(&self, workdir: &Path) -> Result<Outcome, Error> {
        let (host_private, host_public) = keys::make_host_key(workdir)?;
        let identity = self.ensure_key_pair().await?;
        let groups = self.security_groups().await?;
        let instance_id = self.launch(groups, &host_private, &host_public).await?;
        let (volume_id, size_gib) = self
            .bring_up(&instance_id, workdir, identity.as_deref(), &host_public)
            .await?;
        self.report
            .step("connected; looking for the volume's device");
        let transfer = self.transfer_to(&volume_id, size_gib, workdir).await?;
        self.finish(&volume_id, &instance_id, &transfer).await?;
        // The rest (helper, security group) goes the way a failed run's would, in `run`,
        // where a signal can no longer hide the kept volume.
        Ok(Outcome {
            volume_id,
            size_gib,
            method: self.options.method,
            instance_type: self.plan.instance_type.clone(),
            zone: self.plan.zone.clone(),
            region: self.plan.region.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
            transfer,
            leftovers: Vec::new(),
        })
    }

    /// Unwinds the ledger. A signal during cleanup says what is still being removed; a
    /// second one stops waiting and lists what is left.
    async fn cleanup(&self, signals: &mut Signals) -> Vec<String> {
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
}

/// Where the run's private directory goes: `$TMPDIR` when ssh can name files in it (its
/// `-o` values split at spaces, `ControlPath` expands `%`, and a unix socket's path holds at
/// most 108 bytes), `/tmp` otherwise.
fn private_dir_parent() -> std::path::PathBuf {
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
