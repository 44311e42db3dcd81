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

/// What the walk and EC2 say before anything is made. A run sizes its snapshot from the
/// walk and starts the upload at once: tar's exact sizing pass (a walk of its own) is made
/// only for `--dry-run`, for a tree of sparse or compressed files, or when the archive turns
/// out larger than that snapshot.
#[derive(Debug, Clone)]
struct Survey {
    dir: std::path::PathBuf,
    inventory: walk::Inventory,
    zone: String,
    region: String,
}

/// The snapshot's size: as for a new volume (twice the footprint), and, once the archive's
/// length is known, never less than it needs.
fn snapshot_gib(footprint: u64, archive_bytes: Option<u64>) -> i32 {
    let mut gib = walk::volume_gib(footprint);
    if let Some(a) = archive_bytes {
        while !dd::archive_fits(a, gib) {
            gib += 1;
        }
    }
    gib
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
    let source = method::Source::new(&dir, &options.selection);
    if options.dry_run {
        // A survey that fails (no zone, no credentials) does not wait for tar's pass.
        let sized = async { dd::archive_size(&source).await.map_err(Error::from) };
        let (survey, archive_bytes) = tokio::select! {
            p = async { tokio::try_join!(survey(&cloud, &options, dir, &report), sized) } => p?,
            e = signals.recv() => return Err(e.into()),
        };
        return Ok(Done::DirectDryRun(Box::new(DirectPlan {
            snapshot_gib: snapshot_gib(survey.inventory.footprint, Some(archive_bytes)),
            dir: survey.dir,
            inventory: survey.inventory,
            archive_bytes,
            zone: survey.zone,
            region: survey.region,
        })));
    }
    let job = DirectJob {
        cloud,
        ebs: ebs::connect().await,
        options,
        dir,
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

/// The walk and the zone, before anything is made.
async fn survey(
    cloud: &AwsCloud,
    options: &Options,
    dir: std::path::PathBuf,
    report: &Reporter,
) -> Result<Survey, Error> {
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
    Ok(Survey {
        dir,
        inventory,
        zone,
        region: cloud.region.clone(),
    })
}

struct DirectJob {
    cloud: AwsCloud,
    ebs: ebs::Ebs,
    options: Options,
    dir: std::path::PathBuf,
    report: Reporter,
    run_id: String,
    ledger: Arc<Ledger>,
}

impl DirectJob {
    fn backup_tags(&self, completed: bool) -> Tags {
        let host = hostname();
        let dir = truncate(&self.dir.to_string_lossy(), 255);
        let mut tags = run_tags(&self.run_id);
        tags.extend(
            crate::tags::selection(&self.options.selection)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        tags.extend([
            (key::SOURCE_HOST.to_string(), host.clone()),
            (key::SOURCE_DIR.to_string(), dir.clone()),
            (key::SOURCE_DIR_HASH.to_string(), dir_hash(&self.dir)),
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
        let (cloud, report) = (&self.cloud, &self.report);
        let source = method::Source::new(&self.dir, &self.options.selection);
        let bar = super::progress_bar(0);
        // tar starts with the walk: its first blocks are read and hashed while the walk sizes
        // the snapshot and StartSnapshot answers, instead of after.
        let (aim, aimed) = tokio::sync::watch::channel(None);
        let mut early = Box::pin(direct::upload(&self.ebs, aimed, &source, &bar));
        let begun = async {
            let plan = survey(cloud, &self.options, self.dir.clone(), report).await?;
            let inventory = &plan.inventory;
            // The archive's length is known only at its end; tar adds ~1.5 KiB per entry.
            bar.set_length(inventory.data_bytes + inventory.entries * 1536);
            // Sparse or compressed files can hold more than the footprint says: when their
            // full length could overflow the walk's size, tar sizes the archive first.
            let gib = snapshot_gib(inventory.footprint, None);
            if !dd::archive_fits(inventory.footprint + inventory.unallocated, gib) {
                return Ok((plan, None));
            }
            let target = self.start_snapshot(gib, 1).await?;
            aim.send_replace(Some(target.clone()));
            Ok::<_, Error>((plan, Some(target)))
        };
        let (plan, target) = tokio::select! {
            b = begun => b?,
            // Only a failure ends an upload whose snapshot is not started.
            u = &mut early => return Err(match u {
                Err(e) => e.into(),
                Ok(_) => method::MethodError::Failed("the upload ended before its snapshot was started".into()).into(),
            }),
        };
        let footprint = plan.inventory.footprint;
        let mut attempt = 1;
        let (mut target, mut uploaded) = match target {
            Some(t) => (t, early.await),
            None => {
                drop(early); // its tar goes
                report.step("the tree has sparse or compressed files; sizing the archive");
                self.sized_upload(&source, &bar, footprint, 1, attempt)
                    .await?
            }
        };
        let up = loop {
            match uploaded {
                Ok(up) => break up,
                // The walk's estimate was short (large extended attributes, say): that
                // snapshot goes, tar sizes the archive exactly, and the upload starts again
                // into one it fits.
                Err(method::MethodError::Outgrown) if attempt == 1 => {
                    let (id, gib) = (&target.snapshot, target.capacity_gib);
                    report.step(&format!(
                        "the archive is larger than {id}'s {gib} GiB; sizing it"
                    ));
                    snapshot::discard(cloud, id).await?;
                    self.ledger.forget(&Resource::Snapshot(id.clone()));
                    bar.reset();
                    attempt += 1;
                    (target, uploaded) = self
                        .sized_upload(&source, &bar, footprint, gib + 1, attempt)
                        .await?;
                }
                Err(method::MethodError::Outgrown) => {
                    return Err(Error::from(method::MethodError::Failed(format!(
                        "the archive outgrew the snapshot's {} GiB while it was read (is the directory growing?)",
                        target.capacity_gib
                    ))))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let direct::Target {
            snapshot: snapshot_id,
            since,
            capacity_gib: gib,
        } = target;
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
            _ => Some(
                self.make_volume(&plan.zone, &snapshot_id, gib, &done)
                    .await?,
            ),
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
            size_gib: gib,
            method: Method::Dd,
            instance_type: String::new(),
            zone: plan.zone.clone(),
            region: plan.region,
            seconds: started.elapsed().as_secs_f64(),
            transfer: up.transfer,
            snapshot_id: snapshot_kept.then_some(snapshot_id),
            volume_deleted: volume_id.is_none(),
            leftovers: Vec::new(),
            put_blocks: Some(up.blocks),
        })
    }

    /// tar sizes the archive exactly, then the upload goes into a snapshot it fits, of at least
    /// `floor` GiB.
    async fn sized_upload(
        &self,
        source: &method::Source,
        bar: &indicatif::ProgressBar,
        footprint: u64,
        floor: i32,
        attempt: u32,
    ) -> Result<
        (
            direct::Target,
            Result<direct::Uploaded, method::MethodError>,
        ),
        Error,
    > {
        let bytes = dd::archive_size(source).await?;
        self.report
            .step(&format!("the archive will be {bytes} bytes"));
        bar.set_length(bytes);
        let gib = snapshot_gib(footprint, Some(bytes)).max(floor);
        let target = self.start_snapshot(gib, attempt).await?;
        let up = direct::upload(&self.ebs, target.clone().aim(), source, bar).await;
        Ok((target, up))
    }

    /// StartSnapshot of `gib`, on the ledger the moment EBS answers. The ClientToken is the
    /// run's (one per attempt: a retried call gets the same snapshot, a bigger one a new one).
    async fn start_snapshot(&self, gib: i32, attempt: u32) -> Result<direct::Target, Error> {
        let token = match attempt {
            1 => format!("ec2-backup-{}", self.run_id),
            n => format!("ec2-backup-{}-{n}", self.run_id),
        };
        let (e, t, d) = (
            self.ebs.clone(),
            self.backup_tags(false),
            format!("ec2-backup run {} (direct)", self.run_id),
        );
        let kms = self.options.kms_key_id.clone();
        let since = Instant::now();
        let snapshot = self
            .ledger
            .create(
                async move {
                    e.start(
                        i64::from(gib),
                        &t,
                        &d,
                        &token,
                        kms.as_deref(),
                        SNAPSHOT_TIMEOUT_MINUTES,
                    )
                    .await
                    .map_err(|e| crate::cloud::CloudError::new(e.action, e.message))
                },
                |id: &String| Resource::Snapshot(id.clone()),
            )
            .await?;
        self.report.step(&format!(
            "started {snapshot} ({gib} GiB); uploading the archive"
        ));
        Ok(direct::Target {
            snapshot,
            since,
            capacity_gib: gib,
        })
    }

    /// A volume from the completed snapshot, tagged as the backup, once it is available.
    async fn make_volume(
        &self,
        zone: &str,
        snapshot_id: &str,
        gib: i32,
        done: &Tags,
    ) -> Result<String, Error> {
        let cloud = &self.cloud;
        let mut tags = done.clone();
        tags.push((key::CREATED_VOLUME.into(), "true".into()));
        let (c, zone, snap, gib) = (
            cloud.clone(),
            zone.to_string(),
            snapshot_id.to_string(),
            gib,
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
