//! A backup to read (restore, verify): found by its ID, leased to a helper read-only, its
//! method taken from its tags and checked against what the volume really holds. Shared by
//! the read-side commands, which differ only in what they do with the open backup.
//!
//! A snapshot is read through a temporary volume made from it in the helper's zone: tagged
//! as this run's (so `gc` finds it after a kill -9), marked to go with the helper, and
//! deleted by the lease's cleanup at the end, on failure and on a signal.

use std::future::Future;

use crate::cloud::aws::{self, AwsCloud};
use crate::cloud::snapshot::{valid_snapshot_id, Snapshots};
use crate::cloud::Volume;
use crate::error::{Error, Failure};
use crate::helper::lease::{Attached, Disk, Lease};
use crate::helper::plan::{self as helper_plan, find_volume, input, HelperOptions, Pinned};
use crate::helper::probe::{self, Content};
use crate::method::{Method, MethodError};
use crate::report::Reporter;
use crate::signals::Signals;
use crate::tags::key;

/// What the backup's tags say it holds.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The ID the user named: a volume or a snapshot.
    pub id: String,
    pub source: Source,
    pub method: Method,
    /// dd: the archive's recorded length and SHA-256.
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    /// What it recorded it left out: its exclude set's SHA-256, and --one-file-system.
    pub excludes_sha256: Option<String>,
    pub one_file_system: bool,
}

/// Where the backup is.
#[derive(Debug, Clone)]
pub enum Source {
    Volume(Volume),
    /// A completed snapshot of this size, read through a temporary volume.
    Snapshot {
        size_gib: i32,
    },
}

/// Checks `source` before any cloud call.
pub fn check_id(source: &str) -> Result<(), Error> {
    if source.starts_with("snap-") {
        if valid_snapshot_id(source) {
            return Ok(());
        }
        return Err(Error::Usage(format!(
            "'{source}' is not a snapshot ID (they look like snap-0123456789abcdef0)"
        )));
    }
    helper_plan::check_volume_id(source).map_err(|_| {
        Error::Usage(format!(
            "'{source}' is not a volume or snapshot ID (they look like vol-0123456789abcdef0, snap-0123456789abcdef0)"
        ))
    })
}

/// A backup leased to a helper, checked, ready to read.
pub struct Opened {
    pub lease: Lease<AwsCloud>,
    pub attached: Attached,
    pub backup: Backup,
    pub signals: Signals,
}

/// Looks the backup up, lets `accept` refuse it (before anything is created), leases a
/// helper with it attached, and checks what it holds. A failure or signal on the way unwinds
/// what was made.
pub async fn open(
    source: &str,
    accept: impl FnOnce(&Backup) -> Result<(), Error>,
) -> Result<Opened, Failure> {
    let options = HelperOptions::from_env()?;
    let report = Reporter::new(options.verbose);
    let mut signals =
        Signals::new().map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
    let extra = options.extra_authorized_keys(&report)?;
    let cloud = aws::connect().await.map_err(input)?;
    let region = cloud.region.clone();
    let found = async {
        let backup = find(&cloud, &region, source).await?;
        accept(&backup)?;
        let pinned = match &backup.source {
            Source::Volume(v) => Some(Pinned {
                zone: v.zone.clone(),
                volume_id: v.id.clone(),
            }),
            Source::Snapshot { .. } => None,
        };
        let plan = helper_plan::decide(
            &cloud,
            &region,
            &options,
            extra,
            std::future::ready(Ok(pinned)),
            &report,
        )
        .await?;
        Ok::<_, Error>((backup, plan))
    };
    let (backup, plan) = tokio::select! {
        f = found => f?,
        e = signals.recv() => return Err(e.into()),
    };
    let lease = Lease::new(cloud, options, plan, report)?;
    let opening = async {
        let disk = match &backup.source {
            Source::Volume(v) => Disk::Existing(v.clone()),
            Source::Snapshot { size_gib } => Disk::New {
                gib: *size_gib,
                tags: vec![
                    (key::CREATED_VOLUME.into(), "true".into()),
                    (
                        key::NAME.into(),
                        format!("ec2-backup: temporary copy of {}", backup.id),
                    ),
                ],
                snapshot: Some(backup.id.clone()),
            },
        };
        let attached = lease.open(disk).await?;
        check_content(&lease, &attached, &backup).await?;
        Ok::<_, Error>(attached)
    };
    let opened = guarded(&mut signals, opening).await;
    match opened {
        Ok(attached) => Ok(Opened {
            lease,
            attached,
            backup,
            signals,
        }),
        Err(error) => {
            lease.report.step(&format!("failed: {error}; cleaning up"));
            let leftovers = lease.cleanup(&mut signals).await;
            Err(Failure { error, leftovers })
        }
    }
}

/// Where an archive is read from: a helper's device, or (`--direct` snapshots) the
/// snapshot's blocks through the EBS direct APIs, with no instance.
pub enum Reader<'a> {
    Helper {
        ssh: &'a crate::helper::ssh::Session,
        device: &'a str,
    },
    Blocks {
        ebs: &'a crate::cloud::ebs::Ebs,
        snapshot: &'a str,
    },
}

impl Reader<'_> {
    /// Streams the archive (`bytes` long, if known) into `sink`.
    pub async fn read(
        &self,
        bytes: Option<u64>,
        sink: crate::method::dd::read::Sink,
        progress: &indicatif::ProgressBar,
    ) -> Result<crate::method::dd::read::ReadBack, MethodError> {
        match self {
            Reader::Helper { ssh, device } => {
                crate::method::dd::read::read(ssh, device, bytes, sink, progress).await
            }
            Reader::Blocks { ebs, snapshot } => {
                let bytes = bytes.ok_or_else(|| {
                    MethodError::Failed(format!(
                        "{snapshot} has no recorded length (ec2-backup:bytes): its blocks cannot be cut"
                    ))
                })?;
                crate::method::direct::read::read(ebs, snapshot, bytes, sink, progress).await
            }
        }
    }
}

/// A `--direct` snapshot (tagged `ec2-backup:direct`, dd, completed) is read without any
/// instance: its backup and the EBS client, or None for every other source.
pub async fn direct_snapshot(
    source: &str,
) -> Result<Option<(Backup, crate::cloud::ebs::Ebs, Reporter)>, Error> {
    if !source.starts_with("snap-") {
        return Ok(None);
    }
    let cloud = aws::connect().await.map_err(input)?;
    let Some(snap) = cloud.describe_snapshot(source).await.map_err(input)? else {
        return Ok(None); // the helper path says it does not exist
    };
    let direct = snap.tags.get(key::DIRECT).is_some_and(|d| d == "true");
    if !direct || snap.state != "completed" {
        return Ok(None);
    }
    let size_gib = snap.size_gib.unwrap_or(0);
    let backup = from_tags(
        source,
        &snap.tags,
        "snapshot",
        Source::Snapshot { size_gib },
    )?;
    if backup.method != Method::Dd {
        return Ok(None);
    }
    let report = Reporter::new(crate::report::verbose_from_env());
    report.step(&format!(
        "{source} was written through the EBS direct APIs: reading its blocks, no instance"
    ));
    Ok(Some((backup, crate::cloud::ebs::connect().await, report)))
}

/// Runs `work` unless a signal comes first.
pub async fn guarded<T>(
    signals: &mut Signals,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        r = work => r,
        e = signals.recv() => Err(e),
    }
}

/// Hands the backup's volume back (untouched) and unwinds the lease, whatever `result` is;
/// returns it with what cleanup could not remove.
pub async fn close<T>(
    mut opened: Opened,
    result: Result<T, Error>,
) -> Result<(T, Vec<String>), Failure> {
    let result = match (result, &opened.backup.source) {
        (Ok(out), Source::Volume(_)) => {
            let handed = opened.lease.hand_back(&opened.attached, None, true);
            guarded(&mut opened.signals, handed).await.map(|()| out)
        }
        // A snapshot's temporary volume goes with the rest of the lease.
        (Ok(out), Source::Snapshot { .. }) => Ok(out),
        (Err(e), _) => Err(e),
    };
    if let Err(e) = &result {
        opened
            .lease
            .report
            .step(&format!("failed: {e}; cleaning up"));
    }
    let leftovers = opened.lease.cleanup(&mut opened.signals).await;
    match result {
        Ok(out) => Ok((out, leftovers)),
        Err(error) => Err(Failure { error, leftovers }),
    }
}

/// The backup named `id`: a free volume, or a completed snapshot, that ec2-backup wrote.
async fn find(cloud: &AwsCloud, region: &str, id: &str) -> Result<Backup, Error> {
    if !id.starts_with("snap-") {
        let volume = find_volume(cloud, region, id).await?;
        helper_plan::check_free(&volume)?;
        let tags = volume.tags.clone();
        return from_tags(id, &tags, "volume", Source::Volume(volume));
    }
    let snap = cloud
        .describe_snapshot(id)
        .await
        .map_err(input)?
        .ok_or_else(|| Error::Invalid(format!("the snapshot {id} does not exist in {region}")))?;
    match snap.state.as_str() {
        "completed" => {}
        "pending" => {
            return Err(Error::Invalid(format!(
                "the snapshot {id} is still pending ({}); read it once it is completed",
                snap.progress.as_deref().unwrap_or("0%")
            )))
        }
        other => {
            return Err(Error::Invalid(format!(
                "the snapshot {id} is {other}, not completed"
            )))
        }
    }
    let size_gib = snap
        .size_gib
        .ok_or_else(|| Error::Invalid(format!("EC2 gives no size for the snapshot {id}")))?;
    from_tags(id, &snap.tags, "snapshot", Source::Snapshot { size_gib })
}

/// The backup its tags describe; a volume or snapshot that was never a backup is refused.
fn from_tags(
    id: &str,
    tags: &std::collections::BTreeMap<String, String>,
    kind: &str,
    source: Source,
) -> Result<Backup, Error> {
    let method = tags
        .get(key::METHOD)
        .and_then(|m| Method::parse(m))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "the {kind} {id} is not an ec2-backup backup (it has no ec2-backup:method tag)"
            ))
        })?;
    let tag = |k: &str| tags.get(k).filter(|v| !v.is_empty()).cloned();
    let (excludes_sha256, one_file_system) = crate::tags::recorded_selection(tags);
    Ok(Backup {
        excludes_sha256,
        one_file_system,
        id: id.to_string(),
        source,
        method,
        bytes: tag(key::BYTES).and_then(|b| b.parse().ok()),
        sha256: tag(key::SHA256),
    })
}

/// The volume must hold what its tags say: a tar archive for dd, the tool's ext4 filesystem
/// for rsync (tags can be copied, edited or left behind by an overwrite that failed).
async fn check_content(
    lease: &Lease<AwsCloud>,
    attached: &Attached,
    backup: &Backup,
) -> Result<(), Error> {
    let ssh = lease.session().await?;
    let ssh = &*ssh;
    let content = probe::probe(ssh, &attached.device).await?;
    let ok = match backup.method {
        Method::Dd => content == Content::Tar,
        Method::Rsync => matches!(&content, Content::Filesystem { fstype, .. } if fstype == "ext4"),
    };
    if ok {
        return Ok(());
    }
    Err(MethodError::Failed(format!(
        "{} is tagged as a {} backup but holds {}",
        backup.id,
        backup.method.as_str(),
        content.describe()
    ))
    .into())
}
