//! `ec2-backup --direct DIR`: the dd archive uploaded straight into an EBS snapshot through
//! the EBS direct APIs: no instance, no ssh, no key pair, no security group. Then a volume
//! is made from the completed snapshot in the zone a helper would have used, and the
//! snapshot is deleted, unless `--snapshot` keeps both or `--snapshot-only` only it.
//!
//! Everything made is on the run's ledger the moment it exists: a failure or a signal
//! deletes the pending snapshot (EC2 removes it once it is sealed or cancelled by its
//! Timeout; `gc` finds one that is left) and the volume made from it.

use std::sync::Arc;
use std::time::Instant;

use crate::cloud::aws::{self, AwsCloud};
use crate::cloud::ebs;
use crate::cloud::snapshot::Snapshots;
use crate::cloud::{wait, Cloud, Tags};
use crate::error::{Error, Failure};
use crate::helper::lease::STATE_LIMIT;
use crate::helper::plan::{input, DEFAULT_INSTANCE_TYPE};
use crate::history::snapshot;
use crate::ledger::{Ledger, Resource};
use crate::method::{self, dd, direct, Method};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::tags::{hostname, key, new_run_id, now, run_tags, truncate};
use crate::walk;

use super::write::dir_hash;
use super::{plan, Done, History, Options, Outcome};

/// StartSnapshot's Timeout: EBS cancels a snapshot that sees no block and no completion for
/// this long (a killed run's snapshot goes by itself).
const SNAPSHOT_TIMEOUT_MINUTES: i32 = 60;

/// What a `--direct` run would do (`--dry-run`).
#[derive(Debug, Clone)]
pub struct DirectPlan {
    pub dir: std::path::PathBuf,
    pub inventory: walk::Inventory,
    pub archive_bytes: u64,
    pub snapshot_gib: i32,
    pub zone: String,
    pub region: String,
}

impl DirectPlan {
    pub fn blocks(&self) -> u64 {
        self.archive_bytes.div_ceil(ebs::BLOCK as u64)
    }
}

pub(super) async fn run(options: Options) -> Result<Done, Failure> {
    let started = Instant::now();
    let report = Reporter::new(options.helper.verbose);
    let mut signals =
        Signals::new().map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
    let dir = walk::check_dir(&options.dir).map_err(Error::from)?;
    let cloud = aws::connect()
        .await
        .map_err(input)?
        .with_kms_key(options.kms_key_id.clone());
    let decided = tokio::select! {
        p = decide(&cloud, &options, dir, &report) => p?,
        e = signals.recv() => return Err(e.into()),
    };
    if options.dry_run {
        return Ok(Done::DirectDryRun(Box::new(decided)));
    }
    let job = DirectJob {
        cloud,
        ebs: ebs::connect().await,
        options,
        plan: decided,
        report,
        run_id: new_run_id(),
        ledger: Arc::new(Ledger::default()),
    };
    let result = tokio::select! {
        r = job.execute(started) => r,
        e = signals.recv() => Err(e),
    };
    match result {
        Ok(outcome) => Ok(Done::Backup(Box::new(outcome))),
        Err(error) => {
            job.report.step(&format!("failed: {error}; cleaning up"));
            let leftovers = job.ledger.unwind(&job.cloud, None, &job.report).await;
            Err(Failure { error, leftovers })
        }
    }
}

/// The walk, the archive's exact length, and the zone, before anything is made.
async fn decide(
    cloud: &AwsCloud,
    options: &Options,
    dir: std::path::PathBuf,
    report: &Reporter,
) -> Result<DirectPlan, Error> {
    let instance_type = options
        .helper
        .launch
        .instance_type
        .clone()
        .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.to_string());
    let source = method::Source::new(&dir, &options.selection);
    let (inventory, zones) = tokio::join!(
        plan::take_inventory(&source.rules, report),
        cloud.zones_for(&instance_type)
    );
    let inventory = inventory?;
    let zones = zones.map_err(input)?;
    // The zone a helper would have used: the first that offers its type.
    let zone = zones.first().cloned().ok_or_else(|| {
        Error::Invalid(format!(
            "no zone in {} offers {instance_type}",
            cloud.region
        ))
    })?;
    let archive_bytes = dd::archive_size(&source).await?;
    report.step(&format!("the archive will be {archive_bytes} bytes"));
    // As for a new volume (twice the footprint), and never less than the archive needs.
    let mut snapshot_gib = walk::volume_gib(inventory.footprint);
    while !dd::archive_fits(archive_bytes, snapshot_gib) {
        snapshot_gib += 1;
    }
    Ok(DirectPlan {
        dir,
        inventory,
        archive_bytes,
        snapshot_gib,
        zone,
        region: cloud.region.clone(),
    })
}

struct DirectJob {
    cloud: AwsCloud,
    ebs: ebs::Ebs,
    options: Options,
    plan: DirectPlan,
    report: Reporter,
    run_id: String,
    ledger: Arc<Ledger>,
}

impl DirectJob {
    fn backup_tags(&self, completed: bool) -> Tags {
        let host = hostname();
        let dir = truncate(&self.plan.dir.to_string_lossy(), 255);
        let mut tags = run_tags(&self.run_id);
        tags.extend(
            crate::tags::selection(&self.options.selection)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        tags.extend([
            (key::SOURCE_HOST.to_string(), host.clone()),
            (key::SOURCE_DIR.to_string(), dir.clone()),
            (key::SOURCE_DIR_HASH.to_string(), dir_hash(&self.plan.dir)),
            (key::METHOD.to_string(), Method::Dd.as_str().to_string()),
            (key::DIRECT.to_string(), "true".to_string()),
            (key::COMPLETED.to_string(), completed.to_string()),
            (
                key::NAME.to_string(),
                truncate(&format!("ec2-backup {host}:{dir}"), 255),
            ),
        ]);
        tags
    }

    async fn execute(&self, started: Instant) -> Result<Outcome, Error> {
        let (cloud, report, plan) = (&self.cloud, &self.report, &self.plan);
        let kms_arn = self.options.kms_key_id.as_deref();
        let (e, t, d, tok) = (
            self.ebs.clone(),
            self.backup_tags(false),
            format!("ec2-backup run {} (direct)", self.run_id),
            format!("ec2-backup-{}", self.run_id),
        );
        let size = i64::from(plan.snapshot_gib);
        let kms = kms_arn.map(str::to_string);
        let since = Instant::now();
        let snapshot_id = self
            .ledger
            .create(
                async move {
                    e.start(size, &t, &d, &tok, kms.as_deref(), SNAPSHOT_TIMEOUT_MINUTES)
                        .await
                        .map_err(|e| crate::cloud::CloudError::new(e.action, e.message))
                },
                |id: &String| Resource::Snapshot(id.clone()),
            )
            .await?;
        report.step(&format!(
            "started {snapshot_id} ({} GiB); uploading {} blocks",
            plan.snapshot_gib,
            plan.blocks()
        ));
        let source = method::Source::new(&plan.dir, &self.options.selection);
        let bar = super::progress_bar(plan.archive_bytes);
        let capacity = u64::try_from(plan.snapshot_gib).unwrap_or(0) * 2048;
        let up = direct::upload(&self.ebs, &snapshot_id, since, &source, capacity, &bar).await?;
        let retries = self.ebs.retries.load(std::sync::atomic::Ordering::Relaxed);
        report.step(&format!(
            "uploaded {} blocks ({} bytes, {retries} retried); completing",
            up.blocks, up.transfer.bytes
        ));
        let blocks = i32::try_from(up.blocks).unwrap_or(i32::MAX);
        self.ebs
            .complete(&snapshot_id, blocks, &up.linear, since)
            .await
            .map_err(|e| crate::cloud::CloudError::new(e.action, e.message))?;
        snapshot::wait_completed(cloud, &snapshot_id, self.options.snapshot_limit, report).await?;
        let mut done = self.backup_tags(!up.transfer.incomplete);
        done.push((key::FINISHED.into(), now()));
        if let Some(sum) = &up.transfer.sha256 {
            done.push((key::SHA256.into(), sum.clone()));
            done.push((key::BYTES.into(), up.transfer.bytes.to_string()));
        }
        cloud.create_tags(&snapshot_id, &done).await?;
        let history = self.options.history;
        let volume_id = match history {
            History::SnapshotOnly => None,
            _ => Some(self.make_volume(&snapshot_id, &done).await?),
        };
        let snapshot_kept = history != History::Volume;
        if snapshot_kept {
            snapshot::keep(cloud, &self.ledger, &snapshot_id).await?;
        } else {
            // The volume holds the backup; a snapshot that cannot be deleted is named, not
            // fatal (it is a second copy).
            cloud.delete_snapshot(&snapshot_id).await?;
            self.ledger.forget(&Resource::Snapshot(snapshot_id.clone()));
        }
        if let Some(v) = &volume_id {
            self.ledger.forget(&Resource::Volume(v.clone()));
        }
        Ok(Outcome {
            volume_id: volume_id.clone().unwrap_or_default(),
            size_gib: plan.snapshot_gib,
            method: Method::Dd,
            instance_type: String::new(),
            zone: plan.zone.clone(),
            region: plan.region.clone(),
            seconds: started.elapsed().as_secs_f64(),
            transfer: up.transfer,
            snapshot_id: snapshot_kept.then_some(snapshot_id),
            volume_deleted: volume_id.is_none(),
            leftovers: Vec::new(),
            put_blocks: Some(up.blocks),
        })
    }

    /// A volume from the completed snapshot, tagged as the backup, once it is available.
    async fn make_volume(&self, snapshot_id: &str, done: &Tags) -> Result<String, Error> {
        let cloud = &self.cloud;
        let mut tags = done.clone();
        tags.push((key::CREATED_VOLUME.into(), "true".into()));
        let (c, zone, snap, gib) = (
            cloud.clone(),
            self.plan.zone.clone(),
            snapshot_id.to_string(),
            self.plan.snapshot_gib,
        );
        let id = self
            .ledger
            .create(
                async move { c.create_volume_from(&zone, &snap, gib, &tags).await },
                |id: &String| Resource::Volume(id.clone()),
            )
            .await?;
        self.report.step(&format!(
            "created {id} from {snapshot_id}; waiting until it is available"
        ));
        wait::volume_state(cloud, &id, "available", None, STATE_LIMIT).await?;
        Ok(id)
    }
}
