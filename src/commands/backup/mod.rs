//! `ec2-backup [-m method] [-v volume] dir`: decide, lease a helper with the volume attached
//! (made, or the user's), write the directory onto it, hand the volume back tagged as this
//! run's backup; on failure or signal, unwind everything the lease made.

pub mod plan;
mod write;

use crate::cloud::aws::{self, AwsCloud};
use crate::error::{Error, Failure};
use crate::helper::lease::{Disk, Lease};
use crate::helper::plan::input;
use crate::method::{Method, Transfer};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::tags::{key, now};

pub use plan::{Options, Plan};

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

/// What a run produced: a backup, or with `--dry-run` only the plan.
#[derive(Debug)]
pub enum Done {
    Backup(Box<Outcome>),
    DryRun(Box<Plan>),
}

/// Runs a backup as the options say.
pub async fn run(options: Options) -> Result<Done, Failure> {
    let started = std::time::Instant::now();
    let report = Reporter::new(options.helper.verbose);
    let mut signals =
        Signals::new().map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
    let local = plan::check_local(&options, &report)?;
    let cloud = aws::connect().await.map_err(input)?;
    let region = cloud.region.clone();
    let plan = tokio::select! {
        p = plan::decide(&cloud, &region, &options, local, &report) => p?,
        e = signals.recv() => return Err(e.into()),
    };
    if options.dry_run {
        return Ok(Done::DryRun(Box::new(plan)));
    }
    let job = Job {
        lease: Lease::new(cloud, options.helper.clone(), plan.helper.clone(), report)?,
        options,
        plan,
        started,
    };
    let result = tokio::select! {
        r = job.execute() => r,
        e = signals.recv() => Err(e),
    };
    match result {
        Ok(mut outcome) => {
            outcome.leftovers = job.lease.cleanup(&mut signals).await;
            Ok(Done::Backup(Box::new(outcome)))
        }
        Err(error) => {
            job.lease
                .report
                .step(&format!("failed: {error}; cleaning up"));
            let leftovers = job.lease.cleanup(&mut signals).await;
            Err(Failure { error, leftovers })
        }
    }
}

struct Job {
    lease: Lease<AwsCloud>,
    options: Options,
    plan: Plan,
    started: std::time::Instant,
}

impl Job {
    async fn execute(&self) -> Result<Outcome, Error> {
        let disk = match &self.plan.existing_volume {
            Some(v) => Disk::Existing(v.clone()),
            None => {
                let mut tags = self.volume_tags(false);
                tags.push((key::CREATED_VOLUME.into(), "true".into()));
                Disk::New {
                    gib: self.plan.new_volume_gib,
                    tags,
                }
            }
        };
        let attached = self.lease.open(disk).await?;
        let transfer = self.write(&attached).await?;
        let wire = match transfer.wire {
            Some(w) => format!(" ({} on the wire, {w})", transfer.wire_bytes),
            None => String::new(),
        };
        self.lease.report.step(&format!(
            "transferred {} bytes{wire}; detaching",
            transfer.bytes
        ));
        let mut done = self.volume_tags(!transfer.incomplete);
        done.push((key::FINISHED.into(), now()));
        if let Some(sum) = &transfer.sha256 {
            done.push((key::SHA256.into(), sum.clone()));
            done.push((key::BYTES.into(), transfer.bytes.to_string()));
        }
        self.lease.hand_back(&attached, Some(done), true).await?;
        // The rest (helper, security group) goes the way a failed run's would, in `run`,
        // where a signal can no longer hide the kept volume.
        let helper = &self.plan.helper;
        Ok(Outcome {
            volume_id: attached.volume_id,
            size_gib: attached.size_gib,
            method: self.options.method,
            instance_type: helper.instance_type.clone(),
            zone: helper.zone.clone(),
            region: helper.region.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
            transfer,
            leftovers: Vec::new(),
        })
    }
}

/// Bytes, rate and ETA on stderr, drawn only when stderr is a terminal.
pub(crate) fn progress_bar(total: u64) -> indicatif::ProgressBar {
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
