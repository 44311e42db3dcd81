//! A backup to read (restore, verify): found by its ID, leased to a helper read-only, its
//! method taken from its tags and checked against what the volume really holds. Shared by
//! the read-side commands, which differ only in what they do with the open backup.

use std::future::Future;

use crate::cloud::aws::{self, AwsCloud};
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
    pub volume: Volume,
    pub method: Method,
    /// dd: the archive's recorded length and SHA-256.
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    /// What it recorded it left out: its exclude set's SHA-256, and --one-file-system.
    pub excludes_sha256: Option<String>,
    pub one_file_system: bool,
}

/// Checks `source` before any cloud call.
pub fn check_id(source: &str) -> Result<(), Error> {
    helper_plan::check_volume_id(source)
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
        let volume = find_volume(&cloud, &region, source).await?;
        helper_plan::check_free(&volume)?;
        let backup = from_tags(volume)?;
        accept(&backup)?;
        let pinned = Pinned {
            zone: backup.volume.zone.clone(),
            volume_id: backup.volume.id.clone(),
        };
        let plan = helper_plan::decide(
            &cloud,
            &region,
            &options,
            extra,
            std::future::ready(Ok(Some(pinned))),
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
        let attached = lease.open(Disk::Existing(backup.volume.clone())).await?;
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
    let result = match result {
        Ok(out) => {
            let handed = opened.lease.hand_back(&opened.attached, None, true);
            guarded(&mut opened.signals, handed).await.map(|()| out)
        }
        Err(e) => Err(e),
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

/// The backup a volume's tags describe; a volume that was never a backup is refused.
fn from_tags(volume: Volume) -> Result<Backup, Error> {
    let method = volume
        .tags
        .get(key::METHOD)
        .and_then(|m| Method::parse(m))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "the volume {} is not an ec2-backup backup (it has no ec2-backup:method tag)",
                volume.id
            ))
        })?;
    let tag = |k: &str| volume.tags.get(k).filter(|v| !v.is_empty()).cloned();
    let (excludes_sha256, one_file_system) = crate::tags::recorded_selection(&volume.tags);
    Ok(Backup {
        excludes_sha256,
        one_file_system,
        method,
        bytes: tag(key::BYTES).and_then(|b| b.parse().ok()),
        sha256: tag(key::SHA256),
        volume,
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
        "the volume {} is tagged as a {} backup but holds {}",
        backup.volume.id,
        backup.method.as_str(),
        content.describe()
    ))
    .into())
}
