//! `ec2-backup [-m method] [-v volume] dir`: decide, lease a helper with the volume attached
//! (made, or the user's), write the directory onto it, hand the volume back tagged as this
//! run's backup; on failure or signal, unwind everything the lease made.

pub mod direct;
mod history;
pub mod plan;
mod write;

use crate::cloud::aws::{self, AwsCloud};
use crate::error::{Error, Failure};
use crate::helper::lease::{Disk, Lease};
use crate::helper::plan::input;
use crate::history::snapshot;
use crate::ledger::Ledger;
use crate::method::{Method, Transfer};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::tags::{key, now};

pub use plan::{History, Options, Plan};

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
    /// The kept snapshot of this backup (`--snapshot`, `--snapshot-only`).
    pub snapshot_id: Option<String>,
    /// Whether the volume was deleted, its snapshot being the backup (`--snapshot-only`).
    pub volume_deleted: bool,
    /// What the teardown after a successful backup could not remove.
    pub leftovers: Vec<String>,
    /// `--direct`: the PutSnapshotBlock calls made (for the API cost).
    pub put_blocks: Option<u64>,
}

/// What a run produced: a backup, or with `--dry-run` only the plan.
#[derive(Debug)]
pub enum Done {
    Backup(Box<Outcome>),
    DryRun(Box<Plan>),
    DirectDryRun(Box<direct::DirectPlan>),
}

/// Runs a backup as the options say.
pub async fn run(options: Options) -> Result<Done, Failure> {
    if options.direct {
        return direct::run(options).await;
    }
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
    let cloud = cloud.with_kms_key(options.kms_key_id.clone());
    let job = Job {
        lease: Lease::new(cloud, options.helper.clone(), plan.helper.clone(), report)?,
        options,
        plan,
        started,
        history: Default::default(),
        kept: Default::default(),
    };
    let result = tokio::select! {
        r = job.execute() => r,
        e = signals.recv() => Err(e),
    };
    let mut outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => return Err(job.fail(error, &mut signals).await),
    };
    // The helper goes first (nothing waits for its termination); the snapshot, started
    // when the volume was handed back, completes meanwhile.
    outcome.leftovers = job.lease.cleanup(&mut signals).await;
    let finished = tokio::select! {
        r = job.finish_history(&mut outcome) => r,
        e = signals.recv() => Err(e),
    };
    match finished {
        Ok(()) => {
            outcome.seconds = job.started.elapsed().as_secs_f64();
            Ok(Done::Backup(Box::new(outcome)))
        }
        Err(error) => {
            let mut failure = job.fail(error, &mut signals).await;
            failure.leftovers.extend(outcome.leftovers);
            Err(failure)
        }
    }
}

struct Job {
    lease: Lease<AwsCloud>,
    options: Options,
    plan: Plan,
    started: std::time::Instant,
    /// The snapshot this run started and has not kept yet: apart from the lease's ledger,
    /// which the helper's teardown unwinds while the snapshot goes on.
    history: std::sync::Arc<Ledger>,
    /// The volume once it holds this run's backup, handed back (a failure after that
    /// leaves it standing, and says so).
    kept: std::sync::Mutex<Option<String>>,
}

impl Job {
    /// Unwinds what the run made after `error`; a backup already handed back stands, and the
    /// error then says where it is.
    async fn fail(&self, error: Error, signals: &mut Signals) -> Failure {
        let report = &self.lease.report;
        report.step(&format!("failed: {error}; cleaning up"));
        let mut leftovers = self.lease.cleanup(signals).await;
        leftovers.extend(self.history.unwind(&self.lease.cloud, None, report).await);
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let error = match kept.filter(|_| self.options.history != History::Volume) {
            Some(volume_id) => Error::NoSnapshot {
                volume_id,
                error: Box::new(error),
            },
            None => error,
        };
        Failure { error, leftovers }
    }

    /// After the helper's teardown: waits for this backup's snapshot and keeps it (and the
    /// earlier backup's, with -v), then with `--snapshot-only` deletes the volume.
    async fn finish_history(&self, outcome: &mut Outcome) -> Result<(), Error> {
        let Some(id) = outcome.snapshot_id.clone() else {
            return Ok(());
        };
        let lease = &self.lease;
        snapshot::wait_completed(
            &lease.cloud,
            &id,
            self.options.snapshot_limit,
            &lease.report,
        )
        .await?;
        snapshot::keep(&lease.cloud, &self.history, &id).await?;
        lease.report.step(&format!("{id} is completed and kept"));
        if self.options.history == History::SnapshotOnly {
            match self.delete_volume(&outcome.volume_id).await {
                None => outcome.volume_deleted = true,
                Some(left) => outcome.leftovers.push(left),
            }
        }
        Ok(())
    }
}

impl Job {
    async fn execute(&self) -> Result<Outcome, Error> {
        let earlier = match (&self.plan.existing_volume, self.options.history) {
            (Some(v), History::Snapshot) => self.snapshot_before_writing(v).await?,
            _ => None,
        };
        let disk = match &self.plan.existing_volume {
            Some(v) => Disk::Existing(v.clone()),
            None => {
                let mut tags = self.volume_tags(false);
                tags.push((key::CREATED_VOLUME.into(), "true".into()));
                Disk::New {
                    gib: self.plan.new_volume_gib,
                    tags,
                    snapshot: None,
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
        self.lease
            .hand_back(&attached, Some(done.clone()), true)
            .await?;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(attached.volume_id.clone());
        let snapshot_id = match self.options.history {
            History::Volume => None,
            _ => Some(self.start_snapshot(&attached.volume_id, &done).await?),
        };
        if let Some(e) = earlier {
            self.await_earlier(&e).await;
        }
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
            snapshot_id,
            volume_deleted: false,
            leftovers: Vec::new(),
            put_blocks: None,
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
